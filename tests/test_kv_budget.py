"""The serving KV cache is sized by a memory budget, not by the model's context x slots: on a
CPU its memory follows the tokens held, and the scheduler keeps them within the budget."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import moorelm
from moorelm.cli import main
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.generate import SamplingParams
from moorelm.inference.engine import Engine
from moorelm.inference.limits import (
    KV_MEMORY,
    MAX_SLOTS,
    RESERVED_SLOTS,
    RequestError,
    kv_bytes_per_token,
    kv_dtype_of,
    plan_kv,
)
from moorelm.inference.sequence import Request
from moorelm.model import GPT, KVCache
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

# SmolLM2-135M's shape: 30 layers, 9 query / 3 key-value heads of 64, an 8k context
SMOL = ModelConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, seq_len=8192, vocab_size=49152,
                   pos="rope", norm="rmsnorm", mlp="swiglu")


def test_an_8k_model_does_not_reserve_its_whole_context_per_slot():
    """On a GPU (reserved up front) 16 slots of SmolLM2 at 8,192 positions would be 5.6 GiB
    of fp32 keys and values: the default budget (2 GiB) gives each slot its share. On a CPU
    (memory as used) every one of 64 slots may use the whole window, and the budget bounds
    the positions held by all of them together."""
    per = kv_bytes_per_token(SMOL)
    assert RESERVED_SLOTS * SMOL.seq_len * per > 5 * 2**30
    gpu = plan_kv(SMOL, "cuda")
    assert gpu.slots == RESERVED_SLOTS and not gpu.lazy
    assert 2 <= gpu.context < SMOL.seq_len
    assert gpu.token_budget == gpu.slots * gpu.context and gpu.token_budget * per <= KV_MEMORY
    assert plan_kv(SMOL, "cuda", max_batch=1).context == SMOL.seq_len
    assert plan_kv(SMOL, "cuda", max_seq_len=512).context == 512
    cpu = plan_kv(SMOL, "cpu")
    assert cpu.lazy and cpu.slots == MAX_SLOTS and cpu.context == SMOL.seq_len
    assert cpu.token_budget == KV_MEMORY // per  # 46,603 positions: 32 chats of 1,400 tokens
    assert plan_kv(SMOL, "cpu", max_batch=8).slots == 8
    assert plan_kv(SMOL, "cpu", max_seq_len=512).context == 512
    small = plan_kv(SMOL, "cpu", kv_memory=100 * per)
    assert small.context == small.token_budget == 100


def test_a_budget_that_cannot_hold_one_request_is_one_line():
    """A budget below two positions (per slot, where reserved), a non-positive budget, a
    max sequence length below 2 or a bad slot count is refused in one line, before
    anything is allocated."""
    for device, kwargs in (("cuda", {"kv_memory": 1000}), ("cpu", {"kv_memory": 1000}),
                           ("cpu", {"kv_memory": 0}), ("cpu", {"max_seq_len": 1}),
                           ("cpu", {"max_batch": 0})):
        with pytest.raises(MoorelmError) as e:
            plan_kv(SMOL, device, **kwargs)
        assert "\n" not in str(e.value)


def test_the_engine_serves_the_window_its_budget_holds():
    """An engine whose budget holds 40 positions allocates 40 per slot and refuses a request
    that needs more, naming the window; one that fits is served."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=512, vocab_size=tok.vocab_size)
    model = GPT(cfg).eval()
    budget = 40 * kv_bytes_per_token(cfg)
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
                                   ["--max-seq-len", "1"], ["--max-memory", "lots"],
                                   ["--max-batch", "0"], ["--kv-dtype", "fp16"]])
