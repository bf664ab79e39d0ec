"""Tests for prompt->completion fine-tuning (moorelm.finetune.sft), the demo tasks and the
`finetune` verbs. Runs start from the shared tiny run (2 layers, width 32, context 32)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import moorelm
from moorelm.classify.metrics import TruncationWarning
from moorelm.cli import main
from moorelm.codecs import ADAPTER_FILE, read_tensors
from moorelm.config import SFT_TEMPLATE
from moorelm.errors import MoorelmError
from moorelm.finetune.lora import LoRAConfig
from moorelm.finetune.sft import (
    RESULT_FILE,
    Pair,
    SFTData,
    finetune,
    read_pairs,
    split_pairs,
)
from moorelm.finetune.tasks import date_pair, make_pairs, number_pair, number_words, write_pairs
from moorelm.generate import apply_template, check_template
from moorelm.run import RunFolder

FAST = dict(batch_size=4, eval_interval=0, log_interval=2, warmup_steps=0, threads=1,
            schedule="constant", lr=3e-3)


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def pairs_file(tmp_path):
    return _write_jsonl(tmp_path / "pairs.jsonl", make_pairs("dates", 40, seed=1))


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', r"line 2: the row has no 'completion'"),
    (b'{"prompt": "a", "completion": "b"}\n{"completion": "c"}\n', r"line 2: the row has no 'prompt'"),
    (b'{"text": "a"}\n', r"has no 'prompt' or 'completion' field \(found: 'text'\)"),
    (b'{"prompt": "a", "completion": 7}\n', r"line 1: 'completion' must be a string"),
    (b'{"prompt": "a", "completion": "  "}\n', r"line 1: the completion is empty"),
    (b'{"prompt": "a", "completion": "b"}\nnot json\n', r"line 2: not valid JSON"),
    (b'\n\n', r"has no data rows"),
    (b'{"prompt": "caf\xe9", "completion": "b"}\n', r"not valid UTF-8 .* line 1"),
])
def test_bad_pair_files_fail_with_one_line(tmp_path, content, message):
    """Each kind of bad row is one MoorelmError naming the file and line."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(MoorelmError, match=message) as e:
        read_pairs(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_pairs_from_csv_and_split(tmp_path):
    """CSV with prompt/completion columns works; the held-out split is seeded and disjoint."""
    path = tmp_path / "p.csv"
    path.write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(10)), encoding="utf-8")
    pairs = read_pairs(path)
    assert pairs[3] == Pair("p3", "c3", 5)
    train, held = split_pairs(pairs, 3, seed=0)
    assert len(held) == 3 and not set(train) & set(held)
    assert split_pairs(pairs, 3, seed=0) == (train, held)
    with pytest.raises(MoorelmError, match="cannot hold out 10 of 10"):
        split_pairs(pairs, 10)


def test_template_rules():
    """A template needs {prompt} exactly once; other braces pass through untouched."""
    for bad in ("no placeholder", "{prompt} and {prompt}"):
        with pytest.raises(MoorelmError, match="exactly once"):
            check_template(bad)
    assert apply_template("Q {x}: {prompt}\nA:", "a {b}") == "Q {x}: a {b}\nA:"
    assert apply_template(None, "raw") == "raw"


# ----------------------------------------------------------------------------- packing


def _sft(tiny_run, pairs, val=None, template=SFT_TEMPLATE) -> SFTData:
    return SFTData(pairs, val or pairs[:2], tiny_run / "tokenizer.json", template,
                   tiny_run, "fp", pack_seed=0)


