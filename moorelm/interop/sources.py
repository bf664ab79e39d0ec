"""What a model source names, before anything is read: a run folder, a GGUF file (or a bundled
short name such as ``smollm2``), a Hugging Face folder, or a Hugging Face hub id."""

from __future__ import annotations

import os
from pathlib import Path

from moorelm.errors import MoorelmError
from moorelm.hub import hub_folder, is_hub_id
from moorelm.interop.gguf import resolve_source
from moorelm.interop.hf import is_hf_folder
from moorelm.run import RunFolder


def source_kind(source: str | os.PathLike) -> str | None:
    """"run", "gguf", "hf" or "hub" for what ``moorelm.load`` and ``moorelm import`` take, in
    the order they try them; None for anything else."""
    path = Path(source)
    if RunFolder(path).is_run():
        return "run"
    if resolve_source(source) is not None:
        return "gguf"
    if is_hf_folder(path):
        return "hf"
    if is_hub_id(source):
        return "hub"
    return None


def local_source(source: str | os.PathLike) -> Path:
    """The path to read ``source`` from: a hub id (``org/name``, not a bundled GGUF name)
    becomes its snapshot folder in the Hugging Face cache, fetched first when the hub answers
    (``hub.hub_folder``); anything else is its own path."""
    if is_hub_id(source) and resolve_source(source) is None:
        return hub_folder(str(source))
    return Path(source)


def require_run(source: str | os.PathLike, what: str = "fine-tune") -> None:
    """Refuse, in one line that names the import command, a source that is a model to import
    rather than a run folder (fine-tuning writes a run that refers to its base run)."""
    kind = source_kind(source)
    hint = f"'moorelm import {source} RUN' writes the run to {what}"
    if kind in ("gguf", "hf"):
        raise MoorelmError(f"{source} is a model to import, not a run folder: {hint}")
    if kind == "hub":  # or a mistyped path: nothing is there
        raise MoorelmError(f"{source} is not a run folder (nothing is there); if it is a Hugging "
                           f"Face id, {hint}")
