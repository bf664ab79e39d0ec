"""moorelm.harness: lm-evaluation-harness over a run (the adapter, task selection, offline
data, and agreement with ``lm_eval --model hf`` on the exported folder)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from moorelm.errors import MoorelmError  # noqa: E402

from .conftest import SMALL_TEXT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(n_layer=2, n_head=2, n_embd=32, seq_len=64, pos="rope", norm="rmsnorm",
             mlp="swiglu")
TRAIN = dict(batch_size=8, max_steps=150, eval_interval=150, eval_iters=1, log_interval=50, lr=1e-2,
             warmup_steps=2, threads=1)
# (context, choices, answer): lines of SMALL_TEXT, the right ending first
QUESTIONS = [
    ("ROMEO:\nBut, soft! what light through yonder", [" window", " door", " hill"]),
    ("It is the east, and Juliet is the", [" sun", " moon", " star"]),
    ("JULIET:\nO Romeo, Romeo! wherefore art thou", [" Romeo?", " here?", " gone?"]),
    ("Deny thy father and refuse thy", [" name.", " hand.", " home."]),
    ("But, soft! what", [" light", " night", " sight"]),
    ("It is the", [" east,", " west,", " north,"]),
]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama-shaped model (rope, RMSNorm, SwiGLU: it exports) trained briefly on the
    inline corpus, and its Hugging Face export."""
    from moorelm.interop.hf import export_hf
    from moorelm.training.pretrain import pretrain

    root = tmp_path_factory.mktemp("llama")
    corpus = root / "small.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    os.environ["MOORELM_CACHE"] = str(root / "cache")
    pretrain(root / "run", corpus=str(corpus), recipe="gpt2-baseline", model_overrides=LLAMA,
             train_overrides=TRAIN, progress=False)
    export_hf(root / "run", root / "hf")
    return root / "run", root / "hf"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache (the json builder writes one) inside the test's folder."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _mc_task(folder: Path, name: str = "tiny_mc") -> Path:
    """A user's multiple-choice task: a YAML file and its JSON Lines data, local paths."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n"
                            for q, c in QUESTIONS), encoding="utf-8")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
target_delimiter: ""
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""", encoding="utf-8")
    return yaml


def _adapter(run, **kw):
    import moorelm
    from moorelm.harness.lm import MoorelmLM

    return MoorelmLM(moorelm.load(run, device="cpu"), **kw)


def _instance(kind: str, args: tuple, i: int = 0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_is_score_sequences_over_the_pair(llama_run):
    """A continuation's log-likelihood is the sum of score_sequences' log-probs of its tokens
    after the context's (an empty context is the prefix token), and is_greedy holds exactly
    for the model's own greedy continuation."""
    from moorelm.scoring import score_sequences

    run, _ = llama_run
    lm = _adapter(run, batch_size=2)
    greedy = lm.lm.complete("ROMEO:", max_new_tokens=6, temperature=0, stop_at_eot=False)
    reqs = [("ROMEO:", greedy), ("ROMEO:", " xyz"), ("", "JULIET:"), ("It is the ", "east")]
    got = lm.loglikelihood([_instance("loglikelihood", r, i) for i, r in enumerate(reqs)])
    tok = lm.lm.tokenizer
    for (ctx, cont), (ll, is_greedy) in zip(reqs, got):
        if ctx:
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont  # spaces move over
            whole, head = tok.encode(ctx + cont), tok.encode(ctx)
        else:
            head, whole = [lm.prefix_token_id], [lm.prefix_token_id, *tok.encode(cont)]
        s = score_sequences(lm.model, [whole])[0]
        assert ll == pytest.approx(s.total(len(head)), abs=1e-5)
        assert is_greedy == s.all_greedy(len(head))
    assert got[0][1] is True and got[1][1] is False


def test_long_context_is_cut_on_the_left(llama_run):
    """A context longer than the model's window keeps its last tokens: the score equals that
    of the context's tail that fits."""
    run, _ = llama_run
    lm = _adapter(run)
    long_ctx = SMALL_TEXT[:400]
    tail = lm.lm.tokenizer.decode(lm.lm.tokenizer.encode(long_ctx)[-(lm.max_length + 1 - 2):])
    a, b = lm.loglikelihood([_instance("loglikelihood", (long_ctx, "ab")),
                             _instance("loglikelihood", (tail, "ab"))])
    assert a[0] == pytest.approx(b[0], abs=1e-5)


def test_rolling_scores_every_token_once(llama_run):
    """loglikelihood_rolling of a short text is the log-likelihood of the whole text after the
    prefix token; a text of several windows scores each of its tokens once (its total equals
    the sum over lm-eval's disjoint windows, and it is lower than a shorter prefix's)."""
    run, _ = llama_run
    lm = _adapter(run)
    short, long = SMALL_TEXT[:40], SMALL_TEXT[:300]
    roll = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (short,)),
                                     _instance("loglikelihood_rolling", (long,))])
    (whole,) = lm.loglikelihood([_instance("loglikelihood", ("", short))])
    assert roll[0] == pytest.approx(whole[0], abs=1e-4)
    assert roll[1] < roll[0] < 0