def test_packing_keeps_examples_whole_and_masks_prompts(tiny_run):
    """Every completion (+ end-of-text) is a target exactly once, inside one row; prompt and
    padding tokens are never targets."""
    pairs = [Pair(**number_pair(i), line=i) for i in range(20)]
    data = _sft(tiny_run, pairs)
    tok = moorelm.Tokenizer.load(tiny_run / "tokenizer.json")
    tokens, mask = data.rows("train", 32)
    assert tokens.shape[1] == 33 and len(tokens) < len(pairs)  # several examples per row
    assert int(mask.sum()) == data.tokens("train")
    found = []
    for t, m in zip(tokens, mask):
        segment: list[int] = []
        for tid, is_target in zip(t.tolist(), m.tolist()):
            if is_target and tid == tok.eot_id:
                found.append(tok.decode(segment))
                segment = []
            elif is_target:
                segment.append(tid)
        assert not segment  # no completion is cut across rows
    assert sorted(found) == sorted(p.completion for p in pairs)
    x, y, seg = data.train_batch(0, 0, 4, 32)
    assert x.shape == y.shape == seg.shape and x.shape[0] == 4 and x.shape[1] <= 32
    # each example of a row is one run of segment numbers 1, 2, ...; padding is 0
    for row in seg.tolist():
        used = [v for v in row if v]
        assert used == sorted(used) and used[0] == 1 and set(row[len(used):]) <= {0}


def test_packed_rows_compute_what_their_examples_would_alone(tiny_run):
    """With segments, a packed row's per-token losses are those of its examples each in a
    row of its own (positions from 0, no attention across examples); without them they are
    not (the check can fail)."""
    pairs = [Pair(**number_pair(i), line=i) for i in range(12)]
    packed = _sft(tiny_run, pairs)
    single = SFTData(pairs, pairs[:2], tiny_run / "tokenizer.json", SFT_TEMPLATE, tiny_run,
                     "fp", pack=False)
    model = moorelm.load(tiny_run).model
    tokens, mask, _, segments = packed._packed("train", 32)
    assert len(tokens) < len(pairs)
    x, y, seg = packed._xy(tokens, mask, segments, 33)
    t2, m2, _, s2 = single._packed("train", 32)
    x2, y2, no_segments = single._xy(t2, m2, s2, 33)
    assert no_segments is None
    with torch.no_grad():
        _, together = model(x, y, loss_reduction="none", segments=seg)
        _, alone = model(x2, y2, loss_reduction="none")
        _, mixed = model(x, y, loss_reduction="none")
    want = sorted(alone[y2 >= 0].tolist())
    assert len(want) == int((y >= 0).sum())
    assert torch.allclose(torch.tensor(sorted(together[y >= 0].tolist())), torch.tensor(want),
                          atol=1e-4)
    assert not torch.allclose(torch.tensor(sorted(mixed[y >= 0].tolist())), torch.tensor(want),
                              atol=1e-4)


def test_without_packing_each_row_is_one_example_at_position_0(tiny_run):
    """pack=False: one example per row, starting at position 0; batches are cut to their
    longest example instead of the full window."""
    pairs = [Pair(**number_pair(i), line=i) for i in range(20)]
    tok = moorelm.Tokenizer.load(tiny_run / "tokenizer.json")
    data = SFTData(pairs, pairs[:2], tiny_run / "tokenizer.json", SFT_TEMPLATE, tiny_run,
                   "fp", pack=False)
    tokens, mask = data.rows("train", 32)
    assert len(tokens) == 20
    starts = {tuple(tokens[r, :3].tolist()) for r in range(20)}
    assert starts == {tuple(tok.encode(apply_template(SFT_TEMPLATE, p.prompt))[:3]) for p in pairs}
    longest = max(len(tok.encode(apply_template(SFT_TEMPLATE, p.prompt) + p.completion)) + 1
                  for p in pairs)
    assert data.train_batch(0, 0, 20, 32)[0].shape == (20, longest - 1)


