"""The GPT: causality, KV-cache equivalence for every variant, accounting."""

from __future__ import annotations

import pytest
import torch

from moorelm.config import ModelConfig
from moorelm.model import GPT, rope_tables
from tests.conftest import DEVICES

VARIANTS = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu"),
    "modern": dict(pos="rope", norm="rmsnorm", mlp="swiglu"),
    "gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2),
    "relu2-qknorm-untied": dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True,
                                tie_embeddings=False, logit_softcap=15.0),
    "bias-learned-rmsnorm": dict(pos="learned", norm="rmsnorm", mlp="gelu", bias=True),
}


def make(variant: str, device: str = "cpu", **over) -> GPT:
    kw = dict(vocab_size=50, seq_len=24, n_layer=2, n_head=2, n_embd=32)
    kw.update(VARIANTS[variant])
    kw.update(over)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**kw)).to(device).eval()
    # zero-init or tiny weights would make many checks trivially true; perturb everything
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality(variant, device):
    """Changing a later token never changes the logits at earlier positions."""
    model = make(variant, device)
    idx = torch.randint(0, 50, (2, 16), device=device)
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 50
    logits2, _ = model(changed)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-5)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:], atol=1e-3)


def _mode(inference: bool):
    """Inference mode takes the one-token decoding path (``GPT._decode_one``); with autograd
    on, ``forward`` runs its general path: both must agree with a full forward pass."""
    import contextlib

    return torch.inference_mode() if inference else contextlib.nullcontext()


