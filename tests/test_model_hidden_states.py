"""GPT.hidden_states: the trunk's output that heads other than the language model read."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import VARIANTS, make


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hidden_states_equal_what_a_hook_on_the_final_norm_sees(variant):
    """hidden_states(idx) is exactly the final norm's output during forward (what the GPT
    classifier used to catch with a forward hook), and the LM head on it gives forward's
    logits; with segments too."""
    model = make(variant)
    idx = torch.randint(0, 50, (3, 11))
    segments = torch.tensor([[0] * 5 + [1] * 6, [0] * 11, [0] * 2 + [1] * 4 + [2] * 5])
    for seg in (None, segments):
        seen = []
        handle = model.ln_f.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out))
        with torch.no_grad():
            logits, _ = model(idx, segments=seg)
        handle.remove()
        with torch.no_grad():
            h = model.hidden_states(idx, segments=seg)
        assert h.shape == (3, 11, model.config.n_embd)
        assert torch.equal(h, seen[0])
        assert torch.equal(model._logits(h), logits)


def test_hidden_states_carry_gradients():
    """Training a head on hidden_states reaches the trunk's weights."""
    model = make("modern").train()
    model.hidden_states(torch.randint(0, 50, (2, 7))).sum().backward()
    assert model.wte.weight.grad is not None and model.blocks[0].attn.c_attn.weight.grad is not None