def test_batches_are_a_function_of_the_step_and_cover_each_epoch(tiny_run):
    """Same step -> same batch; one epoch of steps visits every packed row once; data-parallel
    parts of a step concatenate to the whole batch."""
    pairs = [Pair(**number_pair(i), line=i) for i in range(40)]
    data = _sft(tiny_run, pairs)
    tokens, _ = data.rows("train", 32)
    n = len(tokens)
    seen = [data.train_batch(s, 5, 1, 32)[0][0].tolist() for s in range(n)]
    padded = {tuple(x + [data.eot_id] * (32 - len(x))) for x in seen}  # batches drop pad columns
    assert len(padded) == n and padded == {tuple(tokens[i, :-1].tolist()) for i in range(n)}
    assert torch.equal(data.train_batch(3, 5, 4, 32)[0], data.train_batch(3, 5, 4, 32)[0])
    a, b = data.train_batch(2, 5, 4, 32, part=0, parts=2), data.train_batch(2, 5, 4, 32, part=1, parts=2)
    whole = data.train_batch(2, 5, 4, 32)
    assert torch.equal(torch.cat([a[0], b[0]]), whole[0])
    assert torch.equal(torch.cat([a[1], b[1]]), whole[1])
    assert torch.equal(torch.cat([a[2], b[2]]), whole[2])


def test_targets_ignore_prompt_tokens(tiny_run):
    """In (idx, targets) the only targets are the completion's tokens and end-of-text."""
    tok = moorelm.Tokenizer.load(tiny_run / "tokenizer.json")
    data = _sft(tiny_run, [Pair("ab", "xyz", 1)], [Pair("ab", "xyz", 1)])
    x, y, _ = data.val_batch(0, 1, 32)
    assert y[y >= 0].tolist() == tok.encode("xyz") + [tok.eot_id]
    assert x[0, : len(tok.encode("ab\n=> "))].tolist() == tok.encode("ab\n=> ")


