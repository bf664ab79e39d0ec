"""A catalogue of hostile inputs, over every CLI verb.

Each case gives one verb a bad file, flag or value and checks the house rule for user
errors: exit status 2, exactly one line on stderr (``moorelm: error: ...``), no traceback,
and no file outside the case's own output folder touched (the inputs, a sibling folder of
the user's files and the shared tiny run are compared before and after). Cases run
in-process through ``cli.main(argv)``; ``serve`` runs in a subprocess with a timeout, since
a case that wrongly starts a server would never return.

No case is expected to fail: a hostile input that gets through is a bug to fix, not a mark
to add. ``test_every_verb_is_covered`` keeps the table honest as verbs are added.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from moorelm.cli import VERBS, main

from .conftest import SMALL_TEXT

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "moorelm: error: "
FAST_TRAIN = ["--preset", "tiny", "--max-steps", "1", "--batch-size", "2", "--eval-iters", "1",
              "--threads", "1", "--quiet"]


class Ctx:
    """Where a case builds its inputs (``inp``), writes its output (``out``, also the
    working directory) and the folder of user files it must leave alone (``user``)."""

    def __init__(self, tmp: Path, run: Path, hf: Path):
        self.tmp, self.shared_run, self.shared_hf = tmp, run, hf
        self.inp, self.out, self.user = tmp / "in", tmp / "out", tmp / "user"
        for d in (self.inp, self.out, self.user / "sub"):
            d.mkdir(parents=True)
        (self.user / "thesis.txt").write_text("years of work\n")
        (self.user / "sub" / "notes.md").write_text("notes\n")
        self.watched = [self.inp, self.user, run, hf]

    def user_folder(self, name: str) -> Path:
        """Another folder of user files, beside ``user``, also watched."""
        folder = self.tmp / name
        shutil.copytree(self.user, folder)
        self.watched.append(folder)
        return folder

    def file(self, name: str, content: str | bytes = "") -> str:
        path = self.inp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        return str(path)

    def corpus(self) -> str:
        return self.file("small.txt", SMALL_TEXT)

    def pairs(self, rows: int = 20) -> str:
        return self.file("pairs.jsonl", "".join(
            json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n"
            for i in range(rows)))

    def run(self, edit: Callable[[Path], None] | None = None) -> str:
        """The shared tiny run itself (read-only), or a copy of it changed by ``edit``."""
        if edit is None:
            return str(self.shared_run)
        copy = self.inp / "run"
        shutil.copytree(self.shared_run, copy)
        edit(copy)
        return str(copy)

    def hf(self, edit: Callable[[Path], None]) -> str:
        copy = self.inp / "hf"
        shutil.copytree(self.shared_hf, copy)
        edit(copy)
        return str(copy)

    def fifo(self, name: str = "pipe.txt") -> str:
        os.mkfifo(self.inp / name)
        return str(self.inp / name)


def _config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """An edit of a run's config.json (parsed, changed, written back)."""
    def apply(run: Path) -> None:
        cfg = json.loads((run / "config.json").read_text())
        edit(cfg)
        (run / "config.json").write_text(json.dumps(cfg))
    return apply


def _raw(name: str, content: str | bytes | None = None, *, kind: str = "file"):
    """Replace ``name`` in a folder with raw bytes, a folder, a link to /dev/zero or nothing."""
    def apply(folder: Path) -> None:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        if kind == "dir":
            path.mkdir()
        elif kind == "zero":
            os.symlink("/dev/zero", path)
        elif content is not None:
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return apply


def _hf_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        conf = json.loads((folder / "config.json").read_text())
        edit(conf)
        (folder / "config.json").write_text(json.dumps(conf))
    return apply


def _weights(edit: Callable[[dict], None], name: str = "model.safetensors"):
    """An edit of the tensors of a run's newest checkpoint (or, with a folder that has no
    checkpoints, of ``name`` in it: a Hugging Face folder), metadata kept."""
    def apply(folder: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        checkpoints = sorted((folder / "checkpoints").glob("step-*"))
        path = (checkpoints[-1] if checkpoints else folder) / name
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata=meta)
    return apply


def _all(value: float) -> Callable[[dict], None]:
    """Every floating tensor filled with ``value`` (NaN, inf)."""
    def edit(tensors: dict) -> None:
        for k, t in tensors.items():
            tensors[k] = t.clone().fill_(value)
    return edit


def _to_int(tensors: dict) -> None:
    tensors["wte.weight" if "wte.weight" in tensors else "transformer.wte.weight"] = \
        tensors.get("wte.weight", tensors.get("transformer.wte.weight")).long()


def _small_tokenizer(run: Path) -> None:
    from moorelm.tokenizer import Tokenizer

    Tokenizer.train(["ab"], "char").save(run / "tokenizer.json")


def _index(entry: Callable[[Path], str]):
    """An HF folder whose weights are named by a sharded index instead: every tensor mapped to
    the file ``entry(folder)`` (the real weights, moved beside the folder or linked absolutely)."""
    def apply(folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
        target = entry(folder)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict.fromkeys(names, target)}))
        if target.startswith(".."):
            os.replace(folder / "model.safetensors", folder.parent / "outside.safetensors")
        else:
            (folder / "model.safetensors").unlink()
    return apply


def _os_error(target: str, code: int, filename: str | None = None):
    """A monkeypatch making ``module:attr`` raise ``OSError(code)`` (a read-only disk, a
    folder the user may not write) when called; ``filename``: the path the error names."""
    module, attr = target.split(":")

    def patch(monkeypatch) -> None:
        def refuse(*args, **kwargs):
            raise OSError(code, os.strerror(code), filename)
        monkeypatch.setattr(f"{module}.{attr}", refuse)
    return patch


def _enospc(target: str):
    """A monkeypatch making ``module:attr`` raise ENOSPC (a full disk) when called."""
    return _os_error(target, errno.ENOSPC)


def _safetensors_full(target: str):
    """A monkeypatch making ``module:attr`` raise what safetensors raises on a full disk."""
    module, attr = target.split(":")

    def patch(monkeypatch) -> None:
        from safetensors import SafetensorError

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        monkeypatch.setattr(f"{module}.{attr}", full)
    return patch


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    subprocess: bool = False
    patch: Callable | None = None
    timeout: int = 60  # seconds, for a subprocess case
    absent: str | None = None  # an output (under the case's out folder) that must not appear


DEEP = "[" * 100_000
DIGITS = '{"n": ' + "9" * 5000 + "}"
BINARY = bytes(range(256)) * 8
LATIN1 = "caf\u00e9 na\u00efve\n".encode("latin-1") * 20

