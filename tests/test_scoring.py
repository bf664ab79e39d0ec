"""scoring.score_sequences: the log-probs every likelihood path shares."""

import pytest
import torch

from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.scoring import score_sequences


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, seq_len=16, n_layer=2, n_head=2, n_embd=32, pos="rope",
                      qk_norm=True, tie_embeddings=False)
    m = GPT(cfg)
    with torch.no_grad():  # a non-zero head, so the scores are not all uniform
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def reference(model, ids):
    """Log-probs of ids[1:] from one plain forward pass of the whole sequence."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].float(), -1)
    return [float(logp[i, t]) for i, t in enumerate(ids[1:])]


def test_scores_equal_a_plain_forward_pass_whatever_the_batch(model):
    """Batched, right-padded scoring gives each sequence the scores it gets alone."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (17, 3, 9, 1, 12)]
    for batch_tokens in (4096, 10, 1):
        scored = score_sequences(model, seqs, top_k=3, batch_tokens=batch_tokens)
        for seq, s in zip(seqs, scored):
            assert s.ids == seq and s.logprobs[0] is None and s.greedy[0] is None
            if len(seq) > 1:
                assert s.logprobs[1:] == pytest.approx(reference(model, seq), abs=1e-5)
                assert s.total() == pytest.approx(sum(reference(model, seq)), abs=1e-4)
            for i in range(1, len(seq)):
                best_id, best_lp = s.top[i][0]
                assert best_lp >= s.logprobs[i] - 1e-6
                assert s.greedy[i] == (best_id == seq[i])
                assert [lp for _, lp in s.top[i]] == sorted((lp for _, lp in s.top[i]),
                                                            reverse=True)


def test_total_of_a_continuation_and_greedy_flag(model):
    """total(start) sums only the continuation; all_greedy holds for a greedy continuation."""
    prompt = [1, 2, 3]
    ids = list(prompt)
    for _ in range(4):  # extend greedily
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    (s,) = score_sequences(model, [ids])
    assert s.all_greedy(len(prompt))
    assert s.total(len(prompt)) == pytest.approx(sum(s.logprobs[len(prompt):]))


@pytest.mark.parametrize("seqs, message", [
    ([[]], "empty"),
    ([list(range(18))], "at most 17"),
    ([[1, 50]], "outside the vocabulary"),
])
def test_bad_sequences_get_one_line(model, seqs, message):
    """Empty, too long and out-of-vocabulary sequences are refused with a clear line."""
    with pytest.raises(MoorelmError, match=message):
        score_sequences(model, seqs)