def test_long_examples_are_truncated_and_counted(tiny_run):
    """Examples longer than the window are cut (prompt from the start, completion at the
    end) and counted in one warning."""
    pairs = [Pair("p" * 40, "c" * 40, 1), Pair("a", "b", 2), Pair("x" * 10, "y", 3)]
    data = _sft(tiny_run, pairs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, mask = data.rows("train", 32)
    msgs = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("1 of 3 train examples")
    assert data.truncated["train"] == 1
    assert tokens.shape[1] == 33 and mask.any(axis=1).all()


# ----------------------------------------------------------------------------- end to end


def test_full_finetune_writes_a_templated_run(tiny_run, pairs_file, tmp_path, monkeypatch):
    """A full fine-tune writes an ordinary run folder with the template, which moorelm.load
    and `generate` reuse; only completion tokens count in the loss; the training and eval
    batches of packed rows reach the model with their segments."""
    from moorelm.model import GPT

    calls = []
    real = GPT.forward

    def spy(self, idx, targets=None, *args, segments=None, **kw):
        if targets is not None:
            calls.append(segments is not None and segments.shape == idx.shape)
        return real(self, idx, targets, *args, segments=segments, **kw)

    monkeypatch.setattr(GPT, "forward", spy)
    out = tmp_path / "ft"
    r = finetune(tiny_run, pairs_file, out, eval_rows=4, train_overrides={**FAST, "max_steps": 6},
                 exact_match_rows=4, progress=False)
    monkeypatch.undo()
    assert len(calls) >= 6 and all(calls)
    assert r.method == "full" and r.train.step == 6 and r.trainable_params == r.total_params
    cfg = RunFolder(out).read_config()
    assert cfg["prompt_template"] == SFT_TEMPLATE and cfg["finetune"]["rows"] == {"train": 36, "eval": 4}
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["exact_match"]["rows"] == 4 and 0.0 <= saved["exact_match"]["exact_match"] <= 1.0
    lm = moorelm.load(out, device="cpu")
    assert lm.format_prompt("2020-01-01") == "2020-01-01\n=> "
    assert moorelm.load(tiny_run, device="cpu").format_prompt("x") == "x"


def test_generate_cli_applies_the_template(tiny_run, pairs_file, tmp_path, capsys):
    """`moorelm generate` wraps --prompt in the run's template unless --no-template."""
    out = tmp_path / "ft"
    finetune(tiny_run, pairs_file, out, eval_rows=4, train_overrides={**FAST, "max_steps": 2},
             exact_match_rows=0, progress=False)
    args = ["generate", str(out), "--prompt", "1999-12-31", "--temperature", "0",
            "--max-new-tokens", "3", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("1999-12-31\n=> ")
    assert main(args + ["--no-template"]) == 0
    assert not capsys.readouterr().out.startswith("1999-12-31\n=>")


def test_exact_match_after_learning_a_tiny_task(tiny_run, tmp_path):
    """A task the tiny model can memorise reaches exact match 1.0 with greedy decoding."""
    rows = [{"prompt": p, "completion": c} for p, c in
            [("a", "one"), ("b", "two"), ("c", "three")]] * 12
    data = _write_jsonl(tmp_path / "abc.jsonl", rows)
    held = _write_jsonl(tmp_path / "held.jsonl", rows[:3])
    r = finetune(tiny_run, data, tmp_path / "ft", eval_data=held,
                 train_overrides={**FAST, "max_steps": 120}, progress=False)
    assert r.exact_match["exact_match"] == 1.0, r.exact_match


def _weights(run):
    model = moorelm.load(run, device="cpu").model
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=2, merged=False)], ids=["full", "lora"])
def test_resume_repeats_the_uninterrupted_run(tiny_run, pairs_file, tmp_path, lora):
    """6 steps, then --resume to 12, gives the same weights as 12 steps straight."""
    common = dict(eval_rows=4, lora=lora, exact_match_rows=0, progress=False)
    finetune(tiny_run, pairs_file, tmp_path / "straight", train_overrides={**FAST, "max_steps": 12}, **common)
    finetune(tiny_run, pairs_file, tmp_path / "split", train_overrides={**FAST, "max_steps": 6}, **common)
    r = finetune(None, None, tmp_path / "split", resume=True, train_overrides={"max_steps": 12},
                 exact_match_rows=0, progress=False)
    assert r.train.step == 12
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_changed_settings(tiny_run, pairs_file, tmp_path):
    """Resuming with another template or other LoRA settings is refused in one line."""
    out = tmp_path / "ft"
    finetune(tiny_run, pairs_file, out, eval_rows=4, lora=LoRAConfig(rank=2),
             train_overrides={**FAST, "max_steps": 2}, exact_match_rows=0, progress=False)
    with pytest.raises(MoorelmError, match="resume without --template"):
        finetune(None, None, out, resume=True, template="Q: {prompt}\nA: ", progress=False)
    with pytest.raises(MoorelmError, match="LoRA settings"):
        finetune(None, None, out, resume=True, lora=LoRAConfig(rank=4), progress=False)
    with pytest.raises(MoorelmError, match="already holds a trained run"):
        finetune(tiny_run, pairs_file, out, eval_rows=4, progress=False)


