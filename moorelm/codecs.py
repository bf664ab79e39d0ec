"""Codecs: how each kind of model is stored as tensors in a run folder's checkpoint.

A codec (``Codec``) turns a model into the files of a checkpoint (``checkpoint_files``),
checks a checkpoint's safetensors headers against the run's ModelConfig before anything is
allocated (``check``), builds the model for inference (``from_files``) and puts saved state
back into a model being trained (``load_files``). Kinds here: ``lm`` (a plain GPT) and
``lora`` (a GPT with low-rank adapters, stored in final form at every save); other modules
add theirs with ``register_codec`` (the GPT classifier; formats imported from elsewhere).
``moorelm.run.RunFolder`` is the only caller that reads or writes the files; this module only
maps tensors to models and back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError, first_line
from moorelm.model import GPT, meta_device, rope_tables

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
FORMAT = "moorelm-1"
ADAPTER_FORMAT = "moorelm-lora-1"
A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"
# merged LoRA: where unmerging (merged - scale B A) misses the frozen weight by a rounding
# step, the exact values, so that a resumed run continues bit for bit
FIX_AT, FIX_TO = ".unmerge_at", ".unmerge_to"
_FLOATS = {"F16", "BF16", "F32", "F64"}

Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)
Files = dict[str, dict[str, torch.Tensor]]  # file name -> its tensors
CheckpointFiles = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]  # + metadata


# ----------------------------------------------------------------------------- safetensors


def _damaged(path: Path, e: Exception) -> MoorelmError:
    return MoorelmError(f"{path} is truncated or corrupt ({first_line(e, 120)}); "
                        "use an earlier checkpoint or retrain")


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a damaged file is one line."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(Path(path), e) from None


def read_header(path: Path) -> tuple[Header, dict[str, str]]:
    """(name -> (shape, dtype), metadata) of a safetensors file, without reading a tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                      for k in f.keys()}
            return header, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several error types for damaged files
        raise _damaged(Path(path), e) from None


def model_tensors(model: nn.Module,
                  state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model``'s state dict (or ``state``, e.g. gathered from shards), detached, on the CPU,
    without the tied head (safetensors refuses shared storage)."""
    sd = dict(model.state_dict() if state is None else state)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


# ----------------------------------------------------------------------------- GPT weights


def gpt_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a GPT of ``cfg`` stores (tied head left out), computed
    on the meta device: nothing is allocated."""
    with meta_device():
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model_tensors_meta(model).items()}


def model_tensors_meta(model: GPT) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def check_gpt_header(cfg: ModelConfig, header: Header, source: Path,
                     extra: dict[str, tuple[int, ...]] | None = None,
                     ignore: Callable[[str], bool] | None = None) -> dict[str, tuple[int, ...]]:
    """Compare config.json with a file's header before anything is allocated.

    The cheap sizes come first (layer count, embedding), so a config claiming a million layers
    or a huge width is refused before even a meta-device model is built; then every name and
    shape. ``extra`` are further tensors the kind stores (e.g. a classifier head); names for
    which ``ignore`` is true are another codec's business. Returns the expected shapes.
    """
    names = {k: v for k, v in header.items() if not (ignore and ignore(k))}
    for name, (_, dtype) in names.items():
        if dtype not in _FLOATS:
            raise MoorelmError(f"{source}: tensor {name!r} has dtype {dtype}; moorelm weights "
                               "are floating point (F16, BF16, F32); the file is not a moorelm model")
    layers = {int(k.split(".")[1]) for k in names if re.match(r"^blocks\.\d+\.", k)}
    n_found = max(layers) + 1 if layers else 0
    if n_found != cfg.n_layer:
        raise MoorelmError(f"{source} does not match config.json: config.json says n_layer="
                           f"{cfg.n_layer}, the weights hold {n_found} layers")
    want = (cfg.vocab_size, cfg.n_embd)
    got = names.get("wte.weight", (None,))[0]
    if got != want:
        raise MoorelmError(f"{source} does not match config.json: wte.weight is "
                           f"{got}, config.json implies {want} (vocab_size, n_embd)")
    if cfg.pos == "learned" and names.get("wpe.weight", (None,))[0] != (cfg.seq_len, cfg.n_embd):
        raise MoorelmError(f"{source} does not match config.json: wpe.weight is "
                           f"{names.get('wpe.weight', (None,))[0]}, config.json implies "
                           f"{(cfg.seq_len, cfg.n_embd)} (seq_len, n_embd)")
    if cfg.pos == "rope":
        table = 2 * cfg.seq_len * cfg.head_dim * 4  # cos and sin, float32
        weights = sum(4 * _numel(s) for s, _ in names.values())
        if table > max(weights, 1 << 28):
            raise MoorelmError(f"config.json: seq_len={cfg.seq_len} needs {table / 2**30:.1f} GiB "
                               "of rotary tables, more than the model's weights; lower seq_len")
    expected = {**gpt_shapes(cfg), **(extra or {})}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected) - {"lm_head.weight"})
    if unexpected and any(k.endswith((A_SUFFIX, B_SUFFIX)) for k in unexpected):
        raise MoorelmError(f"{source} holds LoRA adapter tensors (e.g. {unexpected[0]!r}) but "
                           "config.json has no 'lora' section; the config is not this run's")
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise MoorelmError(f"{source} does not match config.json ({what}); the config and "
                           "weights come from different models")
    for k, shape in expected.items():
        if names[k][0] != shape:
            raise MoorelmError(f"{source} does not match config.json: {k} has shape "
                               f"{names[k][0]}, config implies {shape}")
    return expected


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_gpt_weights(model: GPT, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load weights strictly; mismatches with the config become a clear error."""
    expected = _checked(model, tensors, source)
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight


def _checked(model: GPT, tensors: dict[str, torch.Tensor],
             source: Path | str) -> dict[str, torch.Tensor]:
    """``model``'s state dict (tied head left out) once ``tensors`` match it name for name
    and shape for shape; a mismatch is one line naming ``source``."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise MoorelmError(f"{source} does not match config.json ({what}); the config and "
                           "weights come from different models")
    for k, t in tensors.items():
        if k in expected and expected[k].shape != t.shape:
            raise MoorelmError(f"{source} does not match config.json: {k} has shape "
                               f"{tuple(t.shape)}, config implies {tuple(expected[k].shape)}")
    return expected