CASES = [
    # ------------------------------------------------------------------ top level
    Case("unknown-verb", lambda c: ["frobnicate"]),
    Case("unknown-flag", lambda c: ["--frobnicate"]),
    # ------------------------------------------------------------------ corpus
    Case("corpus-missing", lambda c: ["corpus", "--corpus", str(c.inp / "nope.txt")]),
    Case("corpus-empty-file", lambda c: ["corpus", "--corpus", c.file("empty.txt")]),
    Case("corpus-empty-folder", lambda c: ["corpus", "--corpus", str(c.inp)]),
    Case("corpus-dev-zero", lambda c: ["corpus", "--corpus", "/dev/zero"]),
    Case("corpus-fifo", lambda c: ["corpus", "--corpus", c.fifo()]),
    Case("corpus-jsonl-invalid", lambda c: ["corpus", "--corpus", c.file("x.jsonl", "{oops\n")]),
    Case("corpus-jsonl-deep", lambda c: ["corpus", "--corpus", c.file("x.jsonl", DEEP + "\n")]),
    Case("corpus-jsonl-digits", lambda c: ["corpus", "--corpus", c.file("x.jsonl", DIGITS)]),
    Case("corpus-jsonl-surrogate",
         lambda c: ["corpus", "--corpus", c.file("x.jsonl", '{"text": "a\\ud800"}\n')]),
    Case("corpus-jsonl-list-rows", lambda c: ["corpus", "--corpus", c.file("x.jsonl", "[1]\n")]),
    Case("corpus-jsonl-number-text",
         lambda c: ["corpus", "--corpus", c.file("x.jsonl", '{"text": 5}\n')]),
    Case("corpus-jsonl-field",
         lambda c: ["corpus", "--corpus", c.file("x.jsonl", '{"text": "a"}\n'), "--text-field",
                    "body"]),
    Case("corpus-jsonl-binary", lambda c: ["corpus", "--corpus", c.file("x.jsonl", BINARY)]),
    Case("corpus-jsonl-gz-garbage",
         lambda c: ["corpus", "--corpus", c.file("x.jsonl.gz", b"not gzip at all")]),
    Case("corpus-folder-no-match",
         lambda c: ["corpus", "--corpus", str(Path(c.file("d/a.csv", "x")).parent)]),
    Case("corpus-unknown-play", lambda c: ["corpus", "--print", "no-such-play"]),
    Case("corpus-limit-not-int", lambda c: ["corpus", "--limit", "ten"]),
    # ------------------------------------------------------------------ prepare
    Case("prepare-no-out", lambda c: ["prepare", "--corpus", c.corpus()]),
    Case("prepare-out-user-folder", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                               str(c.user), "--quiet"]),
    Case("prepare-out-dot-dot", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                           f"{c.user}/sub/..", "--quiet"]),
    Case("prepare-out-file", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                        str(c.user / "thesis.txt"), "--quiet"]),
    Case("prepare-out-empty-name", lambda c: ["prepare", "--corpus", c.corpus(), "--out", "",
                                              "--quiet"]),
    Case("prepare-out-user-temp-name",  # the user's folder is named like prepare's temp folder
         lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                    str(c.user_folder("d.preparing").with_name("d")), "--quiet"]),
    Case("prepare-missing", lambda c: ["prepare", "--corpus", str(c.inp / "no.txt"), "--out",
                                       str(c.out / "d")]),
    Case("prepare-empty", lambda c: ["prepare", "--corpus", c.file("e.txt"), "--out",
                                     str(c.out / "d")]),
    Case("prepare-binary", lambda c: ["prepare", "--corpus", c.file("b.txt", BINARY), "--out",
                                      str(c.out / "d"), "--quiet"]),
    Case("prepare-latin1", lambda c: ["prepare", "--corpus", c.file("l.txt", LATIN1), "--out",
                                      str(c.out / "d"), "--quiet"]),
    Case("prepare-gz-garbage", lambda c: ["prepare", "--corpus", c.file("g.txt.gz", b"nope" * 9),
                                          "--out", str(c.out / "d"), "--quiet"]),
    Case("prepare-gz-truncated",
         lambda c: ["prepare", "--corpus",
                    c.file("t.txt.gz", gzip.compress(SMALL_TEXT.encode())[:-40]), "--out",
                    str(c.out / "d"), "--quiet"]),
    Case("prepare-gz-binary",
         lambda c: ["prepare", "--corpus", c.file("z.txt.gz", gzip.compress(b"\0" * 9999)),
                    "--out", str(c.out / "d"), "--quiet"]),
    Case("prepare-dev-zero", lambda c: ["prepare", "--corpus", "/dev/zero", "--out",
                                        str(c.out / "d")]),
    Case("prepare-jsonl-surrogate",
         lambda c: ["prepare", "--corpus", c.file("x.jsonl", '{"text": "\\udfff"}\n' * 12),
                    "--out", str(c.out / "d"), "--quiet"]),
    Case("prepare-val-frac-zero", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                             str(c.out / "d"), "--val-frac", "0"]),
    Case("prepare-val-frac-half", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                             str(c.out / "d"), "--val-frac", "0.5"]),
    Case("prepare-val-frac-nan", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                            str(c.out / "d"), "--val-frac", "nan"]),
    Case("prepare-val-frac-text", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                             str(c.out / "d"), "--val-frac", "a tenth"]),
    Case("prepare-workers-zero", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                            str(c.out / "d"), "--workers", "0"]),
    Case("prepare-workers-negative", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                                str(c.out / "d"), "--workers", "-3"]),
    Case("prepare-tokenizer-unknown", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                                 str(c.out / "d"), "--tokenizer", "word"]),
    Case("prepare-vocab-zero", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                          str(c.out / "d"), "--tokenizer", "bpe",
                                          "--vocab-size", "0", "--quiet"]),
    Case("prepare-unknown-play", lambda c: ["prepare", "--plays", "hamlett", "--out",
                                            str(c.out / "d")]),
    Case("prepare-plays-with-file", lambda c: ["prepare", "--corpus", c.corpus(), "--plays",
                                               "hamlet", "--out", str(c.out / "d")]),
    Case("prepare-full-disk", lambda c: ["prepare", "--corpus", c.corpus(), "--out",
                                         str(c.out / "d"), "--quiet"],
         patch=_enospc("moorelm.data._ShardWriter:write")),
    # ------------------------------------------------------------------ train
    Case("train-data-user-folder", lambda c: ["train", "--data", str(c.user), *FAST_TRAIN]),
    Case("train-data-file", lambda c: ["train", "--data", str(c.user / "thesis.txt"),
                                       *FAST_TRAIN]),
    Case("train-data-missing", lambda c: ["train", "--data", str(c.inp / "nope"), *FAST_TRAIN]),
    Case("train-corpus-into-user-folder",
         lambda c: ["train", "--corpus", c.corpus(), "--data", str(c.user), "--out",
                    str(c.out / "r"), *FAST_TRAIN]),
    Case("train-data-manifest-deep",
         lambda c: ["train", "--data", str(Path(c.file("ds/manifest.json", DEEP)).parent),
                    *FAST_TRAIN]),
    Case("train-data-manifest-dir",
         lambda c: (Path(c.inp / "ds" / "manifest.json").mkdir(parents=True),
                    ["train", "--data", str(c.inp / "ds"), *FAST_TRAIN])[-1]),
    Case("train-data-manifest-shard-escape",
         lambda c: ["train", "--data", str(Path(c.file("ds/manifest.json", json.dumps(
             {"format": 1, "fingerprint": "x", "dtype": "uint16", "vocab_size": 9, "splits": {
                 s: {"tokens": 9, "bytes": 9, "shards": [{"file": "/etc/passwd", "tokens": 9}]}
                 for s in ("train", "val")}}))).parent), *FAST_TRAIN]),
    Case("train-unknown-preset", lambda c: ["train", "--corpus", c.corpus(), "--preset", "gpt5"]),
    Case("train-unknown-recipe", lambda c: ["train", "--corpus", c.corpus(), "--recipe", "x"]),
    Case("train-unknown-norm", lambda c: ["train", "--corpus", c.corpus(), "--norm", "batch"]),
    Case("train-n-embd-indivisible", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                                "--n-embd", "33"]),
    Case("train-n-layer-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                          "--n-layer", "0"]),
    Case("train-n-head-negative", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                             "--n-head", "-2"]),
    Case("train-n-embd-float", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                          "--n-embd", "32.0"]),
    Case("train-seq-len-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                          "--seq-len", "0"]),
    Case("train-lr-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                     "--lr", "0"]),
    Case("train-lr-nan", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                    "--lr", "nan"]),
    Case("train-lr-inf", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                    "--lr", "inf"]),
    Case("train-batch-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                        "--batch-size", "0"]),
    Case("train-threads-huge", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                          "--threads", str(10**20)]),
    Case("train-max-steps-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                            "--max-steps", "0"]),
    Case("train-max-time-negative", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                               "--max-time", "-5"]),
    Case("train-max-tokens-huge-text", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                                  "--max-tokens", "1e99"]),
    Case("train-dropout-one", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                         "--dropout", "1.0"]),
    Case("train-rope-base-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                            "--rope-base", "0"]),
    Case("train-norm-eps-negative", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                               "--norm-eps", "-1e-5"]),
    Case("train-beta1-above-one", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                             "--beta1", "1.5"]),
    Case("train-eval-iters-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                             "--eval-iters", "0"]),
    Case("train-keep-checkpoints-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                                   "--keep-checkpoints", "0"]),
    Case("train-threads-zero", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                          "--threads", "0"]),
    Case("train-val-frac-big", lambda c: ["train", "--corpus", c.corpus(), *FAST_TRAIN,
                                          "--val-frac", "0.9"]),
    Case("train-resume-no-out", lambda c: ["train", "--resume"]),
    Case("train-resume-user-folder", lambda c: ["train", "--resume", "--out", str(c.user)]),
    Case("train-resume-with-preset", lambda c: ["train", "--resume", "--out", c.run(),
                                                "--preset", "tiny"]),
    Case("train-resume-config-deep",
         lambda c: ["train", "--resume", "--out", c.run(_raw("config.json", DEEP))]),
    Case("train-resume-n-layer-million",
         lambda c: ["train", "--resume", "--out",
                    c.run(_config(lambda d: d["model"].update(n_layer=1_000_000)))]),
    Case("train-resume-weights-nan",
         lambda c: ["train", "--resume", "--out", c.run(_weights(_all(float("nan")))),
                    "--max-steps", "99", "--quiet"]),
    Case("train-out-user-file", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                           str(c.user / "thesis.txt"), *FAST_TRAIN]),
    Case("train-full-disk-at-save", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                               str(c.out / "r"), *FAST_TRAIN],
         patch=_enospc("moorelm.run:save_file")),
    Case("train-full-disk-at-fsync", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                                str(c.out / "r"), *FAST_TRAIN],
         patch=_enospc("moorelm.atomic:fsync_file")),
    Case("train-full-disk-at-config", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                                 str(c.out / "r"), *FAST_TRAIN],
         patch=_enospc("moorelm.run:atomic_write_json")),
    Case("train-out-read-only", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                           str(c.out / "r"), *FAST_TRAIN],
         patch=_os_error("pathlib:Path.mkdir", errno.EROFS, "/mnt/ro/r")),
    Case("train-out-not-permitted", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                               str(c.out / "r"), *FAST_TRAIN],
         patch=_os_error("pathlib:Path.mkdir", errno.EACCES, "/home/other/r")),
    Case("train-full-disk-at-plot", lambda c: ["train", "--corpus", c.corpus(), "--out",
                                               str(c.out / "r"), *FAST_TRAIN],
         patch=_enospc("moorelm.training.loop:plot_loss")),
    # ------------------------------------------------------------------ chat
    Case("chat-missing-run", lambda c: ["chat", str(c.inp / "nope"), "--prompt", "a"]),
    Case("chat-prompt-empty", lambda c: ["chat", c.run(), "--prompt", "  "]),
    Case("chat-prompt-too-long", lambda c: ["chat", c.run(), "--prompt", "ab " * 5000]),
    Case("chat-temperature-negative",
         lambda c: ["chat", c.run(), "--prompt", "a", "--temperature", "-1"]),
    Case("chat-system-not-utf8",  # a byte that is not UTF-8, as Python reads it from argv
         lambda c: ["chat", c.run(), "--prompt", "a", "--system", "be \udcff brief"]),
    Case("chat-template-not-jinja", lambda c: [
        "chat", c.run(_config(lambda cfg: cfg.update(chat={"template": "{% for m in %}"}))),
        "--prompt", "a"]),
    Case("chat-template-raises", lambda c: [
        "chat", c.run(_config(lambda cfg: cfg.update(
            chat={"template": "{{ raise_exception('no system turn allowed') }}"}))),
        "--prompt", "a"]),
    Case("chat-stop-ids-not-ids", lambda c: [
        "chat", c.run(_config(lambda cfg: cfg.update(chat={"stop_ids": "2"}))), "--prompt", "a"]),
    # ------------------------------------------------------------------ generate
    # ------------------------------------------------------------------ inspect
    Case("inspect-missing-run", lambda c: ["inspect", str(c.inp / "nope"), "--prompt", "a"]),
    Case("inspect-user-folder", lambda c: ["inspect", str(c.user), "--prompt", "a"]),
    Case("inspect-config-deep",
         lambda c: ["inspect", c.run(_raw("config.json", DEEP)), "--prompt", "a"]),
    Case("inspect-weights-nan",
         lambda c: ["inspect", c.run(_weights(_all(float("nan")))), "--prompt", "a"]),
    Case("inspect-prompt-too-long", lambda c: ["inspect", c.run(), "--prompt", "ab " * 5000]),
    Case("inspect-layer-unknown", lambda c: ["inspect", c.run(), "--prompt", "a", "--layer", "99"]),
    Case("inspect-head-unknown", lambda c: ["inspect", c.run(), "--prompt", "a", "--head", "99"]),
    Case("inspect-top-k-negative", lambda c: ["inspect", c.run(), "--prompt", "a", "--top-k", "-1"]),
    Case("inspect-temperature-nan",
         lambda c: ["inspect", c.run(), "--prompt", "a", "--temperature", "nan"]),
    Case("inspect-new-tokens-negative",
         lambda c: ["inspect", c.run(), "--prompt", "a", "--max-new-tokens", "-1"]),
    Case("inspect-html-exists",
         lambda c: ["inspect", c.run(), "--prompt", "a", "--html", c.file("page.html", "mine")]),
    Case("inspect-png-under-file",
         lambda c: ["inspect", c.run(), "--prompt", "a", "--attention-png",
                    str(Path(c.file("plain.txt", "x")) / "att.png")]),
    # ------------------------------------------------------------------ generate
    Case("generate-missing-run", lambda c: ["generate", str(c.inp / "nope")]),
    Case("generate-user-folder", lambda c: ["generate", str(c.user)]),
    Case("generate-run-is-file", lambda c: ["generate", str(c.user / "thesis.txt")]),
    Case("generate-prompt-not-utf8", lambda c: ["generate", c.run(), "--prompt", "ab\udcff"]),
    Case("generate-seed-huge", lambda c: ["generate", c.run(), "--seed", str(10**20)]),
    Case("generate-config-empty", lambda c: ["generate", c.run(_raw("config.json", ""))]),
    Case("generate-config-binary", lambda c: ["generate", c.run(_raw("config.json", BINARY))]),
    Case("generate-config-list", lambda c: ["generate", c.run(_raw("config.json", "[1, 2]"))]),
    Case("generate-config-dir", lambda c: ["generate", c.run(_raw("config.json", kind="dir"))]),
    Case("generate-config-dev-zero",
         lambda c: ["generate", c.run(_raw("config.json", kind="zero"))],
         subprocess=True),  # reading /dev/zero whole would fill this process's memory
    Case("generate-config-deep", lambda c: ["generate", c.run(_raw("config.json", DEEP))]),
    Case("generate-config-digits", lambda c: ["generate", c.run(_raw("config.json", DIGITS))]),
    Case("generate-n-embd-float",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(n_embd=32.0)))]),
    Case("generate-n-head-bool",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(n_head=True)))]),
    Case("generate-vocab-string",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(vocab_size="322")))]),
    Case("generate-rope-base-zero",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(rope_base=0)))]),
    Case("generate-norm-eps-zero",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(norm_eps=0.0)))]),
    Case("generate-model-section-list",
         lambda c: ["generate", c.run(_config(lambda d: d.update(model=[1])))]),
    Case("generate-unknown-field",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(n_wings=2)))]),
    Case("generate-n-layer-million",  # refused from the header, no model of 10^6 layers built
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(n_layer=1_000_000)))]),
    Case("generate-n-embd-huge",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(n_embd=2**40)))]),
    Case("generate-vocab-huge",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(vocab_size=10**12)))]),
    Case("generate-seq-len-huge",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(seq_len=10**9)))]),
    Case("generate-rope-base-negative",
         lambda c: ["generate", c.run(_config(lambda d: d["model"].update(rope_base=-1.0)))]),
    Case("generate-weights-int", lambda c: ["generate", c.run(_weights(_to_int))]),
    Case("generate-weights-nan", lambda c: ["generate", c.run(_weights(_all(float("nan"))))]),
    Case("generate-weights-inf", lambda c: ["generate", c.run(_weights(_all(float("inf"))))]),
    Case("generate-weights-garbage",
         lambda c: ["generate", c.run(lambda r: next((r / "checkpoints").glob("step-*"))
                                      .joinpath("model.safetensors").write_bytes(BINARY))]),
    Case("generate-state-deep",
         lambda c: ["generate", c.run(lambda r: next((r / "checkpoints").glob("step-*"))
                                      .joinpath("state.json").write_text(DEEP))]),
    Case("generate-tokenizer-smaller", lambda c: ["generate", c.run(_small_tokenizer)]),
    Case("generate-tokenizer-garbage",
         lambda c: ["generate", c.run(_raw("tokenizer.json", BINARY))]),
    Case("generate-tokenizer-dev-zero",
         lambda c: ["generate", c.run(_raw("tokenizer.json", kind="zero"))], subprocess=True),
    Case("generate-tokenizer-missing",
         lambda c: ["generate", c.run(_raw("tokenizer.json"))]),
    Case("generate-no-checkpoints", lambda c: ["generate", c.run(_raw("checkpoints"))]),
    Case("generate-temperature-negative", lambda c: ["generate", c.run(), "--temperature", "-1"]),
    Case("generate-temperature-nan", lambda c: ["generate", c.run(), "--temperature", "nan"]),
    Case("generate-top-p-zero", lambda c: ["generate", c.run(), "--top-p", "0"]),
    Case("generate-top-p-two", lambda c: ["generate", c.run(), "--top-p", "2"]),
    Case("generate-top-k-zero", lambda c: ["generate", c.run(), "--top-k", "0"]),
    Case("generate-max-new-negative", lambda c: ["generate", c.run(), "--max-new-tokens", "-1"]),
    Case("generate-num-samples-zero", lambda c: ["generate", c.run(), "--num-samples", "0"]),
    Case("generate-device-unknown", lambda c: ["generate", c.run(), "--device", "abacus"]),
    # ------------------------------------------------------------------ evaluate
    Case("evaluate-missing-run", lambda c: ["evaluate", str(c.inp / "nope"), "--corpus",
                                            c.corpus()]),
    Case("evaluate-corpus-missing", lambda c: ["evaluate", c.run(), "--corpus",
                                               str(c.inp / "no.txt")]),
    Case("evaluate-corpus-binary", lambda c: ["evaluate", c.run(), "--corpus",
                                              c.file("b.txt", BINARY), "--quiet"]),
    Case("evaluate-weights-int", lambda c: ["evaluate", c.run(_weights(_to_int)), "--corpus",
                                            c.corpus(), "--quiet"]),
    Case("evaluate-corpus-fifo", lambda c: ["evaluate", c.run(), "--corpus", c.fifo()]),
    Case("evaluate-flag-abbreviated",  # --text is not a flag; once it meant --text-field
         lambda c: ["evaluate", c.run(), "--text", c.corpus(), "--quiet"]),
    Case("evaluate-batch-zero", lambda c: ["evaluate", c.run(), "--corpus", c.corpus(),
                                           "--batch-size", "0", "--quiet"]),
    Case("evaluate-max-tokens-negative", lambda c: ["evaluate", c.run(), "--corpus", c.corpus(),
                                                    "--max-tokens", "-5", "--quiet"]),
    # ------------------------------------------------------------------ finetune
    Case("finetune-no-out", lambda c: ["finetune", c.run(), "--data", c.pairs()]),
    Case("finetune-epochs-nan", lambda c: ["finetune", c.run(), "--data", c.pairs(), "--out",
                                           str(c.out / "ft"), "--epochs", "nan"]),
    Case("finetune-data-missing", lambda c: ["finetune", c.run(), "--data",
                                             str(c.inp / "no.jsonl"), "--out", str(c.out / "f")]),
    Case("finetune-data-dir", lambda c: ["finetune", c.run(), "--data", str(c.user), "--out",
                                         str(c.out / "f")]),
    Case("finetune-data-empty", lambda c: ["finetune", c.run(), "--data", c.file("e.jsonl"),
                                           "--out", str(c.out / "f")]),
    Case("finetune-data-binary", lambda c: ["finetune", c.run(), "--data",
                                            c.file("b.jsonl", BINARY), "--out", str(c.out / "f")]),
    Case("finetune-data-deep", lambda c: ["finetune", c.run(), "--data",
                                          c.file("d.jsonl", DEEP + "\n"), "--out",
                                          str(c.out / "f")]),
    Case("finetune-data-surrogate",
         lambda c: ["finetune", c.run(), "--data",
                    c.file("s.jsonl", '{"prompt": "\\ud800", "completion": "x"}\n' * 20),
                    "--out", str(c.out / "f"), "--max-steps", "1", "--quiet"]),
    Case("finetune-data-digits", lambda c: ["finetune", c.run(), "--data",
                                            c.file("d.jsonl", DIGITS + "\n"), "--out",
                                            str(c.out / "f")]),
    Case("finetune-data-surrogate-key",
         lambda c: ["finetune", c.run(), "--data",
                    c.file("k.jsonl", '{"prompt": "a", "completion": "b", "\\udc00": 1}\n' * 20),
                    "--out", str(c.out / "f"), "--max-steps", "1", "--quiet"]),
    Case("finetune-base-weights-int", lambda c: ["finetune", c.run(_weights(_to_int)), "--data",
                                                 c.pairs(), "--out", str(c.out / "f"),
                                                 "--max-steps", "1", "--quiet"]),
    Case("finetune-data-no-completion",
         lambda c: ["finetune", c.run(), "--data", c.file("n.jsonl", '{"prompt": "a"}\n'),
                    "--out", str(c.out / "f")]),
    Case("finetune-data-number-prompt",
         lambda c: ["finetune", c.run(), "--data",
                    c.file("n.jsonl", '{"prompt": 1, "completion": "b"}\n'), "--out",
                    str(c.out / "f")]),
    Case("finetune-base-not-a-run", lambda c: ["finetune", str(c.user), "--data", c.pairs(),
                                               "--out", str(c.out / "f")]),
    Case("finetune-lora-rank-negative",
         lambda c: ["finetune", c.run(), "--data", c.pairs(), "--out", str(c.out / "f"),
                    "--lora-rank", "-1"]),
    Case("finetune-epochs-zero", lambda c: ["finetune", c.run(), "--data", c.pairs(), "--out",
                                            str(c.out / "f"), "--epochs", "0"]),
    Case("finetune-lr-negative", lambda c: ["finetune", c.run(), "--data", c.pairs(), "--out",
                                            str(c.out / "f"), "--lr", "-1"]),
    Case("finetune-template-no-prompt",
         lambda c: ["finetune", c.run(), "--data", c.pairs(), "--out", str(c.out / "f"),
                    "--template", "no placeholder"]),
    # ------------------------------------------------------------------ finetune-eval
    Case("finetune-eval-data-missing", lambda c: ["finetune-eval", c.run(), "--data",
                                                  str(c.inp / "no.jsonl")]),
    Case("finetune-eval-missing-run", lambda c: ["finetune-eval", str(c.inp / "nope"),
                                                 "--data", c.pairs()]),
    Case("finetune-eval-rows-negative", lambda c: ["finetune-eval", c.run(), "--data",
                                                   c.pairs(), "--rows", "-1"]),
    # ------------------------------------------------------------------ finetune-demo-data
    Case("demo-data-unknown-task", lambda c: ["finetune-demo-data", "--task", "chess", "--out",
                                              str(c.out / "p.jsonl")]),
    Case("demo-data-rows-zero", lambda c: ["finetune-demo-data", "--rows", "0", "--out",
                                           str(c.out / "p.jsonl")]),
    Case("demo-data-out-folder", lambda c: ["finetune-demo-data", "--out", str(c.user)]),
    Case("demo-data-out-read-only",
         lambda c: ["finetune-demo-data", "--out", str(c.out / "p.jsonl")],
         patch=_os_error("tempfile:mkstemp", errno.EROFS, "/mnt/ro/.p.jsonl.x1y2.tmp")),
    # ------------------------------------------------------------------ finetune-classifier
    Case("classifier-train-missing",
         lambda c: ["finetune-classifier", "--train", str(c.inp / "no.csv"), "--out",
                    str(c.out / "m")]),
    Case("classifier-train-binary",
         lambda c: ["finetune-classifier", "--train", c.file("b.csv", BINARY), "--out",
                    str(c.out / "m")]),
    Case("classifier-train-folder",
         lambda c: ["finetune-classifier", "--train", str(c.user), "--out", str(c.out / "m")]),
    Case("classifier-epochs-zero",
         lambda c: ["finetune-classifier", "--train", c.file("t.csv", "text,label\na,b\n"),
                    "--out", str(c.out / "m"), "--epochs", "0"]),
    Case("classifier-epochs-nan",
         lambda c: ["finetune-classifier", "--train", c.file("t.csv", "text,label\na,b\n"),
                    "--out", str(c.out / "m"), "--epochs", "nan"]),
    Case("classifier-gpt-lr-inf",  # the head on a moorelm run: an infinite rate saved NaNs
         lambda c: ["finetune-classifier", "--model", c.run(), "--train",
                    c.file("t.csv", "text,label\na,b\n"), "--out", str(c.out / "m"),
                    "--lr", "inf"]),
    Case("classifier-max-time-nan",
         lambda c: ["finetune-classifier", "--train", c.file("t.csv", "text,label\na,b\n"),
                    "--out", str(c.out / "m"), "--max-time", "nan"]),
    Case("classifier-jsonl-deep",
         lambda c: ["finetune-classifier", "--train", c.file("t.jsonl", DEEP + "\n"), "--out",
                    str(c.out / "m")]),
    Case("classifier-jsonl-surrogate",
         lambda c: ["finetune-classifier", "--train",
                    c.file("s.jsonl", '{"text": "\\ud800", "label": "a"}\n' * 4), "--out",
                    str(c.out / "m")]),
    # ------------------------------------------------------------------ classify
    Case("classify-missing-model", lambda c: ["classify", str(c.inp / "nope"), "hello"]),
    Case("classify-user-folder", lambda c: ["classify", str(c.user), "hello"]),
    Case("classify-file-missing", lambda c: ["classify", c.run(), "--file",
                                             str(c.inp / "no.csv")]),
    # ------------------------------------------------------------------ genre-data
    Case("genre-data-passages-zero", lambda c: ["genre-data", "--out", str(c.out / "g"),
                                                "--passages-per-play", "0"]),
    Case("genre-data-out-under-user-file", lambda c: ["genre-data", "--out",
                                                      str(c.user / "thesis.txt" / "g")]),
    Case("genre-data-out-user-file", lambda c: ["genre-data", "--out",
                                                str(c.user / "thesis.txt")]),
    # ------------------------------------------------------------------ export / import
    Case("export-missing-run", lambda c: ["export", str(c.inp / "nope"), str(c.out / "hf")]),
    Case("export-format-unknown", lambda c: ["export", c.run(), str(c.out / "hf"), "--format",
                                             "onnx"]),
    Case("export-weights-nan", lambda c: ["export", c.run(_weights(_all(float("nan")))),
                                          str(c.out / "hf")]),
    Case("export-n-layer-million",
         lambda c: ["export", c.run(_config(lambda d: d["model"].update(n_layer=1_000_000))),
                    str(c.out / "hf")]),
    Case("export-into-user-folder", lambda c: ["export", c.run(), str(c.user)]),
    Case("export-full-disk", lambda c: ["export", c.run(), str(c.out / "hf")],
         patch=_safetensors_full("moorelm.interop.hf:save_file"), absent="hf"),
    Case("export-read-only", lambda c: ["export", c.run(), str(c.out / "hf")],
         patch=_os_error("tempfile:mkdtemp", errno.EROFS, "/mnt/ro/.hf.x1y2.tmp"), absent="hf"),
    Case("export-full-disk-at-fsync", lambda c: ["export", c.run(), str(c.out / "hf")],
         patch=_enospc("moorelm.atomic:fsync_file"), absent="hf"),
    Case("import-missing", lambda c: ["import", str(c.inp / "nope"), str(c.out / "r")]),
    Case("import-user-folder", lambda c: ["import", str(c.user), str(c.out / "r")]),
    Case("import-config-dir", lambda c: ["import", c.hf(_raw("config.json", kind="dir")),
                                         str(c.out / "r")]),
    Case("import-config-deep", lambda c: ["import", c.hf(_raw("config.json", DEEP)),
                                          str(c.out / "r")]),
    Case("import-config-digits", lambda c: ["import", c.hf(_raw("config.json", DIGITS)),
                                            str(c.out / "r")]),
    Case("import-config-binary", lambda c: ["import", c.hf(_raw("config.json", BINARY)),
                                            str(c.out / "r")]),
    Case("import-model-type-unknown",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(model_type="bert"))),
                    str(c.out / "r")]),
    Case("import-no-num-hidden-layers",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.pop("num_hidden_layers", None)
                                              or d.pop("n_layer", None))), str(c.out / "r")]),
    Case("import-list-valued-width",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(n_embd=[32], hidden_size=[32]))),
                    str(c.out / "r")]),
    Case("import-object-valued-heads",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(n_head={"a": 2},
                                                                 num_attention_heads={"a": 2}))),
                    str(c.out / "r")]),
    Case("import-config-is-list", lambda c: ["import", c.hf(_raw("config.json", "[1]")),
                                             str(c.out / "r")]),
    Case("import-n-layer-bool",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(n_layer=True))), str(c.out / "r")]),
    Case("import-n-layer-zero",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(n_layer=0))), str(c.out / "r")]),
    Case("import-n-layer-million",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(n_layer=1_000_000))),
                    str(c.out / "r")]),
    Case("import-eps-string",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(layer_norm_epsilon="1e-5"))),
                    str(c.out / "r")]),
    Case("import-eps-negative",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(layer_norm_epsilon=-1e-5))),
                    str(c.out / "r")]),
    Case("import-tie-list",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(tie_word_embeddings=[True]))),
                    str(c.out / "r")]),
    Case("import-moorelm-section-list",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(moorelm=[1]))), str(c.out / "r")]),
    Case("import-rope-scaling-list",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(rope_scaling=["linear"]))),
                    str(c.out / "r")]),
    Case("import-weights-int", lambda c: ["import", c.hf(_weights(_to_int)), str(c.out / "r")]),
    Case("import-weights-nan", lambda c: ["import", c.hf(_weights(_all(float("nan")))),
                                          str(c.out / "r")]),
    Case("import-weight-map-dot-dot",  # the index names a real weight file beside the folder
         lambda c: ["import", c.hf(_index(lambda f: "../outside.safetensors")), str(c.out / "r")]),
    Case("import-weight-map-absolute",  # ... or a real one anywhere, by its absolute path
         lambda c: ["import", c.hf(_index(lambda f: str(c.shared_hf / "model.safetensors"))),
                    str(c.out / "r")]),
    Case("import-weight-map-not-object",
         lambda c: ["import", c.hf(lambda f: (
                        (f / "model.safetensors").unlink(),
                        (f / "model.safetensors.index.json").write_text(
                            '{"weight_map": ["model.safetensors"]}'))), str(c.out / "r")]),
    Case("import-index-deep",
         lambda c: ["import", c.hf(lambda f: ((f / "model.safetensors").unlink(),
                                              (f / "model.safetensors.index.json").write_text(DEEP))),
                    str(c.out / "r")]),
    Case("import-tokenizer-deep", lambda c: ["import", c.hf(_raw("tokenizer.json", DEEP)),
                                             str(c.out / "r")]),
    Case("import-tokenizer-list", lambda c: ["import", c.hf(_raw("tokenizer.json", "[]")),
                                             str(c.out / "r")]),
    Case("import-tokenizer-config-dir",
         lambda c: ["import", c.hf(_raw("tokenizer_config.json", kind="dir")), str(c.out / "r")]),
    Case("import-weights-garbage",
         lambda c: ["import", c.hf(_raw("model.safetensors", BINARY)), str(c.out / "r")]),
    Case("import-seq-len-zero", lambda c: ["import", c.hf(lambda p: None), str(c.out / "r"),
                                           "--seq-len", "0"]),
    Case("import-into-user-folder", lambda c: ["import", c.hf(lambda p: None), str(c.user)]),
    # ------------------------------------------------------------------ serve (subprocess)
    Case("serve-missing-run", lambda c: ["serve", str(c.inp / "nope")], subprocess=True),
    Case("serve-user-folder", lambda c: ["serve", str(c.user)], subprocess=True),
    Case("serve-port-negative", lambda c: ["serve", c.run(), "--port", "-1"], subprocess=True),
    Case("serve-port-huge", lambda c: ["serve", c.run(), "--port", "70000"], subprocess=True),
    Case("serve-max-batch-huge",  # the cache's shape overflowed C sizes: a traceback
         lambda c: ["serve", c.run(), "--port", "0", "--max-batch", str(10**20)],
         subprocess=True, timeout=30),
    Case("serve-max-batch-zero", lambda c: ["serve", c.run(), "--max-batch", "0"],
         subprocess=True),
    Case("serve-threads-zero", lambda c: ["serve", c.run(), "--threads", "0"], subprocess=True),
    Case("serve-threads-huge", lambda c: ["serve", c.run(), "--threads", str(10**20)],
         subprocess=True, timeout=30),
    Case("serve-config-deep", lambda c: ["serve", c.run(_raw("config.json", DEEP))],
         subprocess=True),
    Case("serve-api-key-non-ascii", lambda c: ["serve", c.run(), "--api-key", "cl\u00e9",
                                               "--port", "0"], subprocess=True,
         timeout=30),
    # ------------------------------------------------------------------ scale / trend
    Case("scale-budget-zero", lambda c: ["scale", "--budget", "0", "--out", str(c.out / "s")]),
    Case("scale-budget-text", lambda c: ["scale", "--budget", "a while", "--out",
                                         str(c.out / "s")]),
    Case("scale-threads-zero", lambda c: ["scale", "--budget", "1m", "--threads", "0", "--out",
                                          str(c.out / "s")], absent="s"),
    Case("scale-levels-zero", lambda c: ["scale", "--levels", "0", "--out", str(c.out / "s")]),
    Case("scale-level-ratio-nan", lambda c: ["scale", "--budget", "1m", "--level-ratio", "nan",
                                             "--out", str(c.out / "s")]),
    Case("scale-level-span-huge", lambda c: ["scale", "--budget", "1m", "--level-ratio", "1e150",
                                             "--out", str(c.out / "s")]),
    Case("scale-budget-flops-inf", lambda c: ["scale", "--budget-flops", "inf", "--out",
                                              str(c.out / "s")]),
    Case("scale-budget-years", lambda c: ["scale", "--budget", "1e400", "--out",
                                          str(c.out / "s")]),
    Case("scale-shapes-bogus", lambda c: ["scale", "--shapes", "wide,tall", "--out",
                                          str(c.out / "s")]),
    Case("scale-report-only-missing", lambda c: ["scale", "--report-only",
                                                 str(c.inp / "nope")]),
    Case("scale-report-only-user-folder", lambda c: ["scale", "--report-only", str(c.user)]),
    Case("scale-ladder-json-deep",
         lambda c: ["scale", "--report-only",
                    str(Path(c.file("lad/ladder.json", DEEP)).parent)]),
    Case("scale-ladder-json-list",
         lambda c: ["scale", "--report-only", str(Path(c.file("lad/ladder.json", "[1]")).parent)]),
    Case("scale-ladder-json-dir",
         lambda c: (Path(c.inp / "lad" / "ladder.json").mkdir(parents=True),
                    ["scale", "--report-only", str(c.inp / "lad")])[-1]),
    Case("scale-ladder-spec-bogus",
         lambda c: ["scale", "--report-only", str(Path(c.file("lad/ladder.json", json.dumps(
             {"spec": {"wings": 2}, "results": {"a": {"name": "a"}}}))).parent)]),
    Case("trend-top-k-zero", lambda c: ["trend", "--top-k", "0", "--out", str(c.out)]),
    Case("trend-out-under-user-file", lambda c: ["trend", "--out", str(c.user / "thesis.txt" / "t")]),
    Case("trend-out-user-file", lambda c: ["trend", "--out", str(c.user / "thesis.txt")]),
    # ------------------------------------------------------------------ structured output
    # (wt-structured) --json-schema FILE on generate and chat: a file that is missing, not
    # JSON, a folder, a pipe, nested past the parser, not a schema, malformed, with a keyword
    # the grammar would not enforce, or that the grammar library cannot compile; and --json
    # with --json-schema. (response_format over HTTP: tests/test_structured.py.)
    Case("generate-json-schema-missing",
         lambda c: ["generate", c.run(), "--json-schema", str(c.inp / "nope.json")]),
    Case("generate-json-schema-not-json",
         lambda c: ["generate", c.run(), "--json-schema", c.file("s.json", "{type: object")]),
    Case("generate-json-schema-binary",
         lambda c: ["generate", c.run(), "--json-schema", c.file("s.json", BINARY)]),
    Case("generate-json-schema-folder",
         lambda c: ["generate", c.run(), "--json-schema", str(c.user)]),
    Case("generate-json-schema-fifo",
         lambda c: ["generate", c.run(), "--json-schema", c.fifo("s.json")]),
    Case("generate-json-schema-deep",
         lambda c: ["generate", c.run(), "--json-schema", c.file("s.json", DEEP)]),
    Case("generate-json-schema-list",
         lambda c: ["generate", c.run(), "--json-schema", c.file("s.json", "[1, 2]")]),
    Case("generate-json-schema-malformed", lambda c: [
        "generate", c.run(), "--json-schema", c.file("s.json", '{"type": "strin"}')]),
    Case("generate-json-schema-unenforced", lambda c: [
        "generate", c.run(), "--json-schema", c.file("s.json", '{"not": {"type": "null"}}')]),
    Case("generate-json-schema-uncompilable", lambda c: [
        "generate", c.run(), "--json-schema",
        c.file("s.json", '{"type": "string", "pattern": "(?<=a)b"}')]),
    Case("generate-json-and-json-schema", lambda c: [
        "generate", c.run(), "--json", "--json-schema", c.file("s.json", '{"type": "object"}')]),
    Case("chat-json-schema-missing",
         lambda c: ["chat", c.run(), "--prompt", "a", "--json-schema", str(c.inp / "nope.json")]),
    Case("chat-json-schema-uncompilable", lambda c: [
        "chat", c.run(), "--prompt", "a", "--json-schema",
        c.file("s.json", '{"$ref": "#/$defs/nope"}')]),
    # ------------------------------------------------------------------ wt-families: HF families
    # (import of Llama/Mistral/Qwen2/Qwen3 folders, and moorelm.load of a folder on the fly)
    Case("import-family-unsupported",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(model_type="gemma3"))),
                    str(c.out / "r")]),
    Case("import-remote-code-auto-map",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(
             auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}))), str(c.out / "r")]),
    Case("import-remote-code-flag",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(trust_remote_code=True))),
                    str(c.out / "r")]),
    Case("import-pickled-only",
         lambda c: ["import", c.hf(lambda f: ((f / "model.safetensors").unlink(),
                                              (f / "pytorch_model.bin").write_bytes(b"never read"))),
                    str(c.out / "r")]),
    Case("import-shape-disagrees",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(n_embd=48, n_head=2))),
                    str(c.out / "r")]),
    Case("import-rope-yarn",  # llama3 scaling imports; yarn (and the others) do not
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(
             model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 8.0}))),
                    str(c.out / "r")]),
    Case("import-family-weights-disagree",  # config says Qwen3, the weights are GPT-2's
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(model_type="qwen3"))),
                    str(c.out / "r")]),
    Case("import-mistral-window-text",
         lambda c: ["import", c.hf(_hf_config(lambda d: d.update(model_type="mistral",
                                                                 sliding_window="4k"))),
                    str(c.out / "r")]),
    Case("generate-hf-folder-remote-code",
         lambda c: ["generate", c.hf(_hf_config(lambda d: d.update(auto_map={"A": "x.Y"}))),
                    "--max-new-tokens", "2"]),
    Case("generate-hf-folder-pickled-only",
         lambda c: ["generate", c.hf(lambda f: ((f / "model.safetensors").unlink(),
                                                (f / "pytorch_model.bin").write_bytes(b"no"))),
                    "--max-new-tokens", "2"]),
    # ------------------------------------------------------------------ finetune on chat rows
    # (issue 15, section 3: {"messages": [...]} rows, the run's chat template, assistant loss)
    Case("finetune-chat-unknown-role",
         lambda c: ["finetune", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "wizard", "content": "a"}])), "--out", str(c.out / "f")]),
    Case("finetune-chat-content-not-text",
         lambda c: ["finetune", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "user", "content": {"text": "a"}}, {"role": "assistant", "content": "b"}])),
                    "--out", str(c.out / "f")]),
    Case("finetune-chat-no-assistant",
         lambda c: ["finetune", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])),
                    "--out", str(c.out / "f")]),
    Case("finetune-chat-mixed-with-pairs",
         lambda c: ["finetune", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
             + '{"prompt": "a", "completion": "b"}\n'), "--out", str(c.out / "f")]),
    Case("finetune-chat-longer-than-context",
         lambda c: ["finetune", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "user", "content": "to be or not " * 8},
              {"role": "assistant", "content": "that is the question " * 8}])),
                    "--out", str(c.out / "f"), "--max-steps", "1", "--quiet"]),
    Case("finetune-chat-template-fails",
         lambda c: ["finetune", c.run(_config(lambda cfg: cfg.update(
             chat={"template": "{{ messages[0]['content'] + 1 }}"}))),
                    "--data", c.file("c.jsonl", _chat_rows(
                        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])),
                    "--out", str(c.out / "f"), "--max-steps", "1", "--quiet"]),
    Case("finetune-chat-template-raises",
         lambda c: ["finetune", c.run(_config(lambda cfg: cfg.update(
             chat={"template": "{{ raise_exception('only user turns') }}"}))),
                    "--data", c.file("c.jsonl", _chat_rows(
                        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])),
                    "--out", str(c.out / "f"), "--max-steps", "1", "--quiet"]),
    Case("finetune-chat-with-prompt-template",
         lambda c: ["finetune", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])),
                    "--out", str(c.out / "f"), "--template", "Q: {prompt}"]),
    Case("finetune-eval-chat-unknown-role",
         lambda c: ["finetune-eval", c.run(), "--data", c.file("c.jsonl", _chat_rows(
             [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]))]),
    # ------------------------------------------------------------------ eval (lm-eval tasks)
    Case("eval-no-tasks", lambda c: ["eval", c.run()]),
    Case("eval-tasks-blank", lambda c: ["eval", c.run(), "--tasks", " , "]),
    Case("eval-limit-zero", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre", "--limit", "0"]),
    Case("eval-limit-negative", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                           "--limit", "-5"]),
    Case("eval-limit-text", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                       "--limit", "all"]),
    Case("eval-num-fewshot-negative", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                                 "--num-fewshot", "-1"]),
    Case("eval-batch-size-zero", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                            "--batch-size", "0"]),
    Case("eval-task-file-broken", lambda c: ["eval", c.run(), "--tasks",
                                             c.file("t.yaml", "task: x\n  y: [1,\n")]),
    Case("eval-task-file-binary", lambda c: ["eval", c.run(), "--tasks", c.file("b.yaml", BINARY)]),
    Case("eval-task-file-list", lambda c: ["eval", c.run(), "--tasks", c.file("l.yaml", "- 1\n")]),
    Case("eval-task-file-deep", lambda c: ["eval", c.run(), "--tasks", c.file("d.yaml", DEEP)]),
    Case("eval-task-file-nameless", lambda c: ["eval", c.run(), "--tasks", c.file(
        "n.yaml", "output_type: multiple_choice\n")]),
    Case("eval-task-file-missing", lambda c: ["eval", c.run(), "--tasks", str(c.inp / "no.yaml")]),
    Case("eval-task-file-dir", lambda c: ((c.inp / "dir.yaml").mkdir(),
                                          ["eval", c.run(), "--tasks", str(c.inp / "dir.yaml")])[-1]),
    Case("eval-task-data-missing", lambda c: ["eval", c.run(), "--tasks", c.file("m.yaml", (
        "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {c.inp / 'gone.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"))]),
    Case("eval-include-path-missing", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                                 "--include-path", str(c.inp / "nope")]),
    Case("eval-include-path-file", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                              "--include-path", c.corpus()]),
    Case("eval-include-path-broken-yaml", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                                     "--include-path", str(Path(c.file(
                                                         "tasks/x.yaml", "a: [\n")).parent)]),
    Case("eval-out-folder", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                       "--out", str(c.user)]),
    Case("eval-out-under-user-file", lambda c: ["eval", c.run(), "--tasks", "moorelm_genre",
                                                "--out", str(c.user / "thesis.txt" / "r.json")]),
    Case("eval-missing-run", lambda c: ["eval", str(c.inp / "nope"), "--tasks", "moorelm_genre"]),
    Case("eval-user-folder", lambda c: ["eval", str(c.user), "--tasks", "moorelm_genre"]),
    Case("eval-config-deep", lambda c: ["eval", c.run(_raw("config.json", DEEP)),
                                        "--tasks", "moorelm_genre"]),
    # these two index lm-eval's own catalogue once (tens of seconds), shared by both
    Case("eval-unknown-task", lambda c: ["eval", c.run(), "--tasks", "moorelm_genr"]),
    Case("eval-public-task-offline", lambda c: ["eval", c.run(), "--tasks", "hellaswag",
                                                "--limit", "1"]),
    # ------------------------------------------------------------------ export gguf / peft,
    # import peft (wt-gguf): unknown dtypes, no checkpoint, outputs that are the user's files
    # (never replaced, not even with --force), adapters whose base does not match
    Case("export-dtype-unknown", lambda c: ["export", c.run(), str(c.out / "m.gguf"), "--format",
                                            "gguf", "--dtype", "q4_k"]),
    Case("export-dtype-with-hf", lambda c: ["export", c.run(), str(c.out / "hf"), "--dtype", "f16"]),
    Case("export-no-checkpoint", lambda c: ["export", c.run(_raw("checkpoints")), str(c.out / "hf")]),
    Case("export-gguf-learned-positions", lambda c: ["export", c.run(), str(c.out / "m.gguf"),
                                                     "--format", "gguf"]),
    Case("export-gguf-char-tokenizer",
         lambda c: ["export", c.run(_config(lambda d: d["model"].update(
             pos="rope", norm="rmsnorm", mlp="swiglu"))), str(c.out / "m.gguf"), "--format", "gguf"]),
    Case("export-gguf-over-user-file", lambda c: ["export", c.run(), str(c.user / "thesis.txt"),
                                                  "--format", "gguf", "--force"]),
    Case("export-gguf-into-user-folder", lambda c: ["export", c.run(), str(c.user), "--format",
                                                    "gguf"]),
    Case("export-hf-force-over-user-folder", lambda c: ["export", c.run(), str(c.user), "--force"]),
    Case("export-peft-not-lora", lambda c: ["export", c.run(), str(c.out / "ad"), "--format",
                                            "peft"]),
    Case("export-peft-force-over-user-folder", lambda c: ["export", c.run(), str(c.user),
                                                          "--format", "peft", "--force"]),
    Case("import-peft-no-base", lambda c: ["import", _adapter(c.inp / "ad"), str(c.out / "r")]),
    Case("import-peft-module-not-in-base",
         lambda c: ["import", _adapter(c.inp / "ad"), str(c.out / "r"), "--base", c.run()]),
    Case("import-peft-other-base-name",
         lambda c: ["import", _adapter(c.inp / "ad", name="HuggingFaceTB/SmolLM2-135M"),
                    str(c.out / "r"), "--base", c.run()]),
    Case("import-peft-shapes",
         lambda c: ["import", _adapter(c.inp / "ad", module="transformer.h.0.attn.c_attn"),
                    str(c.out / "r"), "--base", c.run()]),
    Case("import-peft-config-deep",
         lambda c: ["import", _adapter(c.inp / "ad", config_text=DEEP), str(c.out / "r"), "--base",
                    c.run()]),
    Case("import-peft-not-lora",
         lambda c: ["import", _adapter(c.inp / "ad", config_text='{"peft_type": "IA3"}'),
                    str(c.out / "r"), "--base", c.run()]),
    Case("import-peft-pickled", lambda c: ["import", _adapter(c.inp / "ad", pickled=True),
                                           str(c.out / "r"), "--base", c.run()]),
    Case("import-base-without-adapter", lambda c: ["import", c.hf(lambda p: None), str(c.out / "r"),
                                                   "--base", c.run()]),
    Case("import-peft-into-user-folder", lambda c: ["import", _adapter(c.inp / "ad"), str(c.user),
                                                    "--base", c.run()]),
]

