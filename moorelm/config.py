"""Configuration as frozen data.

Two dataclasses describe a run:

- ``ModelConfig``: what the network is (sizes and architecture variant fields, read by the one
  ``GPT`` class in model.py);
- ``TrainConfig``: how it is trained (optimizer, schedule, batch, budget, precision, logging).

Both round-trip through JSON (``to_dict``/``from_dict``) and live in the run folder's
``config.json``. Two registries fill them:

- a **preset** names a model *size* (``tiny``, ``shakespeare-char``, ``gpt2``, ...);
- a **recipe** names an *architecture + optimizer + schedule* together (``gpt2-baseline``,
  ``moorelm``), i.e. the "how" of training, independent of size.

Precedence: dataclass defaults < recipe < preset sizes < explicit overrides (flags).
``from_dict`` is the way in for any dict read from a file: every field is type-checked
(``n_embd: 32.0``, ``n_head: true`` and ``vocab_size: "322"`` are refused with one line naming
the field, the value and the type expected) before the range checks of ``__post_init__``.
This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from moorelm.errors import MoorelmError

MAX_THREADS = 1024  # CPU threads taken (torch's own setter overflows far above)


def check_threads(threads: int | None, name: str = "threads") -> int | None:
    """``threads`` as given (None: torch's default) if it is an integer in 1..MAX_THREADS;
    else one line naming ``name`` (a flag, a field). Training, serving and the engine share
    it, and ``scale`` asks it before its first rung."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise MoorelmError(f"{name} must be an integer in 1..{MAX_THREADS}, got {threads!r}")
    return threads

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Variant fields select GPT-2 style or modern parts."""

    vocab_size: int = 256
    seq_len: int = 256  # context window (T)
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (plain MHA)
    n_embd: int = 384  # model width (C)
    pos: str = "learned"  # learned absolute positions | rope (rotary)
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (exact, 4x) | swiglu | relu2 (squared ReLU)
    mlp_hidden: int | None = None  # None: 4*n_embd for gelu/relu2, ~8/3*n_embd for swiglu
    bias: bool = False
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False  # normalise queries and keys per head before attention
    qk_gain: bool = False  # learned per-dimension gains after the QK-norm (Qwen3); its norm
    # then uses norm_eps, as an RMSNorm layer does (the parameter-free one keeps 1e-6)
    qkv_bias: bool = False  # a bias on the query/key/value projection only (Qwen2)
    head_dim: int | None = None  # head size (D); None: n_embd // n_head (Qwen3 sets its own).
    # Read back it is always the size; to_dict writes None when derived, so build a changed
    # config from to_dict() rather than dataclasses.replace(n_embd=...), which would keep it
    rope_base: float = 10000.0
    # Llama 3.1+ rotary scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None: plain rotary positions
    rope_scaling: dict | None = field(default=None, hash=False)
    norm_eps: float = 1e-5
    zero_init_proj: bool = False  # output projections start at zero (block = identity at init)
    logit_softcap: float | None = None  # tanh soft cap on the output logits
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mlp", self.mlp, MLPS)
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise MoorelmError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise MoorelmError(
                    f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
                )
            # resolved here so every reader sees the size; to_dict writes None back
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        elif self.head_dim < 1:
            raise MoorelmError(f"head_dim must be >= 1 (or null), got {self.head_dim}")
        if self.qk_gain and not self.qk_norm:
            raise MoorelmError("qk_gain=True needs qk_norm=True (the gains follow the QK-norm)")
        if self.head_dim % 2 and self.pos == "rope":
            raise MoorelmError(f"rotary positions need an even head size, got {self.head_dim}")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise MoorelmError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MoorelmError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("rope_base", "norm_eps"):
            if not getattr(self, name) > 0:
                raise MoorelmError(f"model {name} must be > 0, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            if self.pos != "rope":
                raise MoorelmError("rope_scaling needs pos='rope' (it rescales rotary positions)")
            object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise MoorelmError(f"logit_softcap must be > 0 (or null), got {self.logit_softcap}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise MoorelmError(f"mlp_hidden must be >= 1 (or null), got {self.mlp_hidden}")
        if not self.init_std >= 0:
            raise MoorelmError(f"init_std must be >= 0, got {self.init_std}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            # keep the parameter count of a 4x MLP: 3 matrices of 8/3 C instead of 2 of 4C,
            # rounded up to a multiple of 64 for friendlier matmuls
            return ((8 * self.n_embd // 3) + 63) // 64 * 64
        return 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.head_dim == self.n_embd // self.n_head:
            d["head_dim"] = None  # the derived size: a width change later derives it anew
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, "model config")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. Budgets: the first of max_steps/max_tokens/max_time reached."""

    batch_size: int = 32  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step, per process
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds of training (eval and checkpoints excluded)
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    muon_lr: float = 0.02  # peak Muon learning rate (when optimizer == "muon")
    muon_momentum: float = 0.95
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: last fraction of the run spent decaying
    weight_decay: float = 0.1  # on 2-D hidden weight matrices
    decay_embeddings: bool = False  # also decay embeddings/head (nanoGPT decays every 2-D tensor)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    embed_lr_scale: float = 1.0  # AdamW lr multiplier for embeddings and head
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast); auto: bf16 on capable CUDA, else fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False
    fsdp: bool = False
    seed: int = 1337
    eval_interval: int = 250  # steps between evaluations (0: only at the end)
    eval_iters: int = 20  # val batches per evaluation
    eval_batch_size: int | None = None  # sequences per val batch (None: batch_size); fix it to
    # compare runs of different batch sizes on the same val windows
    log_interval: int = 10
    ckpt_interval: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 1
    threads: int | None = None  # torch CPU threads (None: torch's default)
    peak_flops: float | None = None  # device peak FLOP/s for MFU (None: from a table)

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise MoorelmError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise MoorelmError(f"{name} must be >= 1, got {v}")
        if self.max_time is not None and self.max_time <= 0:
            raise MoorelmError(f"max_time must be > 0 seconds, got {self.max_time}")
        if self.lr <= 0 or self.min_lr < 0 or self.muon_lr <= 0:
            raise MoorelmError("learning rates must be positive")
        if self.warmup_steps < 0:
            raise MoorelmError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_frac <= 1:
            raise MoorelmError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.eval_iters < 1:
            raise MoorelmError(f"eval_iters must be >= 1, got {self.eval_iters}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise MoorelmError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise MoorelmError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise MoorelmError(f"eps must be > 0, got {self.eps}")
        for name in ("weight_decay", "grad_clip", "embed_lr_scale", "eval_interval",
                     "ckpt_interval"):
            if getattr(self, name) < 0:
                raise MoorelmError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise MoorelmError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_threads(self.threads)
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise MoorelmError(f"peak_flops must be > 0, got {self.peak_flops}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d, "train config")


@dataclass(frozen=True)
class Recipe:
    """Architecture + optimizer + schedule, independent of model size."""

    name: str
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- registries

# Sizes only: n_layer, n_head, n_embd, seq_len (and n_kv_head where the preset fixes it).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, seq_len=64),
    "nano": dict(n_layer=4, n_head=4, n_embd=128, seq_len=64),
    "small-char": dict(n_layer=4, n_head=4, n_embd=256, seq_len=128),
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, seq_len=1024),
}
PRESET_HELP = {
    "tiny": "2 layers, width 32, context 64: tests",
    "nano": "4 layers, width 128, context 64: nanoGPT's CPU Shakespeare size",
    "small-char": "4 layers, width 256, context 128: the `make demo` size",
    "shakespeare-char": "6 layers, width 384, context 256 (~10.7M params at vocab 65)",
    "gpt2": "12 layers, width 768, context 1024 (124M params at vocab 50257)",
    "gpt2-medium": "24 layers, width 1024, context 1024 (350M)",
}

