"""The Python API's generate, batch and score: what ``moorelm.load(run)`` gives a user."""

from __future__ import annotations

import math

import pytest
import torch

import moorelm
from moorelm.errors import MoorelmError
from moorelm.generate import generate_batch, generate_tokens
from moorelm.scoring import score_sequences

PROMPTS = ["JULIET:", "O", "ROMEO: But soft", "It is the east"]


@pytest.fixture
def lm(tiny_run):
    return moorelm.load(tiny_run, device="cpu")


def test_generate_returns_text_and_streams_the_same(lm):
    """generate(prompt) is a str; stream=True yields pieces that join into that str."""
    text = lm.generate("JULIET:", max_new_tokens=10, temperature=1.0, seed=2)
    assert isinstance(text, str) and text
    pieces = list(lm.generate("JULIET:", max_new_tokens=10, temperature=1.0, seed=2,
                              stream=True))
    assert all(isinstance(p, str) for p in pieces) and "".join(pieces) == text


def test_a_list_of_prompts_equals_one_by_one_with_seed_plus_index(lm):
    """A list of prompts of different lengths returns a list of texts, and prompt i's text
    is what generate(prompts[i], seed=seed + i) gives alone, with sampling, bans, bias and
    the repetition penalty."""
    for kw in ({"temperature": 1.0},
               {"temperature": 0.9, "top_k": 20, "ban": ["the"], "repetition_penalty": 1.3,
                "logit_bias": {3: 5.0}, "min_p": 0.01}):
        batch = lm.generate(PROMPTS, max_new_tokens=12, seed=7, **kw)
        alone = [lm.generate(p, max_new_tokens=12, seed=7 + i, **kw)
                 for i, p in enumerate(PROMPTS)]
        assert isinstance(batch, list) and batch == alone
    # one prompt repeated gives different samples (seed + i), greedy gives equal ones
    same = lm.generate(["O"] * 3, max_new_tokens=12, temperature=1.0, seed=1)
    assert len(set(same)) > 1
    assert len(set(lm.generate(["O"] * 3, max_new_tokens=8, temperature=0))) == 1


def test_batch_stream_yields_index_piece_pairs(lm):
    """stream=True with a list yields (index, piece) pairs whose pieces, grouped by index,
    are the non-streamed texts."""
    texts = lm.generate(PROMPTS[:3], max_new_tokens=8, temperature=1.0, seed=4)
    got = ["", "", ""]
    for i, piece in lm.generate(PROMPTS[:3], max_new_tokens=8, temperature=1.0, seed=4,
                                stream=True):
        got[i] += piece
    assert got == texts


