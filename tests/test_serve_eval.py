"""The eval-grade completions API: echo with prompt log-probs (the numbers of
``scoring.score_sequences``), /tokenize, /detokenize and /tokenizer_info in vLLM's shapes,
many stop strings, unknown fields refused by name, and lm-evaluation-harness'
``local-completions`` backend end to end against ``moorelm serve``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import httpx
import openai
import pytest

import moorelm
from moorelm.inference.engine import Engine
from moorelm.scoring import score_sequences
from moorelm.serve import BackgroundServer
from moorelm.serve.api import create_app

ROOT = Path(__file__).resolve().parents[1]
KEY = "eval-key-1"


@pytest.fixture(scope="module")
def lm(tiny_run):
    return moorelm.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def server(lm):
    engine = Engine(lm.model, lm.tokenizer, max_batch=4, max_queue=16)
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        srv.engine, srv.lm = engine, lm
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def direct(lm, ids: list[int]) -> list[float | None]:
    return score_sequences(lm.model, [ids])[0].logprobs


# ----------------------------------------------------------------------------- echo


def test_echo_scores_equal_score_sequences(client, server):
    """echo + max_tokens 0 through the openai client returns the prompt and, per token,
    score_sequences' log-prob (None for the first), top alternatives holding the greedy
    token's log-prob, and text offsets that spell the prompt."""
    lm = server.lm
    prompts = ["ROMEO:\nBut, soft!", "It is the east"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True,
                                    logprobs=3)
    assert out.usage.completion_tokens == 0
    for choice, text in zip(sorted(out.choices, key=lambda c: c.index), prompts):
        assert choice.text == text and choice.finish_reason == "length"
        lp = choice.logprobs
        ids = lm.tokenizer.encode(text)
        want = direct(lm, ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(ids) == len(lp.text_offset)
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want[1:])) <= 1e-5
        assert "".join(lp.tokens) == text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
        for top, tok_lp in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]):
            assert len(top) == 3 and max(top.values()) >= tok_lp - 1e-6


def test_echo_with_generation_appends_the_completion(server):
    """echo with max_tokens > 0 returns the prompt's tokens then the generated ones, and the
    generated part is what the same greedy request without echo produces; a token-id prompt
    echoes its decoded text."""
    ids = server.lm.tokenizer.encode("JULIET:\nO")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 1}
    plain = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    echoed = httpx.post(server.url + "/v1/completions", json={**body, "echo": True}).json()
    choice = echoed["choices"][0]
    assert choice["text"] == "JULIET:\nO" + plain["text"]
    lp = choice["logprobs"]
    assert lp["tokens"][len(ids):] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][len(ids):] == plain["logprobs"]["token_logprobs"]
    want = direct(server.lm, ids)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:len(ids)], want[1:])) <= 1e-5
    assert lp["text_offset"][len(ids)] == len("JULIET:\nO")
    assert echoed["usage"]["prompt_tokens"] == len(ids)


def test_echo_streams_the_prompt_first(server):
    """A streamed echo sends the prompt (with its log-probs) as the first chunk, then the
    generated text; max_tokens 0 streams the prompt alone and ends with [DONE]."""
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 3, "echo": True, "logprobs": 0,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    first = chunks[0]["choices"][0]
    assert first["text"] == "ROMEO:" and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == len(server.lm.tokenizer.encode("ROMEO:"))
    whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={**body, "max_tokens": 0,
                            "stream_options": {"include_usage": True}}) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == 0
    assert json.loads(data[0])["choices"][0]["finish_reason"] == "length"


