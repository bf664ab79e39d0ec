"""Benchmark: what structured output costs per token on CPU, and which grammar library to use.

    python bench/structured_overhead.py [--smollm2 RUN] [--steps 48] [--threads 2]

Two measurements, each at batch 1 and batch 32:

1. **The libraries alone** (xgrammar, lm-format-enforcer): B rows walk through a JSON schema
   (an array of objects with a bounded string, an integer and an enum list, with more items
   required than the walk can write, so no row finishes early) on the same seeded random
   logits; each step computes every row's allowed-token mask, applies it to the (B, V)
   logits and advances each row by its sampled token. Only that mask work is timed (not the
   logits or the draw). Both libraries get the run's vocabulary as moorelm sees it
   (``Tokenizer.piece_bytes``); lm-format-enforcer, which works on characters, gets each
   token's bytes decoded as its transformers integration does.
2. **moorelm's engine** (xgrammar, ``moorelm.grammar``): the same B rows of one model
   decoded with and without the grammar (``inference.Engine``, temperature 1, fixed
   length); the difference per generated token is the real overhead.

Setups: a tiny random model on a char-level vocabulary of a few hundred tokens, and, with
``--smollm2 RUN`` (``moorelm import smollm2 RUN``), SmolLM2-135M with its 49,152-token
vocabulary (the vocabulary is what mask cost depends on). Times are CPU time of this process
(all threads), the best of two interleaved runs, so that other jobs on a shared machine count
as little as they can; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads do not burn CPU time
import torch  # noqa: E402

# CPU seconds of this process (all its threads): on a shared machine wall time measures the
# other jobs as much as this one, CPU time only this one's work
clock = time.process_time

SCHEMA = {"type": "array", "minItems": 100000, "items": {
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                 "maxItems": 3}},
    "required": ["name", "age", "tags"]}}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class XGrammarWalk:
    """B rows of xgrammar matchers (what moorelm.grammar does, timed in pieces)."""

    name = "xgrammar"

    def __init__(self, tok, V: int, B: int, stop: int):
        from moorelm.grammar import Grammars

        t0 = clock()
        grammar = Grammars(tok, V, [stop]).compile(SCHEMA)
        self.compile_s = clock() - t0
        self.states = [grammar.state() for _ in range(B)]

    def mask(self, logits: torch.Tensor) -> None:
        from moorelm.grammar import apply_grammars

        apply_grammars(logits, range(len(self.states)), self.states)

    def advance(self, tokens: list[int]) -> None:
        for st, t in zip(self.states, tokens):
            assert st.push(t)


class EnforcerWalk:
    """B rows of lm-format-enforcer TokenEnforcers (bitmask mode)."""

    name = "lm-format-enforcer"

    def __init__(self, tok, V: int, B: int, stop: int):
        import xgrammar as xgr
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

        self._xgr = xgr
        specials = set(tok.hf.get_added_tokens_decoder())
        t0 = clock()
        regular = [(t, tok.piece_bytes(t).decode("utf-8", errors="replace"), False)
                   for t in range(min(V, tok.vocab_size)) if t not in specials]
        data = TokenEnforcerTokenizerData(
            regular, lambda ids: tok.decode(ids).rstrip("\ufffd"), stop, True, V)
        self.enforcers = [TokenEnforcer(data, JsonSchemaParser(SCHEMA)) for _ in range(B)]
        self.compile_s = clock() - t0
        self.outputs: list[list[int]] = [[] for _ in range(B)]
        self.V = V

    def mask(self, logits: torch.Tensor) -> None:
        B = logits.shape[0]
        bits = torch.empty(B, (self.V + 31) // 32, dtype=torch.int32)
        for i, (enf, out) in enumerate(zip(self.enforcers, self.outputs)):
            bits[i] = enf.get_allowed_tokens(out).allowed_tokens
        self._xgr.apply_token_bitmask_inplace(logits, bits, vocab_size=self.V)

    def advance(self, tokens: list[int]) -> None:
        for out, t in zip(self.outputs, tokens):
            out.append(t)  # the enforcer advances on its next get_allowed_tokens


def walk_cost(cls, tok, V: int, B: int, steps: int, stop: int) -> tuple[float, float]:
    """-> (milliseconds of mask work per step, set-up seconds) for B rows over ``steps``."""
    walk = cls(tok, V, B, stop)
    gen = torch.Generator().manual_seed(0)
    quote = [t for t in range(min(V, tok.vocab_size)) if tok.piece_bytes(t) == b'"']
    spent = 0.0
    for _ in range(steps):
        logits = torch.randn(B, V, generator=gen)
        logits[:, quote] += 4.0  # keep strings short, as a trained model would
        t0 = clock()
        walk.mask(logits)
        spent += clock() - t0
        tokens = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0].tolist()
        t0 = clock()
        walk.advance(tokens)
        spent += clock() - t0
    return 1000 * spent / steps, walk.compile_s


class GrammarTimer:
    """CPU time the engine's thread spends in grammar work: ``apply_grammars`` (the masks)
    and ``GrammarState.push`` (advancing), wrapped for the duration of a ``with``."""

    def __init__(self):
        self.spent = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent += time.thread_time() - t0
        return timed

    def __enter__(self):
        import moorelm.inference.sampler as sampler
        from moorelm.grammar import GrammarState

        self._saved = sampler.apply_grammars, GrammarState.push
        sampler.apply_grammars = self.wrap(sampler.apply_grammars)
        GrammarState.push = self.wrap(GrammarState.push)
        return self

    def __exit__(self, *exc):
        import moorelm.inference.sampler as sampler
        from moorelm.grammar import GrammarState

        sampler.apply_grammars, GrammarState.push = self._saved


def engine_cost(model, tok, B: int, steps: int) -> tuple[float, float, float]:
    """-> (ms per step plain, ms per step with the grammar, ms of grammar work per step
    inside the engine) of moorelm's engine, B rows."""
    from moorelm.generate import SamplingParams
    from moorelm.inference.engine import Engine
    from moorelm.inference.sequence import Request

    engine = Engine(model, tok, max_batch=max(B, 1), threads=torch.get_num_threads()).start()
    try:
        prompt = (tuple(tok.encode("Some JSON: ")),)
        grammar = engine.compile_grammar(SCHEMA)
        out, inside = [], []
        for g in (None, grammar) * 3:  # interleaved: the load drifts
            params = SamplingParams(temperature=1.0, max_new_tokens=steps, seed=1)
            req = Request(prompt, params, n=B, stop_at_eot=False, grammar=g)
            engine.generate(Request(prompt, SamplingParams(max_new_tokens=2), n=B))  # warm
            with GrammarTimer() as timer:
                t0 = clock()
                events = engine.generate(req)
                spent = clock() - t0
            assert all(len(ev) == steps for ev in events), "a row ended early"
            out.append(1000 * spent / steps)
            if g is not None:
                inside.append(1000 * timer.spent / steps)
        return min(out[0::2]), min(out[1::2]), min(inside)
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", default=None, help="a run folder of SmolLM2 (moorelm import)")
    ap.add_argument("--steps", type=int, default=48, help="tokens per row per measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--skip-enforcer-at", type=int, default=10**9,
                    help="skip lm-format-enforcer above this vocabulary size (it is slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moorelm.config import ModelConfig
    from moorelm.model import GPT
    from moorelm.tokenizer import Tokenizer

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    text = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 20
            + '{"name": "x", "age": 12, "tags": ["red", "green", "blue"]}\n')
    tok = Tokenizer.train([text], "char")
    torch.manual_seed(0)
    tiny = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, seq_len=512,
                           vocab_size=tok.vocab_size)).eval()
    setups = [("tiny (char)", tiny, tok)]
    if args.smollm2:
        import moorelm

        lm = moorelm.load(args.smollm2)
        setups.append(("SmolLM2-135M", lm.model, lm.tokenizer))
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name, model, tk in setups:
        V = model.config.vocab_size
        for B in batches:
            plain, constrained, inside = engine_cost(model, tk, B, args.steps)
            line = {"setup": name, "V": V, "B": B, "plain": plain, "engine": constrained,
                    "inside": inside}
            for cls in (XGrammarWalk, EnforcerWalk):
                if cls is EnforcerWalk and V > args.skip_enforcer_at:
                    continue
                ms, setup_s = walk_cost(cls, tk, V, B, args.steps, tk.eot_id)
                line[cls.name] = (ms, setup_s)
            rows.append(line)
            print(_row(line), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def _row(r: dict) -> str:
    per = r["B"]
    parts = [f"{r['setup']:<13} V={r['V']:<6} B={r['B']:<3}",
             f"plain step {r['plain']:8.2f} ms",
             f"with grammar {r['engine']:8.2f} ms (difference {r['engine'] - r['plain']:+7.2f})",
             f"grammar work in it {r['inside']:7.3f} ms/step = {r['inside'] / per:6.3f} "
             f"ms/token ({100 * r['inside'] / r['plain']:4.1f}% of a plain step)"]
    for lib in ("xgrammar", "lm-format-enforcer"):
        if lib in r:
            ms, setup_s = r[lib]
            parts.append(f"{lib}: {ms / per:8.3f} ms/token (set-up {setup_s:.2f} s)")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