def test_batch_prompts_beyond_the_window_run_alone(lm):
    """A prompt too long to batch with max_new_tokens (prompt + new > window) still gets the
    text a single call gives it (sliding the window), beside batched ones."""
    window = lm.config.seq_len
    long = "Romeo " * (window // 6)
    kw = {"max_new_tokens": window // 2, "temperature": 1.0}
    out = lm.generate([long, "O"], seed=3, **kw)
    assert out == [lm.generate(long, seed=3, **kw), lm.generate("O", seed=4, **kw)]
    assert lm.generate(["O", "It"], max_new_tokens=0) == ["", ""]


def test_generate_batch_tokens_equal_generate_tokens(lm):
    """generate_batch gives each row the tokens generate_tokens gives it alone with the
    same seed, for prompts of different lengths."""
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [5, 6, 7]]
    steps = list(generate_batch(lm.model, prompts, 6, temperature=1.0, seeds=[1, 2, 3, 4]))
    batch = torch.stack(steps, dim=1).tolist()  # (B, new)
    for row, (ids, seed) in enumerate(zip(prompts, [1, 2, 3, 4])):
        alone = [int(t[0]) for t in generate_tokens(lm.model, torch.tensor([ids]), 6,
                                                    temperature=1.0, seed=seed)]
        assert batch[row] == alone
    with pytest.raises(MoorelmError, match="to leave room"):
        next(generate_batch(lm.model, [[1] * lm.config.seq_len], 2))


def test_score_is_the_shared_scoring_path(lm):
    """score(text) gives one log-prob per token of text, after the end-of-text token, equal
    to scoring.score_sequences; with a context the context's tokens are not reported; a
    list returns a list; total and perplexity follow from the log-probs."""
    s = lm.score("Romeo")
    ids = lm.tokenizer.encode("Romeo")
    ref = score_sequences(lm.model, [[lm.tokenizer.eot_id, *ids]])[0]
    assert s.ids == ids and s.tokens == list("Romeo") and s.logprobs == ref.logprobs[1:]
    assert all(lp <= 0 for lp in s.logprobs) and s.top is None
    assert s.total == pytest.approx(sum(s.logprobs))
    assert s.perplexity == pytest.approx(math.exp(-s.total / 5))
    a, b = lm.score(["Romeo", "Juliet"], context="O ", top_k=3)
    ref = score_sequences(lm.model, [lm.tokenizer.encode("O ") + lm.tokenizer.encode("Juliet")])
    assert b.logprobs == pytest.approx(ref[0].logprobs[2:]) and len(a.ids) == 5
    assert all(len(row) == 3 and row[0][2] >= row[-1][2] for row in b.top)
    assert b.top[0][0][1] == lm.tokenizer.decode([b.top[0][0][0]])


def test_bad_input_is_one_line(lm):
    """Empty text, text beyond the window, a non-text prompt, a non-integer seed are
    MoorelmErrors."""
    with pytest.raises(MoorelmError, match="nothing to score"):
        lm.score("")
    with pytest.raises(MoorelmError, match="split it"):
        lm.score("a" * (lm.config.seq_len + 5))
    with pytest.raises(MoorelmError, match="text or a list of texts"):
        lm.generate(["O", 3])
    with pytest.raises(MoorelmError, match="seed must be an integer"):
        lm.generate("O", seed=1.5)
    with pytest.raises(MoorelmError, match="temperature"):
        lm.generate(["O"], temperature=-1)


def test_load_shortens_a_runs_window(tiny_run):
    """``moorelm.load(run, seq_len=n)`` keeps the first n positions of a run's window (it was
    silently ignored for run folders): the positions kept compute exactly as before, text
    longer than the window still generates, and a bad seq_len is one line."""
    full = moorelm.load(tiny_run, device="cpu")
    short = moorelm.load(tiny_run, device="cpu", seq_len=8)
    window = full.model.config.seq_len
    assert short.model.config.seq_len == 8 < window
    assert short.meta["config"]["model"]["seq_len"] == 8
    assert short.model.wpe.weight.shape[0] == 8  # the learned position table, cut
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.equal(full.model(ids)[0], short.model(ids)[0])
    assert isinstance(short.generate("JULIET:", max_new_tokens=20, seed=0), str)
    for bad in (0, -1, 2.5, "8", True, window + 1):
        with pytest.raises(MoorelmError, match="seq_len must be an integer") as e:
            moorelm.load(tiny_run, device="cpu", seq_len=bad)
        assert "\n" not in str(e.value)


def test_shorten_keeps_rotary_positions_exact():
    """A rotary model shortened in place: its rotary tables are the first rows of the long
    ones, so the logits of the positions kept are the same."""
    from moorelm.config import ModelConfig
    from moorelm.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, seq_len=64, pos="rope",
                      norm="rmsnorm", mlp="swiglu")
    long_model = GPT(cfg).eval()
    short_model = GPT(cfg).eval()
    short_model.load_state_dict(long_model.state_dict())
    assert short_model.shorten(16) is short_model and short_model.config.seq_len == 16
    assert short_model.rope_cos.shape[0] == 16
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(long_model(ids)[0], short_model(ids)[0])
    with pytest.raises(MoorelmError, match=r"in \[1, 16\]"):
        short_model.shorten(17)


def test_stop_strings_end_the_text(lm):
    """``stop`` cuts the text before the first stop string, alone, streamed and batched
    alike (the batch's rows each at their own), and a stop never met leaves the text whole."""
    greedy = dict(max_new_tokens=40, temperature=0)
    full = lm.generate("JULIET:", **greedy)
    stop = full[12:14]
    cut = full[:full.find(stop)]
    assert len(cut) < len(full)
    assert lm.generate("JULIET:", stop=stop, **greedy) == cut
    assert "".join(lm.generate("JULIET:", stop=stop, stream=True, **greedy)) == cut
    earlier = full[5:7]
    both = full[:min(full.find(stop), full.find(earlier))]
    assert lm.generate("JULIET:", stop=[stop, earlier], **greedy) == both
    assert lm.generate("JULIET:", stop=["\x00never"], **greedy) == full
    assert lm.generate("JULIET:", stop=[""], **greedy) == full  # an empty stop: ignored
    alone = [lm.generate(p, stop=stop, **greedy) for p in PROMPTS]
    assert lm.generate(PROMPTS, stop=stop, **greedy) == alone
    pairs = list(lm.generate(PROMPTS, stop=stop, stream=True, **greedy))
    assert ["".join(piece for i, piece in pairs if i == k) for k in range(len(PROMPTS))] == alone
    for bad in (5, [b"x"], {"a": 1}):
        with pytest.raises(MoorelmError, match="stop must be text"):
            lm.generate("JULIET:", stop=bad, **greedy)


def test_cli_generate_stop(tiny_run, capsys):
    from moorelm.cli import main

    argv = ["generate", str(tiny_run), "--prompt", "JULIET:", "--max-new-tokens", "40",
            "--temperature", "0", "--no-stream"]
    assert main(argv) == 0
    full = capsys.readouterr().out[len("JULIET:"):-1]
    stop = full[12:14]
    assert main(argv + ["--stop", stop]) == 0
    assert capsys.readouterr().out == "JULIET:" + full[:full.find(stop)] + "\n"
    assert main(argv + ["--stop", "a\udcffb"]) == 2
    assert "--stop" in capsys.readouterr().err