# ------------------------------------------------------------------ the HTTP API (wt-server)
# Hostile requests to a running server: each gets its 4xx in OpenAI's error shape, naming
# the problem, and never a 5xx (test_hostile_request below). (id, method, path, body,
# status, words in the message)
GOOD_COMPLETION = {"model": "tiny", "prompt": "It", "max_tokens": 2}
API_CASES = [
    ("api-echo-n-2", "POST", "/v1/completions", {**GOOD_COMPLETION, "echo": True, "n": 2},
     400, "n > 1"),
    ("api-echo-max-tokens-0-no-echo", "POST", "/v1/completions",
     {**GOOD_COMPLETION, "max_tokens": 0}, 400, "echo"),
    ("api-echo-too-long", "POST", "/v1/completions",
     {**GOOD_COMPLETION, "prompt": "word " * 40, "max_tokens": 0, "echo": True, "logprobs": 1},
     400, "context window"),
    ("api-echo-65-prompts", "POST", "/v1/completions",
     {**GOOD_COMPLETION, "prompt": ["a"] * 65, "max_tokens": 0, "echo": True}, 400, "split it"),
    ("api-logprobs-21", "POST", "/v1/completions", {**GOOD_COMPLETION, "logprobs": 21}, 400,
     "logprobs"),
    ("api-logprobs-negative", "POST", "/v1/completions", {**GOOD_COMPLETION, "logprobs": -1},
     400, "logprobs"),
    ("api-chat-top-logprobs-21", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
      "top_logprobs": 21}, 400, "top_logprobs"),
    ("api-17-stops", "POST", "/v1/completions",
     {**GOOD_COMPLETION, "stop": [f"s{i}" for i in range(17)]}, 400, "at most 16"),
    ("api-stop-too-long", "POST", "/v1/completions", {**GOOD_COMPLETION, "stop": "x" * 300},
     400, "256"),
    ("api-unknown-field", "POST", "/v1/completions", {**GOOD_COMPLETION, "guided_regex": "a+"},
     400, "guided_regex"),
    ("api-tools", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("api-tool-choice", "POST", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
     400, "tool_choice"),
    ("api-tokenize-nothing", "POST", "/tokenize", {"model": "tiny"}, 400, "prompt or messages"),
    ("api-tokenize-unknown-field", "POST", "/tokenize", {"prompt": "x", "tools": ["y"]}, 400,
     "tools"),
    ("api-detokenize-outside-vocab", "POST", "/detokenize", {"tokens": [1, 2**40]}, 400,
     "vocabulary"),
    ("api-detokenize-negative", "POST", "/detokenize", {"tokens": [-5]}, 400, "vocabulary"),
    ("api-detokenize-floats", "POST", "/detokenize", {"tokens": [1.5]}, 400, "tokens"),
]


