"""GET /metrics: Prometheus' text format, parsed back with prometheus_client's own parser,
counts what the server did; each app keeps its own registry."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import moorelm
from moorelm.inference.engine import Engine
from moorelm.serve import BackgroundServer
from moorelm.serve.api import create_app
from moorelm.serve.metrics import route_label


@pytest.fixture(scope="module")
def lm(tiny_run):
    return moorelm.load(tiny_run, device="cpu")


def scrape(url: str, **kw) -> dict[str, list]:
    """Samples by name, from the server's /metrics as Prometheus would parse it."""
    r = httpx.get(url + "/metrics", **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict, name: str, **labels) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v
                                                          for k, v in labels.items())]
    return sum(found)


def test_metrics_count_requests_tokens_and_latency(lm):
    """After a few requests /metrics reports them by route and status, the prompt and
    generated tokens the responses' usage reported, one time-to-first-token per generating
    request, one inter-token latency per further token, and the queue and slot gauges."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=3, max_queue=8)
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        usage = []
        bodies = [{"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0,
                   "logit_bias": {str(lm.tokenizer.eot_id): -100}},
                  {"model": "tiny", "prompt": ["It", "O R"], "max_tokens": 3, "seed": 1},
                  {"model": "tiny", "prompt": "It", "max_tokens": 4, "stream": True,
                   "stream_options": {"include_usage": True}, "seed": 2}]
        for body in bodies:
            r = httpx.post(srv.url + "/v1/completions", json=body)
            assert r.status_code == 200
            if body.get("stream"):
                last = [line for line in r.text.splitlines() if '"usage"' in line][-1]
                usage.append(json.loads(last[6:])["usage"])
            else:
                usage.append(r.json()["usage"])
        chat = httpx.post(srv.url + "/v1/chat/completions",
                          json={"model": "tiny", "max_tokens": 2,
                                "messages": [{"role": "user", "content": "Hi"}]})
        usage.append(chat.json()["usage"])
        assert httpx.post(srv.url + "/v1/completions", json={"model": "tiny"}).status_code == 400
        assert httpx.get(srv.url + "/nowhere").status_code == 404
        m = scrape(srv.url)
        assert value(m, "moorelm_requests_total", route="/v1/completions", status="200") == 3
        assert value(m, "moorelm_requests_total", route="/v1/chat/completions",
                     status="200") == 1
        assert value(m, "moorelm_requests_total", route="/v1/completions", status="400") == 1
        assert value(m, "moorelm_requests_total", route="other", status="404") == 1
        assert value(m, "moorelm_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
        generated = sum(u["completion_tokens"] for u in usage)
        assert value(m, "moorelm_generation_tokens_total") == generated
        assert value(m, "moorelm_time_to_first_token_seconds_count") == 4
        choices = 1 + 2 + 1 + 1
        assert value(m, "moorelm_inter_token_latency_seconds_count") == generated - choices
        assert value(m, "moorelm_time_to_first_token_seconds_sum") > 0
        inf = [s for s in m["moorelm_time_to_first_token_seconds_bucket"]
               if s.labels["le"] == "+Inf"]
        assert inf[0].value == 4
        assert value(m, "moorelm_queue_depth") == 0 and value(m, "moorelm_active_slots") == 0
        assert value(m, "moorelm_slots") == 3
        assert value(m, "moorelm_kv_tokens") == 0  # every request has finished
        assert value(m, "moorelm_kv_token_budget") == engine.kv.token_budget > 0
        again = scrape(srv.url)  # the scrape itself is counted
        assert value(again, "moorelm_requests_total", route="/metrics", status="200") == 1
    engine.stop()


def test_each_app_has_its_own_registry(lm):
    """Two apps in one process count separately (no clash in a global registry), and with
    an API key /metrics needs it."""
    a = Engine(lm.model, lm.tokenizer, max_batch=2)
    b = Engine(lm.model, lm.tokenizer, max_batch=2)
    with BackgroundServer(create_app(a, "tiny")) as sa, \
            BackgroundServer(create_app(b, "tiny", api_key="k-1")) as sb:
        httpx.post(sa.url + "/v1/completions", json={"model": "tiny", "prompt": "It",
                                                     "max_tokens": 2})
        assert value(scrape(sa.url), "moorelm_requests_total", route="/v1/completions") == 1
        assert httpx.get(sb.url + "/metrics").status_code == 401
        mb = scrape(sb.url, headers={"Authorization": "Bearer k-1"})
        assert value(mb, "moorelm_requests_total", route="/v1/completions") == 0
        assert value(mb, "moorelm_requests_total", route="/metrics", status="401") == 1
    a.stop()
    b.stop()


def test_route_labels_are_bounded():
    """Paths become a bounded set of route labels: unknown ones are 'other'."""
    assert route_label("/v1/completions") == "/v1/completions"
    assert route_label("/v1/models/tiny") == "/v1/models/{model_id}"
    assert route_label("/wp-admin/../../etc") == "other"