def build_gpt(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: Path | str,
              share: bool = False) -> GPT:
    """A GPT holding ``tensors``, built on the meta device and then given its weights, so
    nothing is initialised or allocated twice.

    By default every weight is copied into memory of the model's own (``tensors`` may map a
    file, which another program could rewrite in place under a long-running server).
    ``share`` makes the model hold ``tensors`` themselves where their dtype and layout
    already fit (an importer's freshly converted weights): a 135M-parameter import then
    peaks at one copy of its weights instead of two."""
    with meta_device():
        model = GPT(cfg)
    expected = _checked(model, tensors, source)
    weights = {}
    for k, want in expected.items():
        t = tensors[k]
        fits = share and t.dtype == want.dtype and t.device.type == "cpu" and t.is_contiguous()
        weights[k] = t if fits else t.to("cpu", want.dtype, copy=True).contiguous()
    # assign: the meta tensors are replaced, not copied into (``to_empty`` would allocate
    # first, through PyTorch's Python reference ops, whose first use imports sympy: ~30 MiB)
    model.load_state_dict(weights, strict=False, assign=True)  # names checked above
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if cfg.pos == "rope":  # non-persistent buffers are rebuilt, not loaded
        model.rope_cos, model.rope_sin = rope_tables(
            cfg.head_dim, cfg.seq_len, cfg.rope_base, cfg.rope_scaling)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MoorelmError(f"{source}: no values for {left[:3]} (a model part the weights "
                           "do not cover)")
    return model


# ----------------------------------------------------------------------------- codecs


class Codec(Protocol):
    """How one kind of model is stored in a checkpoint folder.

    ``files`` names the files of a checkpoint the codec reads (those present are handed to
    it); ``checkpoint_files`` returns file name -> (tensors, safetensors metadata) for
    ``RunFolder.save``; ``check`` compares the run's ModelConfig with the files' headers
    before anything is allocated; ``from_files`` builds the model for inference;
    ``load_files`` puts the saved state back into the model being trained (resume).
    """

    kind: str
    files: tuple[str, ...]

    def checkpoint_files(self, model: nn.Module,
                         state: dict[str, torch.Tensor] | None = None) -> CheckpointFiles: ...

    def check(self, cfg: ModelConfig, headers: dict[str, Header], checkpoint: Path) -> None: ...

    def from_files(self, cfg: ModelConfig, files: Files) -> nn.Module: ...

    def load_files(self, model: nn.Module, files: Files) -> None: ...


