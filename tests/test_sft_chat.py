"""Fine-tuning on chat rows (moorelm.finetune.chat_rows, moorelm.finetune.sft): OpenAI-style ``{"messages": [...]}`` rows
read and checked, the run's chat template applied, loss on exactly the assistant tokens (each
reply's end-of-turn token included), and full and LoRA fine-tuning of an imported HF Llama
whose result chats and exports like any run."""

from __future__ import annotations

import json
import re

import pytest
import torch

import moorelm
from moorelm.chat import DEFAULT_TEMPLATE, ChatTemplate
from moorelm.cli import main
from moorelm.errors import MoorelmError
from moorelm.finetune.chat_rows import Conversation, check_conversation, encode_conversation
from moorelm.finetune.lora import LoRAConfig
from moorelm.finetune.sft import SFTData, finetune, read_rows
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("Translate to German: the house. Das Haus. a cat. Eine Katze. "
        "Hello! Hallo! good morning, Guten Morgen. system user assistant\n") * 4
FAST = dict(batch_size=4, eval_interval=0, log_interval=5, warmup_steps=0, threads=1,
            schedule="constant")


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def _conv(*turns: str, line: int = 1, weights: dict | None = None) -> Conversation:
    """A checked conversation of alternating user/assistant turns (a first turn starting
    with 'S:' is a system message); ``weights``: message index -> weight."""
    msgs = []
    if turns and turns[0].startswith("S:"):
        msgs.append({"role": "system", "content": turns[0][2:]})
        turns = turns[1:]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
        if weights and len(msgs) - 1 in weights:
            msgs[-1]["weight"] = weights[len(msgs) - 1]
    return check_conversation(msgs, "data.jsonl", line)


def _chatml_tokenizer() -> Tokenizer:
    tok = Tokenizer.train([TEXT], "char")
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok.hf, "char")


