"""The one-token decode path's view of a model, bound once per KV cache.

``DecodePlan`` turns every projection and norm of a GPT into a ready callable (a matrix
product with its transposed weight or oneDNN's linear op, a norm with its arguments), and
``_ONEDNN_OFF`` switches oneDNN off around a CPU fp32 step. The model's ``_decode_step`` is
their only user (``inference_linear`` is ``GPT.forward``'s); why each exists is in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn as nn


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
    in-place weight updates show through), through oneDNN's op on a CPU in fp32 (and bf16
    where the CPU has it); any subclass (LoRA's) stays its own module, and a quantised linear
    binds its own ``decode_product``. A norm becomes ``torch.layer_norm``/``torch.rms_norm``
    with its arguments bound. ``layers`` holds each block's pieces in the order a step uses them. At batch 1 on a CPU a step is
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
    return _plain_product(mod.weight, mod.bias)


def _plain_product(weight: torch.Tensor, bias: torch.Tensor | None):
    # x @ W.t() rather than F.linear: for a single row on CPU it measured ~20% faster
    wt = weight.t()
    if bias is None:
        plain = lambda x: torch.mm(x, wt)  # noqa: E731
    else:
        plain = lambda x: torch.addmm(bias, x, wt)  # noqa: E731
    if not onednn_usable(weight):
        return plain
    many = by_rows(few_rows_product(weight, bias),
                   lambda x: _ONEDNN_LINEAR(x, weight, bias, "none", [], ""))

    def product(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # oneDNN's op has no backward
            return plain(x)
        return many(x)
    return product


FEW_ROWS = 2  # rows up to which ``few_rows_product`` beats oneDNN (measured on 1 and 2)


def by_rows(few, many):
    """``few`` for inputs of up to ``FEW_ROWS`` rows and ``many`` for more; ``many`` alone
    when ``few`` is None (``few_rows_product`` declined the weight)."""
    if few is None:
        return many
    return lambda x: few(x) if x.shape[0] <= FEW_ROWS else many(x)


def few_rows_product(weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.t() (+ bias)`` for an ``x`` of 1 or 2 rows, as one batched product of the
    weight's two halves of rows with ``x`` broadcast to both; None where it does not apply
    (not a contiguous fp32 CPU weight, or an odd number of outputs).

    Why: at one or two rows, every CPU product PyTorch offers reads a row-major weight far
    below memory speed: MKL's single-row path (``torch.mm``, ``torch.mv``) streams
    ~9 GB/s on one thread of a 2-core AMD EPYC Zen 4, oneDNN's ~15 GB/s on two, where
    ``x.sum()`` reads 32 GB/s. ``torch.bmm`` over the two halves, ``x`` expanded with a
    zero batch stride, splits the rows between the threads and streams the weight at
    32-44 GB/s (docs/performance.md): the character model's 24 projections 1.1 ms against
    oneDNN's packed 1.9 ms, SmolLM2's 150 21.7 -> 14.9 ms; from 4 rows oneDNN's packed
    product is faster. The values agree with oneDNN's to float32 rounding (~1e-5)."""
    if (weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.is_mkldnn
            or not weight.is_contiguous() or weight.dim() != 2 or weight.shape[0] % 2):
        return None
    n, k = weight.shape
    halves = weight.view(2, n // 2, k)

    def product(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        y = torch.bmm(halves, x.t().expand(2, k, rows))  # (2, n/2, rows)
        y = y.view(1, n) if rows == 1 else y.view(n, rows).t().contiguous()
        return y if bias is None else y.add_(bias)
    return product


def inference_linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for a projection in ``GPT.forward``: in inference (no autograd) on a CPU in
    fp32, a plain Linear without hooks goes through oneDNN's op as the decode path's does
    (prefill and scoring: 1.1-1.25x MKL's product at 64-512 rows on the AMD EPYC); anything
    else is the module's own call."""
    if (type(mod) is nn.Linear and not torch.is_grad_enabled() and x.dtype == mod.weight.dtype
            and not (mod._forward_hooks or mod._forward_pre_hooks)
            and onednn_usable(mod.weight)):
        return _ONEDNN_LINEAR(x, mod.weight, mod.bias, "none", [], "")
    return mod(x)


def onednn_linear():
    """PyTorch's oneDNN linear op (x86 and ARM builds with oneDNN), else None."""
    return _ONEDNN_LINEAR


def _find_onednn_linear():
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN_LINEAR = _find_onednn_linear()


@functools.cache
def _native_bf16() -> bool:
    from moorelm.device import cpu_supports_bf16

    return cpu_supports_bf16()


def onednn_usable(weight: torch.Tensor) -> bool:
    """Whether a product with this weight goes through oneDNN: fp32 on a CPU, and bf16 on a
    CPU with bf16 instructions (there a (1536, 576) bf16 product at one row took 143 us
    against ``torch.mm``'s 190).

    Measured on a 2-core AMD EPYC (docs/performance.md): MKL's product, which ``torch.mm``
    takes, reads a (1536, 576) weight at 8 GB/s for one row and does not gain from a
    second thread, where oneDNN's reads it at 15 GB/s; at 8 and 32 rows oneDNN is 1.3-1.5x
    faster, on the 49,152-wide head 2x. oneDNN picks its kernels by instruction set, not
    by vendor."""
    if _ONEDNN_LINEAR is None or weight.device.type != "cpu" or not weight.is_contiguous():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _native_bf16())


def _bind_norm(mod: nn.Module):
    if isinstance(mod, nn.LayerNorm):
        shape, w, b, eps = mod.normalized_shape, mod.weight, mod.bias, mod.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)  # F's wrapper costs as much
    shape, w, eps = mod.normalized_shape, mod.weight, mod.eps
    return lambda x: torch.rms_norm(x, shape, w, eps)
