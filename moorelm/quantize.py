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
  embedding table is still read row by row in fp32.
- ``int4``: every projection as group-wise int4 (``Int4Linear``: 32 input channels per bf16
  scale and zero point, PyTorch's CPU int4 kernel ``torch._weight_int4pack_mm_for_cpu``);
  the LM head stays int8 (an int4 head flipped SmolLM2's greedy choices within ~6 tokens,
  an int8 one within ~25, like int8 throughout), and so does any layer whose shape the
  kernel refuses.

``quantize(model, "int8")`` converts a model in place and returns it; ``moorelm.load(run,
weights=...)`` and the ``--weights`` flag of ``generate``, ``chat`` and ``serve`` call it.
Quantised models are for inference: training, export and checkpoints take fp32 models.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moorelm.errors import MoorelmError

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # input channels per int4 scale and zero point


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
    if Int8Linear in kinds:
        return "int8"
    return "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"


@torch.no_grad()
def quantize(model: nn.Module, weights: str) -> nn.Module:
    """Convert ``model`` (a fp32 GPT) in place to ``weights`` and return it."""
    check_weights(weights)
    current = weight_format(model)
    if weights == current:
        return model
    if current != "fp32":
        raise MoorelmError(f"the model's weights are already {current}; load it again to use "
                           f"{weights}")
    model.eval()
    if weights == "bf16":
        return model.to(torch.bfloat16)
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise MoorelmError(f"{weights} weights run on the CPU here; the model is on {device} "
                           "(use --weights bf16 on a GPU)")
    head = getattr(model, "lm_head", None)  # int8 under int4 too: see the module docstring
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                int4 = weights == "int4" and child is not head and Int4Linear.fits(child)
                setattr(parent, name, (Int4Linear if int4 else Int8Linear).from_linear(child))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