def test_serve_refuses_bad_budget_flags(tiny_run, flags, capsys):
    """Bad --kv-memory / --max-seq-len / --max-memory / --max-batch values exit 2 with one
    line, before loading a model."""
    assert main(["serve", str(tiny_run), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moorelm: error:") and len(err.splitlines()) == 1, err


def test_requests_wait_for_the_token_budget_and_all_finish():
    """A budget of 100 positions and 8 slots: requests of 10 + 30 positions run at most
    two at a time (the scheduler never holds more than the budget), the rest wait their
    turn, and every one finishes with the text it gets alone (greedy)."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=256, vocab_size=tok.vocab_size)
    model = GPT(cfg).eval()
    per = kv_bytes_per_token(cfg)
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    prompts = [tuple(tok.encode(f"ROMEO {i}:")) for i in range(6)]
    alone = Engine(model, tok, max_batch=1).start()
    try:
        want = [[e.token for e in alone.generate(Request((p,), params))[0]] for p in prompts]
    finally:
        alone.stop()
    eng = Engine(model, tok, max_batch=8, kv_memory=100 * per)
    assert eng.kv.token_budget == 100 and eng.max_batch == 8
    most = []
    real_step = eng._step

    def step():
        real_step()
        most.append(eng.scheduler.reserved_tokens())
    eng._step = step
    eng.start()
    try:
        handles = [eng.submit(Request((p,), params)) for p in prompts]
        got = []
        for h in handles:
            events = [e for batch in h for e in batch]
            assert not any(e.error for e in events)
            got.append([e.token for e in events])
    finally:
        eng.stop()
    assert got == want
    assert max(most) <= 100 and max(most) == 2 * (len(prompts[0]) + 30)
    too_big = Request((tuple(range(1, 80)),), SamplingParams(max_new_tokens=30))
    with pytest.raises(RequestError, match="context window of 100"):
        eng.validate(too_big)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_cpu_cache_takes_memory_only_where_written_and_gives_it_back():
    """A 256 MiB cache costs almost nothing until written; writing a quarter of one row's
    window in every row makes about a quarter resident; releasing the rows returns it, and
    released positions read as zeros."""
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, seq_len=4096, vocab_size=64)
    cache = KVCache(cfg, batch_size=8)  # 4 layers x 2 x 8 rows x 4096 x 256 x 4 B = 256 MiB
    total = 2 * 4 * 8 * 4096 * 256 * 4

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    assert rss() - before < total / 16
    for layer in range(4):
        assert float(cache.k[layer].abs().sum()) == 0.0  # reading costs no memory either
    assert rss() - before < total / 16
    for layer in range(4):
        cache.k[layer][:, :, :1024] = 1.0
        cache.v[layer][:, :, :1024] = 1.0
    grown = rss() - before
    assert total / 5 < grown < total / 3, grown
    cache.release()
    assert rss() - before < total / 16
    assert float(cache.k[0][:, :, :1024].abs().sum()) == 0.0


def test_max_memory_gives_the_kv_cache_what_the_weights_leave(tiny_run, capsys):
    """--max-memory counts the weights once (tied ones too, and the row-major twins a small
    packed model keeps) and gives the KV cache the rest; one that the weights fill, or given
    with --kv-memory, is one line and exit 2."""
    from moorelm.serve import build_app, kv_budget_after_weights

    model = moorelm.load(tiny_run).model
    twins = [m.dense for m in model.modules() if getattr(m, "dense", None) is not None]
    weights = sum(p.numel() * p.element_size() for p in [*model.parameters(), *twins])
    assert kv_budget_after_weights(model, weights + (8 << 20)) == 8 << 20
    app = build_app(tiny_run, max_memory=weights + (8 << 20))
    engine = app.state.service.engine
    assert engine.kv.token_budget == (8 << 20) // kv_bytes_per_token(model.config)
    for flags in (["--max-memory", "64KiB"], ["--max-memory", "1GiB", "--kv-memory", "1GiB"]):
        assert main(["serve", str(tiny_run), "--port", "0", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moorelm: error:") and len(err.splitlines()) == 1, err
        assert "--max-memory" in err


def test_a_bf16_kv_cache_holds_twice_the_positions_and_serves_the_same_text_batched():
    """kv_dtype="bf16" under fp32 weights: the cache's keys and values are bf16, the same
    budget holds twice the positions, greedy text is the same alone and batched, and the
    logits stay close to an fp32 cache's. "auto" is the model's dtype; an unknown name is
    one line."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=256,
                      vocab_size=tok.vocab_size, pos="rope", norm="rmsnorm", mlp="swiglu")
    model = GPT(cfg).eval()
    per = kv_bytes_per_token(cfg)
    assert Engine(model, tok, kv_memory=100 * per, kv_dtype="auto").kv.token_budget == 100
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    prompts = [tuple(tok.encode(f"ROMEO {i}:")) for i in (1, 22, 333, 4444)]  # rows apart
    alone = Engine(model, tok, max_batch=1, kv_dtype="bf16").start()
    try:
        assert alone.runner.cache.k[0].dtype == torch.bfloat16
        assert alone.stats()["kv_dtype"] == "bfloat16"
        want = [[e.token for e in alone.generate(Request((p,), params))[0]] for p in prompts]
    finally:
        alone.stop()
    eng = Engine(model, tok, max_batch=4, kv_memory=100 * per, kv_dtype="bf16")
    assert eng.kv.token_budget == 200 and eng.kv_cache_bytes == 100 * per
    eng.start()
    try:
        handles = [eng.submit(Request((p,), params)) for p in prompts]
        got = [[e.token for batch in h for e in batch] for h in handles]
    finally:
        eng.stop()
    assert got == want
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        fp32, half = model.new_cache(1, 64), model.new_cache(1, 64, torch.bfloat16)
        a, _ = model(x, kv_cache=fp32)
        b, _ = model(x, kv_cache=half)
        nxt = a[:, -1:].argmax(-1)
        a2, _ = model(nxt, kv_cache=fp32)
        b2, _ = model(nxt, kv_cache=half)
    assert (a - b).abs().max() < 0.05 and (a2 - b2).abs().max() < 0.05
    with pytest.raises(MoorelmError, match="unknown KV-cache dtype 'fp8'"):
        kv_dtype_of("fp8")
