"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of a moorelm GPT.

A target ``nn.Linear`` computing ``y = x W^T + b`` becomes::

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T      A: (rank, in)   B: (out, rank)

with ``W`` and ``b`` frozen and only ``A`` and ``B`` trained. ``A`` starts like a default
``nn.Linear`` weight (Kaiming-uniform) and ``B`` at zero, so a freshly wrapped model computes
exactly what the base model does. Targets are named by module name suffix among the linear
layers inside the blocks: ``c_attn`` (fused q/k/v), ``c_proj`` (attention *and* MLP output;
``attn.c_proj`` or ``mlp.c_proj`` for one of them), ``c_fc`` and ``c_gate`` (SwiGLU only).
By default every linear layer of every block is a target; embeddings and the head are not,
unless ``train_embeddings`` trains them in full alongside the adapters (as PEFT's
``modules_to_save`` does). That is needed when the fine-tuning data uses tokens the base
never trained, e.g. digits (byte-fallback tokens) for a model pretrained on Shakespeare:
adapters inside the blocks cannot give such tokens distinct embeddings or logits.

Where the tensors live. While training, a checkpoint's ``model.safetensors`` holds the wrapped
model's state: the base weights plus ``<layer>.lora_A`` / ``<layer>.lora_B`` (the training
form, which ``train()`` saves and resumes from). When fine-tuning finishes,
``finalize_checkpoint`` rewrites it into the saved form:

- merged (the default): ``model.safetensors`` is a plain GPT with ``W + (alpha/rank) B A``,
  readable by anything that reads moorelm runs;
- kept separate: ``model.safetensors`` holds the base weights (untouched, except the
  embedding and head when ``train_embeddings`` trained them).

Both also write ``adapter.safetensors`` (the adapters, with rank/alpha/targets in its
metadata), which is what ``--resume`` continues from; config.json's ``"lora"`` section says
which form was chosen. ``load_model_with_adapters`` (used by ``moorelm.load``) reads all three
forms and returns a plain GPT with the adapters merged in.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from moorelm import checkpoint as ckpt
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer

ADAPTER_FILE = "adapter.safetensors"
A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter shape. ``targets`` None: every linear layer inside the blocks."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0
    merged: bool = True  # saved form: merged into the weights, or kept in adapter.safetensors
    train_embeddings: bool = False  # also train token embeddings and head in full

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise MoorelmError(f"LoRA rank must be an integer >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise MoorelmError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise MoorelmError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None:
            if isinstance(self.targets, str):
                object.__setattr__(self, "targets", parse_targets(self.targets))
            else:
                object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise MoorelmError("LoRA targets are empty; name layers such as c_attn,c_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        try:
            keys = ("rank", "alpha", "targets", "dropout", "merged", "train_embeddings")
            return cls(**{k: d[k] for k in keys if k in d})
        except TypeError as e:
            raise MoorelmError(f"LoRA config {d!r} is invalid: {e}") from None


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    """``"c_attn, c_proj"`` -> ("c_attn", "c_proj"); empty or None -> None (all layers)."""
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return names or None


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    It keeps the wrapped layer's ``weight`` and ``bias`` parameters (same objects, same state
    dict names), so base checkpoints load into it unchanged; it subclasses ``nn.Linear`` so
    code that counts linear layers (FLOP accounting) still sees it.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return y + self.scale * update

    def delta(self) -> torch.Tensor:
        """The weight update (out, in) that merging adds to ``weight``."""
        return self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"


# ----------------------------------------------------------------------------- wrapping


def _block_linears(model: GPT) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if name.startswith("blocks.") and isinstance(m, nn.Linear)}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: GPT, targets: tuple[str, ...] | None) -> list[str]:
    """Full module names of the linear layers the targets select (checked: each must match)."""
    linears = _block_linears(model)
    if targets is None:
        return list(linears)
    valid = sorted({n.split(".", 2)[2] for n in linears} | {n.rsplit(".", 1)[1] for n in linears})
    chosen: list[str] = []
    for t in targets:
        hits = [n for n in linears if _matches(n, t)]
        if not hits:
            raise MoorelmError(
                f"LoRA target {t!r} matches no linear layer of this model; choose from: "
                f"{', '.join(valid)}"
            )
        chosen += [h for h in hits if h not in chosen]
    return [n for n in linears if n in chosen]  # model order


