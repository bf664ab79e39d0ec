"""The Hugging Face hub, for a name that is not a local path: is it a hub id, can the hub be
reached, and the local folder of a model's files.

Nothing here runs at import time or needs torch. A hub id goes to the network only when a
TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co) opens within
``HUB_PROBE_TIMEOUT`` seconds and ``HF_HUB_OFFLINE`` is unset; otherwise only the local cache
(``HF_HOME``) is read. Without the probe, a machine with no route out waits through
huggingface_hub's five retries (~25 s of "Retrying in 8s" lines) before the same error.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from moorelm.errors import MoorelmError, first_line

HUB_PROBE_TIMEOUT = 3.0  # seconds to open a connection to the hub before calling it unreachable
# what a model folder needs: configs, safetensors weights (sharded or not), tokenizer files and
# chat templates; pickled weights (.bin, .pt), ONNX, GGUF and other formats are never fetched
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_-]")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the cache alone."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@functools.cache
def hub_reachable(endpoint: str | None = None) -> bool:
    """Whether a TCP connection to the hub (``endpoint``, default huggingface_hub's, which
    follows ``HF_ENDPOINT``) opens within ``HUB_PROBE_TIMEOUT``; asked once per process."""
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = urlsplit(endpoint)
    if not url.hostname:
        return False
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT):
            return True
    except (OSError, ValueError):
        return False


def offline_reason() -> str:
    """Why a hub id was looked up in the cache alone, for an error line."""
    return ("HF_HUB_OFFLINE is set" if hub_offline()
            else "the Hugging Face hub cannot be reached from this machine")


def hub_online() -> bool:
    """Whether a hub id may be looked up on the hub now (not offline, and the hub answers)."""
    return not hub_offline() and hub_reachable()


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` reads as a hub model id (``org/name``) rather than a path: one slash,
    hub characters only, not a ``.gguf`` file name, and nothing at that path on disk."""
    text = str(name)
    return (bool(_HUB_ID.fullmatch(text)) and ".." not in text
            and not text.lower().endswith(".gguf") and not Path(text).exists())


def hub_folder(repo_id: str, patterns: tuple[str, ...] = MODEL_FILES) -> Path:
    """The local folder of hub model ``repo_id`` (a snapshot in the Hugging Face cache): its
    files matching ``patterns`` downloaded when the hub is reachable (with huggingface_hub's
    progress bars), else what the cache holds. A failure is one ``MoorelmError`` line."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MoorelmError(f"{repo_id!r} is not a local path; to fetch it from the Hugging Face "
                           "hub install huggingface_hub (pip install 'moorelm[hf]')") from None
    online = hub_online()
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(patterns),
                                        local_files_only=not online))
    except Exception as e:  # huggingface_hub's errors: not found, gated, HTTP, not cached
        if not online:
            raise MoorelmError(f"{repo_id!r} is not a local path, and as a Hugging Face id it is "
                               f"not in the local cache ({offline_reason()})") from None
        raise MoorelmError(f"{repo_id!r} is not a local path, and the Hugging Face hub could not "
                           f"provide it: {first_line(e)}") from None
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise MoorelmError(f"the hub's {repo_id!r} has no config.json: not a model in the "
                           "transformers format (a GGUF file must be downloaded and given as "
                           "FILE.gguf)")
    return folder


def hub_cache_name(folder: str | os.PathLike) -> str | None:
    """``org/name`` for a snapshot folder of the Hugging Face cache
    (``.../models--org--name/snapshots/REVISION``), else None."""
    path = Path(folder).resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/")
    return None