def kind_metadata(kind: str) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind}


class LMCodec:
    """A plain GPT language model: model.safetensors is its state dict."""

    kind = "lm"
    files = (MODEL_FILE,)

    def checkpoint_files(self, model: nn.Module,
                         state: dict[str, torch.Tensor] | None = None) -> CheckpointFiles:
        return {MODEL_FILE: (model_tensors(model, state), kind_metadata(self.kind))}

    def check(self, cfg: ModelConfig, headers: dict[str, Header], checkpoint: Path) -> None:
        check_gpt_header(cfg, headers[MODEL_FILE], checkpoint / MODEL_FILE)

    def from_files(self, cfg: ModelConfig, files: Files) -> GPT:
        return build_gpt(cfg, files[MODEL_FILE], MODEL_FILE)

    def load_files(self, model: nn.Module, files: Files) -> None:
        load_gpt_weights(model, files[MODEL_FILE], MODEL_FILE)


def split_adapters(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                               dict[str, torch.Tensor]]:
    """A state dict -> (base tensors, adapter tensors)."""
    adapters = {k: v for k, v in tensors.items() if k.endswith((A_SUFFIX, B_SUFFIX))}
    return {k: v for k, v in tensors.items() if k not in adapters}, adapters


def adapter_pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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

    ``sign=-1`` undoes a merge (up to float rounding); the sum is formed in float64.
    """
    out = dict(base)
    for layer, (a, b) in adapter_pairs(adapters).items():
        key = layer + ".weight"
        if key not in base:
            raise MoorelmError(f"adapter for {layer} has no matching weight {key} in the model")
        w = base[key]
        out[key] = (w.double() + sign * scale * (b.double() @ a.double())).to(w.dtype)
    return out


class LoRACodec:
    """A GPT with low-rank adapters (config.json's ``"lora"`` section), saved in final form.

    merged: model.safetensors is a plain GPT with the adapters folded in, readable as any run;
    separate: model.safetensors holds the base weights (untouched, but for the embedding and
    head when those were trained). adapter.safetensors holds the adapters either way (rank,
    alpha, targets in its metadata) and, merged, the few exact base values that unmerging
    misses by rounding, so resuming restores the frozen weights bit for bit. Checkpoints of
    older versions that kept the adapters inside model.safetensors still load.
    """

    kind = "lora"
    files = (MODEL_FILE, ADAPTER_FILE)

    def __init__(self, settings: dict[str, Any]):
        if not isinstance(settings, dict):
            raise MoorelmError(f"config.json's 'lora' section must be an object, got {settings!r}")
        rank, alpha = settings.get("rank"), settings.get("alpha")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise MoorelmError(f"config.json: LoRA rank must be an integer >= 1, got {rank!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise MoorelmError(f"config.json: LoRA alpha must be a number > 0, got {alpha!r}")
        merged = settings.get("merged", True)
        if not isinstance(merged, bool):
            raise MoorelmError(f"config.json: LoRA merged must be true or false, got {merged!r}")
        self.settings, self.rank, self.scale, self.merged = settings, rank, alpha / rank, merged

    def checkpoint_files(self, model: nn.Module,
                         state: dict[str, torch.Tensor] | None = None) -> CheckpointFiles:
        base, adapters = split_adapters(model_tensors(model, state))
        if not adapters:
            raise RuntimeError("LoRACodec.checkpoint_files needs a model wrapped by apply_lora")
        meta = {"format": ADAPTER_FORMAT, "kind": self.kind, "lora": json.dumps(self.settings)}
        adapter_file = dict(adapters)
        weights = base
        if self.merged:
            weights = add_delta(base, adapters, self.scale)
            back = add_delta(weights, adapters, self.scale, sign=-1.0)
            for layer in adapter_pairs(adapters):
                key = layer + ".weight"
                miss = (back[key] != base[key]).flatten().nonzero().flatten()
                if miss.numel():
                    adapter_file[key + FIX_AT] = miss
                    adapter_file[key + FIX_TO] = base[key].flatten()[miss].contiguous()
        return {MODEL_FILE: (weights, kind_metadata(self.kind)), ADAPTER_FILE: (adapter_file, meta)}

    def _is_fix(self, name: str) -> bool:
        return name.endswith((FIX_AT, FIX_TO))

    def check(self, cfg: ModelConfig, headers: dict[str, Header], checkpoint: Path) -> None:
        model_h = headers[MODEL_FILE]
        inline = {k: v for k, v in model_h.items() if k.endswith((A_SUFFIX, B_SUFFIX))}
        if not inline and ADAPTER_FILE not in headers:
            raise MoorelmError(f"{checkpoint} has no {ADAPTER_FILE}, which this LoRA run's "
                               "config.json needs")
        adapters = inline or {k: v for k, v in headers[ADAPTER_FILE].items() if not self._is_fix(k)}
        shapes = check_gpt_header(cfg, model_h, checkpoint / MODEL_FILE,
                                  ignore=lambda k: k.endswith((A_SUFFIX, B_SUFFIX)))
        source = checkpoint / (MODEL_FILE if inline else ADAPTER_FILE)
        for name, (shape, dtype) in adapters.items():
            if not name.endswith((A_SUFFIX, B_SUFFIX)):
                raise MoorelmError(f"{source} holds a tensor that is not a LoRA adapter: {name!r}")
            layer = name.rsplit(".", 1)[0]
            w = shapes.get(layer + ".weight")
            if w is None or len(w) != 2:
                raise MoorelmError(f"{source}: adapter {name!r} names no linear layer of this model")
            want = (self.rank, w[1]) if name.endswith(A_SUFFIX) else (w[0], self.rank)
            if shape != want or dtype not in _FLOATS:
                raise MoorelmError(f"{source}: {name} is {dtype} {shape}, config.json's LoRA "
                                   f"rank {self.rank} implies a float tensor of {want}")

    def trained_state(self, files: Files) -> dict[str, torch.Tensor]:
        """The state dict of the wrapped model that was saved: base weights and adapters."""
        base, adapters = split_adapters(files[MODEL_FILE])
        if adapters:  # written by an older version while training
            return files[MODEL_FILE]
        stored = files[ADAPTER_FILE]
        adapters = {k: v for k, v in stored.items() if not self._is_fix(k)}
        if self.merged:
            base = add_delta(base, adapters, self.scale, sign=-1.0)
            for name, at in stored.items():
                if name.endswith(FIX_AT):
                    key = name[: -len(FIX_AT)]
                    fixed = base[key].flatten().clone()
                    fixed[at.long()] = stored[key + FIX_TO].to(fixed.dtype)
                    base[key] = fixed.view_as(base[key])
        return {**base, **adapters}

    def from_files(self, cfg: ModelConfig, files: Files) -> GPT:
        base, adapters = split_adapters(files[MODEL_FILE])
        if adapters:  # older training form
            weights = add_delta(base, adapters, self.scale)
        elif self.merged:
            weights = base
        else:
            stored = files[ADAPTER_FILE]
            weights = add_delta(base, {k: v for k, v in stored.items() if not self._is_fix(k)},
                                self.scale)
        return build_gpt(cfg, weights, MODEL_FILE)

    def load_files(self, model: nn.Module, files: Files) -> None:
        load_gpt_weights(model, self.trained_state(files), MODEL_FILE)


# kind -> factory (the run's config.json -> codec); other modules add theirs
_CODECS: dict[str, Callable[[dict], Codec]] = {
    "lm": lambda cfg: LMCodec(),
    "lora": lambda cfg: LoRACodec(cfg.get("lora")),
}


def register_codec(kind: str, factory: Callable[[dict], Codec]) -> None:
    """Make ``RunFolder.load`` build checkpoints of ``kind`` with ``factory(run config)``."""
    _CODECS[kind] = factory


def kind_of_config(config: dict) -> str:
    """The kind a run's config.json describes (what checkpoints without a recorded kind are)."""
    if "classifier" in config:
        return "classifier"
    return "lora" if config.get("lora") else "lm"


def codec_for(config: dict, kind: str | None = None) -> Codec:
    """The codec that saves and loads the models of a run with this config.json."""
    kind = kind or kind_of_config(config)
    if kind in _CODECS:
        return _CODECS[kind](config)
    raise MoorelmError(f"checkpoints of kind {kind!r} cannot be loaded by this version of moorelm")


__all__ = ["ADAPTER_FILE", "MODEL_FILE", "CheckpointFiles", "Codec", "Files", "Header", "LMCodec",
           "LoRACodec", "add_delta", "adapter_pairs", "build_gpt", "check_gpt_header", "codec_for",
           "gpt_shapes", "kind_metadata", "kind_of_config", "load_gpt_weights", "model_tensors",
           "read_header", "read_tensors", "register_codec", "split_adapters"]
