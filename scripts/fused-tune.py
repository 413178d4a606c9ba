"""Time the fused step on one GPU, to choose distrep.fused's SHAPES (by precision),
OFFSETL2_KERNEL and MAX_REGISTERS: one Table 1 model (ReLU2) and one Table 3 model (ReLU-L2,
the precision's OffsetL2 kernel), RUNS runs each (a chunk's group), full MNIST, bf16, TF32 and
fp32, ms per run-epoch (step plus a tenth of a test pass, as `distrep bench` measures it) at
several shapes (examples per block x warps x blocks per program [x pipeline stages, default
3]); the other OffsetL2 kernels at each precision's present shape; at most TUNE_MAXNREG
registers per thread (default 168,128: more programs per SM, some spilling:
scripts/kernel-stats.py --maxnreg); then, at the present shape, where a step spends its time (the first layer's
product, the kernel, the weight-gradient product, the whole step), with the products'
TFLOP/s and the kernel's effective bandwidth over P and dP. One model per table keeps the
kernel compilations (a second or two per model, mode and shape) to a few dozen.
Usage: PYTHONPATH=src python scripts/fused-tune.py [RUNS] [BNxWARPSxBLOCKS[xSTAGES] ...]
       (default 20 32x4x8 ...)
Environment: TUNE_PRECISIONS (default bf16,tf32,fp32), TUNE_MODELS (the cases, each timed as one
sweep: comma-separated models, cases separated by spaces; default "ReLU2 ReLU-L2"), TUNE_EXTRAS=0
(the shapes alone: no other OffsetL2 kernels, register caps or breakdown), TUNE_HEAD_PRODUCTS
(fp32's output-layer products to time at each shape, e.g. ieee,3xtf32: distrep.fused.HEAD_PRODUCTS;
logged as fp32:ieee, fp32:3xtf32). Each case's rate is
also given as a fraction of its precision's GEMM peak, measured once, counting the model's
arithmetic as `distrep bench` does. E.g. IEEE fp32 on Table 1's and Table 3's variants:
TUNE_PRECISIONS=fp32 TUNE_EXTRAS=0 TUNE_MODELS="Abs,ReLU,Abs2,Abs2-Neg,ReLU2,ReLU2-Neg
ReLU-L2,ReLU-L2-Neg,Abs-L2,Abs-L2-Neg" ... 20 32x4x8 32x1x8 ...
A smoke test without a GPU: TRITON_INTERPRET=1 TUNE_DEVICE=cpu TUNE_SUBSET=64 (bf16 unless
TUNE_PRECISIONS says otherwise; not tf32, a CUDA precision).
"""

import os
import sys
from dataclasses import replace

import torch

from distrep import fused
from distrep.bench import engine, flops_per_run_epoch, peak, timed
from distrep.data import load_dataset
from distrep.models import parse
from distrep.sweep import GiB


def breakdown(data, runs: int, device: torch.device, precisions: tuple[str, ...],
              models: tuple[str, ...]) -> None:
    """Milliseconds per step of each part of one variant's fused step (10 repeats)."""
    from distrep.sweep import Sweep, SweepConfig, matmul_precision
    x_t, y = data.x_train.t().contiguous().to(device), data.y_train.to(device)
    for precision in precisions:
        for model in models:
            config = SweepConfig(models=[model], runs=runs, epochs=1, precision=precision,
                                 device=str(device), engine="fused", max_memory=40 * GiB)
            sweep = Sweep(config, data, progress=False)
            trainer, (group,) = sweep.chunk_trainer(sweep.chunks()[0])
            with matmul_precision(precision, device):
                x = x_t.bfloat16() if precision == "bf16" else x_t
                x_bf16 = x if precision == "bf16" else None
                frozen = torch.zeros(runs, dtype=torch.bool, device=device)
                trainer.step(x_t, y, 1e-3, [frozen], x_bf16)           # warm-up, compiles
                P = group._first_layer(x, "train")
                R, H, _ = group.params["0.weight"].shape
                n = P.shape[2]
                parts = {"first-layer product": lambda: group._first_layer(x, "train"),
                         "kernel": lambda: group._launch(P, group._head_weights(), y, None),
                         "weight-gradient product": lambda: torch.mm(
                             P.view(R * H, n), group._first_input(x, "train").columns.t()),
                         "whole step": lambda: trainer.step(x_t, y, 0.0, [frozen], x_bf16)}
                times = {name: timed(fn, device, 10) * 1e3 for name, fn in parts.items()}
            columns = group._first_input(x, "train").columns.shape[0]      # the varying features, padded
            gemm = 2 * R * H * columns * n / 1e12
            moved = 2 * P.numel() * P.element_size() / 1e9
            print(f"{model} x {runs} runs, {precision}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
                  + f"; products {gemm / times['first-layer product'] * 1e3:.0f} and "
                  f"{gemm / times['weight-gradient product'] * 1e3:.0f} TFLOP/s, kernel "
                  f"{moved / times['kernel'] * 1e3:.0f} GB/s over P and dP", flush=True)