def _chat_rows(messages: list[dict], rows: int = 20) -> str:
    """JSON Lines of ``rows`` chat rows, each holding ``messages`` (the finetune-chat cases)."""
    return "".join(json.dumps({"messages": messages}) + "\n" for _ in range(rows))


def _adapter(folder: Path, **kw) -> str:
    """A PEFT adapter folder (tests/test_peft.py's ``hostile_adapter``)."""
    from .test_peft import hostile_adapter

    return hostile_adapter(folder, **kw)


def _snapshot(folder: Path) -> dict[str, object]:
    """Names, kinds and contents of everything under ``folder`` (links are not followed)."""
    seen: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink():
                seen[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                seen[str(p)] = "dir"
            elif p.is_file():
                seen[str(p)] = p.read_bytes()
            else:
                seen[str(p)] = "special"
    return seen


@pytest.fixture(scope="module")
def shared_hf(tiny_run, tmp_path_factory):
    """The tiny run exported to a Hugging Face folder, for the import cases to spoil."""
    from moorelm.interop.hf import export_hf

    return export_hf(tiny_run, tmp_path_factory.mktemp("hf") / "hf")


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a runaway read stops here


def _run_subprocess(argv: list[str], cwd: Path, timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "moorelm", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return -1, "timed out (the server started instead of refusing)\n"
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.subprocess else [])
     for c in CASES],
)
def test_hostile_input(case: Case, tmp_path, tiny_run, shared_hf, capsys, monkeypatch):
    """The case exits with status 2 and one 'moorelm: error:' line, no traceback, and leaves
    its inputs, the user's folder and the shared run exactly as they were."""
    ctx = Ctx(tmp_path, tiny_run, shared_hf)
    argv = case.build(ctx)
    watched = ctx.watched
    before = [_snapshot(f) for f in watched]
    monkeypatch.chdir(ctx.out)
    if case.subprocess:
        rc, err = _run_subprocess(argv, ctx.out, case.timeout)
    else:
        if case.patch:
            case.patch(monkeypatch)
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err[-2000:]
    assert [_snapshot(f) for f in watched] == before, "a file outside the output was changed"
    if case.absent:
        assert not (ctx.out / case.absent).exists(), f"a half-made {case.absent} was left"


