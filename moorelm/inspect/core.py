"""Looking inside one forward pass: per-token probabilities, attention weights, logit lens.

``trace(model, ids)`` runs the model's computation over one sequence again, block by block,
with attention written out explicitly (scores, causal mask, softmax, weighted values) so its
weights can be kept; the training and decoding paths (``F.scaled_dot_product_attention``,
the flat decode path) are not touched. ``inspect(model, tokenizer, prompt, ...)`` builds on
it: optionally continues the prompt first, then scores every token and returns an
``Inspection`` (see ``moorelm.inspect.render`` for the terminal, HTML and PNG views).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moorelm.errors import MoorelmError
from moorelm.model import GPT, norm_rotate
from moorelm.tokenizer import Tokenizer

ATTENTION_BUDGET = 1 << 27  # attention weights kept at most (floats); pick layers beyond it


@dataclass
class Trace:
    """What one pass over a sequence of T tokens computed.

    ``logits`` (T, V) the model's output; ``residuals`` (L + 1) x (T, C): the residual
    stream after the embeddings and after each block; ``attention`` layer -> (H, T, T) the
    weights each query head gave each key (row t: query position t; GQA heads that share
    keys each have their own row); ``values`` layer -> (K, T, D), kept on request (tests
    rebuild the attention output from them); ``attn_out`` layer -> (T, C) the attention
    sub-layer's output (after its projection), with ``values``."""

    logits: torch.Tensor
    residuals: list[torch.Tensor]
    attention: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)


