"""Probe: what would ``torch.compile`` buy the one-row decode step? (issue 17, int8 at 3x fp32)

moorelm's decode step runs eagerly: ~44 kernels a layer launched from Python, and int8
products through fbgemm's embedding bag. This script writes SmolLM2's (or any Llama-shaped
run's) one-token step as a plain function of tensors (RMS norm, fused q/k/v, RoPE, the KV
cache written in place, grouped-query SDPA over the positions held, SwiGLU, tied head) and
times it eagerly and compiled by inductor (one graph for every cache length, the other
shapes fixed), with the projections in three forms:

    fp32     ``(w * x).sum(-1)``: a reduction inductor fuses into one loop over the weight
    int8     per output channel, symmetric: ``(q.to(fp32) * x).sum(-1) * scale``, the
             int8 read and converted inside that loop (no dequantised copy)
    int8t    the same with the int8 weight stored transposed (in, out): a sum over the
             inputs of x[k] times row k, vectorised along the outputs (embedding-bag order)
    int8g    the same as int8 with a scale per group of 64 inputs (finer, as ``Int8RowsLinear``'s
             64 values a scale): a sum per group, scaled, then summed
    none     products over 8 inputs only: what is left is the step's overhead

next to moorelm's own eager step (``moorelm.load(..., batched=False)``, the layouts of
``generate``: fp32 row-major, int8 ``Int8RowsLinear``), in the same process. The compiled
fp32 step's logits are checked against moorelm's (same tokens, same cache positions).
Nothing here is used by moorelm: it measures whether a compiled decode path would pay.

    python bench/compiled_step.py [--run RUN] [--forms fp32,int8,none] [--cpp-wrapper]

Compiling takes tens of seconds per form on 2 cores (less on a second run: inductor caches
its kernels under /tmp/torchinductor_$USER).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import moorelm
from moorelm.model import rope_tables

GROUP = 64  # inputs a scale for int8g


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per output channel, symmetric absmax/127 (Int8Linear's scheme)."""
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale.squeeze(1).contiguous()


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 with a symmetric scale per ``GROUP`` inputs of each output: q (n, k/G, G), s (n, k/G)."""
    n, k = w.shape
    g = w.view(n, k // GROUP, GROUP)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (g / scale).round().clamp(-127, 127).to(torch.int8), scale.squeeze(-1).contiguous()


class Step:
    """One token through the model as a function of tensors: ``(token (1,), pos (1,), n)``
    -> logits (1, V), keys and values written into this object's cache at ``pos``."""

    def __init__(self, lm, form: str, max_len: int):
        m, c = lm.model, lm.model.config
        if c.pos != "rope" or c.norm != "rmsnorm" or c.mlp != "swiglu" or c.bias:
            raise SystemExit("the probe handles Llama-shaped runs (RoPE, RMS norm, SwiGLU, "
                             "no biases) only")
        self.form, self.c = form, c
        self.H, self.K, self.D, self.E = c.n_head, c.kv_heads, c.head_dim, c.n_embd
        self.hidden = m.blocks[0].mlp.c_fc.out_features

        def prep(w: torch.Tensor):
            w = w.detach().float().contiguous()
            if form == "int8":
                return quantize_rows(w)
            if form == "int8g":
                return quantize_groups(w)
            if form == "int8t":
                q, scale = quantize_rows(w)
                return q.t().contiguous(), scale
            return w[:, :8].contiguous() if form == "none" else w

        self.layers = []
        for b in m.blocks:
            gate_up = torch.cat([b.mlp.c_gate.weight, b.mlp.c_fc.weight])
            ws = [prep(w) for w in (b.attn.c_attn.weight, b.attn.c_proj.weight, gate_up,
                                    b.mlp.c_proj.weight)]
            self.layers.append((b.ln_1.weight.detach(), b.ln_2.weight.detach(), ws))
        self.wte = m.wte.weight.detach()
        self.head = prep(m.lm_head.weight)
        self.ln_f = m.ln_f.weight.detach()
        self.cos, self.sin = rope_tables(self.D, max_len, c.rope_base, c.rope_scaling)
        self.k = [torch.zeros(self.K, max_len, self.D) for _ in m.blocks]
        self.v = [torch.zeros(self.K, max_len, self.D) for _ in m.blocks]

    def lin(self, x: torch.Tensor, w) -> torch.Tensor:
        if self.form == "int8":
            q, scale = w
            return ((q.to(x.dtype) * x).sum(-1) * scale).view(1, -1)
        if self.form == "int8t":
            q, scale = w  # (in, out)
            return ((q.to(x.dtype) * x.view(-1, 1)).sum(0) * scale).view(1, -1)
        if self.form == "int8g":
            q, scale = w
            part = (q.to(x.dtype) * x.view(1, -1, GROUP)).sum(-1)  # (n, k/G)
            return (part * scale).sum(-1).view(1, -1)
        if self.form == "none":
            return x[:, :8] @ w.t()
        return (w * x).sum(-1).view(1, -1)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
        H, K, D, E, eps = self.H, self.K, self.D, self.E, self.c.norm_eps
        x = self.wte.index_select(0, tok)  # (1, E)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # (1, D)
        for (g1, g2, (wqkv, wo, wgu, wd)), kc, vc in zip(self.layers, self.k, self.v):
            qkv = self.lin(torch.rms_norm(x, (E,), g1, eps), wqkv).view(H + 2 * K, D)
            qk, v = qkv.split([H + K, K], 0)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
            q, k = qk.split([H, K], 0)
            kc.index_copy_(1, pos, k.view(K, 1, D))
            vc.index_copy_(1, pos, v.view(K, 1, D))
            y = F.scaled_dot_product_attention(q.view(1, H, 1, D), kc[None, :, :n],
                                               vc[None, :, :n], enable_gqa=True)
            x = x + self.lin(y.view(1, H * D), wo)
            gu = self.lin(torch.rms_norm(x, (E,), g2, eps), wgu)
            x = x + self.lin(F.silu(gu[:, : self.hidden]) * gu[:, self.hidden:], wd)
        return self.lin(torch.rms_norm(x, (E,), self.ln_f, eps), self.head)


