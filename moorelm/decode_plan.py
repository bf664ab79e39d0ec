"""The one-token decode path's view of a model, bound once per KV cache.

``DecodePlan`` turns every projection and norm of a GPT into a ready callable (a matrix
product with its transposed weight, MKL's packed GEMM for batches of 8-64 rows, a norm with
its arguments), and ``_ONEDNN_OFF`` switches oneDNN off around a CPU fp32 step. The model's
``_decode_step`` is their only user; why each exists is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F


class _OneDnnOff:
    """Switches oneDNN off while any thread is inside, and back to what it was when the last
    one leaves (counted, so that overlapping decoders in several threads cannot leave it
    off)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._before = True

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._before = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False
            self._inside += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                torch.backends.mkldnn.enabled = self._before


_ONEDNN_OFF = _OneDnnOff()


class DecodePlan:
    """The one-token decode path's view of a model: every projection and norm as a ready
    callable, taken once per KV cache (``KVCache.plan``) rather than once per call.

    A plain ``nn.Linear`` becomes a matrix product with its transposed weight bound (a view:
    in-place weight updates show through), on a CPU with MKL a ``_PackedLinear`` (the same
    product for a row or a few, MKL's packed GEMM for 8-64 rows); any subclass (LoRA's) stays
    its own module. A norm
    becomes ``torch.layer_norm``/``torch.rms_norm`` with its arguments bound. ``layers``
    holds each block's pieces in the order a step uses them. At batch 1 on a CPU a step is
    a few dozen small kernels, and the module lookups, transposes and type checks this
    saves measured about a fifth of it. The plan assumes the weights are not replaced
    (``model.to(...)``, a swapped module) while a cache built before is still decoding.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.linear = {m: _bind_linear(m) for m in model.modules() if isinstance(m, nn.Linear)}
        lin, norm = self.linear, _bind_norm
        # (norm, qkv, proj, norm, mlp, gains): the QK gains as a function, concatenated
        # afresh each step so that in-place updates of q_gain/k_gain show through
        self.layers = [(norm(b.ln_1), lin[b.attn.c_attn], lin[b.attn.c_proj], norm(b.ln_2),
                        b.mlp, b.attn.qk_gains if b.attn.cfg.qk_gain else None)
                       for b in model.blocks]
        self.qk_eps = model.blocks[0].attn.qk_eps if len(model.blocks) else 1e-6
        self.head = (norm(model.ln_f), lin[model.lm_head])

    def apply(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``linear(module, x)`` for ``MLP.forward``."""
        return self.linear[mod](x)


def _bind_linear(mod: nn.Linear):
    if type(mod) is not nn.Linear:
        fast = getattr(mod, "decode_product", None)  # quantised linears: a bound product
        return fast() if fast is not None else mod
    if _PackedLinear.usable(mod.weight):
        return _PackedLinear(mod.weight, mod.bias)
    return _plain_product(mod.weight, mod.bias)


def _plain_product(weight: torch.Tensor, bias: torch.Tensor | None):
    # x @ W.t() rather than F.linear: for a single row on CPU it measured ~20% faster
    wt = weight.t()
    if bias is None:
        return lambda x: torch.mm(x, wt)
    return lambda x: torch.addmm(bias, x, wt)


class _PackedLinear:
    """``x @ W.t() + b`` for a batch of rows, through MKL's packed GEMM on a CPU.

    A plain matrix product re-packs the whole weight into MKL's internal layout on every
    call: at 32 rows that copy is about as costly as the arithmetic (a measured 1.4-2x on the
    projections of a 384-wide model). MKL can keep the packed weight, but PyTorch's op for it
    only takes the row count it was packed for, so rows are padded up to a power of two (8,
    16, 32, ...) and each such size gets its pack, made when first needed; at most ``KEEP``
    sizes stay, the least recently used goes. Below 8 rows a product reads the weight once
    anyway and the plain one is used; so it is above 64 rows, where the re-packing is a small
    share and padding could double the work, and when autograd records (the op has no
    backward). A pack remembers its weight's version counter, so an in-place update of the
    weight (``load_state_dict``, an optimizer step) re-packs it; weights made in inference
    mode have no such counter and keep the plain product.
    """

    MIN_ROWS, MAX_ROWS = 8, 64
    KEEP = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.plain = _plain_product(weight, bias)
        self.packs: dict[int, tuple[int, torch.Tensor]] = {}  # rows -> (weight version, pack)

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        return (_MKL_OPS is not None and weight.device.type == "cpu"
                and weight.dtype == torch.float32 and weight.is_contiguous()
                and not weight.is_inference())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if not self.MIN_ROWS <= m <= self.MAX_ROWS or torch.is_grad_enabled():
            return self.plain(x)
        rows = 1 << (m - 1).bit_length()
        entry = self.packs.pop(rows, None)  # popped and put back: the dict's order is LRU
        version = self.weight._version
        if entry is None or entry[0] != version:
            entry = (version, _MKL_OPS[0](self.weight, rows))
            while len(self.packs) >= self.KEEP:
                self.packs.pop(next(iter(self.packs)))
        self.packs[rows] = entry
        if rows != m:
            x = F.pad(x, (0, 0, 0, rows - m))
        return _MKL_OPS[1](x, entry[1], self.weight, self.bias, rows)[:m]


def _mkl_pack_ops():
    """(pack, packed linear) ops of builds with MKL (x86 CPU wheels), else None."""
    try:
        if torch.backends.mkl.is_available():
            return torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
    except (AttributeError, RuntimeError):
        pass
    return None


_MKL_OPS = _mkl_pack_ops()


def _bind_norm(mod: nn.Module):
    if isinstance(mod, nn.LayerNorm):
        shape, w, b, eps = mod.normalized_shape, mod.weight, mod.bias, mod.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)  # F's wrapper costs as much
    shape, w, eps = mod.normalized_shape, mod.weight, mod.eps
    return lambda x: torch.rms_norm(x, shape, w, eps)
