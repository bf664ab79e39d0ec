"""Muon's orthogonalisation, parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from moorelm.config import ModelConfig, TrainConfig
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.optim import (
    Muon,
    OptimizerState,
    build_optimizer,
    decay_progress,
    lr_multiplier,
    newton_schulz,
    param_groups,
)

TINY = dict(vocab_size=50, seq_len=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 128), (200, 48)])
def test_newton_schulz_singular_values_near_one(shape):
    """Five Newton-Schulz steps push every singular value of a random matrix into about
    [0.6, 1.25] (the quintic's target band), whatever the shape."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=g) * 3.0
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.25, s


def test_newton_schulz_keeps_singular_vectors():
    """The result points where U V^T (the exact orthogonal polar factor) points."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(64, 24, generator=g)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    X = newton_schulz(G)
    cos = float((X * polar).sum() / (X.norm() * polar.norm()))
    assert cos > 0.97


def test_newton_schulz_ill_conditioned():
    """Small singular values are lifted too: a matrix with condition number 1e3 comes out
    with every singular value in the band, which plain normalisation would not give."""
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    G = U @ torch.diag(torch.logspace(0, -3, 48)) @ V.T
    s = torch.linalg.svdvals(newton_schulz(G, steps=8).float())
    assert s.min() > 0.5 and s.max() < 1.25


def test_muon_step_is_orthogonal_update():
    """One Muon step (no momentum history) moves a weight by lr x an orthogonalised
    gradient: the change's singular values sit near lr (times the shape scale)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    before = w.detach().clone()
    opt = Muon([w], lr=0.01, momentum=0.0, nesterov=False)
    w.grad = torch.randn(64, 32)
    opt.step()
    s = torch.linalg.svdvals(w.detach() - before)
    scale = math.sqrt(64 / 32)
    assert s.min() > 0.6 * 0.01 * scale and s.max() < 1.25 * 0.01 * scale


@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie_embeddings=False, pos="rope", norm="rmsnorm", mlp="swiglu"),
    dict(bias=True, n_kv_head=1),
])
def test_param_groups_partition_every_tensor(variant):
    """Every trainable tensor lands in exactly one group; hidden holds only 2-D block
    matrices, embed the embeddings/head, scalar the 1-D tensors."""
    model = GPT(ModelConfig(**TINY, **variant))
    groups = param_groups(model)
    ids = [id(p) for g in groups.values() for _, p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(p.dim() == 2 and n.startswith("blocks.") for n, p in groups["hidden"])
    assert all(p.dim() < 2 for _, p in groups["scalar"])
    assert {n.split(".")[0] for n, _ in groups["embed"]} <= {"wte", "wpe", "lm_head"}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_groups_cover_parameters_once(optimizer):
    """build_optimizer hands every parameter to exactly one optimizer group, with Muon
    taking exactly the hidden matrices when chosen."""
    model = GPT(ModelConfig(**TINY, tie_embeddings=False))
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer))
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    hidden = {id(p) for _, p in param_groups(model)["hidden"]}
    if optimizer == "muon":
        muon = [o for o in opt.opts if isinstance(o, Muon)]
        assert len(muon) == 1
        assert {id(p) for g in muon[0].param_groups for p in g["params"]} == hidden


def test_weight_decay_targets():
    """Decay applies to hidden matrices, to embeddings only with decay_embeddings (nanoGPT
    decays every 2-D tensor), never to norm gains."""
    model = GPT(ModelConfig(**TINY))
    for decay_embed in (False, True):
        opt = build_optimizer(model, TrainConfig(weight_decay=0.1, decay_embeddings=decay_embed))
        wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
        assert wd["hidden"] == 0.1 and wd["scalar"] == 0.0
        assert wd["embed"] == (0.1 if decay_embed else 0.0)


