"""moorelm: build, pretrain, fine-tune, serve and measure transformer language models.

The public Python API (the CLI is a thin layer over it)::

    import moorelm
    result = moorelm.pretrain("runs/demo", preset="small-char", train_overrides={"max_time": 60})
    lm = moorelm.load("runs/demo")
    print(lm.generate("ROMEO:", max_new_tokens=100))        # the text
    for piece in lm.generate("ROMEO:", stream=True):         # or piece by piece
        print(piece, end="")
    texts = lm.generate(["ROMEO:", "JULIET:"], seed=1)       # a batch: a list of texts
    lm.score("O Romeo").logprobs                             # per-token log-probabilities

The names below are imported on first use, so ``import moorelm.config`` (or any other module
that needs no torch) does not pull in torch through this file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moorelm.config import ModelConfig, TrainConfig, build_configs
    from moorelm.errors import MoorelmError
    from moorelm.generate import LanguageModel
    from moorelm.model import GPT
    from moorelm.tokenizer import Tokenizer

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first read)
_LAZY = {
    "GPT": "moorelm.model",
    "LanguageModel": "moorelm.generate",
    "ModelConfig": "moorelm.config",
    "MoorelmError": "moorelm.errors",
    "Tokenizer": "moorelm.tokenizer",
    "TrainConfig": "moorelm.config",
    "build_configs": "moorelm.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module 'moorelm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load(source: str | Path, device: str = "auto", seq_len: int | None = None,
         weights: str = "fp32", batched: bool = True) -> LanguageModel:
    """A language model ready to generate and chat, from what ``moorelm import`` accepts too.

    ``source`` is a run folder (its newest checkpoint, LoRA adapters merged in), or, converted
    in memory without writing a run folder: a GGUF file, a bundled short name (``smollm2``),
    a Hugging Face model folder (GPT-2, Llama, Mistral, Qwen2, Qwen3) or hub id (``org/name``,
    from the Hugging Face cache, downloaded first when the hub is reachable; safetensors and
    tokenizer files only, see ``moorelm.hub``). ``seq_len`` shortens the model's context
    window (a run's or an imported model's), as ``moorelm import --seq-len`` does. ``weights``:
    fp32 (as trained), bf16, int8 or int4 (see ``moorelm.quantize``); on a CPU, fp32 and bf16
    projections are held in oneDNN's blocked layout, so the model is for inference (train
    from ``RunFolder(run).load()``). ``batched=False`` is for decoding one sequence at a time
    (the ``generate`` and ``chat`` commands): fp32 projections then stay row-major, whose
    one-row product (``decode_plan.few_rows_product``) measured 1.4-1.55x the packed
    layout's step on SmolLM2, and int8 ones take ``quantize.Int8RowsLinear`` (~1.3-1.5x
    serving's int8 step at one row, closer to fp32); the batched layouts are faster from 3
    rows up. A model of at most ``quantize.TWIN_BYTES`` of projections keeps both layouts
    either way."""
    from moorelm.device import resolve_device
    from moorelm.errors import MoorelmError
    from moorelm.generate import LanguageModel
    from moorelm.interop.gguf import read_gguf_import, resolve_source
    from moorelm.interop.hf import is_hf_folder, read_hf
    from moorelm.interop.sources import local_source
    from moorelm.quantize import check_weights, quantize
    from moorelm.run import RunFolder

    check_weights(weights)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or seq_len < 1):
        raise MoorelmError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    device = resolve_device(device)
    path = local_source(source)  # a hub id: its snapshot in the Hugging Face cache
    imported = None
    if not RunFolder(path).is_run():
        gguf = resolve_source(path)
        if gguf is not None:
            imported = read_gguf_import(gguf, seq_len=seq_len)
        elif is_hf_folder(path):
            imported = read_hf(path, seq_len=seq_len)
    if imported is None:
        loaded = RunFolder(path).load(device=device)
        config = loaded.config
        if seq_len is not None:
            loaded.model.shorten(seq_len)
            config = {**config, "model": loaded.model.config.to_dict()}
        quantize(loaded.model, weights, batched=batched)
        return LanguageModel(loaded.model, loaded.tokenizer, path,
                             meta={"config": config, "state": loaded.state})
    model = imported.build()
    imported.tensors.clear()  # the model holds the weights now
    config = imported.run_config(model)
    model = quantize(model.to(device).eval(), weights, batched=batched)
    return LanguageModel(model, imported.tokenizer, path,
                         meta={"config": config, "state": {"step": 0}})


def pretrain(out, **kwargs):
    """See ``moorelm.training.pretrain.pretrain``."""
    from moorelm.training.pretrain import pretrain as _pretrain

    return _pretrain(out, **kwargs)


def train(*args, **kwargs):
    """See ``moorelm.training.loop.train``."""
    from moorelm.training.loop import train as _train

    return _train(*args, **kwargs)


__all__ = ["GPT", "LanguageModel", "ModelConfig", "MoorelmError", "Tokenizer", "TrainConfig",
           "build_configs", "load", "pretrain", "train", "__version__"]