def _attention(attn, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention sub-layer on x (1, T, C) written out -> (output (1, T, C), weights
    (H, T, T), values (K, T, D)). Same projections, norm and rotation as ``Attention``."""
    B, T, _ = x.shape
    cfg = attn.cfg
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    qk, v = attn.c_attn(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)
    q, k = norm_rotate(qk, rope, cfg.qk_norm, attn.qk_eps, attn.qk_gains()).split([H, K], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
    # grouped-query attention: query head h reads key/value head h // (H / K), as SDPA's
    # enable_gqa does
    kq = k.repeat_interleave(H // K, dim=1).float()  # (B, H, T, D)
    vq = v.repeat_interleave(H // K, dim=1).float()
    scores = q.float() @ kq.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = (weights @ vq).to(x.dtype)  # (B, H, T, D)
    out = attn.c_proj(y.transpose(1, 2).reshape(B, T, H * D))
    return out, weights[0], v[0]


@torch.no_grad()
def trace(model: GPT, ids: Sequence[int] | torch.Tensor, layers: Sequence[int] | None = None,
          keep_values: bool = False) -> Trace:
    """One sequence (T,) through ``model`` with its attention weights kept (for ``layers``,
    default all). T must fit the context window."""
    cfg = model.config
    idx = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long)
    idx = idx.reshape(1, -1).to(model.wte.weight.device)  # (1, T)
    T = idx.shape[1]
    if T == 0:
        raise MoorelmError("nothing to inspect: the prompt has no tokens")
    if T > cfg.seq_len:
        raise MoorelmError(f"{T} tokens do not fit the context window of {cfg.seq_len}")
    keep = set(range(cfg.n_layer) if layers is None else layers)
    was_training = model.training
    model.eval()
    try:
        pos = torch.arange(T, device=idx.device)
        x = model.wte(idx)  # (1, T, C)
        if model.wpe is not None:
            x = x + model.wpe(pos)[None]
        rope = None
        if cfg.pos == "rope":
            rope = (model.rope_cos[:T, None], model.rope_sin[:T, None])  # (T, 1, D)
        residuals, attention, values, outs = [x[0]], {}, {}, {}
        for i, block in enumerate(model.blocks):
            out, weights, v = _attention(block.attn, block.ln_1(x), rope)
            if i in keep:
                attention[i] = weights.cpu()
            if keep_values:
                values[i], outs[i] = v.cpu(), out[0].cpu()
            x = x + out
            x = x + block.mlp(block.ln_2(x))
            residuals.append(x[0])
        logits = model._logits(model.ln_f(x))[0].float()  # (T, V)
    finally:
        model.train(was_training)
    return Trace(logits, residuals, attention, values, outs)


# ----------------------------------------------------------------------------- the result


@dataclass
class TokenScore:
    """One token of the inspected text: ``logprob`` and ``rank`` (1 = the model's first
    choice) of this token given the ones before it (None for the first token), and the
    ``top`` alternatives there as (text, id, log-probability)."""

    id: int
    text: str
    generated: bool
    logprob: float | None = None
    rank: int | None = None
    top: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)

    @property
    def surprisal_bits(self) -> float | None:
        return None if self.logprob is None else -self.logprob / math.log(2)


@dataclass
class Inspection:
    """What ``inspect`` found, as plain data.

    ``tokens``: every token (prompt, then any continuation) with its score; ``next_top``:
    the alternatives after the last token. ``attention``: layer -> (H, T, T) weights (kept
    layers only). Logit lens, one row per residual stream (0: the embeddings, l: after block
    l; the last row is the model's own output) and one column per position:
    ``lens_ids`` (L + 1, T) the most likely next token read through the final norm and head,
    ``lens_probs`` its probability, ``lens_final`` the probability given to the model's
    final choice there. ``truncated``: prompt tokens dropped to fit the context window.
    """

    tokens: list[TokenScore]
    next_top: list[tuple[str, int, float]]
    attention: dict[int, torch.Tensor]
    lens_ids: torch.Tensor
    lens_probs: torch.Tensor
    lens_final: torch.Tensor
    n_layer: int
    n_head: int
    n_kv_head: int
    prompt_tokens: int
    truncated: int = 0
    lens_texts: list[list[str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def check_layer(self, layer: int | None) -> None:
        if layer is not None and layer not in range(self.n_layer):
            raise MoorelmError(f"layer {layer} does not exist; this model has layers "
                               f"0..{self.n_layer - 1}")
        if layer is not None and layer not in self.attention:
            raise MoorelmError(f"layer {layer}'s attention was not kept; inspect it with "
                               f"layers including {layer}")

    def check_head(self, head: int | None) -> None:
        if head is not None and head not in range(self.n_head):
            raise MoorelmError(f"head {head} does not exist; this model has query heads "
                               f"0..{self.n_head - 1}")

    def attention_map(self, layer: int, head: int | None = None) -> torch.Tensor:
        """(T, T) weights of one query head of ``layer``, or their mean over heads."""
        self.check_layer(layer)
        self.check_head(head)
        w = self.attention[layer]
        return w.mean(dim=0) if head is None else w[head]

    def to_dict(self, attention: bool = False) -> dict:
        """JSON-ready: tokens with scores, the logit lens, and (optionally) attention."""
        out = {
            "tokens": [{"id": t.id, "text": t.text, "generated": t.generated,
                        "logprob": t.logprob, "rank": t.rank,
                        "top": [{"text": s, "id": i, "logprob": lp} for s, i, lp in t.top]}
                       for t in self.tokens],
            "next_top": [{"text": s, "id": i, "logprob": lp} for s, i, lp in self.next_top],
            "n_layer": self.n_layer, "n_head": self.n_head, "n_kv_head": self.n_kv_head,
            "prompt_tokens": self.prompt_tokens, "truncated": self.truncated,
            "lens": {"texts": self.lens_texts, "probs": _rounded(self.lens_probs),
                     "final": _rounded(self.lens_final)},
        }
        if attention:
            out["attention"] = {str(layer): _rounded(w) for layer, w in self.attention.items()}
        return out


def _rounded(t: torch.Tensor, digits: int = 4):
    return torch.round(t.float(), decimals=digits).tolist()


def token_text(tokenizer: Tokenizer, tok: int) -> str:
    """A token as text; one that is only part of a character reads ``bytes:\\xNN``."""
    text = tokenizer.decode([tok])
    if "\ufffd" in text:
        raw = tokenizer.piece_bytes(tok)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def _top(lp: torch.Tensor, k: int, tokenizer: Tokenizer, texts: dict) -> list[tuple[str, int, float]]:
    if k == 0:
        return []
    values, ids = torch.topk(lp, min(k, lp.shape[-1]))
    out = []
    for i, v in zip(ids.tolist(), values.tolist()):
        if i not in texts:
            texts[i] = token_text(tokenizer, i)
        out.append((texts[i], i, v))
    return out


@torch.no_grad()
def inspect(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int],
            max_new_tokens: int = 0, top_k: int = 5, temperature: float = 0.0,
            seed: int | None = None, layers: Sequence[int] | None = None,
            truncate: bool = False, stop_at_eot: bool = True, lens: bool = True) -> Inspection:
    """Score every token of ``prompt`` (text or token ids) and of a continuation of
    ``max_new_tokens`` tokens (greedy unless ``temperature``), keep the attention of
    ``layers`` (default all) and read the logit lens.

    A prompt that with the continuation does not fit the context window raises
    MoorelmError, unless ``truncate`` keeps its last tokens. ``lens=False`` skips the logit
    lens (its tensors are then empty).
    """
    cfg = model.config
    if not isinstance(top_k, int) or top_k < 0:
        raise MoorelmError(f"top-k must be an integer >= 0, got {top_k}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise MoorelmError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens}")
    for layer in layers or ():
        if layer not in range(cfg.n_layer):
            raise MoorelmError(f"layer {layer} does not exist; this model has layers "
                               f"0..{cfg.n_layer - 1}")
    ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise MoorelmError("the prompt is empty; give some text to inspect")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise MoorelmError(f"token id {bad[0]} is not in the vocabulary (0..{cfg.vocab_size - 1})")
    room = cfg.seq_len - max_new_tokens
    if room < 1:
        raise MoorelmError(f"max-new-tokens {max_new_tokens} leaves no room for the prompt in "
                           f"the context window of {cfg.seq_len} tokens")
    truncated = 0
    if len(ids) > room:
        if not truncate:
            raise MoorelmError(
                f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that "
                f"exceeds the context window of {cfg.seq_len} tokens; shorten it or truncate "
                f"it to its last {room} tokens (--truncate, truncate=True)")
        truncated = len(ids) - room
        ids = ids[-room:]
    n_prompt = len(ids)
    if max_new_tokens:
        ids += _continue(model, ids, max_new_tokens, temperature, seed,
                         tokenizer.eot_id if stop_at_eot else None)
    kept = list(range(cfg.n_layer)) if layers is None else sorted(set(layers))
    T = len(ids)
    if len(kept) * cfg.n_head * T * T > ATTENTION_BUDGET:
        raise MoorelmError(
            f"the attention of {len(kept)} layers x {cfg.n_head} heads over {T} tokens is too "
            "much to keep; choose layers (--layer) or a shorter prompt")
    tr = trace(model, ids, kept)
    lp = torch.log_softmax(tr.logits, dim=-1).cpu()  # (T, V)
    texts: dict[int, str] = {}
    tokens = []
    for t, tok in enumerate(ids):
        if tok not in texts:
            texts[tok] = token_text(tokenizer, tok)
        score = TokenScore(tok, texts[tok], t >= n_prompt)
        if t > 0:
            row = lp[t - 1]
            score.logprob = float(row[tok])
            score.rank = 1 + int((row > row[tok]).sum())
            score.top = _top(row, top_k, tokenizer, texts)
        tokens.append(score)
    if lens:
        lens_ids, lens_probs, lens_final = _lens(model, tr)
    else:
        lens_ids = torch.zeros(0, T, dtype=torch.long)
        lens_probs = lens_final = torch.zeros(0, T)
    lens_texts = []
    for row in lens_ids.tolist():
        for i in row:
            if i not in texts:
                texts[i] = token_text(tokenizer, i)
        lens_texts.append([texts[i] for i in row])
    return Inspection(tokens, _top(lp[-1], top_k, tokenizer, texts), tr.attention, lens_ids,
                      lens_probs, lens_final, cfg.n_layer, cfg.n_head, cfg.kv_heads, n_prompt,
                      truncated, lens_texts)


@torch.no_grad()
def _continue(model: GPT, ids: list[int], n: int, temperature: float, seed: int | None,
              eot: int | None) -> list[int]:
    """Up to ``n`` tokens after ``ids`` through the KV cache: greedy, or sampled from the
    softmax at ``temperature`` (seeded). Plain on purpose: ``moorelm.generate`` (which
    builds on this package's layer) has the full sampler."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise MoorelmError(f"temperature must be >= 0 and finite, got {temperature!r}")
    device = model.wte.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1)
        logits, _ = model(torch.tensor([ids], device=device), kv_cache=cache, last_only=True)
        out: list[int] = []
        for _ in range(n):
            last = logits[0, -1].float()  # (V,)
            if temperature < 1e-4:
                tok = int(last.argmax())
            else:
                tok = int(torch.multinomial((last / temperature).softmax(-1), 1, generator=gen))
            out.append(tok)
            if tok == eot:
                break
            logits, _ = model(torch.tensor([[tok]], device=device), kv_cache=cache)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def _lens(model: GPT, tr: Trace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each residual stream through the final norm and head -> (top ids, their
    probabilities, the probability of the model's final choice), each (L + 1, T). The last
    row is the output itself (its residual went through the norm in the model already)."""
    final = tr.logits.argmax(dim=-1)  # (T,)
    ids, probs, at_final = [], [], []
    for i, r in enumerate(tr.residuals):
        logits = tr.logits if i == len(tr.residuals) - 1 else model._logits(model.ln_f(r)).float()
        p = logits.softmax(dim=-1)  # (T, V)
        top, arg = p.max(dim=-1)
        ids.append(arg.cpu())
        probs.append(top.cpu())
        at_final.append(p.gather(-1, final[:, None])[:, 0].cpu())
    return torch.stack(ids), torch.stack(probs), torch.stack(at_final)
