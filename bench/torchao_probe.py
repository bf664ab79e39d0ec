"""Probe: does torchao earn its place for weight-only int8/int4 on the CPU? (issue 17)

Issue 17 asks for PyTorch's own quantised kernels, "torchao if it earns its place". This
script times, for one decoding row, every projection of a model (SmolLM2 by default: 30
layers x 7 projections and the 49,152-wide head, each weight distinct so it comes from memory)
in the formats moorelm ships and in torchao's CPU configurations, in one process:

    fp32                  moorelm's one-row fp32 product (``decode_plan.few_rows_product``,
                          what ``generate`` runs), the baseline of the ratios
    fp32 F.linear         PyTorch's plain ``F.linear`` on the same row-major weight
    moorelm int8          ``Int8Linear`` (serving's int8: ``torch._weight_int8pack_mm``)
    moorelm int8 rows     ``Int8RowsLinear`` (``generate``'s int8: fbgemm's embedding bag)
    moorelm int4          ``Int4Linear`` (``torch._weight_int4pack_mm_for_cpu``, groups of 32)
    torchao int8          ``Int8WeightOnlyConfig()`` (per-row int8), eager
    torchao int4          ``PrototypeInt4WeightOnlyConfig(group_size=32)`` (its CPU int4), eager
    torchao w8a8          ``Int8DynamicActivationInt8WeightConfig()`` (activations quantised
                          per token, int8 x int8), eager
    torchao int8 compiled ``--compile``: torchao's int8 under ``torch.compile``, the way its
                          docs use it (all products in one compiled function)

torchao is not a moorelm dependency: the script installs the wheel from PyPI with ``pip
install --no-deps --target`` into ``--torchao`` (a cache folder) when it is not there, and
imports it from that folder. It also says whether the wheel carries its CPU kernels
(``torchao::da8w4_linear_cpu``, needed by its int8-activation/int4-weight path).

    python bench/torchao_probe.py [--run smollm2] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import moorelm
from moorelm.decode_plan import few_rows_product
from moorelm.quantize import Int4Linear, Int8Linear, Int8RowsLinear

VERSION = "0.18.0"
CACHE = Path.home() / ".cache" / "moorelm-bench" / f"torchao-{VERSION}"


def ensure_torchao(folder: Path) -> None:
    """torchao importable from ``folder``, installed there (no dependencies) when missing."""
    if not (folder / "torchao" / "__init__.py").is_file():
        print(f"installing torchao {VERSION} into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(folder), f"torchao=={VERSION}"], check=True)
    sys.path.insert(0, str(folder))


def step_ms(products, rows: list[torch.Tensor], repeats: int) -> float:
    """Best time over ``repeats`` of every product applied once to its input row."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for product, x in zip(products, rows):
                product(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def fresh_linears(model: nn.Module) -> list[nn.Linear]:
    """Plain fp32 copies of the model's projections and head, in order."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            copy = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                copy.weight.copy_(m.weight.float())
                if m.bias is not None:
                    copy.bias.copy_(m.bias.float())
            copy.requires_grad_(False)
            out.append(copy)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="smollm2", help="a run folder or bundled name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torchao", type=Path, default=CACHE, help="where torchao is installed")
    ap.add_argument("--compile", action="store_true", help="also time torchao int8 compiled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_torchao(args.torchao)
    import torchao
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    lm = moorelm.load(args.run, weights="fp32", batched=False)
    base = fresh_linears(lm.model)
    del lm
    torch.manual_seed(0)
    rows = [torch.randn(1, layer.in_features) for layer in base]
    n_bytes = sum(layer.weight.numel() for layer in base)
    print(f"{len(base)} products, {n_bytes / 1e6:.1f}M weights; torch {torch.__version__}, "
          f"torchao {torchao.__version__}, {args.threads} threads; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    has_da8w4 = "CPU" in torch._C._dispatch_dump("torchao::da8w4_linear_cpu")
    print(f"torchao's CPU kernel da8w4_linear_cpu in this wheel: {has_da8w4}")

    results: dict[str, float] = {}

    def measure(name, products, repeats=args.repeats):
        results[name] = step_ms(products, rows, repeats)
        print(f"  {name:24s} {results[name]:8.1f} ms a step", flush=True)

    measure("fp32", [few_rows_product(layer.weight, layer.bias) or layer.forward
                     for layer in base])
    measure("fp32 F.linear", [layer.forward for layer in base])
    measure("moorelm int8", [Int8Linear.from_linear(layer).decode_product() for layer in base])
    if Int8RowsLinear.available():
        measure("moorelm int8 rows", [Int8RowsLinear.from_linear(layer) for layer in base])
    measure("moorelm int4", [(Int4Linear if Int4Linear.fits(layer) else Int8Linear)
                             .from_linear(layer) for layer in base])
    for name, config in (("torchao int8", Int8WeightOnlyConfig()),
                         ("torchao int4", PrototypeInt4WeightOnlyConfig(group_size=32)),
                         ("torchao w8a8", Int8DynamicActivationInt8WeightConfig())):
        layers = nn.Sequential(*fresh_linears(nn.Sequential(*base)))
        quantize_(layers, config)
        measure(name, list(layers), repeats=2)
        del layers
    if args.compile:
        layers = nn.Sequential(*fresh_linears(nn.Sequential(*base)))
        quantize_(layers, Int8WeightOnlyConfig())

        @torch.compile(dynamic=False)
        def all_products(xs):
            return [layer(x) for layer, x in zip(layers, xs)]

        start = time.perf_counter()
        with torch.inference_mode():
            all_products(rows)
        print(f"  (compiled in {time.perf_counter() - start:.0f} s)", flush=True)
        results["torchao int8 compiled"] = step_ms([lambda _: all_products(rows)], [None],
                                                   args.repeats)
        print(f"  {'torchao int8 compiled':24s} {results['torchao int8 compiled']:8.1f} ms "
              f"a step (all products in one call)")
    fp32 = results["fp32"]
    print("against fp32: " + ", ".join(f"{k} {fp32 / v:.2f}x" for k, v in results.items()
                                       if k != "fp32"))


if __name__ == "__main__":
    main()