@pytest.mark.parametrize("inference", [False, True], ids=["general", "decode-path"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_matches_full_recompute(variant, device, inference):
    """Prefill + one-token-at-a-time decoding gives the logits of a full forward pass."""
    model = make(variant, device)
    idx = torch.randint(0, 50, (3, 20), device=device)
    full, _ = model(idx)
    with _mode(inference):
        cache = model.new_cache(3)
        out, _ = model(idx[:, :7], kv_cache=cache)
        steps = [out]
        for t in range(7, 20):
            o, _ = model(idx[:, t : t + 1], kv_cache=cache)
            steps.append(o)
        inc = torch.cat(steps, dim=1)
    assert torch.allclose(full, inc, atol=1e-4), (full - inc).abs().max()
    assert int(cache.lengths[0]) == 20


def test_decode_step_switches_onednn_off_only_while_it_runs(monkeypatch):
    """On CPU in fp32 a decode step runs with oneDNN off and puts it back after, also when
    several threads decode at once (the switch is process-wide)."""
    import threading

    model = make("gpt2")
    seen = []
    real = GPT._decode_step

    def spy(self, tok, cache):
        seen.append(torch.backends.mkldnn.enabled)
        return real(self, tok, cache)

    monkeypatch.setattr(GPT, "_decode_step", spy)
    assert torch.backends.mkldnn.enabled

    def decode():
        with torch.inference_mode():
            cache = model.new_cache(1)
            model(torch.randint(0, 50, (1, 4)), kv_cache=cache)
            for _ in range(15):
                model(torch.randint(0, 50, (1, 1)), kv_cache=cache)

    threads = [threading.Thread(target=decode) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 60 and not any(seen)
    assert torch.backends.mkldnn.enabled


def test_decode_plan_follows_the_model_using_the_cache():
    """The decode path binds a model's weights to the cache once (shared by its row views);
    another model decoding with the same cache gets its own weights, not the first's."""
    a, b = make("gpt2"), make("gpt2")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)
    idx = torch.randint(0, 50, (2, 6))
    with torch.inference_mode():
        cache = a.new_cache(2)
        a(idx, kv_cache=cache)
        a(idx[:, :1], kv_cache=cache.rows(0, 2))  # builds the plan through a view
        assert cache.plan is not None and cache.plan.model is a
        cache.reset()
        b(idx, kv_cache=cache)
        out, _ = b(idx[:, :1], kv_cache=cache)
        assert cache.plan.model is b
    full, _ = b(torch.cat([idx, idx[:, :1]], dim=1))
    assert torch.allclose(out[:, -1], full[:, -1], atol=1e-4)


@pytest.mark.parametrize("variant", ["gpt2", "bias-learned-rmsnorm"])
def test_wide_batch_decode_at_different_lengths(variant):
    """Twelve rows at twelve lengths decode as each row would alone."""
    model = make(variant)
    seqs = [torch.randint(0, 50, (1, 2 + i)) for i in range(12)]
    batch = model.new_cache(12)
    with torch.inference_mode():
        for row, seq in enumerate(seqs):
            single = model.new_cache(1)
            model(seq, kv_cache=single)
            batch.insert(row, single)
        nxt = torch.randint(0, 50, (12, 1))
        for _ in range(2):  # the second step reuses the packs made by the first
            out, _ = model(nxt, kv_cache=batch)
            seqs = [torch.cat([s, nxt[r : r + 1]], dim=1) for r, s in enumerate(seqs)]
            for row, seq in enumerate(seqs):
                alone, _ = model(seq)
                assert torch.allclose(out[row, -1], alone[0, -1], atol=1e-4), row


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segments_keep_packed_sequences_apart(variant):
    """Sequences packed into one row with ``segments`` get the logits of
    each run alone: positions restart at 0 and attention stays within a sequence."""
    model = make(variant)
    a, b, c = (torch.randint(0, 50, (1, n)) for n in (5, 7, 4))
    row = torch.cat([a, b, c], dim=1)  # (1, 16)
    seg = torch.tensor([[1] * 5 + [2] * 7 + [1] * 4])  # a run is a change of value
    packed, _ = model(row, segments=seg)
    start = 0
    for s in (a, b, c):
        alone, _ = model(s)
        assert torch.allclose(packed[:, start:start + s.shape[1]], alone, atol=1e-5)
        start += s.shape[1]
    plain, _ = model(row)
    assert not torch.allclose(plain[:, 5:12], packed[:, 5:12], atol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        model(row, segments=seg[:, :-1])
    with pytest.raises(ValueError, match="KV cache"):
        model(row, kv_cache=model.new_cache(1), segments=seg)


@pytest.mark.parametrize("inference", [False, True], ids=["general", "decode-path"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_rows_at_different_lengths(variant, inference):
    """Rows with different cached lengths (continuous batching) decode as if alone."""
    with _mode(inference):
        _rows_at_different_lengths(variant)


def _rows_at_different_lengths(variant):
    model = make(variant)
    a = torch.randint(0, 50, (1, 9))
    b = torch.randint(0, 50, (1, 4))
    batch = model.new_cache(2)
    for row, seq in enumerate((a, b)):
        single = model.new_cache(1)
        model(seq, kv_cache=single)
        batch.insert(row, single)
    nxt = torch.tensor([[3], [5]])
    batched, _ = model(nxt, kv_cache=batch)
    for row, seq in enumerate((a, b)):
        alone, _ = model(torch.cat([seq, nxt[row : row + 1]], dim=1))
        assert torch.allclose(batched[row, -1], alone[0, -1], atol=1e-4)
    # a multi-token chunk on uneven rows takes the masked path
    chunk = torch.randint(0, 50, (2, 3))
    out, _ = model(chunk, kv_cache=batch)
    for row, seq in enumerate((a, b)):
        full = torch.cat([seq, nxt[row : row + 1], chunk[row : row + 1]], dim=1)
        alone, _ = model(full)
        assert torch.allclose(out[row], alone[0, -3:], atol=1e-4)


def test_loss_and_reductions():
    """Given targets, forward returns the mean CE; 'none' gives per-token losses; -1 is ignored."""
    model = make("gpt2")
    idx = torch.randint(0, 50, (2, 8))
    tgt = torch.randint(0, 50, (2, 8))
    _, loss = model(idx, tgt)
    _, per = model(idx, tgt, loss_reduction="none")
    assert per.shape == (2, 8)
    assert torch.allclose(loss, per.mean(), atol=1e-6)
    masked = tgt.clone()
    masked[:, :4] = -1
    _, part = model(idx, masked)
    assert torch.allclose(part, per[:, 4:].mean(), atol=1e-6)


def test_shakespeare_char_parameter_count():
    """The shakespeare-char preset has about 10.7M parameters (nanoGPT's figure)."""
    cfg = ModelConfig(vocab_size=65, seq_len=256, n_layer=6, n_head=6, n_embd=384)
    counts = GPT(cfg).param_counts()
    assert 10.6e6 < counts["total"] < 10.9e6
    assert counts["non_embedding"] == counts["total"] - 65 * 384 - 256 * 384


def test_gpt2_parameter_count():
    """The gpt2 preset at vocab 50257 has GPT-2 small's 124M parameters."""
    with torch.device("meta"):
        model = GPT(ModelConfig(vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, n_embd=768))
    assert abs(model.param_counts()["total"] - 124.4e6) < 0.5e6


def test_meta_device_builds_the_same_model_without_values():
    """A model built under meta_device() has the shapes of one built on the CPU, holds no
    memory, and its rotary tables come out as meta tensors of the same shape."""
    from moorelm.config import build_configs, with_vocab
    from moorelm.model import meta_device

    cfg, _ = build_configs(recipe="moorelm", model_overrides=dict(n_layer=2, n_head=2,
                                                                 n_embd=32, seq_len=16))
    cfg = with_vocab(cfg, 50)
    with meta_device():
        meta = GPT(cfg)
    cpu = GPT(cfg)
    assert all(t.is_meta for t in meta.state_dict().values()) and meta.rope_cos.is_meta
    assert {k: v.shape for k, v in meta.state_dict().items()} == \
        {k: v.shape for k, v in cpu.state_dict().items()}
    assert meta.rope_cos.shape == cpu.rope_cos.shape and not cpu.rope_cos.is_meta
    assert torch.equal(cpu.rope_cos, rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_base)[0])


def test_flops_per_token_formula():
    """Training FLOPs/token = 6 x matmul params + 12 x layers x T x C (PaLM's accounting)."""
    cfg = ModelConfig(vocab_size=100, seq_len=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    matmul = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 100
    assert model.flops_per_token() == 6 * matmul + 12 * 2 * 16 * 32
    assert model.flops_per_token(training=False) * 3 == model.flops_per_token()


def test_positions_beyond_context_are_refused():
    """Asking for more positions than the context window is an error, not silent garbage."""
    model = make("gpt2")
    with pytest.raises(ValueError):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_bad_configs_have_clear_errors():
    """Invalid shapes and unknown variants are rejected with the offending value."""
    from moorelm.errors import MoorelmError

    with pytest.raises(MoorelmError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(MoorelmError, match="n_kv_head"):
        ModelConfig(n_embd=32, n_head=4, n_kv_head=3)
    with pytest.raises(MoorelmError, match="choose one of"):
        ModelConfig(mlp="moe")


def _reference_norm_rotate(x, cos, sin, norm):
    """The plain composite the fused function replaces, differentiated by autograd."""
    if norm:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)
    if cos is None:
        return x
    d = x.shape[-1] // 2
    cos, sin = cos[..., :d], sin[..., d:]  # the half tables inside the full-width ones
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@pytest.mark.parametrize("norm,rope", [(True, True), (True, False), (False, True)])
def test_norm_rotate_matches_autograd_composite(norm, rope):
    from moorelm.model import norm_rotate, rope_tables

    torch.manual_seed(0)
    B, T, N, D = 2, 5, 3, 8
    cos, sin = rope_tables(D, T, 10000.0)
    tables = (cos[:, None].double(), sin[:, None].double()) if rope else None
    x = torch.randn(B, T, N, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(B, T, N, D, dtype=torch.float64)
    out = norm_rotate(x, tables, norm)
    ref = _reference_norm_rotate(x_ref, *(tables or (None, None)), norm)
    torch.testing.assert_close(out, ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert torch.autograd.gradcheck(lambda t: norm_rotate(t, tables, norm), (x_ref.detach().requires_grad_(),))