def test_echo_while_decoding_changes_nothing(server):
    """Scoring prompts (on the engine's thread, between decode steps) while other requests
    decode gives the same log-probs as scoring alone, and a seeded request the same text."""
    lm = server.lm
    gen = {"model": "tiny", "prompt": "It is", "max_tokens": 20, "temperature": 1.0, "seed": 7}
    alone = httpx.post(server.url + "/v1/completions", json=gen).json()["choices"][0]["text"]
    texts = ["ROMEO:\nBut", "Deny thy father", "O Romeo, Romeo!"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            gens = [c.post("/v1/completions", json=gen) for _ in range(3)]
            echoes = [c.post("/v1/completions", json={"model": "tiny", "prompt": t,
                                                      "max_tokens": 0, "echo": True,
                                                      "logprobs": 1}) for t in texts * 3]
            return await asyncio.gather(*gens, *echoes)

    answers = asyncio.run(main())
    assert all(r.status_code == 200 for r in answers)
    assert {r.json()["choices"][0]["text"] for r in answers[:3]} == {alone}
    for r, text in zip(answers[3:], texts * 3):
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
        want = direct(lm, lm.tokenizer.encode(text))[1:]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5


def test_echo_prompt_longer_than_the_window(server):
    """An echoed prompt longer than the context window is a 400 naming it, not a 5xx."""
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": "tiny", "prompt": "word " * 40, "max_tokens": 0,
                         "echo": True, "logprobs": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_run_job_runs_on_the_engine_thread(lm):
    """Engine.run_job runs its function on the engine's own thread and hands back its result
    or exception; once the engine stops it refuses new jobs with one MoorelmError."""
    import threading

    from moorelm.errors import MoorelmError

    engine = Engine(lm.model, lm.tokenizer, max_batch=1).start()
    assert engine.run_job(lambda: threading.current_thread().name).result(30) == \
        "moorelm-engine"
    with pytest.raises(ZeroDivisionError):
        engine.run_job(lambda: 1 / 0).result(30)
    assert engine.run_job(lambda: 2).result(30) == 2  # a failed job leaves the loop running
    engine.stop()
    with pytest.raises(MoorelmError, match="not running"):
        engine.run_job(lambda: 3)


# ----------------------------------------------------------------------------- tokenizer routes


def test_tokenize_and_detokenize_in_vllms_shape(server):
    """/tokenize answers count, max_model_len, tokens (and token_strs on request), for a
    prompt or chat messages; /detokenize gives the text back; /tokenizer_info names the
    end-of-text token, which /tokenize maps to its id."""
    tok = server.lm.tokenizer
    r = httpx.post(server.url + "/tokenize",
                   json={"model": "tiny", "prompt": "ROMEO:", "add_special_tokens": False,
                         "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("ROMEO:") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.seq_len and len(r["token_strs"]) == r["count"]
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "ROMEO:"}
    chat = httpx.post(server.url + "/tokenize",
                      json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert tok.decode(chat["tokens"]).endswith("ASSISTANT:\n")
    info = httpx.get(server.url + "/tokenizer_info").json()
    eos = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"]}).json()
    assert eos["tokens"] == [tok.eot_id]
    assert info["model_max_length"] == server.engine.seq_len


def test_tokenizer_routes_refuse_bad_input(server):
    """Ids outside the vocabulary, neither or both of prompt and messages, and another
    model's name are 4xx in OpenAI's error shape. A text longer than the context window is
    tokenized (lm-eval cuts long documents itself), its count above max_model_len."""
    long = httpx.post(server.url + "/tokenize", json={"prompt": "word " * 40}).json()
    assert long["count"] == len(long["tokens"]) > long["max_model_len"]
    cases = [("/tokenize", {}, 400, "prompt or messages"),
             ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
              400, "one of them"),
             ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "gpt-9"),
             ("/detokenize", {"tokens": [0, 10**6]}, 400, "vocabulary"),
             ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
             ("/detokenize", {"tokens": "abc"}, 400, "tokens")]
    for path, body, status, needle in cases:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and needle in err["message"]


def test_routes_need_the_key_when_one_is_set(lm):
    """With an API key, /tokenize, /detokenize, /tokenizer_info and /metrics need it like
    /v1 does; /health and the playground do not."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=2)
    with BackgroundServer(create_app(engine, "tiny", api_key=KEY)) as srv:
        for method, path, body in [("POST", "/tokenize", {"prompt": "x"}),
                                   ("POST", "/detokenize", {"tokens": [1]}),
                                   ("GET", "/tokenizer_info", None), ("GET", "/metrics", None)]:
            r = httpx.request(method, srv.url + path, json=body)
            assert r.status_code == 401, path
            r = httpx.request(method, srv.url + path, json=body,
                              headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, (path, r.text)
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/").status_code == 200
    engine.stop()


# ----------------------------------------------------------------------------- fields


def test_sixteen_stops_are_served(server):
    """Sixteen stop strings (lm-eval's chain-of-thought tasks send six or more) are served,
    and the text ends before the first one reached."""
    stops = ["zz" + chr(ord("a") + i) for i in range(15)] + ["e"]
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": "tiny", "prompt": "It is th", "max_tokens": 8,
                         "temperature": 0, "stop": stops, "logit_bias": {}})
    assert r.status_code == 200, r.text
    assert "e" not in r.json()["choices"][0]["text"]


def test_unknown_fields_are_refused_by_name(client, server):
    """A field the server does not implement is a 400 naming it (through the openai client:
    a BadRequestError), on both routes and inside messages; one that asks for nothing (null,
    [] or {}) is served, as is the openai client's own request with its defaults."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function",
                                               "function": {"name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tools" and "tools" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1,
                                  extra_body={"guided_json": {"type": "object"}})
    assert e.value.body["param"] == "guided_json"
    ok = client.chat.completions.create(
        model="tiny", max_tokens=2,
        messages=[{"role": "assistant", "content": "y", "tool_calls": None, "refusal": None}],
        extra_body={"tools": [], "metadata": {}, "functions": None})
    assert ok.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- lm-eval end to end

MC_DOCS = [
    {"question": "ROMEO:\nBut, soft! what", "choices": [" light", " night", " ship"], "answer": 0},
    {"question": "It is the east, and", "choices": [" Juliet", " Romeo", " fish"], "answer": 0},
    {"question": "JULIET:\nO Romeo,", "choices": [" Romeo!", " Juliet!"], "answer": 0},
    {"question": "Deny thy father", "choices": [" and", " or", " but"], "answer": 0},
]
MC_TASK = """task: moorelm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_TASK = """task: moorelm_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "ROMEO", "JULIET", "zzz", "qqq", "xxx", "O Romeo"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _start_serve(run: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moorelm", "serve", str(run), "--port", "0",
                             "--model-name", "tiny", "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    for line in proc.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    proc.wait(5)
    raise AssertionError((tmp / "serve.log").read_text()[-2000:])


@pytest.mark.slow
def test_lm_eval_local_completions_matches_score_sequences(tiny_run, lm, tmp_path):
    """lm_eval --model local-completions against `moorelm serve` (offline, a local
    multiple-choice task) reports per-sample log-likelihoods equal to score_sequences'
    within 1e-4 and the same accuracy, with batched requests (three prompts a request),
    finding the tokenizer through /tokenizer_info and /tokenize; a generate_until task
    with seven stop strings runs through the same server."""
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    missing = [m for m in ("tenacity", "aiohttp", "requests") if find_spec(m) is None]
    if lm_eval is None or missing:  # lm-eval's API backend needs lm-eval[api]
        pytest.skip(f"lm-eval with its API extra is not installed (missing: {missing})")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": d["question"], "answer": d["choices"][0]})
                           + "\n" for d in MC_DOCS[:2]))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=gen))
    proc, url = _start_serve(tiny_run, tmp_path)
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OPENAI_API_KEY": "unused",
               "OMP_NUM_THREADS": "1"}
        seq_len = lm.model.config.seq_len
        out = subprocess.run(
            [lm_eval, "--model", "local-completions", "--model_args",
             f"model=tiny,base_url={url}/v1/completions,max_length={seq_len},num_concurrent=1",
             "--batch_size", "3", "--tasks", "moorelm_tiny_mc,moorelm_tiny_gen",
             "--include_path", str(tasks),
             "--output_path", str(tmp_path / "out"), "--log_samples"],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
    samples = {}
    for path in (tmp_path / "out").rglob("samples_*.jsonl"):
        name = re.search(r"samples_(.+?)_\d{4}-", path.name).group(1)
        samples[name] = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(samples["moorelm_tiny_mc"]) == len(MC_DOCS)
    tok = lm.tokenizer
    checked = 0
    for s in samples["moorelm_tiny_mc"]:
        wants = []
        for i, resp in enumerate(s["resps"]):
            args = s["arguments"][f"gen_args_{i}"]
            context, continuation = args["arg_0"], args["arg_1"]
            ctx = tok.encode(context)
            whole = tok.encode(context + continuation)
            assert whole[:len(ctx)] == ctx
            wants.append(score_sequences(lm.model, [whole])[0].total(len(ctx)))
            got = float(resp[0][0])
            assert abs(got - wants[-1]) <= 1e-4, (context, continuation, got, wants[-1])
            checked += 1
        best = max(range(len(wants)), key=wants.__getitem__)
        assert s["acc"] == float(best == s["doc"]["answer"])  # the same accuracy
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
    assert len(samples["moorelm_tiny_gen"]) == 2
    assert all(isinstance(s["resps"][0][0], str) for s in samples["moorelm_tiny_gen"])
    assert 'route="/tokenizer_info",status="200"' in metrics  # lm-eval found the tokenizer
    assert 'route="/tokenize",status="200"' in metrics

