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

How they are stored. The run folder's ``LoRACodec`` (``moorelm.run``) writes every
checkpoint in its final form as it is saved: merged into the weights (the default:
model.safetensors is a plain GPT with ``W + (alpha/rank) B A``) or kept separate
(model.safetensors holds the base weights), with the adapters in adapter.safetensors either
way; config.json's ``"lora"`` section (``LoRAConfig.to_dict``) says which. ``moorelm.load``
returns a plain GPT with the adapters merged in; ``--resume`` puts the base weights and the
adapters back into a wrapped model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moorelm.codecs import LoRACodec
from moorelm.errors import MoorelmError
from moorelm.model import GPT


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

    def codec(self) -> LoRACodec:
        """The run folder codec that saves and loads models with these adapters."""
        return LoRACodec(self.to_dict())

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
