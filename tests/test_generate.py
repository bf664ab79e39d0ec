"""Sampling and generation."""

from __future__ import annotations

import pytest
import torch

import moorelm
from moorelm.errors import MoorelmError
from moorelm.generate import (
    SamplingParams,
    TextStreamer,
    apply_penalties,
    generate_tokens,
    sample_next_token,
)
from moorelm.tokenizer import Tokenizer


def test_greedy_at_temperature_zero():
    """Temperature 0 picks the argmax, whatever the generator."""
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    """top-k keeps the k best tokens; top-p keeps the smallest set reaching p (top one always)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_k = {int(sample_next_token(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {int(sample_next_token(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert seen_p == {0, 1}
    assert {int(sample_next_token(logits, 1.0, top_p=0.1, generator=g)) for _ in range(50)} == {0}


def test_seeded_sampling_is_reproducible():
    """The same seed gives the same tokens."""
    logits = torch.randn(1, 30)
    a = [int(sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(7))) for _ in range(3)]
    b = [int(sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(7))) for _ in range(3)]
    assert a == b


def test_sampling_follows_the_distribution_and_never_picks_a_zero():
    """Inverse-CDF draws match the probabilities; a token of probability 0 never comes up."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    logits = torch.log(probs).expand(4000, 5)  # 4000 rows: one draw each
    toks = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(toks, minlength=5).float() / 4000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_non_finite_logits_are_a_clear_error():
    """NaN logits (a broken checkpoint) raise a MoorelmError rather than picking a token."""
    with pytest.raises(MoorelmError, match="not finite"):
        sample_next_token(torch.full((1, 5), float("nan")), 1.0)


def test_tiny_temperature_and_top_p_sample_the_top_token():
    """Temperatures and top-p values that underflow in float32 (1e-300, the smallest double)
    give the argmax rather than NaN or an empty nucleus (they raised before)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50)
    best = logits.argmax(-1).tolist()
    for t in (1e-300, 5e-324, 1e-45):
        assert sample_next_token(logits, t, generator=g).tolist() == best
    for p in (1e-300, 5e-324):
        assert sample_next_token(logits, 1.0, top_p=p, generator=g).tolist() == best
        assert sample_next_token(logits, 0.7, top_k=3, top_p=p, generator=g).tolist() == best


def test_infinite_logits_have_a_defined_outcome():
    """Logits that overflow to +inf (a huge bias, a tiny temperature) share the row's
    probability among themselves; a row with every logit at -inf takes token 0; finite
    rows beside them sample as they would alone. None of it raises."""
    inf = float("inf")
    logits = torch.randn(3, 8)
    logits[0, 2] = logits[0, 5] = inf
    logits[1] = -inf
    seen = set()
    for seed in range(60):
        gens = [torch.Generator().manual_seed(s) for s in (seed, seed, seed)]
        toks = sample_next_token(logits, 0.9, top_k=4, top_p=0.9, generator=gens).tolist()
        seen.add(toks[0])
        assert toks[1] == 0
        alone = sample_next_token(logits[2:], 0.9, top_k=4, top_p=0.9,
                                  generator=[torch.Generator().manual_seed(seed)])
        assert toks[2] == int(alone)
    assert seen == {2, 5}
    huge = torch.tensor([[3e38, 1.0, 3e38]])  # finite, but / 0.5 overflows
    assert int(sample_next_token(huge, 0.5, generator=torch.Generator().manual_seed(0))) in (0, 2)


def test_per_row_generators_make_rows_independent():
    """With one generator per row, a row's token depends on its own seed only, not on the
    rows beside it (what lets the server batch seeded requests)."""
    logits = torch.randn(3, 40)
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    together = sample_next_token(logits, 0.8, top_k=20, generator=gens([1, 2, 3]))
    for row, seed in enumerate([1, 2, 3]):
        alone = sample_next_token(logits[row:row + 1], 0.8, top_k=20, generator=gens([seed]))
        assert int(alone) == int(together[row])
    shuffled = sample_next_token(logits[[2, 0]], 0.8, top_k=20, generator=gens([3, 1]))
    assert shuffled.tolist() == together[[2, 0]].tolist()


def test_penalties():
    """Presence subtracts once per seen token, frequency once per occurrence."""
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0, 1, 3]])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25]]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(top_k=0), "top-k"),
        (dict(max_new_tokens=-1), "max-new-tokens"),
    ],
)
def test_invalid_sampling_values(kwargs, message):
    """Out-of-range sampling settings are refused with the setting's name."""
    with pytest.raises(MoorelmError, match=message):
        SamplingParams(**kwargs)


