"""Which lm-evaluation-harness tasks a ``--tasks`` list means, found without a network.

A task is named three ways: a task, group or tag name (``moorelm_genre``, or a pattern such
as ``moorelm_*``), or the path of a task YAML file. Names are looked up first among the
tasks moorelm ships (``moorelm/tasks/``: YAML files and their JSON Lines data, made by
``bench/make_eval_tasks.py``) and the user's ``--include-path`` folders, which is quick;
only a name found in neither makes lm-eval index its own catalogue of some 15,000 tasks
(tens of seconds), to tell a public task from a typing error.

User errors get one line: a name that is nowhere (with the closest names), a task file that
does not parse, and a public task whose data set is not on this machine (``moorelm eval``
never downloads: ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set while it runs).

``bundled_dataset`` is what the bundled YAML files name as their ``custom_dataset``: it reads
their JSON Lines splits from the package folder, wherever moorelm is installed, so the same
files work with ``lm_eval --include_path``.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moorelm.errors import MoorelmError

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
YAML_SUFFIXES = (".yaml", ".yml")
SPLITS = ("train", "validation", "test")
MAX_TASKS = 200  # names in one --tasks list


def bundled_tasks() -> list[str]:
    """Names of the tasks moorelm ships (each ``moorelm/tasks/NAME.yaml`` defines ``NAME``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def bundled_dataset(moorelm_data: str | None = None, **_metadata: Any):
    """The splits of a bundled task's data (``moorelm/tasks/NAME_SPLIT.jsonl``) as a
    ``datasets.DatasetDict``. lm-eval calls it with the task's ``dataset_kwargs`` and its
    metadata (ignored)."""
    import datasets

    if not isinstance(moorelm_data, str) or not moorelm_data.isidentifier():
        raise MoorelmError(f"bundled task data {moorelm_data!r} is not a name")
    splits = {}
    for split in SPLITS:
        path = TASKS_DIR / f"{moorelm_data}_{split}.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
            splits[split] = datasets.Dataset.from_list(rows)
    if not splits:
        raise MoorelmError(f"no bundled task data named {moorelm_data!r} in {TASKS_DIR}")
    return datasets.DatasetDict(splits)


def parse_task_list(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blanks dropped, order kept,
    duplicates removed); at least one."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise MoorelmError(f"a task name must be text, got {item!r}")
        for name in item.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise MoorelmError("no task given; name at least one with --tasks, e.g. "
                           f"--tasks {','.join(bundled_tasks()[:2])}")
    if len(names) > MAX_TASKS:
        raise MoorelmError(f"{len(names)} tasks in one --tasks list is more than {MAX_TASKS}")
    return names


def is_task_file(spec: str) -> bool:
    return spec.lower().endswith(YAML_SUFFIXES) or "/" in spec or spec.startswith(".")


def check_include_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Each ``--include-path`` is an existing folder whose YAML files all parse."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise MoorelmError(f"--include-path {p}: {'not a folder' if path.exists() else 'no such folder'}"
                               "; give a folder of lm-eval task YAML files")
        for yaml_file in sorted(f for f in path.rglob("*") if f.suffix.lower() in YAML_SUFFIXES):
            check_task_file(yaml_file)
        out.append(path.resolve())
    return out


def check_task_file(path: str | Path) -> dict:
    """A task YAML file, parsed (``!function`` tags and includes unresolved) -> its mapping;
    MoorelmError in one line when it is missing or does not parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise MoorelmError(f"task file {path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        cfg = load_yaml(path, resolve_func=False, recursive=True)
    except Exception as e:  # yaml's errors, a missing include, a non-mapping: all one line
        raise MoorelmError(f"task file {path} does not parse: {_first_line(e)}") from None
    return cfg


@dataclass
class Selection:
    """What to hand lm-eval: the task manager and the specs it should load."""

    manager: Any  # lm_eval.tasks.TaskManager
    specs: list[str]
    public: list[str] = field(default_factory=list)  # specs found only in lm-eval's catalogue


def select_tasks(names: Sequence[str], include_paths: Sequence[Path] = ()) -> Selection:
    """Resolve ``names`` (see the module docstring) -> a ``Selection``; MoorelmError naming
    the first one that is nowhere, with the closest known names."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *include_paths]
    local = TaskManager(include_defaults=False, include_path=[str(p) for p in paths])
    specs, missing = [], []
    for name in names:
        if is_task_file(name):
            cfg = check_task_file(name)
            if not isinstance(cfg.get("task") or cfg.get("group"), str):
                raise MoorelmError(f"task file {name} defines no 'task' (or 'group') name")
            specs.append(str(Path(name).expanduser().resolve()))
        elif _matches(name, local.all_tasks):
            specs.extend(_expand(name, local.all_tasks))
        else:
            specs.append(name)
            missing.append(name)
    if not missing:
        return Selection(local, _unique(specs))
    full = _catalogue(paths)
    public = []
    for name in missing:
        if not _matches(name, full.all_tasks):
            close = difflib.get_close_matches(name, full.all_tasks, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; moorelm ships {', '.join(bundled_tasks())} ('lm-eval ls tasks' lists the rest)"
            raise MoorelmError(f"unknown task {name!r}{hint}")
        public.extend(_expand(name, full.all_tasks))
    specs = [s for n in specs for s in (_expand(n, full.all_tasks) if n in missing else [n])]
    return Selection(full, _unique(specs), _unique(public))


_CATALOGUES: dict[tuple, Any] = {}  # the last index of lm-eval's own tasks + the local ones


def _catalogue(paths: Sequence[Path]):
    """A TaskManager over lm-eval's own tasks and ``paths``, kept while no YAML file under
    ``paths`` changes (indexing lm-eval's catalogue takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    key = tuple((str(p), tuple(sorted((str(f), f.stat().st_mtime_ns)
                                      for f in p.rglob("*") if f.suffix in YAML_SUFFIXES)))
                for p in paths)
    if key not in _CATALOGUES:
        _CATALOGUES.clear()
        _CATALOGUES[key] = TaskManager(include_defaults=True, include_path=[str(p) for p in paths])
    return _CATALOGUES[key]


def _matches(name: str, known: Sequence[str]) -> bool:
    return bool(_expand(name, known))


def _expand(name: str, known: Sequence[str]) -> list[str]:
    if any(c in name for c in "*?["):
        return sorted(fnmatch.filter(known, name))
    return [name] if name in known else []


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def load_error(selection: Selection, error: BaseException) -> MoorelmError:
    """The one line for a failure while lm-eval loaded the tasks: the first spec that fails
    on its own, and why (for a public task: its data set is not on this machine)."""
    for spec in selection.specs:
        try:
            selection.manager.load([spec])
        except Exception as e:
            return _spec_error(selection, spec, e)
    return MoorelmError(f"the tasks could not be prepared: {_first_line(error)}")


def _spec_error(selection: Selection, spec: str, error: BaseException) -> MoorelmError:
    if spec in selection.public:
        entry = selection.manager.task_index.get(spec)
        cfg = (entry.cfg if entry is not None else None) or {}
        data = cfg.get("dataset_path")
        where = f"its data set {data!r}" if isinstance(data, str) else "its data"
        return MoorelmError(
            f"task {spec!r} needs {where} from the Hugging Face Hub, which is not on this "
            "machine, and moorelm eval does not download (it runs offline); fetch it once with "
            "the datasets library, or evaluate a local task (--include-path DIR)")
    return MoorelmError(f"task {spec!r} could not be loaded: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