ALIASES = {"demo-data": "finetune-demo-data", "classifier": "finetune-classifier"}


def _verb_of(case_id: str) -> str:
    verbs = sorted({v for vs in VERBS.values() for v in vs} | set(ALIASES), key=len,
                   reverse=True)
    verb = next((v for v in verbs if case_id.startswith(v + "-")), "")
    return ALIASES.get(verb, verb)


def test_every_verb_is_covered():
    """Every verb the CLI registers has at least one hostile case."""
    verbs = {v for vs in VERBS.values() for v in vs}
    assert verbs <= {_verb_of(c.id) for c in CASES}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def api_server(tiny_run):
    import moorelm
    from moorelm.inference.engine import Engine
    from moorelm.serve import BackgroundServer
    from moorelm.serve.api import create_app

    lm = moorelm.load(tiny_run, device="cpu")
    engine = Engine(lm.model, lm.tokenizer, max_batch=2, max_queue=4)
    with BackgroundServer(create_app(engine, "tiny")) as server:
        yield server
    engine.stop()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_hostile_request(case, api_server):
    """The request gets its 4xx in OpenAI's error shape with a message naming the problem,
    no traceback, and the server still answers /health."""
    import httpx

    _, method, path, body, status, needle = case
    r = httpx.request(method, api_server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle.lower() in err["message"].lower(), err
    assert "Traceback" not in r.text
    assert httpx.get(api_server.url + "/health").status_code == 200