def test_cosine_schedule_matches_nanogpt():
    """Warmup then cosine to min_lr equals nanoGPT's get_lr (lr_decay_iters = max_iters)."""
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000, schedule="cosine")

    def nanogpt(it):
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / (2000 - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    for it in (0, 50, 99, 100, 500, 1500, 1999, 2000):
        got = cfg.lr * lr_multiplier(it, decay_progress(it, 0, 0.0, cfg, 1), cfg)
        assert got == pytest.approx(nanogpt(it), rel=1e-9)


def test_wsd_schedule_shape():
    """Warmup-stable-decay: flat at the peak, then linear down to min_lr over the last
    decay_frac of the budget."""
    cfg = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=0, schedule="wsd", decay_frac=0.4)
    assert lr_multiplier(10, 0.3, cfg) == 1.0
    assert lr_multiplier(10, 0.6, cfg) == 1.0
    assert lr_multiplier(10, 0.8, cfg) == pytest.approx(0.5)
    assert lr_multiplier(10, 1.0, cfg) == pytest.approx(0.0)


def test_time_budget_drives_decay():
    """With a time budget, progress is the fraction of seconds used."""
    cfg = TrainConfig(max_time=100.0, warmup_steps=10)
    assert decay_progress(50, 0, 25.0, cfg, 1) == pytest.approx(0.25)


def test_newton_schulz_batch_matches_one_at_a_time():
    """A stack runs as one batch and gives each member what it gets alone."""
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(5, 24, 40, generator=g) * torch.logspace(-1, 1, 5)[:, None, None]
    together = newton_schulz(stack)
    alone = torch.stack([newton_schulz(m) for m in stack])
    torch.testing.assert_close(together, alone, atol=2e-2, rtol=0)
    tall = newton_schulz(stack.mT)  # tall members orientate like their transposes
    torch.testing.assert_close(tall, together.mT, atol=2e-2, rtol=0)


def test_muon_batches_shapes_and_scales_like_the_per_matrix_rule():
    """Muon groups tall and wide matrices of the same shape pair into one batch; each
    parameter still moves by -lr x scale x its own orthogonalised (Nesterov) momentum."""
    g = torch.Generator().manual_seed(4)
    shapes = [(48, 16), (16, 48), (48, 16), (16, 16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    before = [p.detach().clone() for p in params]
    lr, mom = 0.05, 0.9
    opt = Muon(params, lr=lr, momentum=mom)
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()
    for p, p0, gr in zip(params, before, grads):
        buf = (1 - mom) * gr  # first step: momentum from zero
        update = newton_schulz(gr.lerp(buf, mom))
        scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        torch.testing.assert_close(p.detach(), p0 - lr * scale * update, atol=3e-3, rtol=0)


def _stepped(optimizer: str, steps: int):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-2))
    for i in range(steps):
        idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(i))
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_round_trips_under_checkpoint_names(optimizer):
    """Optimizers.state_dict names tensors "i/pid.key" (the names checkpoints have always
    used) and load_state_dict into a fresh optimizer continues exactly where the first left."""
    model, opt = _stepped(optimizer, 3)
    state = opt.state_dict()
    assert "0/0.exp_avg" in state.tensors and "0/0.exp_avg_sq" in state.tensors
    if optimizer == "muon":
        assert any(k.startswith("1/") and k.endswith(".momentum_buffer") for k in state.tensors)
    assert len(state.meta) == len(opt.opts) and "param_groups" in state.meta[0]

    twin = GPT(ModelConfig(**TINY))
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, TrainConfig(optimizer=optimizer, lr=1e-2))
    copied = {k: v.clone() for k, v in state.tensors.items()}
    twin_opt.load_state_dict(OptimizerState(copied, state.meta))
    for m, o in ((model, opt), (twin, twin_opt)):
        idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(9))
        m(idx, idx)[1].backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_optimizer_state_of_another_optimizer_is_refused():
    """AdamW-only state loaded where AdamW + Muon are built fails in one clear line."""
    _, opt = _stepped("adamw", 1)
    _, muon = _stepped("muon", 0)
    with pytest.raises(MoorelmError, match="--optimizer"):
        muon.load_state_dict(opt.state_dict())