def test_generate_until_is_greedy_and_stops(llama_run):
    """generate_until gives the greedy continuation (LanguageModel.complete at temperature 0),
    cut before the first 'until' string, and at most max_gen_toks tokens."""
    run, _ = llama_run
    lm = _adapter(run, batch_size=2)
    prompt = "ROMEO:\n"
    free = lm.lm.complete(prompt, max_new_tokens=20, temperature=0, stop_at_eot=True)
    stop = next((ch for ch in free[3:] if ch.strip()), None)
    assert stop is not None, free
    out = lm.generate_until([
        _instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 20}), 0),
        _instance("generate_until", (prompt, {"until": ["\x00"], "max_gen_toks": 5}), 1),
        _instance("generate_until", ("JULIET:", {"until": ["\n"], "max_gen_toks": 8}), 2),
    ])
    assert out[0] == free.split(stop)[0]
    assert len(lm.lm.tokenizer.encode(out[1])) <= 5 and free.startswith(out[1])
    assert "\n" not in out[2]


def test_generate_until_refuses_a_length_the_context_cannot_hold(llama_run):
    """max_gen_toks as long as the context window is refused in one line."""
    run, _ = llama_run
    lm = _adapter(run)
    with pytest.raises(MoorelmError, match="generated tokens"):
        lm.generate_until([_instance("generate_until", ("a", {"max_gen_toks": lm.max_length}))])


def test_chat_template_is_the_runs(llama_run):
    """apply_chat_template renders the run's template; without a generation prompt the last
    message stays open (its text ends the prompt)."""
    run, _ = llama_run
    lm = _adapter(run)
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Good day"}]
    assert lm.apply_chat_template(msgs[:1]) == lm.lm.template().render(msgs[:1])
    assert lm.apply_chat_template(msgs, add_generation_prompt=False).endswith("Good day")
    assert lm.chat_template(True) == lm.lm.template().source
    assert lm.tokenizer_name


def test_user_task_file_runs_offline(llama_run, tmp_path, hf_cache):
    """A user's task YAML with local JSON Lines data runs offline, found through
    --include-path or named by its path, with the same numbers either way."""
    from moorelm.harness.evaluate import evaluate_run

    run, _ = llama_run
    yaml = _mc_task(tmp_path / "tasks")
    before = os.environ.get("HF_DATASETS_OFFLINE")
    by_name = evaluate_run(run, "tiny_mc", include_path=[yaml.parent], progress=False)
    by_path = evaluate_run(run, [str(yaml)], progress=False)
    assert by_name["results"]["tiny_mc"]["acc,none"] == by_path["results"]["tiny_mc"]["acc,none"]
    assert by_name["n-samples"]["tiny_mc"]["effective"] == len(QUESTIONS)
    assert os.environ.get("HF_DATASETS_OFFLINE") == before  # the offline switch is put back


def test_bundled_tasks_run_and_write_json(llama_run, tmp_path):
    """The bundled tasks (multiple choice, generation, rolling perplexity) run on a fresh
    run through the 'moorelm' tag; --out holds lm-eval's results as JSON, samples included."""
    from moorelm.harness.evaluate import evaluate_run

    run, _ = llama_run
    out = tmp_path / "results.json"
    results = evaluate_run(run, "moorelm", limit=2, out=out, log_samples=True, progress=False)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert set(saved["results"]) == {"moorelm_genre", "moorelm_dates", "moorelm_shakespeare"}
    assert saved["results"]["moorelm_genre"]["acc,none"] == results["results"]["moorelm_genre"]["acc,none"]
    assert all(isinstance(s["resps"][0][0], str) for s in saved["samples"]["moorelm_dates"])
    assert saved["results"]["moorelm_shakespeare"]["bits_per_byte,none"] > 0