@torch.no_grad()
def time_probe(fn, start: int, steps: int, rounds: int) -> tuple[float, list[float]]:
    """(seconds of the first two calls, ms a step in each round) for ``fn`` at positions from
    ``start`` on."""
    tok = torch.tensor([42])
    t0 = time.perf_counter()
    fn(tok, torch.tensor([start]), start + 1)
    fn(tok, torch.tensor([start + 1]), start + 2)  # compiled: the second length recompiles
    first = time.perf_counter() - t0  # with the length symbolic, which then serves them all
    out, p = [], start + 2
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(tok, torch.tensor([p]), p + 1)
            p += 1
        out.append((time.perf_counter() - t0) / steps * 1e3)
    return first, out


@torch.no_grad()
def time_moorelm(lm, start: int, steps: int, rounds: int) -> list[float]:
    """ms a step of moorelm's own eager decode (its KV cache, its decode plan)."""
    model = lm.model
    cache = model.new_cache(1, start + steps * rounds + 2)
    prompt = torch.full((1, start), 42)
    model(prompt, kv_cache=cache, last_only=True)
    tok = torch.tensor([[42]])
    model(tok, kv_cache=cache)  # binds the decode plan
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            model(tok, kv_cache=cache)
        out.append((time.perf_counter() - t0) / steps * 1e3)
    return out


@torch.no_grad()
def check_logits(lm, step: Step, start: int) -> float:
    """max |logit difference| between moorelm's forward and the probe's eager fp32 step after
    the same ``start`` tokens (the probe's cache filled one token at a time)."""
    ids = torch.randint(0, lm.model.config.vocab_size, (start,))
    for p in range(start):
        last = step(ids[p : p + 1], torch.tensor([p]), p + 1)
    ref, _ = lm.model(ids[None], last_only=True)
    return float((ref[0, -1] - last[0]).abs().max())


def fmt(ms: list[float]) -> str:
    return f"{min(ms):6.2f}-{max(ms):6.2f} ms ({1e3 / min(ms):5.1f} tok/s best)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="smollm2", help="run folder (default: the bundled SmolLM2)")
    ap.add_argument("--forms", default="fp32,int8,none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--start", type=int, default=100, help="cache positions held (default 100)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpp-wrapper", action="store_true",
                    help="inductor's C++ wrapper (the graph's calls from C++, not Python)")
    args = ap.parse_args()
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if bad := [f for f in forms if f not in ("fp32", "int8", "int8t", "int8g", "none")]:
        raise SystemExit(f"unknown form(s) {bad}; choose from fp32, int8, int8t, int8g, none")
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = args.cpp_wrapper
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, load {load:.1f}, "
          f"cpp_wrapper {args.cpp_wrapper}, {args.start} cached positions")
    max_len = args.start + args.steps * args.rounds + 8
    lm = moorelm.load(args.run, batched=False)
    print(f"moorelm eager fp32 (row-major):  {fmt(time_moorelm(lm, args.start, args.steps, args.rounds))}")
    lm8 = moorelm.load(args.run, batched=False, weights="int8")
    print(f"moorelm eager int8 (rows of 64): {fmt(time_moorelm(lm8, args.start, args.steps, args.rounds))}")
    del lm8
    ref = Step(lm, "fp32", max_len)
    print(f"probe fp32 vs moorelm's logits after 24 tokens: max |diff| "
          f"{check_logits(lm, ref, 24):.2e}")
    del ref
    for form in forms:
        step = Step(lm, form, max_len)
        _, eager = time_probe(step, args.start, args.steps, args.rounds)
        # shapes specialised except the cache length (dynamo makes it symbolic when it
        # changes): with dynamic=True the weights' shapes are symbolic too, and inductor's
        # loops over them ran at about half the speed (int8 18-24 ms a step against 10-11)
        compiled = torch.compile(step.__call__, dynamic=None)
        first, ms = time_probe(compiled, args.start, args.steps, args.rounds)
        print(f"probe {form:4s} eager {fmt(eager)}   compiled {fmt(ms)}  (first two calls {first:.0f} s)",
              flush=True)
        del step, compiled
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