RECIPES: dict[str, Recipe] = {
    "gpt2-baseline": Recipe(
        "gpt2-baseline",
        "GPT-2/nanoGPT: learned positions, LayerNorm, exact GELU, tied embeddings, no bias, "
        "AdamW 1e-3 (0.9, 0.99, wd 0.1), 100 warmup + cosine to 1e-4, clip 1.0, fp32",
        model=dict(pos="learned", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True,
                   qk_norm=False, zero_init_proj=False, logit_softcap=None),
        train=dict(optimizer="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine",
                   weight_decay=0.1, decay_embeddings=True, beta1=0.9, beta2=0.99,
                   grad_clip=1.0, dtype="fp32", embed_lr_scale=1.0),
    ),
    "moorelm": Recipe(
        "moorelm",
        "moorelm's default: rotary positions, RMSNorm, QK-norm, SwiGLU MLP, untied "
        "zero-init head, zero-init projections, Muon 0.04 (momentum 0.85) on hidden matrices + "
        "AdamW 6e-3 elsewhere, warmup-stable-decay schedule, half the run decaying; exports "
        "exactly as transformers' Qwen3 (measured in docs/recipe.md)",
        # RMSNorm + SwiGLU (was LayerNorm + GELU) so the architecture is exactly Qwen3's and a
        # default run can leave for transformers; norm_eps 1e-6 because Qwen3 has one eps for
        # its norms and its q/k norms, and moorelm's QK-norm uses 1e-6. The step costs the same
        # relative to the baseline as before (docs/recipe.md, section 3, round 3)
        model=dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                   qk_norm=True, zero_init_proj=True, logit_softcap=None, norm_eps=1e-6),
        train=dict(optimizer="muon", lr=6e-3, min_lr=0.0, muon_lr=0.04, muon_momentum=0.85,
                   warmup_steps=20, schedule="wsd", decay_frac=0.5, weight_decay=0.0,
                   beta1=0.9, beta2=0.95, grad_clip=1.0, dtype="auto", embed_lr_scale=1.0),
    ),
}
DEFAULT_RECIPE = "moorelm"


