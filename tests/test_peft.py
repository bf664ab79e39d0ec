"""PEFT interop: a moorelm LoRA run's adapters load with peft.PeftModel onto the exported base
model with moorelm's logits, and PEFT adapter folders import onto a base run."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from moorelm.cli import main  # noqa: E402
from moorelm.codecs import LMCodec  # noqa: E402
from moorelm.config import ModelConfig  # noqa: E402
from moorelm.finetune.lora import LoRAConfig, apply_lora  # noqa: E402
from moorelm.interop.hf import export_hf  # noqa: E402
from moorelm.interop.peft import export_peft, import_peft  # noqa: E402
from moorelm.model import GPT  # noqa: E402
from moorelm.run import RunFolder  # noqa: E402
from moorelm.tokenizer import Tokenizer  # noqa: E402

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nJULIET:\nO Romeo!\n" * 5
SMALL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, tie_embeddings=False)
FAMILIES = {"llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1),
            "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu")}


def _runs(root, family: str = "llama", targets=None, merged: bool = False, seed: int = 0,
          width: int = 32):
    """A base run (random, perturbed weights) and a LoRA run on it whose adapters are random
    (not zero), saved as moorelm saves a LoRA fine-tune."""
    tok = Tokenizer.train([TEXT], "char")
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, **dict(SMALL, n_embd=width),
                            **FAMILIES[family])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    base = root / "base"
    RunFolder(base).write_files({"model": model.config.to_dict()}, tok)
    RunFolder(base).save(4, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    lora = LoRAConfig(rank=4, alpha=8.0, targets=targets, merged=merged)
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    run = root / "lora"
    RunFolder(run).write_files({"model": model.config.to_dict(), "lora": lora.to_dict(),
                                "finetune": {"method": "lora", "base_run": str(base)}}, tok)
    RunFolder(run).save(9, lora.codec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    return base, run


def _ids(run) -> torch.Tensor:
    vocab = RunFolder(run).model_config().vocab_size
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))


def _logits(run, idx) -> torch.Tensor:
    with torch.no_grad():
        return RunFolder(run).load().model(idx)[0]


def _peft_model(base_hf, adapter):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_hf), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, str(adapter)).eval()


@pytest.mark.parametrize("family, targets, merged", [
    ("llama", None, False), ("llama", ("c_attn", "mlp.c_proj"), False), ("llama", None, True),
    ("gpt2", None, False), ("gpt2", ("attn.c_proj",), False),
], ids=["llama-all", "llama-some", "llama-merged-run", "gpt2-all", "gpt2-attn-proj"])
def test_peft_loads_the_adapters_with_moorelms_logits(tmp_path, family, targets, merged):
    """PeftModel.from_pretrained(exported base, exported adapter) computes the LoRA run's
    logits (< 1e-4): c_attn split into q/k/v with a shared lora_A for Llama, GPT-2's Conv1D
    with fan_in_fan_out; targets that name one of two same-named layers stay exact."""
    base, run = _runs(tmp_path, family, targets, merged)
    export_hf(base, tmp_path / "base-hf")
    export_peft(run, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["base_model_name_or_path"]) == (4, 8.0, "base")
    idx = _ids(run)
    theirs = _peft_model(tmp_path / "base-hf", tmp_path / "adapter")(idx).logits.detach()
    assert (theirs - _logits(run, idx)).abs().max().item() < 1e-4


def test_import_of_the_export_is_the_same_run(tmp_path):
    """moorelm import ADAPTER --base BASE gives back a LoRA run with the same logits."""
    base, run = _runs(tmp_path)
    export_peft(run, tmp_path / "adapter")
    back = import_peft(tmp_path / "adapter", tmp_path / "back", base=base)
    idx = _ids(run)
    assert (_logits(back, idx) - _logits(run, idx)).abs().max().item() < 1e-5
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["lora"]["rank"] == 4 and cfg["lora"]["merged"] is False


def test_an_adapter_trained_by_peft_imports(tmp_path):
    """An adapter PEFT made itself (q_proj and v_proj only, each with its own lora_A, and
    use_rslora) imports onto the base run with PEFT's logits: q/v stacked into the fused
    c_attn at twice the rank, the other layers padded to it."""
    base, _ = _runs(tmp_path)
    export_hf(base, tmp_path / "base-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base-hf"),
                                                           dtype=torch.float32)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_rslora=True, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "adapter"))
    run = import_peft(tmp_path / "adapter", tmp_path / "run", base=base, ignore_base_name=True)
    idx = _ids(run)
    theirs = pm.eval()(idx).logits.detach()
    assert (theirs - _logits(run, idx)).abs().max().item() < 1e-4
    assert json.loads((run / "config.json").read_text())["lora"]["rank"] == 4


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("moorelm: error: "), err
    return err


def test_mismatched_bases_are_named(tmp_path, capsys):
    """A PEFT folder on the wrong base is one line naming the mismatch: another base name,
    other shapes, a target module the base does not have; no --base is one line too."""
    base, run = _runs(tmp_path / "a")
    export_peft(run, tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    _runs(tmp_path / "b", "gpt2")
    (tmp_path / "b" / "base").rename(tmp_path / "other")
    assert "trained on 'base'" in _cli_error(["import", adapter, str(tmp_path / "r1"), "--base",
                                              str(tmp_path / "other")], capsys)
    assert "target module" in _cli_error(["import", adapter, str(tmp_path / "r1"), "--base",
                                          str(tmp_path / "other"), "--ignore-base-name"], capsys)
    narrow, _ = _runs(tmp_path / "c", width=16)
    assert "shapes" in _cli_error(["import", adapter, str(tmp_path / "r2"), "--base", str(narrow),
                                   "--ignore-base-name"], capsys)
    assert "--base" in _cli_error(["import", adapter, str(tmp_path / "r3")], capsys)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_cli_export_peft_refusals(tmp_path, capsys):
    """--format peft of a run without adapters, and over a folder of the user's files even with
    --force, are one line each; an earlier adapter export is replaced with --force."""
    base, run = _runs(tmp_path)
    assert "not a LoRA run" in _cli_error(["export", str(base), str(tmp_path / "x"), "--format",
                                           "peft"], capsys)
    assert main(["export", str(run), str(tmp_path / "ad"), "--format", "peft"]) == 0
    assert "already exists" in _cli_error(["export", str(run), str(tmp_path / "ad"), "--format",
                                           "peft"], capsys)
    assert main(["export", str(run), str(tmp_path / "ad"), "--format", "peft", "--force"]) == 0
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("years")
    assert "thesis.txt" in _cli_error(["export", str(run), str(user), "--format", "peft",
                                       "--force"], capsys)
    assert (user / "thesis.txt").read_text() == "years"


def hostile_adapter(folder, name: str = "run", module: str = "model.layers.0.self_attn.q_proj",
                    config_text: str | None = None, pickled: bool = False) -> str:
    """A small PEFT adapter folder for tests/test_hostile_inputs.py's cases: one q_proj
    adapter of rank 2 on a 32-wide model, trained on ``name``; ``config_text`` replaces
    adapter_config.json, ``pickled`` stores the weights as adapter_model.bin only."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    conf = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "base_model_name_or_path": name}
    (folder / "adapter_config.json").write_text(config_text or json.dumps(conf))
    tensors = {f"base_model.model.{module}.lora_A.weight": torch.zeros(2, 32),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(32, 2)}
    if pickled:
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)
