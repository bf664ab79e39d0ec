"""Parameter groups, optimizers (AdamW, Muon) and learning-rate schedules.

Every trainable tensor lands in exactly one group:

- ``hidden``:  2-D weight matrices inside the blocks (attention and MLP projections);
- ``embed``:   token and position embeddings and the output head (one tensor when tied);
- ``scalar``:  norm gains and biases (1-D).

AdamW (decoupled weight decay) decays ``hidden`` and, when ``decay_embeddings`` is set
(nanoGPT decays every 2-D tensor), ``embed``. With ``optimizer="muon"`` the ``hidden``
matrices are trained by Muon and the rest by AdamW.

Muon (Jordan et al. 2024): SGD momentum (Nesterov) whose update matrix is replaced by the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from moorelm.config import TrainConfig
from moorelm.errors import MoorelmError


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"hidden": [], "embed": [], "scalar": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # shared (tied) tensors are yielded once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            groups["scalar"].append((name, p))
        elif name.startswith(("wte", "wpe", "lm_head")) or ".wte." in name or ".wpe." in name \
                or ".lm_head." in name or name.endswith(("score.weight",)):
            groups["embed"].append((name, p))
        else:
            groups["hidden"].append((name, p))
    return groups


# Quintic Newton-Schulz coefficients chosen (Jordan et al.) to push all singular values into
# roughly [0.7, 1.2] in five steps rather than converge exactly: fast and good enough.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix (singular values -> ~1) without an SVD.

    ``G`` is one matrix (r, c) or a stack of same-shape matrices (n, r, c); a stack runs as
    batched matmuls, which on CPU costs about a third of looping over its members.
    """
    assert G.ndim in (2, 3)
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16)
    if G.ndim == 2:
        X = X[None]  # a batch of one
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if transposed:
        X = X.mT
    if G.ndim == 2:
        X = X[0]
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalised updates, for 2-D hidden weight matrices.

    Per step: momentum buffers updated in one foreach call, then the updates of every
    same-shape group (a model has few distinct shapes: q/k/v, projections, MLP in and out)
    orthogonalised together as one batch.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            # batch by shape, tall matrices transposed to wide so (r, c) and (c, r) share a batch
            tall = [p.size(0) > p.size(1) for p in params]
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, u in enumerate(updates):
                by_shape.setdefault((min(u.shape), max(u.shape)), []).append(i)
            for idx in by_shape.values():
                stack = torch.stack([updates[i].mT if tall[i] else updates[i] for i in idx])
                ortho = newton_schulz(stack, group["ns_steps"]).unbind(0)
                for i, o in zip(idx, ortho):
                    p = params[i]
                    # scale so the update's RMS matches across shapes (tall matrices get more)
                    scale = (p.size(0) / p.size(1)) ** 0.5 if tall[i] else 1.0
                    p.add_(o.mT if tall[i] else o, alpha=-group["lr"] * scale)
        return loss


class OptimizerState(NamedTuple):
    """The optimizers' state in checkpoint form: tensors for safetensors and the JSON rest.

    Tensors are named ``"i/pid.key"``: optimizer ``i`` (0: AdamW, 1: Muon when used),
    parameter ``pid`` in that optimizer's order, state ``key`` (``"0/3.exp_avg"``).
    ``meta[i]`` holds optimizer ``i``'s param groups and non-tensor state (``scalars``).
    """

    tensors: dict[str, torch.Tensor]
    meta: list[dict[str, Any]]


