"""The run folder: the one module that reads and writes it.

    runs/NAME/
      config.json                 {"model": ModelConfig, "train": TrainConfig, "recipe", "data", ...}
      tokenizer.json              Hugging Face tokenizers format
      metrics.csv, loss.png       written by the training loop
      .lock.json                  flock-ed by the process writing the run ({"pid": N})
      checkpoints/step-000500/    one complete checkpoint per folder
        model.safetensors         weights (metadata: step, format, kind)
        adapter.safetensors       LoRA adapters (LoRA runs only)
        optimizer.safetensors     optimizer tensors (absent for inference-only checkpoints)
        state.json                step, tokens seen, elapsed time, optimizer param groups

``RunFolder`` is the only code that touches these files. A checkpoint folder is written under
a temporary name, every file fsynced, then renamed into place; older checkpoints are deleted
only afterwards. A process killed at any instant leaves the previous checkpoint complete, and
``RunFolder.latest`` never returns a partial one.

What a checkpoint's tensors mean depends on the *kind* of model, and each kind has a codec
(``Codec``): ``checkpoint_files(model)`` gives the files to write, ``from_files`` rebuilds the
model for inference, ``load_files`` puts the saved state back into a training model (resume).
Kinds here: ``lm`` (a plain GPT) and ``lora`` (a GPT with low-rank adapters; the adapter maths
of ``finetune/lora.py`` stored in its final form at every save). Other modules plug in more
(the GPT classifier; formats imported from elsewhere) with ``register_codec``. The kind is
recorded in model.safetensors' metadata; older checkpoints are told apart by config.json.

Loading checks before allocating: the sizes in config.json are compared with the safetensors
header (names, shapes, dtypes) before any model is built, and the weights must be finite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moorelm.atomic import atomic_write_json, replace_dir
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.model import GPT, rope_tables
from moorelm.tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LOCK_FILE = ".lock.json"  # {"pid": N} of the holder; JSON like every file of a run
FORMAT = "moorelm-1"
ADAPTER_FORMAT = "moorelm-lora-1"
A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"
# merged LoRA: where unmerging (merged - scale B A) misses the frozen weight by a rounding
# step, the exact values, so that a resumed run continues bit for bit
FIX_AT, FIX_TO = ".unmerge_at", ".unmerge_to"
PROMPT_PLACEHOLDER = "{prompt}"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FLOATS = {"F16", "BF16", "F32", "F64"}

Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)
Files = dict[str, dict[str, torch.Tensor]]  # file name -> its tensors
CheckpointFiles = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]  # + metadata


# ----------------------------------------------------------------------------- safetensors


def _damaged(path: Path, e: Exception) -> MoorelmError:
    return MoorelmError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
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


def optimizer_state(opt: torch.optim.Optimizer,
                    state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's tensors, named "param_id.key", plus the JSON-able rest (param groups,
    scalars). ``state`` replaces ``opt.state_dict()`` (e.g. one gathered from shards)."""
    sd = opt.state_dict() if state is None else state
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    """The inverse of ``optimizer_state``."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, kv in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(kv)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------- GPT weights


def gpt_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a GPT of ``cfg`` stores (tied head left out), computed
    on the meta device: nothing is allocated."""
    with torch.device("meta"):
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
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight


def build_gpt(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: Path | str) -> GPT:
    """A GPT holding ``tensors``, built without initialising weights it then overwrites."""
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    if cfg.pos == "rope":  # non-persistent buffers are rebuilt, not loaded
        model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_base)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    load_gpt_weights(model, tensors, source)
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
        meta = {**kind_metadata(self.kind), "lora": json.dumps(self.settings)}
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
# kinds whose codec lives above this module, and what to use instead
_ELSEWHERE = {"classifier": "is a text classifier, not a language model; use 'moorelm classify'"}


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


# ----------------------------------------------------------------------------- locking

_HELD: dict[str, list] = {}  # lock file -> [fd, holders in this process]