def apply_lora(model: GPT, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model`` (but the token embedding and head with
    ``train_embeddings``) and wrap the target layers; returns their names."""
    names = resolve_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train_embeddings:
        model.wte.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)  # the same tensor when tied
    for name in names:
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg.rank, cfg.alpha, cfg.dropout))
    return names


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight and put plain ``nn.Linear`` layers back."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                              device=m.weight.device, dtype=m.weight.dtype)
            plain.weight.copy_(m.weight + m.delta().to(m.weight.dtype))
            if m.bias is not None:
                plain.bias.copy_(m.bias)
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, plain)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- tensor dicts


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict -> (base tensors, adapter tensors)."""
    adapters = {k: v for k, v in tensors.items() if k.endswith((A_SUFFIX, B_SUFFIX))}
    base = {k: v for k, v in tensors.items() if k not in adapters}
    return base, adapters


def _pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer name -> (A, B)."""
    out = {}
    for k, a in adapters.items():
        if k.endswith(A_SUFFIX):
            layer = k[: -len(A_SUFFIX)]
            b = adapters.get(layer + B_SUFFIX)
            if b is None:
                raise MoorelmError(f"adapter tensors have {k} but no {layer + B_SUFFIX}")
            out[layer] = (a, b)
    return out


def add_delta(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float,
              sign: float = 1.0) -> dict[str, torch.Tensor]:
    """Base weights with ``sign * scale * B A`` added to each adapted layer (new dict).

    ``sign=-1`` undoes a merge (exact up to float rounding); the sum is formed in float64.
    """
    out = dict(base)
    for layer, (a, b) in _pairs(adapters).items():
        key = layer + ".weight"
        if key not in base:
            raise MoorelmError(f"adapter for {layer} has no matching weight {key} in the model")
        w = base[key]
        out[key] = (w.double() + sign * scale * (b.double() @ a.double())).to(w.dtype)
    return out


def adapter_metadata(cfg: LoRAConfig) -> dict[str, str]:
    return {"format": "moorelm-lora-1", "lora": json.dumps(cfg.to_dict())}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    ckpt.atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


# ----------------------------------------------------------------------------- checkpoint forms


def _model_metadata(ckpt_dir: Path) -> dict[str, str]:
    return {"step": str(ckpt.read_state(ckpt_dir)["step"]), "format": "moorelm-1"}


def checkpoint_form(ckpt_dir: Path) -> str:
    """'training' (adapters inside model.safetensors), 'saved' (adapter.safetensors), or 'plain'."""
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises several error types for damaged files
        raise MoorelmError(f"{ckpt_dir}/model.safetensors is unreadable ({str(e)[:100]})") from None
    if any(k.endswith((A_SUFFIX, B_SUFFIX)) for k in keys):
        return "training"
    return "saved" if (ckpt_dir / ADAPTER_FILE).exists() else "plain"


def finalize_checkpoint(ckpt_dir: Path, cfg: LoRAConfig) -> None:
    """Training form -> saved form (see the module docstring). A no-op on a saved one.

    adapter.safetensors is written before model.safetensors is replaced, and the form is read
    from model.safetensors' keys, so a kill between the two writes leaves a readable,
    resumable checkpoint either way.
    """
    if checkpoint_form(ckpt_dir) != "training":
        return
    base, adapters = split_state(ckpt.read_tensors(ckpt_dir / "model.safetensors"))
    _write_safetensors(ckpt_dir / ADAPTER_FILE, adapters, adapter_metadata(cfg))
    weights = add_delta(base, adapters, cfg.scale) if cfg.merged else base
    _write_safetensors(ckpt_dir / "model.safetensors", weights, _model_metadata(ckpt_dir))


def to_training_checkpoint(ckpt_dir: Path, cfg: LoRAConfig) -> None:
    """Saved form -> training form, so that ``train(resume=True)`` can continue the adapters."""
    form = checkpoint_form(ckpt_dir)
    if form == "training":
        return
    if form == "plain":
        raise MoorelmError(f"{ckpt_dir} has no {ADAPTER_FILE}; this LoRA run cannot be resumed")
    weights = ckpt.read_tensors(ckpt_dir / "model.safetensors")
    adapters = ckpt.read_tensors(ckpt_dir / ADAPTER_FILE)
    base = add_delta(weights, adapters, cfg.scale, sign=-1.0) if cfg.merged else weights
    _write_safetensors(ckpt_dir / "model.safetensors", {**base, **adapters},
                       _model_metadata(ckpt_dir))


def plain_weights(run_dir: str | Path, checkpoint: Path | None = None) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(run config, plain GPT tensors with any adapters merged in, checkpoint folder)."""
    run_dir = Path(run_dir)
    cfg = ckpt.read_run_config(run_dir)
    ck = checkpoint or ckpt.latest_checkpoint(run_dir)
    tensors = ckpt.read_tensors(ck / "model.safetensors")
    if cfg.get("lora"):
        lcfg = LoRAConfig.from_dict(cfg["lora"])
        base, adapters = split_state(tensors)
        if adapters:  # training form (an interrupted run)
            tensors = add_delta(base, adapters, lcfg.scale)
        elif not lcfg.merged:
            if not (ck / ADAPTER_FILE).exists():
                raise MoorelmError(f"{ck} has no {ADAPTER_FILE}, which this run's config needs")
            tensors = add_delta(tensors, ckpt.read_tensors(ck / ADAPTER_FILE), lcfg.scale)
    return cfg, tensors, ck


def load_model_with_adapters(run_dir: str | Path, device: str | torch.device = "cpu",
                             checkpoint: Path | None = None) -> tuple[GPT, Tokenizer, dict, dict]:
    """Like ``checkpoint.load_model``, also for LoRA runs in any form (adapters merged)."""
    run_dir = Path(run_dir)
    cfg = ckpt.read_run_config(run_dir)
    if "classifier" in cfg:
        raise MoorelmError(f"{run_dir} is a text classifier, not a language model; use "
                           "'moorelm classify'")
    if not cfg.get("lora"):
        return ckpt.load_model(run_dir, device=device, checkpoint=checkpoint)
    cfg, tensors, ck = plain_weights(run_dir, checkpoint)
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    ckpt.load_weights(model, tensors, ck / "model.safetensors")
    tokenizer = Tokenizer.load(run_dir / ckpt.TOKENIZER)
    return model.to(device).eval(), tokenizer, cfg, ckpt.read_state(ck)
