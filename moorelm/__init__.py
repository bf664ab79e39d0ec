"""moorelm: build, pretrain, fine-tune, serve and measure transformer language models.

The public Python API (the CLI is a thin layer over it)::

    import moorelm
    result = moorelm.pretrain("runs/demo", preset="small-char", train_overrides={"max_time": 60})
    lm = moorelm.load("runs/demo")
    for piece in lm.generate("ROMEO:", max_new_tokens=100):
        print(piece, end="")
"""

from __future__ import annotations

from pathlib import Path

from moorelm.config import ModelConfig, TrainConfig, build_configs
from moorelm.errors import MoorelmError
from moorelm.generate import LanguageModel
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer

__version__ = "0.1.0"


def load(run: str | Path, device: str = "auto") -> LanguageModel:
    """The newest checkpoint of a run folder, ready to generate (LoRA adapters merged in)."""
    from moorelm.device import resolve_device
    from moorelm.run import RunFolder

    loaded = RunFolder(run).load(device=resolve_device(device))
    return LanguageModel(loaded.model, loaded.tokenizer, Path(run),
                         meta={"config": loaded.config, "state": loaded.state})


def pretrain(out, **kwargs):
    """See ``moorelm.train.pretrain``."""
    from moorelm.train import pretrain as _pretrain

    return _pretrain(out, **kwargs)


def train(*args, **kwargs):
    """See ``moorelm.train.train``."""
    from moorelm.train import train as _train

    return _train(*args, **kwargs)


__all__ = ["GPT", "LanguageModel", "ModelConfig", "MoorelmError", "Tokenizer", "TrainConfig",
           "build_configs", "load", "pretrain", "train", "__version__"]