class RunLock:
    """An exclusive ``flock`` on the run folder's lock file, for one writing process.

    Re-entrant within a process (a lock still referenced by an exception's traceback does not
    block the same process's retry); released by ``release()``, the ``with`` block, or when the
    object is collected.
    """

    def __init__(self, run: Path):
        self.key, self.done = str((run / LOCK_FILE).resolve()), False
        if fcntl is None:
            return
        held = _HELD.get(self.key)
        if held is not None:
            held[1] += 1
            return
        try:
            fd = os.open(self.key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MoorelmError(f"cannot create {self.key} ({e.strerror}); check the folder's "
                               "permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = json.loads(os.read(fd, 64).decode("ascii")).get("pid")
            except (ValueError, AttributeError):
                other = None
            os.close(fd)
            who = f" (pid {other})" if isinstance(other, int) else ""
            raise MoorelmError(f"{run} is in use by another moorelm process{who}; wait for it "
                               "to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid()}).encode() + b"\n")
        _HELD[self.key] = [fd, 1]

    def release(self) -> None:
        if self.done or fcntl is None:
            return
        self.done = True
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            os.close(held[0])  # closing the descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


# ----------------------------------------------------------------------------- the folder


@dataclass
class LoadedRun:
    """What ``RunFolder.load`` returns."""

    model: nn.Module  # in eval mode, on the requested device
    tokenizer: Tokenizer
    config: dict  # config.json
    state: dict  # the checkpoint's state.json
    checkpoint: Path
    kind: str


def check_prompt_template(template: Any, source: str = "prompt template") -> str:
    """A prompt template must be a string holding ``{prompt}`` exactly once."""
    if not isinstance(template, str) or template.count(PROMPT_PLACEHOLDER) != 1:
        raise MoorelmError(f"{source} {template!r} must be a string containing "
                           f"{PROMPT_PLACEHOLDER} exactly once, e.g. 'Q: {PROMPT_PLACEHOLDER}\\nA: '")
    return template


class RunFolder:
    """A run folder on disk: config, tokenizer, checkpoints, resume state, locking."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    # -- config and tokenizer

    def is_run(self) -> bool:
        """True when config.json is there and has a "model" section."""
        try:
            self.read_config()
        except MoorelmError:
            return False
        return True

    def read_config(self) -> dict:
        """config.json, checked: a JSON object with a "model" section and a valid template."""
        path = self.config_path
        if not path.is_file():
            raise MoorelmError(f"{self.path} is not a moorelm run folder (no {CONFIG_FILE})")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise MoorelmError(f"{path} is not valid JSON ({str(e)[:100]})") from None
        except OSError as e:
            raise MoorelmError(f"cannot read {path} ({e.strerror})") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise MoorelmError(f"{path} has no 'model' section; it was not written by moorelm")
        if cfg.get("prompt_template") is not None:
            check_prompt_template(cfg["prompt_template"], f"{path}: prompt_template")
        return cfg

    def model_config(self, config: dict | None = None) -> ModelConfig:
        return ModelConfig.from_dict((config or self.read_config())["model"])

    def tokenizer(self, model_cfg: ModelConfig | None = None, config: dict | None = None) -> Tokenizer:
        """The run's tokenizer, checked against the model's vocabulary when given."""
        path = self.tokenizer_path
        if not path.is_file():
            raise MoorelmError(f"{self.path} has no {TOKENIZER_FILE}")
        tok = Tokenizer.load(path)
        if model_cfg is not None:
            if tok.vocab_size > model_cfg.vocab_size:
                raise MoorelmError(f"{path} has {tok.vocab_size} tokens but config.json says "
                                   f"vocab_size={model_cfg.vocab_size}")
            # imported models may pad their embeddings past the tokenizer; moorelm's never do
            padded_ok = "imported_from" in (config or {})
            if tok.vocab_size < model_cfg.vocab_size and not padded_ok:
                raise MoorelmError(f"{path} has {tok.vocab_size} tokens but config.json says "
                                   f"vocab_size={model_cfg.vocab_size}; the tokenizer is not "
                                   "this run's")
        return tok

    def write_files(self, config: dict, tokenizer: Tokenizer) -> None:
        """config.json and tokenizer.json, each written atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, config)
        tokenizer.save(self.tokenizer_path)

    # -- checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / MODEL_FILE).exists() and (p / STATE_FILE).exists():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path:
        """The newest complete checkpoint folder."""
        if not self.path.is_dir():
            raise MoorelmError(f"run folder {self.path} does not exist")
        found = self.checkpoints()
        if not found:
            raise MoorelmError(f"run folder {self.path} has no checkpoint yet; train it first")
        return found[-1]

    def read_state(self, checkpoint: Path | None = None) -> dict:
        """A checkpoint's state.json (the newest checkpoint's by default)."""
        ck = checkpoint or self.latest()
        try:
            state = json.loads((ck / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise MoorelmError(f"{ck}/{STATE_FILE} is unreadable ({str(e)[:100]})") from None
        if not isinstance(state, dict):
            raise MoorelmError(f"{ck}/{STATE_FILE} is not a JSON object")
        return state

    def read_optimizer(self, checkpoint: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        path = checkpoint / OPTIMIZER_FILE
        if not path.exists():
            raise MoorelmError(f"{checkpoint} has no optimizer state, so it cannot be resumed")
        return read_tensors(path, device)

    def kind(self, checkpoint: Path | None = None, config: dict | None = None) -> str:
        """What a checkpoint holds: its recorded kind, else what config.json describes."""
        ck = checkpoint or self.latest()
        _, meta = read_header(ck / MODEL_FILE)
        return meta.get("kind") or kind_of_config(config or self.read_config())

    def codec(self, config: dict | None = None, checkpoint: Path | None = None) -> Codec:
        config = config or self.read_config()
        return codec_for(config, self.kind(checkpoint, config) if checkpoint else None)

    def save(self, step: int, files: CheckpointFiles, state: dict,
             optimizer: dict[str, torch.Tensor] | None = None, keep: int = 1) -> Path:
        """Write checkpoints/step-N atomically (``files`` from a codec's ``checkpoint_files``);
        keep the newest ``keep`` checkpoints."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"step-{step:08d}"
        stamp = {"step": str(step), "format": FORMAT}
        with replace_dir(final) as tmp:
            for name, (tensors, meta) in files.items():
                save_file(tensors, str(tmp / name), metadata={**stamp, **meta})
            if optimizer is not None:
                save_file(optimizer, str(tmp / OPTIMIZER_FILE), metadata=stamp)
            atomic_write_json(tmp / STATE_FILE, {"step": step, **state})
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints_dir.glob(".*.tmp"):  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def _read(self, codec: Codec, cfg: ModelConfig, ck: Path) -> Files:
        """The codec's files of a checkpoint: headers checked first, then tensors read and
        checked to be finite."""
        present = [n for n in codec.files if (ck / n).exists()]
        codec.check(cfg, {n: read_header(ck / n)[0] for n in present}, ck)
        files = {n: read_tensors(ck / n) for n in present}
        for n, tensors in files.items():
            for k, t in tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise MoorelmError(f"{ck / n}: tensor {k!r} holds NaN or infinite values; "
                                       "use an earlier checkpoint or retrain")
        return files

    def load(self, device: str | torch.device = "cpu", checkpoint: Path | None = None,
             codec: Codec | None = None) -> LoadedRun:
        """The model of a checkpoint (the newest by default), ready for inference.

        Without ``codec``, the kind the checkpoint records picks it, among the language models
        (plain, LoRA, registered formats); a given codec must match that kind.
        """
        config = self.read_config()
        cfg = self.model_config(config)
        ck = checkpoint or self.latest()
        kind = self.kind(ck, config)
        if codec is None:
            if kind in _ELSEWHERE:  # a model that is not a language model
                raise MoorelmError(f"{self.path} {_ELSEWHERE[kind]}")
            codec = codec_for(config, kind)
        elif codec.kind != kind:
            raise MoorelmError(f"{ck} holds a {kind!r} model, not a {codec.kind!r} one")
        tokenizer = self.tokenizer(cfg, config)
        model = codec.from_files(cfg, self._read(codec, cfg, ck))
        return LoadedRun(model.to(device).eval(), tokenizer, config, self.read_state(ck), ck, kind)

    def load_into(self, model: nn.Module, checkpoint: Path | None = None,
                  codec: Codec | None = None) -> Path:
        """Put a checkpoint's saved state back into ``model`` (resume); returns the checkpoint."""
        config = self.read_config()
        ck = checkpoint or self.latest()
        codec = codec or codec_for(config, self.kind(ck, config))
        codec.load_files(model, self._read(codec, self.model_config(config), ck))
        return ck

    # -- guarding the folder

    def _foreign(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE)

    def _check_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise MoorelmError(f"{self.path} exists and is not a folder; choose another one")
        entries = self._foreign()
        if entries and not self.is_run():
            raise MoorelmError(f"{self.path} is not empty and is not a moorelm run folder (it "
                               f"holds {entries[0]!r}); choose a new or empty folder")

    def check_new(self, resume: bool = False) -> None:
        """Refuse to start a run here over files that are not a run's, or over a trained run
        unless resuming it."""
        self._check_folder()
        if not resume and self.checkpoints():
            raise MoorelmError(f"{self.path} already holds a trained run; pass --resume to "
                               "continue it or choose another --out")

    def lock(self) -> RunLock:
        """Hold the run folder for this process; another process gets one clear line."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RunLock(self.path)

    @contextlib.contextmanager
    def rewrite(self, force: bool = False) -> Iterator[RunFolder]:
        """A whole new run, built in a temporary folder beside this one and moved into place
        when the block ends without error. An existing run is replaced only with ``force``
        (and never while another process holds it); a folder that is not a run, never."""
        self._check_folder()
        if self.checkpoints() and not force:
            raise MoorelmError(f"{self.path} already holds a run; choose another folder or "
                               "pass --force")
        held = RunLock(self.path) if self.path.is_dir() else None
        try:
            with replace_dir(self.path) as tmp:
                yield RunFolder(tmp)
        finally:
            if held is not None:
                held.release()


__all__ = ["ADAPTER_FILE", "CHECKPOINTS_DIR", "CONFIG_FILE", "Codec", "LMCodec", "LOCK_FILE",
           "LoRACodec", "LoadedRun", "MODEL_FILE", "OPTIMIZER_FILE", "RunFolder", "RunLock",
           "STATE_FILE", "TOKENIZER_FILE", "add_delta", "build_gpt", "check_gpt_header",
           "check_prompt_template", "codec_for", "gpt_shapes", "kind_of_config",
           "load_gpt_weights", "load_optimizer_state", "model_tensors", "optimizer_state",
           "read_header", "read_tensors", "register_codec", "split_adapters"]