def label(shape: tuple[int, int, int, int]) -> str:
    return "BN {:>3} warps {:>2} blocks {:>2} stages {}".format(*shape)


def rate_line(name: str, seconds: float, setup: float, share: str = "") -> str:
    """A timed case as logged (scripts/shape-check.py reads it back)."""
    return (f"{name}: {seconds * 1e3:.4f} ms per run-epoch = {1 / seconds:,.0f} run-epochs/s "
            f"(warm-up {setup:.1f} s){share}")


def main(argv: list[str]) -> None:
    runs = int(argv[0]) if argv else 20
    shapes = [fused.parse_shape(s) for s in argv[1:]] or [
        (32, 4, 8, 3), (32, 4, 4, 3), (32, 4, 16, 3), (64, 4, 8, 3), (16, 4, 8, 3)]
    caps = [int(v) for v in os.environ.get("TUNE_MAXNREG", "168,128").split(",") if v]
    device = torch.device(os.environ.get("TUNE_DEVICE", "cuda"))
    subset = os.environ.get("TUNE_SUBSET")
    data = load_dataset("mnist", "raw")
    if subset:                      # the smoke test: few training and test images
        n = int(subset)
        data = replace(data.subset(n), x_test=data.x_test[:n], y_test=data.y_test[:n])
    precisions = tuple(os.environ.get("TUNE_PRECISIONS", "bf16,tf32,fp32" if device.type == "cuda" else "bf16")
                       .split(","))
    cases = [tuple(case.split(",")) for case in os.environ.get("TUNE_MODELS", "ReLU2 ReLU-L2").split()]
    extras = os.environ.get("TUNE_EXTRAS", "1") != "0"
    defaults = dict(fused.SHAPES)
    kernels = dict(fused.OFFSETL2_KERNEL)
    peaks = {p: peak(device, p) for p in precisions}

    def time_case(name, models, precision):
        try:
            seconds, setup, _ = engine(list(models), runs, data, device, precision, 5, 40 * GiB,
                                       engine_name="fused")
            flops = sum(flops_per_run_epoch(m, len(data.y_train), len(data.y_test), 10)
                        for m in models) / len(models)
            share = (f", {flops / seconds / 1e9 / peaks[precision]:.1%} of the {precision} GEMM "
                     f"peak ({peaks[precision]:,.0f} GFLOP/s)")
            print(rate_line(name, seconds, setup, share), flush=True)
        except Exception as e:          # noqa: BLE001 - a shape that fails is a result here
            print(f"{name}: failed: {e!r}"[:300], flush=True)

    def case_name(models, precision):
        name = ",".join(models) if len(models) < 3 else f"{models[0]} ... {models[-1]} ({len(models)} variants)"
        if any(fused.fused_layout(parse(m))["offsetl2"] for m in models):
            name += f" {kernels[precision]}"
        return name

    head_products = os.environ.get("TUNE_HEAD_PRODUCTS")
    products = dict(fused.HEAD_PRODUCTS)
    for shape in shapes:                          # OffsetL2 with each precision's kernel
        for precision in precisions:
            fused.SHAPES[precision] = shape
            kinds = head_products.split(",") if head_products and precision == "fp32" else [None]
            for kind, models in ((kind, models) for kind in kinds for models in cases):
                fused.HEAD_PRODUCTS[precision] = kind or products[precision]
                mode = precision + (f":{kind}" if kind else "")
                time_case(f"{label(shape)} {mode} {case_name(models, precision)}", models, precision)
            fused.SHAPES[precision], fused.HEAD_PRODUCTS[precision] = defaults[precision], products[precision]
    if not extras:
        return
    for precision in precisions:                  # the other OffsetL2 kernels, default shape
        for form in fused.OFFSETL2_KERNEL_FORMS:
            if form != kernels[precision]:
                fused.OFFSETL2_KERNEL[precision] = form
                time_case(f"{label(defaults[precision])} {precision} ReLU-L2 {form}", ["ReLU-L2"], precision)
        fused.OFFSETL2_KERNEL[precision] = kernels[precision]
    for precision in precisions:                  # fewer registers, more programs per SM
        uncapped = fused.MAX_REGISTERS[precision]
        for cap in caps:
            fused.MAX_REGISTERS[precision] = cap
            for model in ("ReLU2", "ReLU-L2"):
                time_case(f"{label(defaults[precision])} {precision} {model}"
                          + (f" {kernels[precision]}" if model == "ReLU-L2" else "")
                          + f", at most {cap} registers", [model], precision)
        fused.MAX_REGISTERS[precision] = uncapped
    print("breakdown at each precision's shape and OffsetL2 kernel:", flush=True)
    breakdown(data, runs, device, precisions, ("ReLU2", "ReLU-L2"))


if __name__ == "__main__":
    main(sys.argv[1:])
