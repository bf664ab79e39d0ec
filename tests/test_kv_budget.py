"""The serving KV cache is sized by a memory budget, not by the model's context x slots."""

from __future__ import annotations

import pytest
import torch

from moorelm.cli import main
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.generate import SamplingParams
from moorelm.inference.engine import Engine
from moorelm.inference.limits import KV_MEMORY, RequestError, context_for_budget, kv_bytes_per_token
from moorelm.inference.sequence import Request
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

# SmolLM2-135M's shape: 30 layers, 9 query / 3 key-value heads of 64, an 8k context
SMOL = ModelConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, seq_len=8192, vocab_size=49152,
                   pos="rope", norm="rmsnorm", mlp="swiglu")


def test_an_8k_model_does_not_reserve_its_whole_context_per_slot():
    """16 slots of SmolLM2 at 8,192 positions would be 5.6 GiB of fp32 keys and values; the
    default budget (2 GiB) gives each slot what fits, and the cache stays within it."""
    full = 16 * SMOL.seq_len * kv_bytes_per_token(SMOL)
    assert full > 5 * 2**30
    ctx = context_for_budget(SMOL, 16)
    assert 2 <= ctx < SMOL.seq_len
    assert 16 * ctx * kv_bytes_per_token(SMOL) <= KV_MEMORY
    assert context_for_budget(SMOL, 1) == SMOL.seq_len  # one slot: the whole window fits
    assert context_for_budget(SMOL, 16, max_seq_len=512) == 512
    assert context_for_budget(SMOL, 16, kv_memory=2**40) == SMOL.seq_len


def test_a_budget_that_cannot_hold_one_request_is_one_line():
    """A budget below two positions per slot, a non-positive budget, or a max sequence length
    below 2 is refused in one line, before anything is allocated."""
    for kwargs in ({"kv_memory": 1000}, {"kv_memory": 0}, {"max_seq_len": 1}):
        with pytest.raises(MoorelmError) as e:
            context_for_budget(SMOL, 16, **kwargs)
        assert "\n" not in str(e.value)


def test_the_engine_serves_the_window_its_budget_holds():
    """An engine whose budget holds 40 positions per slot allocates 40 and refuses a request
    that needs more, naming the window; one that fits is served."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=512, vocab_size=tok.vocab_size)
    model = GPT(cfg).eval()
    budget = 4 * 40 * kv_bytes_per_token(cfg)
    eng = Engine(model, tok, max_batch=4, kv_memory=budget)
    assert eng.seq_len == 40 and eng.kv_cache_bytes == budget
    eng.start()
    try:
        assert eng.runner.cache.max_len == 40
        prompt = tuple(tok.encode("ROMEO:"))
        with pytest.raises(RequestError, match="context window of 40"):
            eng.submit(Request((prompt,), SamplingParams(max_new_tokens=40, temperature=0.0)))
        events = eng.generate(Request((prompt,), SamplingParams(max_new_tokens=8,
                                                                temperature=0.0)))
        assert sum(len(batch) for batch in events) >= 1
    finally:
        eng.stop()


@pytest.mark.parametrize("flags", [["--kv-memory", "12 parsecs"], ["--kv-memory", "0"],
                                   ["--max-seq-len", "1"]])
def test_serve_refuses_bad_budget_flags(tiny_run, flags, capsys):
    """Bad --kv-memory / --max-seq-len values exit 2 with one line, before loading a model."""
    assert main(["serve", str(tiny_run), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moorelm: error:") and len(err.splitlines()) == 1, err