def test_bad_settings_are_one_line(llama_run, tmp_path):
    """limit <= 0, num_fewshot < 0, no tasks, a task file that does not parse, a missing
    include folder, an --out that is a folder: MoorelmError before any model is loaded."""
    from moorelm.harness.evaluate import evaluate_run

    run, _ = llama_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\n  nested: [1,\n", encoding="utf-8")
    cases = [(dict(tasks="moorelm_genre", limit=0), "--limit must be"),
             (dict(tasks="moorelm_genre", limit=-3), "--limit must be"),
             (dict(tasks="moorelm_genre", num_fewshot=-1), "--num-fewshot must be"),
             (dict(tasks=" , "), "no task given"),
             (dict(tasks=str(bad)), "does not parse"),
             (dict(tasks="moorelm_genre", include_path=[tmp_path / "nope"]), "no such folder"),
             (dict(tasks="moorelm_genre", out=tmp_path), "is a folder")]
    for kw, needle in cases:
        with pytest.raises(MoorelmError, match=needle):
            evaluate_run(run, **kw)


@pytest.mark.slow
def test_unknown_and_public_tasks_are_one_line(llama_run):
    """A name that is no task gets the closest names; a public task whose data set is not
    on this machine says it would have to be downloaded (lm-eval's catalogue is indexed once)."""
    from moorelm.harness.evaluate import evaluate_run

    run, _ = llama_run
    with pytest.raises(MoorelmError, match="unknown task 'moorelm_genr'; did you mean moorelm_genre"):
        evaluate_run(run, "moorelm_genr")
    with pytest.raises(MoorelmError, match="needs its data set 'Rowan/hellaswag'.*offline"):
        evaluate_run(run, "hellaswag", limit=1)


def _lm_eval_hf(hf_dir: Path, tasks: str, include: Path, out: Path, limit: int) -> dict:
    """``lm_eval --model hf`` in a subprocess, offline -> {task: [samples by doc_id]}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={hf_dir},dtype=float32", "--tasks", tasks, "--include_path",
           str(include), "--limit", str(limit), "--batch_size", "4",
           "--device", "cpu", "--log_samples", "--output_path", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert r.returncode == 0, r.stderr[-4000:]
    samples = {}
    for f in glob.glob(str(out / "*" / "samples_*.jsonl")):
        rows = [json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines()]
        name = Path(f).name[len("samples_"):]  # TASK_DATE.jsonl; dates hold no underscore
        samples[name[:name.rindex("_")]] = sorted(rows, key=lambda s: s["doc_id"])
    results = json.loads(Path(glob.glob(str(out / "*" / "results_*.json"))[0]).read_text())
    return {"samples": samples, "results": results["results"]}


@pytest.mark.slow
def test_moorelm_eval_agrees_with_lm_eval_hf(llama_run, tmp_path, hf_cache):
    """moorelm eval on the run and ``lm_eval --model hf`` on its export give the same
    per-sample log-likelihoods (within 1e-4) on a local multiple-choice task, a bundled one
    and rolling perplexity, the same accuracy, and generate_until runs in both on the same
    few-shot prompts."""
    from moorelm.harness.evaluate import evaluate_run
    from moorelm.harness.tasks import TASKS_DIR

    run, hf_dir = llama_run
    yaml = _mc_task(tmp_path / "tasks")
    for f in TASKS_DIR.glob("*.yaml"):  # lm_eval takes one --include_path: the bundled YAML
        shutil.copy(f, yaml.parent)  # files work from anywhere (their data is found by name)
    tasks = "tiny_mc,moorelm_genre,moorelm_shakespeare,moorelm_dates"
    ours = evaluate_run(run, tasks, include_path=[yaml.parent], limit=6, log_samples=True,
                        batch_size=4, progress=False)
    theirs = _lm_eval_hf(hf_dir, tasks, yaml.parent, tmp_path / "hf-out", 6)
    for task in ("tiny_mc", "moorelm_genre", "moorelm_shakespeare"):
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        other = theirs["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in other]
        for a, b in zip(mine, other):
            lls_a = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in a["filtered_resps"]]
            lls_b = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in b["filtered_resps"]]
            assert lls_a == pytest.approx(lls_b, abs=1e-4), (task, a["doc_id"])
    for task, metric in (("tiny_mc", "acc,none"), ("moorelm_genre", "acc,none")):
        assert ours["results"][task][metric] == theirs["results"][task][metric]
    # generation: the same few-shot prompts (lm-eval's default seeds on both sides), and text
    mine = sorted(ours["samples"]["moorelm_dates"], key=lambda s: s["doc_id"])
    other = theirs["samples"]["moorelm_dates"]
    assert len(mine) == len(other) == 6
    assert [s["prompt_hash"] for s in mine] == [s["prompt_hash"] for s in other]
    assert all(isinstance(s["filtered_resps"][0], str) for s in mine)


def test_bundled_task_files_are_complete():
    """Each bundled YAML defines the task named by its file, tagged 'moorelm', reads its data
    through bundled_dataset, and that data (every split it names) is in the package; the
    package data of pyproject.toml covers the files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from moorelm.harness.tasks import TASKS_DIR, bundled_dataset, bundled_tasks

    assert bundled_tasks() == ["moorelm_dates", "moorelm_genre", "moorelm_shakespeare"]
    for name in bundled_tasks():
        cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False)
        assert cfg["task"] == name and cfg["tag"] == "moorelm"
        data = bundled_dataset(**cfg["dataset_kwargs"], version=1)
        for key in ("training_split", "fewshot_split", "test_split"):
            if key in cfg:
                assert len(data[cfg[key]]) > 0, (name, key)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"tasks/*.yaml"' in pyproject and '"tasks/*.jsonl"' in pyproject


