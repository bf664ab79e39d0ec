"""``POST /v1/inspect`` (a moorelm extension): per-token probabilities of a text and the
attention of one layer, from ``moorelm.inspect``. The app runs requests one at a time on
the engine's thread, between two decode steps (``Engine.run_job``), on the engine's model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from moorelm.inference.engine import Engine
from moorelm.inspect import inspect
from moorelm.serve.schema import ApiError, InspectRequest, checked_text


def inspection(body: InspectRequest, engine: Engine, model_name: str,
               token_text: Callable[[int], str], lock: threading.Lock) -> dict:
    """The answer to ``body`` on ``engine``'s model: scores of every token, and the
    attention asked for (tokens spelled by ``token_text``; ``lock`` held while computing)."""
    model = engine.runner.model
    cfg = model.config
    if isinstance(body.prompt, str):
        ids = engine.tokenizer.encode(checked_text(body.prompt, "prompt"))
    else:
        ids = list(body.prompt)
    if not ids:
        raise ApiError(400, "prompt is empty; send some text to inspect", "prompt")
    bad = [t for t in ids if not 0 <= t < engine.token_vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} in the prompt is not in the vocabulary "
                       f"(ids 0..{engine.token_vocab - 1})", "prompt")
    if len(ids) > engine.seq_len:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, more than this model's "
                       f"context window of {engine.seq_len}; shorten it", "prompt",
                       "context_length_exceeded")
    layer = cfg.n_layer - 1 if body.layer is None else body.layer
    layer = layer + cfg.n_layer if layer < 0 else layer
    if not 0 <= layer < cfg.n_layer:
        raise ApiError(400, f"layer {body.layer} does not exist; this model has layers "
                       f"0..{cfg.n_layer - 1}", "layer")
    if body.head is not None and body.head >= cfg.n_head:
        raise ApiError(400, f"head {body.head} does not exist; this model has query "
                       f"heads 0..{cfg.n_head - 1}", "head")
    position = body.position
    if position is not None:
        position = position + len(ids) if position < 0 else position
        if not 0 <= position < len(ids):
            raise ApiError(400, f"position {body.position} is outside the prompt's "
                           f"{len(ids)} tokens", "position")
    with lock:
        result = inspect(model, engine.tokenizer, ids, top_k=body.top_logprobs,
                         layers=[layer] if body.attention else [], lens=False)
    tokens = [{"id": t.id, "token": token_text(t.id), "logprob": t.logprob,
               "rank": t.rank,
               "top_logprobs": [{"token": token_text(i), "id": i, "logprob": lp}
                                for _, i, lp in t.top]} for t in result.tokens]
    out = {"object": "inspection", "model": model_name, "tokens": tokens,
           "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.kv_heads}
    if body.attention:
        w = result.attention_map(layer, body.head)  # (T, T)
        if position is not None:
            w = w[position]
        out["attention"] = {"layer": layer, "head": body.head, "position": position,
                            "weights": torch.round(w, decimals=5).tolist()}
    return out