def _targets(ids, mask, tok) -> list[str]:
    """The target tokens' text, one string per run of consecutive targets."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


# ----------------------------------------------------------------------------- reading


CHAT = {"messages": [{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "Eine Katze"}]}


@pytest.mark.parametrize("rows,needle", [
    ([{"messages": [{"role": "wizard", "content": "x"}]}], "line 1: message 0 has an unknown role \"wizard\""),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}],
     "line 1: message 0 (user) must have string content, got int"),
    ([CHAT, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}],
     "line 2: the conversation has no assistant message"),
    ([CHAT, CHAT, {"prompt": "a", "completion": "b"}],
     "line 3: a prompt/completion row in a file of chat rows (line 1 has \"messages\")"),
    ([{"prompt": "a", "completion": "b"}, CHAT],
     "line 1: a prompt/completion row in a file of chat rows (line 2 has \"messages\")"),
    ([{"messages": []}], "line 1: 'messages' must be a non-empty list"),
    ([{"messages": "hi"}], "line 1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "assistant", "content": "b"}]}], "starts with an assistant message"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                       "weight": 0}]}], "every assistant message has weight 0"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                       "weight": 0.5}]}], "weight 0.5"),
])
def test_bad_chat_rows_are_one_line_naming_the_line(tmp_path, rows, needle):
    """Each kind of bad chat row (unknown role, non-string content, no assistant message, a
    file mixing formats, ...) is one MoorelmError naming the file and line."""
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(MoorelmError, match=re.escape(needle)) as e:
        read_rows(path)
    assert "\n" not in str(e.value) and "chat.jsonl" in str(e.value)


def test_chat_and_pair_files_are_told_apart(tmp_path):
    """A file of chat rows gives Conversations (system, name and weight kept); a
    prompt/completion file still gives Pairs."""
    rows = [{"messages": [{"role": "system", "content": "s"},
                          {"role": "user", "content": "u", "name": "ann"},
                          {"role": "assistant", "content": "x", "weight": 0},
                          {"role": "user", "content": "v"},
                          {"role": "assistant", "content": "y"}]}] * 2
    convs = read_rows(_write_jsonl(tmp_path / "c.jsonl", rows))
    assert [type(c).__name__ for c in convs] == ["Conversation"] * 2
    assert convs[1].line == 2 and convs[0].learn == (False, False, False, False, True)
    assert convs[0].messages[1] == {"role": "user", "content": "u", "name": "ann"}
    pairs = read_rows(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}]))
    assert type(pairs[0]).__name__ == "Pair"


# ----------------------------------------------------------------------------- which tokens learn


def test_default_template_learns_each_reply_and_its_closing_blank_line():
    """With the default template (runs trained here), the targets are exactly the text of
    every assistant reply followed by the blank line that ends it (the template's stop text),
    in order; system and user speeches and the ASSISTANT: cues are never targets."""
    tok = Tokenizer.train([TEXT + DEFAULT_TEMPLATE + "ASYSTEMUR:"], "char")
    conv = _conv("S:Translate.", "the house", "Das Haus", "a cat", "Eine Katze")
    ids, mask, exact = encode_conversation(conv, ChatTemplate.default(), tok, frozenset())
    assert exact and ids == tok.encode(ChatTemplate.default().render(list(conv.messages), False))
    assert _targets(ids, mask, tok) == ["Das Haus\n\n", "Eine Katze\n\n"]
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "SYSTEM:\nTranslate.\n\nUSER:\nthe house\n\nASSISTANT:\nUSER:\na cat\n\nASSISTANT:\n")


def test_chatml_learns_replies_and_im_end_not_the_line_break_after_it():
    """With a ChatML template, each learned reply's targets are its content and the
    <|im_end|> that closes it (a stop id), not the line break the template writes after it;
    an assistant message with weight 0 is context only."""
    tok = _chatml_tokenizer()
    im_end = tok.hf.token_to_id("<|im_end|>")
    tpl = ChatTemplate(CHATML, {}, (), "model's chat template")
    conv = _conv("Hello!", "Hallo!", "a cat", "Eine Katze", "the house", "Das Haus",
                 weights={3: 0})
    ids, mask, exact = encode_conversation(conv, tpl, tok, frozenset({im_end}))
    assert exact
    assert _targets(ids, mask, tok) == ["Hallo!<|im_end|>", "Das Haus<|im_end|>"]
    # the text before each reply, tokenized alone, is the prompt the model reads at inference
    first = ids.index(im_end, ids.index(im_end) + 1)  # the first reply's <|im_end|>
    assert mask[first] and not mask[first + 1] and tok.decode([ids[first + 1]]) == "\n"
    prompt = tpl.render(list(conv.messages[:1]), True)
    assert ids[: len(tok.encode(prompt))] == tok.encode(prompt)
    assert not any(mask[: len(tok.encode(prompt))])


def test_a_token_across_a_turn_boundary_falls_back_to_turn_by_turn_tokens():
    """When tokenizing the whole conversation merges characters across the start of a reply
    (the prefix property fails), the row is tokenized piece by piece between boundaries and
    the targets are still exactly the reply's tokens."""
    glued = ("{% for m in messages %}{{ m['role'] }}{{ m['content'] }}|{% endfor %}"
             "{% if add_generation_prompt %}assistant{% endif %}")
    tok = Tokenizer.train(["assistanthello| userhi|" * 200], "bpe", vocab_size=300)
    tpl = ChatTemplate(glued, {}, (), "model's chat template")
    conv = _conv("hi", "hello")
    whole = tok.encode(tpl.render(list(conv.messages), False))
    prefix = tok.encode(tpl.render(list(conv.messages[:1]), True))
    assert whole[: len(prefix)] != prefix  # this tokenizer merges "assistant" with "hello"
    ids, mask, exact = encode_conversation(conv, tpl, tok, frozenset())
    assert not exact and ids[: len(prefix)] == prefix
    assert _targets(ids, mask, tok) == ["hello|"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """A template that renders a message differently once later messages follow (so no
    prefix of the text is the conversation so far) is refused with one line naming the row."""
    rewrites = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n"
                "{% endfor %}")
    tok = Tokenizer.train([TEXT + "LAST"], "char")
    with pytest.raises(MoorelmError, match=r"data.jsonl, line 4: .* does not render the "
                                           r"conversation turn by turn"):
        encode_conversation(_conv("a cat", "Eine Katze", line=4),
                            ChatTemplate(rewrites, {}, (), "model's chat template"), tok, frozenset())


def test_a_failing_template_and_a_too_long_conversation_name_the_row(tmp_path):
    """A run's template that fails on a row, and a conversation longer than the context
    window (with its token count), are each one line naming the file and line."""
    tok = Tokenizer.train([TEXT + DEFAULT_TEMPLATE + "ASYSTEMUR:"], "char")
    tok.save(tmp_path / "tokenizer.json")
    raising = ChatTemplate("{{ raise_exception('no system messages') }}", {}, (), "model's chat template")
    convs = [_conv("a cat", "Eine Katze", line=3)]
    with pytest.raises(MoorelmError, match="data.jsonl, line 3: the model's chat template "
                                           "refused the conversation: no system messages"):
        SFTData(convs, convs, tmp_path / "tokenizer.json", None, tmp_path, "fp",
                chat_template=raising)
    long = [_conv("a cat " * 10, "Eine Katze " * 10, line=7)]
    data = SFTData(long, long, tmp_path / "tokenizer.json", None, tmp_path, "fp")
    n = len(encode_conversation(long[0], ChatTemplate.default(), tok, frozenset())[0])
    with pytest.raises(MoorelmError, match=rf"line 7: the conversation is {n} tokens with the "
                                           r"chat template, longer than the context window \(32 tokens\)"):
        data.check_fits(32)


def test_chat_batches_carry_targets_only_on_assistant_tokens(tmp_path):
    """Packed chat rows: a batch's targets are -1 everywhere but on the assistant tokens, and
    the number of target tokens equals the sum of the replies' tokens (+ closing blank line)."""
    tok = Tokenizer.train([TEXT + DEFAULT_TEMPLATE + "ASYSTEMUR:"], "char")
    tok.save(tmp_path / "tokenizer.json")
    convs = [_conv("a cat", "Eine Katze", line=i) for i in range(1, 4)] + \
            [_conv("Hello!", "Hallo!", "the house", "Das Haus", line=4)]
    data = SFTData(convs, convs[:1], tmp_path / "tokenizer.json", None, tmp_path, "fp")
    want = 3 * len("Eine Katze\n\n") + len("Hallo!\n\n") + len("Das Haus\n\n")
    assert data.tokens("train") == want
    tokens, _ = data.rows("train", 256)
    assert len(tokens) == 1  # all four examples packed into one row
    x, y, seg = data.train_batch(0, 0, 1, 256)
    assert set(seg[0].tolist()) == {1, 2, 3, 4}
    assert sorted(tok.decode(y[0][y[0] >= 0].tolist()).split("\n\n")) == sorted(
        ["", "Eine Katze", "Eine Katze", "Eine Katze", "Hallo!", "Das Haus"])


# ----------------------------------------------------------------------------- imported models


def _tiny_hf_llama(folder):
    """A tiny Hugging Face Llama folder written by transformers (grouped-query attention
    4/2, tied embeddings), with a ChatML template and <|im_end|> as its EOS."""
    transformers = pytest.importorskip("transformers")
    tok = _chatml_tokenizer()
    im_end = tok.hf.token_to_id("<|im_end|>")
    conf = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=im_end, bos_token_id=im_end)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML}))
    return folder, im_end


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from moorelm.interop.hf import import_hf

    root = tmp_path_factory.mktemp("llama")
    hf, im_end = _tiny_hf_llama(root / "hf")
    return import_hf(hf, root / "run"), im_end


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4, alpha=8.0)], ids=["full", "lora"])
def test_imported_llama_learns_a_reply_and_stops_chats_and_exports(imported, tmp_path, capsys, lora):
    """Full and LoRA fine-tuning of an imported HF Llama on chat rows: the run keeps the
    base's chat template and stop ids, has no prompt template, and after training
    `moorelm chat --prompt` answers with the learned reply and stops at <|im_end|>; the run
    exports to a Hugging Face folder."""
    base, im_end = imported
    rows = [{"messages": [{"role": "user", "content": "a cat"},
                          {"role": "assistant", "content": "Eine Katze"}]}] * 12
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    r = finetune(base, data, tmp_path / "ft", eval_rows=2, lora=lora, exact_match_rows=2,
                 # LoRA at 1e-2: at 3e-2 the run went unstable on an AVX2 CPU (AMD Zen 3:
                 # "Eine Katze Katze K" after 120 steps, gibberish after 200), while 1e-2
                 # learned the reply and its stop at 80, 120, 200 and 300 steps alike
                 train_overrides={**FAST, "max_steps": 150 if lora else 40, "lr": 1e-2},
                 progress=False)
    cfg = RunFolder(tmp_path / "ft").read_config()
    assert cfg["chat"]["template"] == CHATML and im_end in cfg["chat"]["stop_ids"]
    assert "prompt_template" not in cfg and cfg["finetune"]["format"] == "chat"
    assert r.exact_match["exact_match"] == 1.0, r.exact_match
    lm = moorelm.load(tmp_path / "ft", device="cpu")
    assert lm.chat([{"role": "user", "content": "a cat"}], temperature=0,
                   max_new_tokens=30) == "Eine Katze"
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "ft"), "--prompt", "a cat", "--temperature", "0",
                 "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out.strip() == "Eine Katze"
    assert main(["export", str(tmp_path / "ft"), str(tmp_path / "hf-out")]) == 0
    assert (tmp_path / "hf-out" / "config.json").exists()


