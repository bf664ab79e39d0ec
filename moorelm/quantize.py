"""Weight formats for inference: fp32 (as trained), bf16, int8 or int4 weights (weight-only).

A batch-1 decoding step of a 135M-parameter model reads every weight once, so on a CPU memory
bandwidth, not arithmetic, sets its pace; storing weights in fewer bytes is the lever.

- ``fp32``: the model as trained.
- ``bf16``: the whole model in bfloat16 (weights, activations and KV cache), computed with
  the CPU's bf16 matrix kernels where it has them (AVX-512 BF16, AMX, ARM's BF16).
- ``int8``: every projection and the LM head stored as int8 with one fp32 scale per output
  channel (symmetric, absmax / 127, the scale a bf16 value); each product runs PyTorch's weight-only int8 kernel
  (``torch._weight_int8pack_mm``) on bf16 copies of the activations and returns fp32.
  Embeddings, norms and the KV cache stay fp32. A tied LM head gets its own int8 copy: the
  embedding table is still read row by row in fp32. For one sequence at a time
  (``batched=False``: ``generate`` and ``chat``) int8 takes another layout,
  ``Int8RowsLinear``: the weight transposed into rows of 64 outputs with their own scale and
  offset, multiplied by fbgemm's int8 embedding-bag kernel, which streams it at memory speed
  where the weight-only kernel reads ~10 GB/s (and a scale per 64 values is closer to fp32).
- ``int4``: every projection as group-wise int4 (``Int4Linear``: 32 input channels per bf16
  scale and zero point, PyTorch's CPU int4 kernel ``torch._weight_int4pack_mm_for_cpu``);
  the LM head stays int8 (an int4 head flipped SmolLM2's greedy choices within ~6 tokens,
  an int8 one within ~25, like int8 throughout), and so does any layer whose shape the
  kernel refuses.

On a CPU with oneDNN, fp32 and bf16 projections are also *packed*: held in oneDNN's blocked
weight layout (``PackedLinear``) instead of PyTorch's row-major one. The values are the same;
the layout lets oneDNN stream a weight at full memory bandwidth whatever the number of rows
(on the 2-core AMD EPYC, SmolLM2's 120 projections at 1 / 8 / 32 rows took 23 / 23 / 47 ms
packed against 35 / 44 / 65 ms row-major, docs/performance.md). A packed copy replaces the
row-major weight, so memory does not grow; a head tied to the embedding table stays
row-major (the table's row lookups need that layout, and a second copy would cost its bytes).

``quantize(model, "int8")`` converts a model in place and returns it; ``moorelm.load(run,
weights=...)`` and the ``--weights`` flag of ``generate``, ``chat`` and ``serve`` call it
(``batched=False``, for one sequence at a time, leaves fp32 projections row-major and puts
int8 ones in ``Int8RowsLinear``'s layout). Converted models are for
inference: training, export and checkpoints take models loaded without it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from moorelm.decode_plan import FEW_ROWS, by_rows, few_rows_product, onednn_linear, onednn_usable
from moorelm.errors import MoorelmError
from moorelm.model import meta_device

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # input channels per int4 scale and zero point
PACK_ROWS = 32  # the row count oneDNN's weight layout is chosen for (1-256 rows all gain)
# fp32 projections of at most this many bytes keep a row-major twin beside the packed weight
# (``PackedLinear.dense``), for one- and two-row decoding: the character model's 43 MB are
# worth doubling, SmolLM2's 425 MB are not (serving memory)
TWIN_BYTES = 128 << 20
# outputs per table row of ``Int8RowsLinear``: on SmolLM2 32 was slower, 96 and 192 a little
# faster but coarser (mean |delta log-prob| 0.055 at 192 against 0.039)
ROWS_BLOCK = 64


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A row-major (out, in) weight reordered into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose weight (fp32 or bf16) is in oneDNN's blocked layout, for inference
    on a CPU: every product is oneDNN's linear op, which takes the layout without reordering.

    ``weight`` is an opaque oneDNN tensor (``torch.ops.mkldnn._reorder_linear_weight``) of
    the original's shape and dtype; ``unpacked()`` gives the row-major ``nn.Linear`` back.
    There is no backward: calling it with autograd recording is refused.
    """

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None,
                 dense: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = packed.shape
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # the row-major twin (``twin=True``): decoding one or two rows reads it through
        # ``few_rows_product``, faster there than any product with the packed layout
        self.dense = dense

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return type(linear) is nn.Linear and onednn_usable(linear.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, twin: bool = False) -> PackedLinear:
        w = linear.weight.detach()
        dense = w.contiguous() if twin and w.dtype == torch.float32 else None
        return cls(_pack(w), linear.bias, dense)

    def unpacked(self) -> nn.Linear:
        """The same projection as a row-major ``nn.Linear``."""
        with meta_device():
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # a state dict holds the row-major weight, as an nn.Linear's does (an opaque oneDNN
        # tensor could not be saved, compared or converted)
        destination[prefix + "weight"] = self.weight.detach().to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key].detach()
            if w.shape != self.weight.shape:
                error_msgs.append(f"size mismatch for {key}: {tuple(w.shape)} in the state "
                                  f"dict, {tuple(self.weight.shape)} here")
                return
            self.weight = nn.Parameter(_pack(w.to(self.weight.dtype)), requires_grad=False)
            if self.dense is not None:
                self.dense = w.to(self.dense.dtype).contiguous().clone()
        elif strict:
            missing_keys.append(key)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # an opaque oneDNN tensor cannot be cloned as a Parameter is: repack a dense copy
        copied = PackedLinear.from_linear(self.unpacked(), twin=self.dense is not None)
        memo[id(self)] = copied
        return copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise MoorelmError("this model's projections are packed for inference "
                               "(moorelm.load does that on a CPU); to train it, load the run "
                               "with moorelm.run.RunFolder(run).load()")
        return onednn_linear()(x, self.weight, self.bias, "none", [], "")

    def decode_product(self):
        """As ``Int8Linear.decode_product``: the op with this weight bound (with a row-major
        twin, one or two rows go through ``few_rows_product`` instead)."""
        op, w, b = onednn_linear(), self.weight, self.bias
        few = few_rows_product(self.dense, b) if self.dense is not None else None
        return by_rows(few, lambda x: op(x, w, b, "none", [], ""))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{str(self.weight.dtype).removeprefix('torch.')} packed for oneDNN")