class Optimizers:
    """One or two torch optimizers behind one step/zero_grad/state interface."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]

    def set_lr(self, multiplier: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * multiplier

    def state_dict(self) -> OptimizerState:
        """The state of every optimizer, named as checkpoints store it. Tensors are the
        optimizers' own (on their device; DTensor shards under FSDP): copy them before the
        next step changes them."""
        tensors: dict[str, torch.Tensor] = {}
        meta = []
        for i, o in enumerate(self.opts):
            sd = o.state_dict()
            scalars: dict[str, dict[str, Any]] = {}
            for pid, st in sd["state"].items():
                for key, val in st.items():
                    if torch.is_tensor(val):
                        tensors[f"{i}/{pid}.{key}"] = val
                    else:
                        scalars.setdefault(str(pid), {})[key] = val
            meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
        return OptimizerState(tensors, meta)

    def load_state_dict(self, state: OptimizerState,
                        place: Callable[[torch.Tensor, nn.Parameter], torch.Tensor] | None = None
                        ) -> None:
        """Restore what ``state_dict`` gave. ``place(tensor, param)`` lays each loaded tensor
        out like its parameter first (FSDP cuts full tensors into the parameter's shards)."""
        if len(state.meta) != len(self.opts):
            raise MoorelmError(
                f"the checkpoint holds the state of {len(state.meta)} optimizer(s) but this run "
                f"builds {len(self.opts)}; resume with the run's --optimizer")
        by_opt: list[dict[str, torch.Tensor]] = [{} for _ in self.opts]
        for name, t in state.tensors.items():
            i, rest = name.split("/", 1)
            by_opt[int(i)][rest] = t
        for o, tensors, meta in zip(self.opts, by_opt, state.meta):
            params = [p for g in o.param_groups for p in g["params"]]
            st: dict[int, dict[str, Any]] = {}
            for name, t in tensors.items():
                pid, key = name.split(".", 1)
                st.setdefault(int(pid), {})[key] = t if place is None else place(t, params[int(pid)])
            for pid, kv in meta.get("scalars", {}).items():
                st.setdefault(int(pid), {}).update(kv)
            o.load_state_dict({"state": st, "param_groups": meta["param_groups"]})


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> Optimizers:
    groups = param_groups(model)
    decay_embed = cfg.weight_decay if cfg.decay_embeddings else 0.0
    adam_groups = [
        dict(params=[p for _, p in groups["embed"]], weight_decay=decay_embed,
             base_lr=cfg.lr * cfg.embed_lr_scale, name="embed"),
        dict(params=[p for _, p in groups["scalar"]], weight_decay=0.0, base_lr=cfg.lr,
             name="scalar"),
    ]
    opts: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "muon":
        muon = Muon([dict(params=[p for _, p in groups["hidden"]], base_lr=cfg.muon_lr,
                          name="hidden")], lr=cfg.muon_lr, momentum=cfg.muon_momentum)
        opts.append(muon)
    else:
        adam_groups.insert(0, dict(params=[p for _, p in groups["hidden"]],
                                   weight_decay=cfg.weight_decay, base_lr=cfg.lr, name="hidden"))
    adam_groups = [g for g in adam_groups if g["params"]]
    for g in adam_groups:
        g["lr"] = g["base_lr"]
    # the fused kernel does the whole update in one pass per tensor; on CPU it beats the
    # default per-tensor loop of small ops (see bench/train_speed.py)
    fused = device_type in ("cuda", "cpu")
    opts.insert(0, torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     eps=cfg.eps, fused=fused or None))
    for o in opts:
        for g in o.param_groups:
            g.setdefault("base_lr", g["lr"])
    return Optimizers(opts)


def lr_multiplier(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` as a fraction of the peak.

    Warmup is linear over ``warmup_steps``; ``progress`` in [0, 1] is how far the run is
    through its budget (steps, tokens or time, whichever binds) and drives the decay:
    cosine from 1 down to min_lr/lr, or warmup-stable-decay (flat, then linear to min_lr/lr
    over the last ``decay_frac``), or constant.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    floor = cfg.min_lr / cfg.lr
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.decay_frac
        if progress <= start:
            return 1.0
        return 1.0 - (1.0 - floor) * (progress - start) / cfg.decay_frac
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))


def decay_progress(step: int, tokens: int, elapsed: float, cfg: TrainConfig,
                   tokens_per_step: int) -> float:
    """How far past warmup the run is, in [0, 1], by whichever budget binds first."""
    fracs = []
    w = cfg.warmup_steps
    if cfg.max_steps:
        fracs.append((step - w) / max(1, cfg.max_steps - w))
    if cfg.max_tokens:
        fracs.append((tokens - w * tokens_per_step) / max(1, cfg.max_tokens - w * tokens_per_step))
    if cfg.max_time:
        fracs.append(elapsed / cfg.max_time)
    return max(fracs) if fracs else 0.0
