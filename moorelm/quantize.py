"""Weight formats for inference: fp32 (as trained), bf16, or int8 weights with fp32 activations.

A batch-1 decoding step of a 135M-parameter model reads every weight once, so on a CPU memory
bandwidth, not arithmetic, sets its pace; storing weights in fewer bytes is the lever.

- ``fp32``: the model as trained.
- ``bf16``: the whole model in bfloat16 (weights, activations and KV cache), computed with
  the CPU's bf16 matrix kernels where it has them (AVX-512 BF16, AMX, ARM's BF16).
- ``int8``: every projection and the LM head stored as int8 with one fp32 scale per output
  channel (symmetric, absmax / 127); each product runs PyTorch's weight-only int8 kernel
  (``torch._weight_int8pack_mm``) on bf16 copies of the activations and returns fp32.
  Embeddings, norms and the KV cache stay fp32. A tied LM head gets its own int8 copy: the
  embedding table is still read row by row in fp32.

``quantize(model, "int8")`` converts a model in place and returns it; ``moorelm.load(run,
weights=...)`` and the ``--weights`` flag of ``generate``, ``chat`` and ``serve`` call it.
Quantised models are for inference: training, export and checkpoints take fp32 models.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moorelm.errors import MoorelmError

WEIGHT_FORMATS = ("fp32", "bf16", "int8")


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
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
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

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_weights(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise MoorelmError(f"unknown weight format {weights!r}; choose one of: "
                           f"{', '.join(WEIGHT_FORMATS)}")
    return weights


def weight_format(model: nn.Module) -> str:
    """Which of WEIGHT_FORMATS a model's weights are in."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
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
        raise MoorelmError(f"int8 weights run on the CPU here; the model is on {device} "
                           "(use --weights bf16 on a GPU)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_linear(child))
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