class Int8Linear(nn.Linear):
    """``nn.Linear`` with int8 weights and per-output-channel scales (weight-only int8).

    A subclass of ``nn.Linear`` so that code walking a model's linears finds it; the decode
    plan calls it as a module, like LoRA's. ``weight`` holds the int8 values, ``scales`` the
    fp32 scale of each output row: ``W ~= weight * scales[:, None]``.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate an fp32 weight
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        # The kernel takes the scales in bf16, whose 8-bit mantissa would shift a row's
        # every weight by up to 0.4%. So the scales are bf16 values from the start (rounded
        # up a little, so that the row's largest weight still fits in 127 steps) and the int8
        # values are computed against them: the kernel's product is then exactly
        # ``weight * scales`` (fp32 ``scales`` hold the same values).
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12) * (1 + 2**-8)
        scales = scales.to(torch.bfloat16).float()
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix these int8 values stand for."""
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales_bf16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def decode_product(self):
        """``x (B, in) fp32 -> (B, out) fp32`` for the decode path: the same product as
        ``forward`` without its reshapes and checks (a step makes ~150 of these calls)."""
        w, s, b, bf16 = self.weight, self.scales_bf16, self.bias, torch.bfloat16
        if b is None:
            return lambda x: torch._weight_int8pack_mm(x.to(bf16), w, s).float()
        return lambda x: torch._weight_int8pack_mm(x.to(bf16), w, s).float().add_(b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8RowsLinear(nn.Linear):
    """``nn.Linear`` with int8 weights laid out for decoding one row at a time (what
    ``moorelm.load(..., batched=False)`` gives ``generate`` and ``chat``).

    One decoding step multiplies a single input row ``x`` (in) by the weight: ``y = sum_k
    x[k] * W[:, k]``, a weighted sum of the weight's columns. That is what an embedding bag
    computes (a weighted sum of table rows), and fbgemm's kernel for int8 tables
    (``torch.ops.quantized.embedding_bag_byte_rowwise_offsets``) streams its rows at memory
    speed. So the weight is stored transposed, in blocks of ``ROWS_BLOCK`` outputs: the table
    has one row per (block, input channel), ``ROWS_BLOCK`` uint8 values with their own fp32
    scale and offset (min/max over the row, 256 levels: ``embedding_bag_byte_prepack``), and a
    product is one bag per block, each over all inputs with ``x`` as the weights; the bags
    run on all threads. Outputs are padded to a multiple of ``ROWS_BLOCK`` (zeros, sliced off).

    Measured on SmolLM2-135M, 2 threads of an AMD EPYC Zen 4 (docs/performance.md): a batch-1
    step 14-18 ms against 18-24 ms for ``Int8Linear`` and 20-27 ms for row-major fp32, with
    a mean |delta log-prob| of 0.039 against ``Int8Linear``'s 0.063 (a scale per 64 values
    instead of one per output channel). Every batch reads the table once per row, so a batch of more
    than ``FEW_ROWS`` rows (prefill, scoring) goes through the dequantised blocks and one
    batched product instead; serving keeps ``Int8Linear``, whose cost does not grow with rows.
    """

    def __init__(self, table: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.blocks = table.shape[0] // in_features
        self.weight = nn.Parameter(table, requires_grad=False)  # (blocks * in, block + 8) uint8
        # bag b takes the table's rows b * in ... (b + 1) * in - 1
        self.register_buffer("indices", torch.arange(table.shape[0], dtype=torch.int32),
                             persistent=False)
        self.register_buffer("offsets", torch.arange(0, table.shape[0], in_features,
                                                     dtype=torch.int32), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)

    @staticmethod
    @functools.cache
    def available() -> bool:
        """Whether this PyTorch build has the quantized embedding-bag ops with fbgemm's
        kernels behind them (x86 builds). Elsewhere (ARM builds have no fbgemm, and the ops
        fall back to plain loops there) int8 keeps ``Int8Linear``."""
        try:
            if "fbgemm" not in torch.backends.quantized.supported_engines:
                return False
            ops = torch.ops.quantized
            return all(callable(getattr(ops, name)) for name in (
                "embedding_bag_byte_prepack", "embedding_bag_byte_unpack",
                "embedding_bag_byte_rowwise_offsets"))
        except (AttributeError, RuntimeError):
            return False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8RowsLinear:
        w = linear.weight.detach().float()
        n, k = w.shape
        padded = -(-n // ROWS_BLOCK) * ROWS_BLOCK
        if padded != n:
            w = torch.cat([w, w.new_zeros(padded - n, k)])
        blocks = padded // ROWS_BLOCK
        rows = w.view(blocks, ROWS_BLOCK, k).transpose(1, 2).reshape(blocks * k, ROWS_BLOCK)
        table = torch.ops.quantized.embedding_bag_byte_prepack(rows.contiguous())
        return cls(table, k, n, linear.bias)

    def _blocks(self) -> torch.Tensor:
        """The values as fp32 blocks (blocks, in, ROWS_BLOCK): block b holds outputs
        b * ROWS_BLOCK ... of every input."""
        values = torch.ops.quantized.embedding_bag_byte_unpack(self.weight)
        return values.view(self.blocks, self.in_features, ROWS_BLOCK)

    def dequantized(self) -> torch.Tensor:
        """The fp32 (out, in) matrix these values stand for."""
        w = self._blocks().transpose(1, 2).reshape(-1, self.in_features)
        return w[: self.out_features]

    def _one_row(self):
        """``x (1, in) fp32 -> (1, out)``: the bags, with ``x`` repeated as every block's
        weights (by ``cat`` for up to 64 blocks, faster than ``expand`` there; the call's own
        cost is ~20 us, the weight's bytes are the rest)."""
        bag, table = torch.ops.quantized.embedding_bag_byte_rowwise_offsets, self.weight
        indices, offsets, n, k, blocks = (self.indices, self.offsets, self.out_features,
                                          self.in_features, self.blocks)
        padded = blocks * ROWS_BLOCK

        def by_cat(x: torch.Tensor) -> torch.Tensor:
            weights = torch.cat([x.reshape(k)] * blocks)
            return bag(table, indices, offsets, False, 0, False, weights, None,
                       False).view(1, padded)

        def by_expand(x: torch.Tensor) -> torch.Tensor:
            weights = x.expand(blocks, k).reshape(-1)
            return bag(table, indices, offsets, False, 0, False, weights, None,
                       False).view(1, padded)

        one = by_cat if blocks <= 64 else by_expand
        return one if padded == n else lambda x: one(x)[:, :n]

    def _product(self):
        """``x (B, in) fp32 -> (B, out)``, without the bias."""
        one, n, k = self._one_row(), self.out_features, self.in_features

        def product(x: torch.Tensor) -> torch.Tensor:
            rows = x.shape[0]
            if rows == 1:
                return one(x)
            if rows <= FEW_ROWS:
                return torch.cat([one(r) for r in x.split(1)])
            y = torch.bmm(x.expand(self.blocks, rows, k), self._blocks())  # (blocks, B, 64)
            return y.transpose(0, 1).reshape(rows, -1)[:, :n]
        return product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._product()(x.reshape(-1, shape[-1]).float().contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def decode_product(self):
        """As ``Int8Linear.decode_product``."""
        product, b = self._product(), self.bias
        if b is None:
            return product
        return lambda x: product(x).add_(b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 in row blocks of {ROWS_BLOCK} for one-row decoding")


class Int4Linear(nn.Linear):
    """``nn.Linear`` with group-wise asymmetric int4 weights (weight-only int4).

    Each run of ``group`` input channels of an output row has its own scale and zero point
    (min/max over the group, 16 levels): ``W ~= (q - 8) * scale + zero``. The values are kept
    in the layout of PyTorch's CPU int4 kernel (``torch._convert_weight_to_int4pack_for_cpu``,
    two values a byte) and each product runs ``torch._weight_int4pack_mm_for_cpu`` on bf16
    activations, output fp32. ``in_features`` must be a multiple of ``group``.
    """

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                 in_features: int, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features, self.group = packed.shape[0], in_features, group
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("scales_zeros", scales_zeros)  # (in / group, out, 2) bf16
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)

    @staticmethod
    def fits(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
        """Whether the kernel takes this shape: inputs a multiple of ``group``, outputs of 16."""
        return linear.in_features % group == 0 and linear.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = INT4_GROUP) -> Int4Linear:
        w = linear.weight.detach().float()
        n, k = w.shape
        if not cls.fits(linear, group):
            raise MoorelmError(f"int4 weights need input widths that are multiples of {group} "
                               f"and output widths of 16; a layer is {k} -> {n}")
        wg = w.view(n, k // group, group)
        low, high = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15
        q = ((wg - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        zero = low + 8 * scale
        sz = torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        return cls(packed, sz.to(torch.bfloat16), group, k, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The matrix these int4 values stand for (the product with the identity, so bf16)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.weight, self.group,
                                                 self.scales_zeros).float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group,
                                              self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def decode_product(self):
        """As ``Int8Linear.decode_product``."""
        w, g, sz, b, bf16 = self.weight, self.group, self.scales_zeros, self.bias, torch.bfloat16
        if b is None:
            return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(bf16), w, g, sz).float()
        return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(bf16), w, g, sz).float().add_(b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 groups of {self.group}")


def check_weights(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise MoorelmError(f"unknown weight format {weights!r}; choose one of: "
                           f"{', '.join(WEIGHT_FORMATS)}")
    return weights


def weight_format(model: nn.Module) -> str:
    """Which of WEIGHT_FORMATS a model's weights are in."""
    kinds = {type(m) for m in model.modules()}
    if Int4Linear in kinds:  # int4 keeps some layers int8
        return "int4"
    if Int8Linear in kinds or Int8RowsLinear in kinds:
        return "int8"
    return "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"


@torch.no_grad()
def quantize(model: nn.Module, weights: str, batched: bool = True) -> nn.Module:
    """Convert ``model`` (a fp32 GPT) in place to ``weights`` and return it.

    ``batched`` picks the layouts for decoding many sequences at once (serving): on a CPU,
    fp32 and bf16 projections packed for oneDNN, int8 as ``Int8Linear``. ``batched=False``
    is for one sequence at a time (``generate``, ``chat``): fp32 stays row-major, int8 takes
    ``Int8RowsLinear`` where the build has its kernel (and so does int4's int8 head); bf16
    is packed either way (its one-row product stays oneDNN's). See the module docstring."""
    check_weights(weights)
    current = weight_format(model)
    if weights != current and current != "fp32":
        raise MoorelmError(f"the model's weights are already {current}; load it again to use "
                           f"{weights}")
    model.eval()
    if weights == "bf16" and current != "bf16":
        _unpack(model)
        model.to(torch.bfloat16)
    elif weights in ("int8", "int4") and current == "fp32":
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise MoorelmError(f"{weights} weights run on the CPU here; the model is on "
                               f"{device} (use --weights bf16 on a GPU)")
        _unpack(model)
        int8 = Int8Linear if batched or not Int8RowsLinear.available() else Int8RowsLinear
        head = getattr(model, "lm_head", None)  # int8 under int4 too: see the module docstring
        for parent, name, child in _linears(model, nn.Linear):
            int4 = weights == "int4" and child is not head and Int4Linear.fits(child)
            setattr(parent, name, (Int4Linear if int4 else int8).from_linear(child))
    if batched or weights == "bf16":  # bf16's one-row product stays oneDNN's packed one
        _pack_projections(model)
    for p in model.parameters():
        p.requires_grad_(False)
    _return_freed_memory()
    return model


def _pack_projections(model: nn.Module) -> None:
    """Replace every packable projection (not a head tied to the embedding table) by a
    ``PackedLinear``, with row-major twins when they total at most ``TWIN_BYTES``. Each
    row-major weight is let go as soon as its packed copy is in place (nothing here holds it
    after), so the peak is one weight above the model and ``malloc_trim`` can return it."""
    embedding = getattr(getattr(model, "wte", None), "weight", None)
    todo = [(parent, name) for parent, name, child in _linears(model, nn.Linear)
            if child.weight is not embedding and PackedLinear.fits(child)]
    size = sum(getattr(p, n).weight.numel() * getattr(p, n).weight.element_size()
               for p, n in todo)
    for parent, name in todo:
        setattr(parent, name, PackedLinear.from_linear(getattr(parent, name),
                                                       twin=size <= TWIN_BYTES))


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op). The weights a conversion replaces are freed into glibc's heap, which keeps them:
    packing SmolLM2 left 400 MiB of freed fp32 weights resident until trimmed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc (macOS, musl without it, Windows)


def _linears(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) of every child module of exactly type ``kind``."""
    return [(parent, name, child) for parent in list(model.modules())
            for name, child in parent.named_children() if type(child) is kind]


def _unpack(model: nn.Module) -> None:
    for parent, name, child in _linears(model, PackedLinear):
        setattr(parent, name, child.unpacked())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight counted once), and of the
    row-major twins of packed projections."""
    seen, total = set(), 0
    twins = [m.dense for m in model.modules() if isinstance(m, PackedLinear) and m.dense is not None]
    for t in [*model.parameters(), *model.buffers(), *twins]:
        key = id(t) if t.is_mkldnn else t.data_ptr()  # an opaque oneDNN tensor has no pointer
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
