"""``evaluate_run``: lm-evaluation-harness tasks on a run, offline; what ``moorelm eval`` runs.

    from moorelm.harness.evaluate import evaluate_run, results_table
    results = evaluate_run("runs/smol", ["moorelm_genre"], limit=50, out="genre.json")
    print(results_table(results))

The run is loaded once (``moorelm.load``), wrapped in ``MoorelmLM`` and handed to lm-eval's
``simple_evaluate`` with the selected tasks (``moorelm.harness.tasks``). The results are
lm-eval's own dictionary (``results``, ``groups``, ``configs``, ``n-samples``, ``config``,
and the per-sample records under ``samples`` when ``log_samples``), written to ``out`` as
JSON atomically. The Hugging Face offline switches are on while it runs, so nothing is
downloaded.

Settings are checked before anything heavy is imported: ``limit`` and ``batch_size`` are
integers >= 1, ``num_fewshot`` >= 0, ``out`` a file whose folder exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moorelm.atomic import check_writable
from moorelm.errors import MoorelmError
from moorelm.harness.tasks import check_include_paths, load_error, parse_task_list, select_tasks

INSTALL = "pip install 'moorelm[eval]'"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _check_int(name: str, value: Any, low: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MoorelmError(f"{name} must be an integer >= {low}, got {value!r}")


def check_out(out: str | Path | None) -> Path | None:
    """``out`` as a path to write: not a folder, in a folder that exists."""
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.is_dir():
        raise MoorelmError(f"--out {out} is a folder; give a file name such as {path / 'results.json'}")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise MoorelmError(f"--out {out}: {path.parent} {what}")
    check_writable(path.parent)  # the results are written after the whole evaluation
    return path


def require_lm_eval() -> None:
    """MoorelmError naming the extra to install unless ``lm_eval`` imports."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MoorelmError("moorelm eval needs EleutherAI's lm-evaluation-harness, which is not "
                           f"installed: {INSTALL}") from None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face's offline switches on (the variables, and the constants the libraries
    already read at import), restored afterwards."""
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    patched = []
    for module, attr in (("datasets.config", "HF_DATASETS_OFFLINE"),
                         ("datasets.config", "HF_HUB_OFFLINE"),
                         ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate_run(run: str | Path, tasks: str | Sequence[str], *, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 16,
                 include_path: Sequence[str | Path] = (), apply_chat_template: bool = False,
                 log_samples: bool = False, out: str | Path | None = None,
                 device: str = "auto", seed: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run lm-eval ``tasks`` (names, patterns or YAML paths; a comma-separated string works)
    on the newest checkpoint of ``run`` -> lm-eval's results dictionary.

    ``limit``: at most this many documents per task; ``num_fewshot``: examples in each
    prompt (a task's own default otherwise); ``apply_chat_template``: render prompts with
    the run's chat template (few-shot examples as turns); ``log_samples``: keep every
    request and response under ``"samples"``; ``out``: also write the dictionary there as
    JSON (atomically). ``seed``: of lm-eval's random draws (few-shot examples among them)
    and of sampled generations; None keeps lm-eval's defaults, so the numbers are those of
    the ``lm_eval`` command run without seed flags. ``progress``: show the progress bars.
    """
    _check_int("--limit", limit, 1)
    _check_int("--num-fewshot", num_fewshot, 0)
    _check_int("--batch-size", batch_size, 1)
    _check_int("--seed", seed, 0)
    names = parse_task_list(tasks)
    out_path = check_out(out)
    run_path = Path(run)
    if not run_path.is_dir():
        raise MoorelmError(f"{run}: {'not a folder' if run_path.exists() else 'no such run folder'}")
    require_lm_eval()
    with offline(), _quiet_logs():
        includes = check_include_paths(include_path)
        selection = select_tasks(names, includes)
        from lm_eval import simple_evaluate

        import moorelm
        from moorelm.harness.lm import MoorelmLM

        lm = MoorelmLM(moorelm.load(run_path, device=device), batch_size=batch_size,
                       **({} if seed is None else {"seed": seed}))
        seeds = {} if seed is None else dict(random_seed=seed, numpy_random_seed=seed,
                                             torch_random_seed=seed, fewshot_random_seed=seed)
        lm.started = False
        for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            _mark_start(lm, method, progress)
        start = time.time()
        try:
            with _no_git_describe():
                results = simple_evaluate(
                    model=lm, tasks=selection.specs, task_manager=selection.manager,
                    num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                    log_samples=log_samples, apply_chat_template=apply_chat_template,
                    fewshot_as_multiturn=apply_chat_template, **seeds)
        except MoorelmError:
            raise
        except Exception as e:
            if lm.started:  # the model was already answering: not a task problem
                raise
            raise load_error(selection, e) from None
    results = dict(results or {})
    results["config"] = {**results.get("config", {}), "model": "moorelm",
                         "model_args": str(run_path), "device": str(lm.device)}
    results["total_evaluation_time_seconds"] = str(round(time.time() - start, 2))
    if out_path is not None:
        write_results(results, out_path)
    return results


def _mark_start(lm: Any, method: str, progress: bool) -> None:
    """Wrap one of ``lm``'s request methods: note that evaluation has begun, and pass the
    progress setting on."""
    inner = getattr(lm, method)

    def call(requests, disable_tqdm: bool = False):
        lm.started = True
        return inner(requests, disable_tqdm=disable_tqdm or not progress)

    setattr(lm, method, call)


@contextlib.contextmanager
def _no_git_describe() -> Iterator[None]:
    """lm-eval records ``git describe`` of the working directory, and git prints "fatal: not
    a git repository" outside one; the results say ``git_hash: null`` instead."""
    import lm_eval.evaluator as evaluator

    saved = getattr(evaluator, "get_git_commit_hash", None)
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if saved is not None:
            evaluator.get_git_commit_hash = saved


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """lm-eval's and datasets' info and warning logs off (errors still show)."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """The results dictionary as JSON at ``path`` (atomically; values JSON cannot hold are
    written as lm-eval writes them)."""
    from lm_eval.utils import handle_non_serializable

    from moorelm.atomic import atomic_write_text
    from moorelm.errors import from_os_error

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    try:
        atomic_write_text(Path(path), text + "\n")
    except OSError as e:
        raise from_os_error(e, f"write {path}") from None
    return Path(path)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's Markdown table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
