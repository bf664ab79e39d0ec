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

What a checkpoint's tensors mean depends on the *kind* of model; each kind has a codec
(``moorelm.codecs``) that maps the model to its files and back. The kind is recorded in
model.safetensors' metadata (older checkpoints are told apart by config.json) and picks the
codec when a run is loaded.

Loading checks before allocating: the sizes in config.json are compared with the safetensors
header (names, shapes, dtypes) before any model is built, and the weights must be finite.
"""


from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from moorelm.atomic import atomic_write_json, replace_dir
from moorelm.codecs import (
    FORMAT,
    MODEL_FILE,
    CheckpointFiles,
    Codec,
    Files,
    codec_for,
    kind_of_config,
    read_header,
    read_tensors,
)
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError, from_os_error
from moorelm.jsonfile import read_json
from moorelm.tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
# what moorelm writes into a run folder (``clear`` removes these, config and tokenizer aside)
RUN_ENTRIES = (CONFIG_FILE, TOKENIZER_FILE, CHECKPOINTS_DIR, "metrics.csv", "loss.png",
               "finetune.json", "tb", "wandb", "trackio")
LOCK_FILE = ".lock.json"  # {"pid": N} of the holder; JSON like every file of a run
PROMPT_PLACEHOLDER = "{prompt}"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# kinds whose codec lives above this module, and what to use instead
_ELSEWHERE = {"classifier": "is a text classifier, not a language model; use 'moorelm classify'"}


# ----------------------------------------------------------------------------- optimizer state


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


def check_chat_settings(cfg: dict, path: Path | str = CONFIG_FILE) -> None:
    """config.json's ``name`` and ``chat`` section, type-checked (one line when wrong)."""
    name = cfg.get("name")
    if name is not None and not isinstance(name, str):
        raise MoorelmError(f"{path}: name must be text")
    chat = cfg.get("chat")
    if chat is None:
        return
    if not isinstance(chat, dict):
        raise MoorelmError(f"{path}: chat must be an object")
    for key in ("template", "bos_token", "eos_token", "pad_token", "unk_token"):
        if chat.get(key) is not None and not isinstance(chat[key], str):
            raise MoorelmError(f"{path}: chat.{key} must be text")
    ids = chat.get("stop_ids")
    if ids is not None and not (isinstance(ids, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise MoorelmError(f"{path}: chat.stop_ids must be a list of token ids")


class RunFolder:
    """A run folder on disk: config, tokenizer, checkpoints, resume state, locking."""

    def __init__(self, path: str | os.PathLike, shown: str | os.PathLike | None = None):
        self.path = Path(path)
        # the folder error lines name: the run being built, for a temporary folder beside it
        self.shown = Path(shown) if shown is not None else self.path

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
        if not (path.exists() or path.is_symlink()):
            raise MoorelmError(f"{self.path} is not a moorelm run folder (no {CONFIG_FILE})")
        cfg = read_json(path)  # a folder, a device, deep nesting, huge numbers: one line
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise MoorelmError(f"{path} has no 'model' section; it was not written by moorelm")
        if cfg.get("prompt_template") is not None:
            check_prompt_template(cfg["prompt_template"], f"{path}: prompt_template")
        check_chat_settings(cfg, path)
        return cfg

    def name(self, config: dict | None = None) -> str:
        """The model's name: the one an import kept (config.json ``name``), else the folder's."""
        name = (config or self.read_config()).get("name")
        return name if isinstance(name, str) and name.strip() else self.path.resolve().name

    def chat_settings(self, config: dict | None = None) -> dict:
        """config.json's ``chat`` section (template, bos/eos/pad token text, ``stop_ids``), as
        an import kept it; {} for a run trained here."""
        return dict((config or self.read_config()).get("chat") or {})

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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.config_path, config)
            tokenizer.save(self.tokenizer_path)
        except OSError as e:  # a full disk, a read-only folder: one line
            raise from_os_error(e, f"write the run files in {self.shown}") from None

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
        state = read_json(ck / STATE_FILE)
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
        # a failed write is one line; the half-written folder is gone, older checkpoints kept
        # (and then the same command is refused without --resume: say so)
        again = "run the same command with --resume" if self.checkpoints() else None
        shown = self.shown / final.relative_to(self.path)
        with replace_dir(final, f"save the checkpoint {shown}", again) as tmp:
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

    def check(self, checkpoint: Path | None = None, codec: Codec | None = None) -> Path:
        """Compare config.json with a checkpoint's safetensors headers (the newest checkpoint,
        with the codec its kind names by default): names, shapes and dtypes, nothing read or
        allocated, so a config asking for a million layers is refused at once. Returns the
        checkpoint."""
        config = self.read_config()
        ck = checkpoint or self.latest()
        codec = codec or codec_for(config, self.kind(ck, config))
        self._check(codec, self.model_config(config), ck)
        return ck

    def _check(self, codec: Codec, cfg: ModelConfig, ck: Path) -> list[str]:
        present = [n for n in codec.files if (ck / n).exists()]
        codec.check(cfg, {n: read_header(ck / n)[0] for n in present}, ck)
        return present

    def _read(self, codec: Codec, cfg: ModelConfig, ck: Path) -> Files:
        """The codec's files of a checkpoint: headers checked first, then tensors read and
        checked to be finite."""
        present = self._check(codec, cfg, ck)
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

    def check_folder(self) -> None:
        """Refuse a path that is a file, or a non-empty folder that is not a run."""
        if self.path.exists() and not self.path.is_dir():
            raise MoorelmError(f"{self.path} exists and is not a folder; choose another one")
        entries = self._foreign()
        if entries and not self.is_run():
            raise MoorelmError(f"{self.path} is not empty and is not a moorelm run folder (it "
                               f"holds {entries[0]!r}); choose a new or empty folder")

    def check_new(self, resume: bool = False) -> None:
        """Refuse to start a run here over files that are not a run's, or over a trained run
        unless resuming it; a run to resume must match its config.json (checked from the
        headers, before the training loop builds the model config.json describes)."""
        self.check_folder()
        if not self.checkpoints():
            return
        if not resume:
            raise MoorelmError(f"{self.path} already holds a trained run; pass --resume to "
                               "continue it or choose another --out")
        ck = self.latest()
        if self.kind(ck) not in _ELSEWHERE:  # a classifier's codec lives above this module;
            self.check(ck)  # its trainer checks on load

    def clear(self) -> None:
        """Remove a run's checkpoints, metrics, plots and tracker folders so a new run can
        start here (its config.json and tokenizer.json stay until the new run writes its
        own, so the folder is still known as a run); a folder that is not a run is refused,
        and files moorelm did not write stay."""
        self.check_folder()
        with self.lock():
            for name in RUN_ENTRIES[2:]:
                entry = self.path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()

    def lock(self) -> RunLock:
        """Hold the run folder for this process; another process gets one clear line."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RunLock(self.path)

    @contextlib.contextmanager
    def rewrite(self, force: bool = False) -> Iterator[RunFolder]:
        """A whole new run, built in a temporary folder beside this one and moved into place
        when the block ends without error. An existing run is replaced only with ``force``
        (and never while another process holds it); a folder that is not a run, never."""
        self.check_folder()
        if self.checkpoints() and not force:
            raise MoorelmError(f"{self.path} already holds a run; choose another folder or "
                               "pass --force")
        held = RunLock(self.path) if self.path.is_dir() else None
        try:
            with replace_dir(self.path) as tmp:
                yield RunFolder(tmp, shown=self.path)
        finally:
            if held is not None:
                held.release()


__all__ = ["CHECKPOINTS_DIR", "CONFIG_FILE", "LOCK_FILE", "LoadedRun", "OPTIMIZER_FILE",
           "RunFolder", "RunLock", "STATE_FILE", "TOKENIZER_FILE", "check_prompt_template",
           "load_optimizer_state", "optimizer_state"]
