"""Tests for moorelm.finetune.lora: wrapping, freezing, merging, and how the run folder's
LoRA codec stores and restores adapters."""

from __future__ import annotations

import pytest
import torch

from moorelm.codecs import (
    ADAPTER_FILE,
    MODEL_FILE,
    add_delta,
    model_tensors,
    read_header,
    read_tensors,
    split_adapters,
)
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    merge_lora,
    resolve_targets,
    trainable_parameters,
)
from moorelm.model import GPT
from moorelm.optim import param_groups
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer

TOK = Tokenizer.train(["abc def"], "char")
CFG = ModelConfig(vocab_size=TOK.vocab_size, seq_len=16, n_layer=2, n_head=2, n_embd=32, mlp="swiglu",
                  pos="rope", norm="rmsnorm", tie_embeddings=False)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def _randomize_adapters(model: GPT, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


IDX = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))


def test_wrapped_model_starts_identical_to_the_base():
    """B starts at zero, so wrapping changes no output."""
    model = _model()
    before = _logits(model, IDX)
    apply_lora(model, LoRAConfig(rank=4))
    assert torch.equal(_logits(model, IDX), before)


def test_only_adapters_are_trainable_and_reach_the_optimizer():
    """Base weights are frozen; param groups hold exactly the adapter tensors, r*(in+out) each."""
    model = _model()
    names = apply_lora(model, LoRAConfig(rank=4))
    assert len(names) == 2 * 5  # c_attn, attn.c_proj, c_fc, c_gate, mlp.c_proj per block
    grouped = [n for g in param_groups(model).values() for n, _ in g]
    assert grouped and all(n.endswith((".lora_A", ".lora_B")) for n in grouped)
    expected = sum(4 * (m.in_features + m.out_features) for m in model.modules()
                   if isinstance(m, LoRALinear))
    assert trainable_parameters(model) == expected


def test_train_embeddings_adds_embedding_and_head():
    """With train_embeddings the token embedding and (untied) head train in full too."""
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, train_embeddings=True))
    grouped = {n for g in param_groups(model).values() for n, _ in g}
    assert {"wte.weight", "lm_head.weight"} <= grouped and "wpe.weight" not in grouped
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable_parameters(model) == adapters + 2 * CFG.vocab_size * 32


def test_targets_select_layers_by_suffix():
    """'attn.c_proj' picks only attention projections; 'c_proj' picks both kinds."""
    model = _model()
    assert resolve_targets(model, ("attn.c_proj",)) == ["blocks.0.attn.c_proj", "blocks.1.attn.c_proj"]
    assert len(resolve_targets(model, ("c_proj",))) == 4


def test_unknown_target_is_one_clear_error():
    """A target matching no layer names the valid choices."""
    with pytest.raises(MoorelmError, match="'q_proj' matches no linear layer.*c_attn"):
        apply_lora(_model(), LoRAConfig(targets=("q_proj",)))


@pytest.mark.parametrize("kw,msg", [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"),
                                    ({"dropout": 1.0}, "dropout"), ({"targets": ()}, "empty")])
def test_config_validation(kw, msg):
    """Bad LoRA settings fail with a MoorelmError naming the setting."""
    with pytest.raises(MoorelmError, match=msg):
        LoRAConfig(**kw)


def test_merge_matches_the_wrapped_model():
    """Folding B A into W gives the same outputs as the adapter path."""
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    _randomize_adapters(model)
    wrapped = _logits(model, IDX)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, IDX), wrapped, atol=1e-5, rtol=1e-5)


def test_add_delta_inverts():
    """Merging then unmerging gives the base weights back to float rounding."""
    model = _model()
    lcfg = LoRAConfig(rank=2)
    apply_lora(model, lcfg)
    _randomize_adapters(model)
    base, adapters = split_adapters(model.state_dict())
    back = add_delta(add_delta(base, adapters, lcfg.scale), adapters, lcfg.scale, sign=-1.0)
    for k in base:
        torch.testing.assert_close(back[k], base[k], atol=1e-6, rtol=0)


def _lora_run(tmp_path, merged: bool, legacy: bool = False):
    """A run folder holding a LoRA checkpoint as train() saves it (through the codec), or as
    older versions left an interrupted run (adapters inside model.safetensors)."""
    lcfg = LoRAConfig(rank=4, merged=merged)
    model = _model()
    apply_lora(model, lcfg)
    _randomize_adapters(model)
    run = RunFolder(tmp_path / ("merged" if merged else "separate"))
    run.write_files({"model": CFG.to_dict(), "lora": lcfg.to_dict()}, TOK)
    files = ({MODEL_FILE: (model_tensors(model), {})} if legacy
             else lcfg.codec().checkpoint_files(model))
    ck = run.save(5, files, {"tokens": 0, "elapsed": 0.0})
    return run, ck, model


@pytest.mark.parametrize("legacy", [False, True], ids=["final", "legacy-training-form"])
@pytest.mark.parametrize("merged", [True, False])
def test_every_checkpoint_form_loads_to_the_adapted_model(tmp_path, merged, legacy):
    """Merged, kept separate, or an older version's training form: RunFolder.load gives a
    plain GPT computing what the wrapped model did."""
    run, ck, model = _lora_run(tmp_path, merged, legacy)
    loaded = run.load()
    assert loaded.kind == "lora"
    assert not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    torch.testing.assert_close(_logits(loaded.model, IDX), _logits(model, IDX), atol=1e-5, rtol=1e-5)
    if legacy:
        return
    assert (ck / ADAPTER_FILE).exists() and read_header(ck / MODEL_FILE)[1]["kind"] == "lora"
    stored = read_tensors(ck / MODEL_FILE)
    assert not split_adapters(stored)[1]  # model.safetensors is a plain GPT either way
    if not merged:  # the base weights are untouched
        base = model_tensors(_model())
        assert all(torch.equal(stored[k], base[k]) for k in base)


@pytest.mark.parametrize("legacy", [False, True], ids=["final", "legacy-training-form"])
@pytest.mark.parametrize("merged", [True, False])
def test_resume_restores_the_wrapped_model_bit_for_bit(tmp_path, merged, legacy):
    """Loading a checkpoint into a freshly wrapped model (what --resume does) restores the
    frozen base weights and the adapters exactly, merged or not."""
    run, _, model = _lora_run(tmp_path, merged, legacy)
    fresh = GPT(CFG)
    apply_lora(fresh, LoRAConfig(rank=4, merged=merged))
    run.load_into(fresh)
    want = model.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_separate_adapters_missing_file_is_a_clear_error(tmp_path):
    """A run whose config says LoRA but lacks adapter.safetensors says so in one line."""
    run, ck, _ = _lora_run(tmp_path, merged=False)
    (ck / ADAPTER_FILE).unlink()
    with pytest.raises(MoorelmError, match="adapter.safetensors"):
        run.load()


def test_adapters_that_do_not_fit_the_model_are_one_line(tmp_path):
    """An adapter file with a rank other than config.json's is refused before loading."""
    run, _, _ = _lora_run(tmp_path, merged=True)
    cfg = run.read_config()
    cfg["lora"]["rank"] = 2
    run.write_files(cfg, TOK)
    with pytest.raises(MoorelmError, match="LoRA rank 2"):
        run.load()
