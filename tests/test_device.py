"""Devices and precision: resolution, per-device precision choice, MFU arithmetic, and
checkpoints that move between precisions."""

from __future__ import annotations

import pytest
import torch

from moorelm import device as dev
from moorelm.errors import MoorelmError


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    """auto resolves to CUDA when present, else MPS, else CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto").type == "mps"
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")


def test_explicit_devices(monkeypatch):
    """cuda:N is checked against the GPUs present; unknown names are refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MoorelmError, match="has 2 GPU"):
        dev.resolve_device("cuda:5")
    with pytest.raises(MoorelmError, match="cuda:N"):
        dev.resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoorelmError, match="CUDA is not available"):
        dev.resolve_device("cuda")
    with pytest.raises(MoorelmError, match="not valid"):
        dev.resolve_device("tpu")


@pytest.mark.parametrize(
    "kind,requested,bf16,expected,scaler",
    [
        ("cuda", "auto", True, torch.bfloat16, False),  # Ampere and newer
        ("cuda", "auto", False, torch.float16, True),  # Volta/Turing: fp16 + grad scaler
        ("cuda", "fp32", True, None, False),
        ("cuda", "fp16", True, torch.float16, True),
        ("cpu", "auto", None, None, False),  # fp32 unless asked
        ("cpu", "bf16", None, torch.bfloat16, False),
        ("mps", "auto", None, None, False),
        ("mps", "fp16", None, torch.float16, False),
    ],
)
def test_precision_per_device(kind, requested, bf16, expected, scaler):
    """Each device kind gets the precision the docs promise."""
    p = dev.choose_precision(torch.device(kind), requested, cuda_bf16=bf16)
    assert p.autocast == expected and p.use_scaler == scaler


def test_unsupported_precisions_are_refused():
    """fp16 training on CPU and bf16 on MPS are clear errors."""
    with pytest.raises(MoorelmError, match="fp16"):
        dev.choose_precision(torch.device("cpu"), "fp16")
    with pytest.raises(MoorelmError, match="MPS"):
        dev.choose_precision(torch.device("mps"), "bf16")


def test_mfu_arithmetic():
    """MFU = FLOPs/token x tokens/s / peak, with a hand-computed case."""
    # 124M-parameter GPT-2 at T=1024: 6N + 12 L T C = 6*124e6 + 12*12*1024*768 = 857.2e6
    fpt = 6 * 124e6 + 12 * 12 * 1024 * 768
    assert dev.mfu(fpt, 400_000, 989e12) == pytest.approx(fpt * 400_000 / 989e12)
    assert dev.mfu(fpt, 400_000, 989e12) == pytest.approx(0.3467, abs=1e-3)
    assert dev.mfu(fpt, 1.0, None) is None


def test_peak_flops_table_and_override():
    """Known GPUs are found by name (most specific first); a flag overrides the table."""
    cuda = torch.device("cuda")
    assert dev.peak_flops(cuda, name="NVIDIA H200") == 989e12
    assert dev.peak_flops(cuda, name="NVIDIA H100 PCIe") == 756e12
    assert dev.peak_flops(cuda, name="NVIDIA A100-SXM4-80GB") == 312e12
    assert dev.peak_flops(cuda, name="Mystery GPU") is None
    assert dev.peak_flops(torch.device("cpu")) is None
    assert dev.peak_flops(torch.device("cpu"), override=1e12) == 1e12


def test_checkpoint_saved_under_autocast_loads_in_fp32(tmp_path, small_corpus):
    """A run trained under bf16 autocast saves fp32 weights; reloaded in fp32 they give the
    same logits as the in-memory model."""
    import moorelm
    from moorelm.codecs import load_gpt_weights, read_tensors
    from moorelm.run import RunFolder
    from moorelm.training.pretrain import pretrain
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    run = tmp_path / "run"
    pretrain(run, corpus=str(small_corpus), model_overrides=TINY_MODEL,
             train_overrides=dict(TINY_TRAIN, dtype="bf16", max_steps=5), progress=False)
    tensors = read_tensors(RunFolder(run).latest() / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    lm = moorelm.load(run, device="cpu")
    from moorelm.model import GPT

    fresh = GPT(lm.config)
    load_gpt_weights(fresh, tensors, run)
    idx = torch.randint(0, lm.config.vocab_size, (1, 16))
    assert torch.equal(lm.model(idx)[0], fresh.eval()(idx)[0])