def test_run_trained_here_learns_chat_rows_with_the_default_template(tiny_run, tmp_path):
    """A run trained here (no chat section) fine-tuned on chat rows learns through the
    default template: its chat reply is the learned one, cut at the blank line."""
    rows = [{"messages": [{"role": "user", "content": "Ro"},
                          {"role": "assistant", "content": "Jul"}]}] * 12
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    r = finetune(tiny_run, data, tmp_path / "ft", eval_rows=2, exact_match_rows=2,
                 train_overrides={**FAST, "max_steps": 60, "lr": 1e-2}, progress=False)
    assert r.exact_match["exact_match"] == 1.0, r.exact_match
    assert "chat" not in RunFolder(tmp_path / "ft").read_config()
    lm = moorelm.load(tmp_path / "ft", device="cpu")
    assert lm.chat([{"role": "user", "content": "Ro"}], temperature=0, max_new_tokens=8) == "Jul"


def test_cli_refuses_a_prompt_template_for_chat_rows(tiny_run, tmp_path, capsys):
    """--template with chat rows is one line, exit 2 (chat rows use the chat template)."""
    data = _write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 4)
    assert main(["finetune", str(tiny_run), "--data", data, "--out", str(tmp_path / "f"),
                 "--template", "Q: {prompt}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--template is the prompt template" in err


def test_chat_run_resumes_exactly_on_an_imported_model(imported, tmp_path):
    """Fine-tuning an imported model on chat rows for 3 steps, then --resume to 6, gives the
    same weights as 6 steps straight (the chat template is part of what resume checks)."""
    base, _ = imported
    rows = [{"messages": [{"role": "user", "content": f"a cat {i}"},
                          {"role": "assistant", "content": "Eine Katze"}]} for i in range(10)]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    common = dict(eval_rows=2, lora=LoRAConfig(rank=2), exact_match_rows=0, progress=False)
    finetune(base, data, tmp_path / "straight", train_overrides={**FAST, "max_steps": 6, "lr": 1e-2}, **common)
    finetune(base, data, tmp_path / "split", train_overrides={**FAST, "max_steps": 3, "lr": 1e-2}, **common)
    r = finetune(None, None, tmp_path / "split", resume=True, train_overrides={"max_steps": 6},
                 exact_match_rows=0, progress=False)
    assert r.train.step == 6
    a = moorelm.load(tmp_path / "straight", device="cpu").model.state_dict()
    b = moorelm.load(tmp_path / "split", device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