# Training defaults for fine-tuning (flags override them). AdamW for both methods: Muon's
# orthogonalised update is meant for full hidden matrices, not rank-r adapter factors.
SFT_TRAIN: dict[str, Any] = dict(
    optimizer="adamw", lr=3e-4, warmup_steps=20, schedule="cosine", weight_decay=0.0,
    decay_embeddings=False, beta1=0.9, beta2=0.99, grad_clip=1.0, batch_size=16,
    eval_interval=100, log_interval=10, ckpt_interval=500, keep_checkpoints=1,
)
LORA_LR = 2e-3  # adapters start at zero and are small: a higher rate than full fine-tuning
SFT_TEMPLATE = "{prompt}\n=> "  # a prompt, a line break and a cue: the completion follows
SFT_EPOCHS = 3.0  # passes over the training rows when neither epochs nor max_steps is given
SFT_EVAL_ROWS = 200  # held-out rows (at most 10% of the data) and rows scored by exact match


ROPE_SCALINGS = ("llama3",)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(d: dict) -> dict[str, Any]:
    """A valid llama3 ``rope_scaling`` as a fresh dict in a fixed key order (floats as floats),
    else one line naming what is wrong."""
    if not isinstance(d, dict):
        raise MoorelmError(f"rope_scaling must be an object or null, got {type(d).__name__}")
    kind = d.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise MoorelmError(f"rope_scaling rope_type {kind!r} is not supported; moorelm "
                           f"implements: {', '.join(ROPE_SCALINGS)}")
    unknown = sorted(map(str, set(d) - {"rope_type", *_LLAMA3_KEYS}))
    missing = [k for k in _LLAMA3_KEYS if k not in d]
    if unknown or missing:
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
        raise MoorelmError(f"rope_scaling (llama3) has {what}; it takes exactly: "
                           f"rope_type, {', '.join(_LLAMA3_KEYS)}")
    out: dict[str, Any] = {"rope_type": kind}
    for key in _LLAMA3_KEYS:
        base = "int" if key == "original_max_position_embeddings" else "float"
        value = d[key]
        if not _value_fits(base, value) or not value > 0:
            raise MoorelmError(f"rope_scaling {key} must be a positive "
                               f"{'integer' if base == 'int' else 'number'}, got {value!r}")
        out[key] = float(value) if base == "float" else value
    if not out["high_freq_factor"] > out["low_freq_factor"]:
        raise MoorelmError(f"rope_scaling high_freq_factor ({out['high_freq_factor']}) must be "
                           f"greater than low_freq_factor ({out['low_freq_factor']})")
    return out


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MoorelmError(f"{name} {value!r} is not valid; choose one of: {', '.join(choices)}")


_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "dict": "an object"}


def _value_fits(base: str, value: Any) -> bool:
    if base == "dict":
        return isinstance(value, dict)
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass: true is not a width
        return False
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        if isinstance(value, int):
            return abs(value) < 2**1023  # converts to a finite float
        return isinstance(value, float) and math.isfinite(value)
    return isinstance(value, str)


def _check_types(cls, d: dict[str, Any], what: str) -> None:
    """Every field of ``d`` has its dataclass field's type (an int is a valid float; null only
    where the field is optional), else one line naming field, value and expected type."""
    for f in fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        parts = [p.strip() for p in str(f.type).split("|")]
        optional = "None" in parts
        base = next(p for p in parts if p != "None")
        if value is None and optional:
            continue
        if value is None or not _value_fits(base, value):
            try:
                shown = repr(value)
            except ValueError:  # an integer past Python's digit limit for str()
                shown = "a very long integer"
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            expected = _EXPECTED[base] + (" or null" if optional else "")
            raise MoorelmError(f"{what} field {f.name!r} must be {expected}, got {shown} "
                               f"({'null' if value is None else type(value).__name__})")


def _from_dict(cls, d: dict[str, Any], what: str):
    if not isinstance(d, dict):
        raise MoorelmError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(d) - known))
    if unknown:
        raise MoorelmError(f"{what} has unknown field(s): {', '.join(unknown)}")
    _check_types(cls, d, what)
    try:
        return cls(**d)
    except TypeError as e:
        raise MoorelmError(f"{what} is invalid: {e}") from None


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise MoorelmError(f"{name!r} is not a preset; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise MoorelmError(f"{name!r} is not a recipe; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def build_configs(
    *,
    preset: str | None = None,
    recipe: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Defaults < recipe < preset < overrides. ``vocab_size`` normally comes from the data."""
    r = get_recipe(recipe or DEFAULT_RECIPE)
    m: dict[str, Any] = dict(r.model)
    if preset:
        m.update(get_preset(preset))
    m.update({k: v for k, v in (model_overrides or {}).items() if v is not None})
    t: dict[str, Any] = dict(r.train)
    t.update({k: v for k, v in (train_overrides or {}).items() if v is not None})
    return ModelConfig.from_dict(m), TrainConfig.from_dict(t)


def with_vocab(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    return replace(cfg, vocab_size=vocab_size)


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"