def test_bundled_task_data_is_what_the_script_makes():
    """bench/make_eval_tasks.py regenerates the bundled JSON Lines byte for byte (the data is
    made by code from the bundled corpus, never edited by hand)."""
    spec = importlib.util.spec_from_file_location("make_eval_tasks",
                                                  ROOT / "bench" / "make_eval_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0


def _start_server(run: Path, log: Path):
    """`moorelm serve RUN --port 0` in a subprocess -> (process, base URL)."""
    import re

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moorelm", "serve", str(run), "--port", "0",
                             "--model-name", "tiny", "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    for line in proc.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    proc.wait(5)
    raise AssertionError(log.read_text()[-2000:])


def _lls(sample: dict) -> list[float]:
    return [float(r[0] if isinstance(r, (list, tuple)) else r) for r in sample["filtered_resps"]]


@pytest.mark.slow
def test_three_routes_give_the_same_log_likelihoods(llama_run, tmp_path, hf_cache):
    """The issue's acceptance check: `moorelm eval` on the run, `lm_eval --model hf` on its
    export and `lm_eval --model local-completions` against `moorelm serve` of the run give the
    same per-sample log-likelihoods (within 1e-4) and the same accuracy on a local
    multiple-choice task (and moorelm eval and hf on the bundled genre task too)."""
    missing = [m for m in ("tenacity", "aiohttp", "requests")
               if importlib.util.find_spec(m) is None]
    assert not missing, f"lm-eval's API backend needs {missing} (the eval extra declares them)"
    from moorelm.harness.evaluate import evaluate_run
    from moorelm.harness.tasks import TASKS_DIR

    run, hf_dir = llama_run
    yaml = _mc_task(tmp_path / "tasks")
    shutil.copy(TASKS_DIR / "moorelm_genre.yaml", yaml.parent)
    tasks = "tiny_mc,moorelm_genre"
    ours = evaluate_run(run, tasks, include_path=[yaml.parent], limit=6, log_samples=True,
                        batch_size=4, progress=False)
    hf = _lm_eval_hf(hf_dir, tasks, yaml.parent, tmp_path / "hf-out", 6)
    proc, url = _start_server(run, tmp_path / "serve.log")
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused", "OMP_NUM_THREADS": "1"}
        out = tmp_path / "api-out"
        r = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"model=tiny,base_url={url}/v1/completions,max_length=64,num_concurrent=1",
             "--batch_size", "4", "--tasks", tasks, "--include_path", str(yaml.parent),
             "--limit", "6", "--log_samples", "--output_path", str(out)],
            env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    finally:
        proc.terminate()
        proc.wait(30)
    api: dict[str, list[dict]] = {}
    for f in glob.glob(str(out / "*" / "samples_*.jsonl")):
        rows = [json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines()]
        name = Path(f).name[len("samples_"):]
        api[name[:name.rindex("_")]] = sorted(rows, key=lambda s: s["doc_id"])
    api_results = json.loads(Path(glob.glob(str(out / "*" / "results_*.json"))[0]).read_text())
    # genre passages are longer than this tiny model's 64-token window, and lm-eval's
    # backends cut an over-long request differently (hf keeps max_length + 1 tokens, the API
    # backend max_length), so the server's route is compared where every request fits
    for task, routes in (("tiny_mc", {"hf": hf["samples"], "api": api}),
                         ("moorelm_genre", {"hf": hf["samples"]})):
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        for route, samples in routes.items():
            other = samples[task]
            assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in other]
            for a, b in zip(mine, other):
                assert _lls(a) == pytest.approx(_lls(b), abs=1e-4), (task, route, a["doc_id"])
        assert ours["results"][task]["acc,none"] == hf["results"][task]["acc,none"]
    assert ours["results"]["tiny_mc"]["acc,none"] == api_results["results"]["tiny_mc"]["acc,none"]