def test_lora_merged_and_separate_give_the_same_model(tiny_run, pairs_file, tmp_path):
    """Merged and kept-separate adapters load (moorelm.load) to the same model; separate
    leaves model.safetensors equal to the base weights; only adapters were trained."""
    runs = {}
    for merged in (True, False):
        out = tmp_path / f"m{merged}"
        r = finetune(tiny_run, pairs_file, out, eval_rows=4,
                     lora=LoRAConfig(rank=2, alpha=4, merged=merged, targets=("c_attn", "c_fc")),
                     train_overrides={**FAST, "max_steps": 5}, exact_match_rows=0, progress=False)
        assert 0 < r.trainable_params < r.total_params / 5
        assert (RunFolder(out).latest() / ADAPTER_FILE).exists()
        runs[merged] = out
    a, b = _weights(runs[True]), _weights(runs[False])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    base = read_tensors(RunFolder(tiny_run).latest() / "model.safetensors")
    sep = read_tensors(RunFolder(runs[False]).latest() / "model.safetensors")
    assert all(torch.equal(base[k], sep[k]) for k in base)
    lm = moorelm.load(runs[False], device="cpu")
    assert lm.complete("2001-02-03", max_new_tokens=4, temperature=0) == \
        moorelm.load(runs[True], device="cpu").complete("2001-02-03", max_new_tokens=4, temperature=0)


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_input_is_one_line_exit_2(tiny_run, tmp_path, capsys):
    """A row missing a field, and LoRA flags without a rank, exit 2 with one error line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    assert main(["finetune", str(tiny_run), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 2" in err and err.startswith("moorelm: error:")
    assert main(["finetune", str(tiny_run), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--lora-alpha", "4"]) == 2
    assert "--lora-rank" in capsys.readouterr().err



def test_a_model_to_import_is_named_with_the_import_command(tmp_path, capsys):
    """A base that moorelm.load takes but that is no run folder (the bundled smollm2, a GGUF
    file, a Hugging Face folder) is one line that names `moorelm import`, before any data or
    weights are read; the output folder is not created."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4, encoding="utf-8")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    for base in ("smollm2", str(gguf)):
        assert main(["finetune", base, "--data", str(data), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"moorelm import {base} RUN" in err, err
    assert main(["finetune", "no-such/run", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a run folder (nothing is there)" in err and "moorelm import no-such/run" in err
    assert not (tmp_path / "o").exists()

def test_cli_demo_data_finetune_and_eval(tiny_run, tmp_path, capsys):
    """demo data -> finetune (LoRA, a typed '\\n' in --template is a line break) ->
    finetune-eval, all through the CLI."""
    data = tmp_path / "d.jsonl"
    assert main(["finetune-demo-data", "--task", "numbers", "--rows", "30", "--out", str(data)]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_run), "--data", str(data), "--out", str(out), "--quiet",
                 "--lora-rank", "2", "--max-steps", "3", "--batch-size", "4", "--threads", "1",
                 "--eval-rows", "5", "--exact-match-rows", "2", "--device", "cpu",
                 "--template", "Q: {prompt}\\nA: "]) == 0
    text = capsys.readouterr().out
    assert "lora fine-tuning: 3 steps" in text and "exact match" in text
    assert RunFolder(out).read_config()["prompt_template"] == "Q: {prompt}\nA: "
    assert main(["finetune-eval", str(out), "--data", str(data), "--rows", "3", "--json",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3


# ----------------------------------------------------------------------------- demo tasks


def test_demo_tasks_are_deterministic_and_correct(tmp_path):
    """Same seed, same pairs; prompts are distinct; conversions are right."""
    a, b = make_pairs("dates", 500, seed=4), make_pairs("dates", 500, seed=4)
    assert a == b and len({p["prompt"] for p in a}) == 500
    assert make_pairs("dates", 5, seed=5) != make_pairs("dates", 5, seed=4)
    assert date_pair(0) == {"prompt": "1900-01-01", "completion": "1 January 1900"}
    assert {"prompt": "2024-02-29", "completion": "29 February 2024"} in make_pairs("dates", 73049)
    assert [number_words(n) for n in (0, 15, 40, 42, 100, 1000, 3412, 9999)] == [
        "zero", "fifteen", "forty", "forty-two", "one hundred", "one thousand",
        "three thousand four hundred twelve", "nine thousand nine hundred ninety-nine"]
    with pytest.raises(MoorelmError, match="unknown"):
        make_pairs("poems")
    with pytest.raises(MoorelmError, match="between 1 and 10000"):
        make_pairs("numbers", 10001)
    path = write_pairs(a[:3], tmp_path / "x.jsonl")
    assert [Pair(**p, line=i + 1) for i, p in enumerate(a[:3])] == read_pairs(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == a[:3]
