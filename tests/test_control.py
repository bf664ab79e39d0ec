"""Control over what a model may say: banned phrases at the text level (every tokenisation,
across token boundaries, split between prompt and output), min-p, repetition penalty and
logit bias in the sampler, the engine (constrained rows batched with plain ones), the API
(vLLM's and OpenAI's names) and a deployment's policy (``serve --policy``)."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

import moorelm.inference.sampler as sampler_mod
from moorelm.cli import main
from moorelm.errors import MoorelmError
from moorelm.generate import (
    BanList,
    LanguageModel,
    SamplingParams,
    apply_repetition_penalty,
    parse_logit_bias,
    sample_next_token,
    token_bytes,
)
from moorelm.inference.engine import Engine
from moorelm.inference.limits import RequestError
from moorelm.inference.sequence import Request
from moorelm.serve import BackgroundServer
from moorelm.serve.api import create_app
from moorelm.serve.policy import ServePolicy, load_policy
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT
from tests.test_inference_engine import scripted_model

PHRASE = "Romeo"
SAY = "O Juliet"  # what the scripted models say: every character once, so successors are unique


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.train([SMALL_TEXT], "char")


@pytest.fixture(scope="module")
def bpe_tok():
    """Byte-level BPE: "Romeo" is spelled by one token, by several, or byte by byte."""
    return Tokenizer.train([SMALL_TEXT], "bpe", vocab_size=320)


def spellings(tok: Tokenizer, phrase: str) -> list[int]:
    """Ids of every token whose bytes are a piece of ``phrase`` (its spellings' parts)."""
    p = phrase.encode()
    return [t for t, b in enumerate(token_bytes(tok)) if b and b in p]


def test_phrase_spans_tokens_in_these_tokenizers(char_tok, bpe_tok):
    """The fixtures are what the tests need: the char tokenizer spells the phrase in 5
    tokens, and the BPE one can spell it both whole-ish and in pieces."""
    assert len(char_tok.encode(PHRASE)) == 5
    pieces = spellings(bpe_tok, PHRASE)
    assert len(pieces) > 5 and any(len(token_bytes(bpe_tok)[t]) > 1 for t in pieces)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_mask_is_exactly_the_tokens_that_would_complete_a_phrase(kind, char_tok, bpe_tok):
    """For many random texts without a banned phrase, a token is masked exactly when
    appending its bytes makes a banned phrase appear (brute force over the vocabulary)."""
    tok = char_tok if kind == "char" else bpe_tok
    phrases = [PHRASE, "t th", "é"]
    bans = BanList(tok, phrases)
    pieces = token_bytes(tok)
    encoded = [p.encode() for p in phrases]
    rng = random.Random(0)
    alphabet = spellings(tok, PHRASE + " the") or list(range(tok.vocab_size))
    checked = 0
    for _ in range(60):
        state, text = bans.state(), b""
        for _ in range(rng.randrange(1, 12)):
            mask = state.mask()
            for t in range(tok.vocab_size):
                appears = any(p in text + pieces[t] for p in encoded)
                assert bool(mask[t]) == appears, (text, pieces[t])
            checked += 1
            allowed = [t for t in alphabet if not mask[t]]
            t = rng.choice(allowed)
            state.push(t)
            text += pieces[t]
    assert checked > 100


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_banned_phrase_never_sampled_when_the_logits_push_for_it(kind, char_tok, bpe_tok):
    """Logits that favour every piece of the phrase (so it would be spelled often, in any
    tokenisation) never produce it over 200 seeded samples once banned; without the ban
    they do."""
    tok = char_tok if kind == "char" else bpe_tok
    pieces = token_bytes(tok)
    phrase = PHRASE.encode()
    base = torch.full((1, tok.vocab_size), -4.0)
    base[0, spellings(tok, PHRASE)] = 1.0

    def pushing(text: bytes) -> torch.Tensor:
        """Favour whatever continues the phrase from the text's end, in any tokenisation."""
        k = max((k for k in range(len(phrase)) if text.endswith(phrase[:k])), default=0)
        rest = phrase[k:]
        ids = [t for t, b in enumerate(pieces) if b and (rest.startswith(b) or b.startswith(rest))]
        logits = base.clone()
        logits[0, ids] = 4.0
        return logits

    bans = BanList(tok, [PHRASE])
    hits = {True: 0, False: 0}
    for banned in (False, True):
        for seed in range(200):
            g = torch.Generator().manual_seed(seed)
            state, text = bans.state(tok.encode("O Rom")), b"O Rom"
            for _ in range(25):
                favour = pushing(text)
                logits = state.apply(favour) if banned else favour
                t = int(sample_next_token(logits, 1.0, generator=g)[0])
                state.push(t)
                text += pieces[t]
            hits[banned] += PHRASE.encode() in text
    assert hits[True] == 0
    assert hits[False] > 100  # the test pushes for the phrase hard enough to matter


def test_engine_bans_across_prompt_and_batches_with_plain_rows(char_tok):
    """A model scripted to say "O Juliet" never completes "Juliet" after the prompt "O Jul"
    (it asks for it, the phrase is split across prompt and output), greedy or sampled with
    64 seeds; a plain request decoded in the same steps still says it unchanged."""
    model = scripted_model(char_tok, char_tok.encode(SAY), seq_len=64)
    engine = Engine(model, char_tok, max_batch=8).start()
    try:
        prompt = tuple(char_tok.encode("O Jul"))
        plain = engine.submit(Request((prompt,), SamplingParams(temperature=0, max_new_tokens=8)))
        banned = engine.submit(Request((prompt,), SamplingParams(temperature=0, max_new_tokens=8),
                                       bad_words=("Juliet",)))
        outs = []
        for handle in (plain, banned):
            events = [e for batch in handle for e in batch]
            outs.append(events)
        plain_text = "".join(e.text for e in outs[0])
        banned_text = "".join(e.text for e in outs[1])
        assert plain_text == "iet"
        assert banned_text == "ie"  # "t" would complete it; the model's next best ends the text
        assert {e.step for e in outs[0]} & {e.step for e in outs[1]}  # decoded together
        sampled = Request((prompt,), SamplingParams(temperature=1.0, max_new_tokens=12, seed=7),
                          n=64, bad_words=("Juliet", "O J"))
        for events in engine.generate(sampled):
            text = "O Jul" + "".join(e.text for e in events)
            assert "Juliet" not in text and "O J" not in text[1:]
    finally:
        engine.stop()


def test_plain_rows_skip_the_control_path(char_tok, monkeypatch):
    """Rows without bias, penalties or bans never go through the logit-shaping step (the
    plain hot path is what it was); a constrained row does."""
    model = scripted_model(char_tok, char_tok.encode(SAY), seq_len=32)
    calls = []
    real = sampler_mod._shape
    monkeypatch.setattr(sampler_mod, "_shape", lambda seq, lg: calls.append(1) or real(seq, lg))
    engine = Engine(model, char_tok, max_batch=2).start()
    try:
        prompt = (tuple(char_tok.encode("O")),)
        engine.generate(Request(prompt, SamplingParams(temperature=0, max_new_tokens=4)))
        assert calls == []
        engine.generate(Request(prompt, SamplingParams(temperature=0, max_new_tokens=4,
                                                       repetition_penalty=1.2)))
        assert calls
    finally:
        engine.stop()


def test_language_model_generate_bans_and_biases(char_tok):
    """LanguageModel.generate takes ban, logit_bias, min_p and repetition_penalty; the ban
    holds for sampled text, a -100 bias removes a token, bad values are one-line errors."""
    model = scripted_model(char_tok, char_tok.encode(SAY), seq_len=64)
    lm = LanguageModel(model, char_tok)
    assert lm.complete("O Jul", max_new_tokens=6, temperature=0) == "iet"
    assert lm.complete("O Jul", max_new_tokens=6, temperature=0, ban=["Juliet"]) == "ie"
    bans = lm.ban_list(["Juliet"])
    for seed in range(20):
        text = lm.complete("O Jul", max_new_tokens=10, temperature=1.0, seed=seed, ban=bans,
                           min_p=0.01, repetition_penalty=1.1)
        assert "Juliet" not in "O Jul" + text
    e = char_tok.encode("i")[0]
    assert lm.complete("O Jul", max_new_tokens=1, temperature=0, logit_bias={e: -100.0}) != "i"
    with pytest.raises(MoorelmError, match="banned phrase"):
        lm.complete("O", ban=["  "])
    with pytest.raises(MoorelmError, match="logit bias value"):
        lm.complete("O", logit_bias={e: 500.0})


def test_min_p_and_repetition_penalty_are_vllms():
    """min-p keeps the tokens whose probability is at least min_p x the top one's;
    repetition penalty divides positive and multiplies negative logits of seen tokens;
    out-of-range values are refused."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        assert int(sample_next_token(logits, 1.0, generator=g, min_p=0.5)[0]) in (0, 1)
    x = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(x, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    for bad in (dict(min_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0.0),
                dict(repetition_penalty=-1.0)):
        with pytest.raises(MoorelmError):
            SamplingParams(**bad)
    assert parse_logit_bias(["5=-100", "7=2.5"]) == {5: -100.0, 7: 2.5}
    for bad in (["5"], ["x=1"], ["5=101"], ["5=nan"]):
        with pytest.raises(MoorelmError):
            parse_logit_bias(bad)


def test_limits_refuse_empty_phrases(char_tok):
    """An empty or whitespace-only banned phrase is a RequestError naming bad_words."""
    model = scripted_model(char_tok, [1, 2], seq_len=16)
    engine = Engine(model, char_tok, max_batch=1)
    for phrase in ("", "  \n"):
        with pytest.raises(RequestError) as err:
            engine.validate(Request(((1,),), SamplingParams(max_new_tokens=2), bad_words=(phrase,)))
        assert err.value.param == "bad_words"


# ----------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def scripted(char_tok):
    return scripted_model(char_tok, char_tok.encode(SAY), seq_len=64)


def post(server, path, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_api_fields_and_errors(scripted, char_tok):
    """bad_words, min_p and repetition_penalty work through /v1/completions and chat;
    out-of-range values and empty phrases get 400 in OpenAI's error shape naming the field;
    /v1/inspect answers scores and attention, refuses unknown layers and heads, and needs
    the key when one is set."""
    engine = Engine(scripted, char_tok, max_batch=4)
    with BackgroundServer(create_app(engine, "s", api_key="k")) as server:
        base = {"model": "s", "prompt": "O Jul", "max_tokens": 6, "temperature": 0}
        r = post(server, "/v1/completions", {**base, "bad_words": ["Juliet"], "min_p": 0.1,
                                              "repetition_penalty": 1.05}, "k")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "ie"
        assert post(server, "/v1/completions", base, "k").json()["choices"][0]["text"] == "iet"
        chat = post(server, "/v1/chat/completions", {
            "model": "s", "messages": [{"role": "user", "content": "say Juliet"}],
            "max_tokens": 5, "bad_words": "Juliet"}, "k")
        assert chat.status_code == 200
        for field, value in [("bad_words", [" "]), ("bad_words", [""]), ("min_p", 1.5),
                             ("repetition_penalty", 0), ("repetition_penalty", -1),
                             ("bad_words", ["x"] * 65)]:
            r = post(server, "/v1/completions", {**base, field: value}, "k")
            assert r.status_code == 400, (field, value, r.text)
            err = r.json()["error"]
            assert err["param"] == field and err["type"] == "invalid_request_error"
        ins = post(server, "/v1/inspect", {"model": "s", "prompt": "O Juliet", "position": -1}, "k")
        assert ins.status_code == 200, ins.text
        d = ins.json()
        assert [t["token"] for t in d["tokens"]] == list("O Juliet")
        assert d["tokens"][0]["logprob"] is None and d["tokens"][1]["rank"] >= 1
        assert abs(sum(d["attention"]["weights"]) - 1) < 1e-3
        assert post(server, "/v1/inspect", {"model": "s", "prompt": "O"}).status_code == 401
        for body, param in [({"layer": 5}, "layer"), ({"head": 3}, "head"),
                            ({"position": 99}, "position"), ({"prompt": "x" * 100}, "prompt"),
                            ({"prompt": ""}, "prompt")]:
            r = post(server, "/v1/inspect", {"model": "s", "prompt": "O Rom", **body}, "k")
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert post(server, "/v1/inspect", {"model": "x", "prompt": "O"}, "k").status_code == 404
    engine.stop()


def test_policy_bounds_what_the_deployment_says(scripted, char_tok):
    """A policy's stop strings end every reply, its banned phrases hold whatever the client
    sends, and its max_tokens clamps (or, with over_max_tokens: reject, refuses) longer
    requests and bounds requests that name no length."""
    engine = Engine(scripted, char_tok, max_batch=4)
    with BackgroundServer(create_app(engine, "s", policy=ServePolicy(stop=("li",)))) as server:
        r = post(server, "/v1/completions", {"model": "s", "prompt": "O", "max_tokens": 40,
                                             "temperature": 0, "stop": "zz"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == " Ju"  # cut before the policy's stop
    engine.stop()
    policy = ServePolicy(bad_words=("Juliet",), max_tokens=30)
    engine = Engine(scripted, char_tok, max_batch=4)
    with BackgroundServer(create_app(engine, "s", policy=policy)) as server:
        r = post(server, "/v1/completions", {"model": "s", "prompt": "O Jul", "max_tokens": 40,
                                             "temperature": 0, "bad_words": ["zz"]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "ie"
    engine.stop()
    engine = Engine(scripted, char_tok, max_batch=4)
    strict = ServePolicy(max_tokens=3, over_max_tokens="reject")
    with BackgroundServer(create_app(engine, "s", policy=strict)) as server:
        r = post(server, "/v1/completions", {"model": "s", "prompt": "O", "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = post(server, "/v1/completions", {"model": "s", "prompt": "O", "max_tokens": None,
                                             "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] <= 3
    engine.stop()


def test_load_policy_yaml_json_and_errors(tmp_path):
    """Policies load from YAML or JSON, a models section overrides per served model, and
    bad files are one-line errors naming the problem."""
    pytest.importorskip("yaml")
    y = tmp_path / "p.yaml"
    y.write_text('stop: ["\\nUSER:"]\nbad_words: [forsooth]\nmax_tokens: 100\n'
                 "models:\n  demo: {max_tokens: 20, over_max_tokens: reject}\n")
    assert load_policy(y, "other") == ServePolicy(("\nUSER:",), ("forsooth",), 100)
    assert load_policy(y, "demo").max_tokens == 20
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"bad_words": ["a b"], "max_tokens": 5}))
    assert load_policy(j).bad_words == ("a b",)
    for text, message in [('{"stpo": []}', "unknown key"), ('{"bad_words": [" "]}', "banned"),
                          ('{"max_tokens": 0}', "max_tokens"), ("[1]", "mapping"),
                          ('{"over_max_tokens": "x"}', "clamp"), ("{", "not valid JSON")]:
        j.write_text(text)
        with pytest.raises(MoorelmError, match=message):
            load_policy(j)


def test_cli_control_flags(tiny_run, tmp_path, capsys):
    """generate --ban / --logit-bias / --min-p / --repetition-penalty run; bad values (an
    empty phrase, a malformed bias, min-p out of range) and a bad serve --policy exit 2
    with one line, before anything is loaded or bound."""
    code = main(["generate", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--ban", "the", "--ban", "e t", "--logit-bias", "3=-100", "--min-p", "0.05",
                 "--repetition-penalty", "1.2", "--seed", "1", "--num-samples", "3"])
    out = capsys.readouterr().out
    assert code == 0
    for sample in out.split("-" * 40):
        assert "the" not in sample.replace("ROMEO:", "", 1) and "e t" not in sample
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text('{"bad_words": [""]}')
    for argv in (["generate", str(tiny_run), "--ban", " "],
                 ["generate", str(tiny_run), "--logit-bias", "oops"],
                 ["generate", str(tiny_run), "--min-p", "2"],
                 ["generate", str(tiny_run), "--repetition-penalty", "0"],
                 ["serve", str(tiny_run), "--policy", str(bad_cfg)],
                 ["serve", str(tiny_run), "--ban", ""],
                 ["serve", str(tiny_run), "--policy", str(tmp_path / "missing.yaml")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("moorelm: error:") and len(err.splitlines()) == 1, err