def test_kv_cached_generation_equals_recomputation(tiny_run):
    """Greedy decoding with the cache yields the tokens of greedy full recomputation."""
    lm = moorelm.load(tiny_run, device="cpu")
    idx = torch.tensor([lm.tokenizer.encode("ROMEO:\nBut")])
    fast = [int(t) for t in generate_tokens(lm.model, idx, 20, temperature=0)]
    seq = idx
    slow = []
    for _ in range(20):
        logits, _ = lm.model(seq)
        nxt = int(logits[0, -1].argmax())
        slow.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert fast == slow


def test_generation_past_the_context_window(tiny_run):
    """Generation continues past seq_len by re-prefilling the recent window."""
    lm = moorelm.load(tiny_run, device="cpu")
    n = lm.config.seq_len * 2 + 5
    toks = list(generate_tokens(lm.model, torch.tensor([[1, 2, 3]]), n, temperature=1.0, seed=0))
    assert len(toks) == n


def test_long_prompt_is_truncated_with_a_warning(tiny_run):
    """A prompt longer than the context keeps its end and warns once."""
    lm = moorelm.load(tiny_run, device="cpu")
    with pytest.warns(UserWarning, match="longer than the context window"):
        text = lm.complete("Romeo " * 100, max_new_tokens=5, temperature=0)
    assert isinstance(text, str)


def test_streamer_never_splits_characters():
    """Byte tokens of a multi-byte character are held until the character is complete."""
    tok = Tokenizer.train(["abc"], "char")
    ids = tok.encode("a🙂b")
    pieces = [TextStreamer(tok)]
    s = pieces[0]
    out = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(out) == "a🙂b"
    assert "\ufffd" not in "".join(out)
    assert "🙂" in out  # emitted whole


def test_api_generate_returns_text_and_streams(tiny_run):
    """moorelm.load(run).generate(...) returns the text; stream=True yields the same text in
    pieces; seeded runs repeat."""
    lm = moorelm.load(tiny_run, device="cpu")
    it = lm.generate("JULIET:", max_new_tokens=15, seed=3, temperature=1.0, stream=True)
    assert iter(it) is it
    a = "".join(it)
    b = lm.generate("JULIET:", max_new_tokens=15, seed=3, temperature=1.0)
    assert isinstance(b, str) and a == b and len(a) > 0
    assert lm.complete("JULIET:", max_new_tokens=15, seed=3, temperature=1.0) == b


def test_generate_tokens_sizes_its_cache_to_the_request(monkeypatch):
    """generate_tokens reserves prompt + new tokens of KV cache, not the whole context window
    (an 8k model asked for a short reply), and still slides past the window when asked for
    more than it holds, giving the same tokens as before."""
    from moorelm.config import ModelConfig
    from moorelm.generate import generate_tokens
    from moorelm.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, seq_len=32, n_layer=1, n_head=2, n_embd=16,
                            pos="rope")).eval()
    sizes = []
    real = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda b, n=None: sizes.append(n) or real(b, n))
    idx = torch.randint(0, 40, (2, 5))
    short = torch.stack(list(generate_tokens(model, idx, 4, temperature=0)), 1)
    assert sizes == [9]
    long = torch.stack(list(generate_tokens(model, idx, 60, temperature=0)), 1)  # slides
    assert sizes[-1] == 32 and torch.equal(long[:, :4], short)
