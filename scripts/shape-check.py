"""Try the fused kernel at another shape, or with its output layer's products in three TF32
passes, for one precision on a GPU, in one process: `distrep bench` of that precision on Table
1's and Table 3's variants (run-epochs/s and the fraction of the GEMM peak, against the present
kernel measured in the same call), then its CUDA tests (the fused step against the CPU, its CUDA
graphs bit for bit, the memory plan against the peak, and with --head-products the three-pass
products against IEEE fp32's). With --operand rows, the weight gradient also reads the input
held example-major (distrep.fused.GRADIENT_OPERAND): a third bench times the tried kernel with
it, and the CUDA tests run with every change. With --streams 1,pipeline, the last kernel is
benched again with each of these CUDA stream schedules (DISTREP_CUDA_STREAMS: a stream per
variant, or the products on one stream and the kernels on another), and the tests that hold
them to one stream's bits run too: with its output layer on tensor cores, fp32's kernel may now
run beside the SIMT products instead of contending for their FMA pipes. The benches come first:
a pass cut short by its time limit still says how fast; a kernel is adopted only when its tests
passed too.

    python scripts/shape-check.py PRECISION BNxWARPSxBLOCKS[xSTAGES] [--pick TUNE_LOG] [--epochs 5]
        [--head-products 3xtf32] [--operand rows] [--streams 1,pipeline] [--device cuda] [--runs 20] [--train-subset N]
        (a smoke test: --device cpu under TRITON_INTERPRET=1 with --train-subset 64 --epochs 1
        --runs 2; no CUDA test runs)

With --pick, that shape (and --head-products) is the fallback and the one taken is what
scripts/fused-tune.py logged as fastest for PRECISION on the case whose name starts with
"Abs ..." (Table 1's six variants), present kernel included; if that is the present one (and
nothing else is asked), there is nothing to try: it says so and stops (`distrep bench` times it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from unittest import mock

import pytest

from distrep import fused
from distrep.bench import run_bench
from distrep.graphs import CUDA_STREAMS_VARIABLE, STREAM_SCHEDULES
from distrep.sweep import GiB

LINE = re.compile(r"BN\s+(\d+) warps\s+(\d+) blocks\s+(\d+) stages (\d+) (\w+)(?::(\w+))? Abs \.\.\..*?"
                  r"= ([\d,]+) run-epochs/s")


def fastest(log: str, precision: str) -> tuple[tuple[int, int, int, int], str | None] | None:
    """The shape and output-layer products (None where the log does not say: the present ones)
    of the highest Table 1 rate that fused-tune.py logged for ``precision``."""
    rates = [(int(m.group(7).replace(",", "")), tuple(int(m.group(i)) for i in (1, 2, 3, 4)), m.group(6))
             for m in LINE.finditer(log) if m.group(5) == precision]
    return max(rates, key=lambda rate: rate[0])[1:] if rates else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("precision", choices=list(fused.SHAPES))
    parser.add_argument("shape", help="BNxWARPSxBLOCKS[xSTAGES], e.g. 32x1x8x1")
    parser.add_argument("--pick", metavar="TUNE_LOG", help="take the fastest shape this log shows")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--operand", choices=["columns", "rows"], default=None,
                        help="also bench the kernel tried with this GRADIENT_OPERAND")
    parser.add_argument("--head-products", default=None,
                        choices=sorted({p for ps in fused.HEAD_PRODUCT_CHOICES.values() for p in ps}),
                        help="the output layer's products to try (distrep.fused.HEAD_PRODUCTS)")
    parser.add_argument("--streams", type=schedules, default=[],
                        help="also bench the last kernel with these DISTREP_CUDA_STREAMS, e.g. 1,pipeline")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--train-subset", type=int, default=None)
    args = parser.parse_args()
    settings = (fused.SHAPES, fused.GRADIENT_OPERAND, fused.HEAD_PRODUCTS)
    present = tuple(setting[args.precision] for setting in settings)      # shape, operand, products
    shape, products = fused.parse_shape(args.shape), args.head_products or present[2]
    if args.pick:
        shape, products = fastest(open(args.pick).read(), args.precision) or (shape, products)
        products = products or args.head_products or present[2]
    if products not in fused.HEAD_PRODUCT_CHOICES[args.precision]:
        parser.error(f"--head-products: {args.precision} runs its output layer's products as "
                     + " or ".join(fused.HEAD_PRODUCT_CHOICES[args.precision]))
    tried = (shape, present[1], products)
    print(f"{args.precision}: present {describe(present)}, trying {describe(tried)}"
          + (f"; then reading {args.operand}" if args.operand not in (None, present[1]) else ""), flush=True)

    def use(setting):
        for table, value in zip(settings, setting):
            table[args.precision] = value

    changed = (shape, args.operand or present[1], products)
    if changed == present and not args.streams:      # `distrep bench` times the present kernel alone
        print("nothing to try: the present kernel is the one asked for", flush=True)
        return 0
    cases = [("present", present)] + ([("tried", tried)] if tried != present else []) \
        + ([("tried", changed)] if changed != tried else [])
    for label, setting in cases:        # the speed first: it is what no CPU can say
        use(setting)
        print(f"=== bench, {args.precision} with {describe(setting)} ({label})", flush=True)
        bench(args)
    use(changed)
    for schedule in args.streams:
        print(f"=== bench, {args.precision} with {describe(changed)}, {CUDA_STREAMS_VARIABLE}={schedule}",
              flush=True)
        bench(args, streams=schedule)
    three_pass = " or 3xtf32_on_cuda" if products != present[2] else ""
    streams = f" or (concurrent_streams and fused and {args.precision})" if args.streams else ""
    status = pytest.main(["-q", "-s", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k",
                          f"fused_step_on_cuda or (graphs and fused and {args.precision}) "
                          f"or (memory_plan and {args.precision}){three_pass}{streams}"])
    status = 0 if status == pytest.ExitCode.NO_TESTS_COLLECTED else status
    print(f"CUDA tests with {describe(changed)}: {'passed' if status == 0 else f'FAILED ({status})'}",
          flush=True)
    return int(status)


def bench(args, streams: str | None = None) -> None:
    """`distrep bench` of the fused step in ``args.precision`` on Table 1's and Table 3's
    variants, with the CUDA stream schedule ``streams`` (None: the one it takes by default)."""
    with mock.patch.dict(os.environ, {CUDA_STREAMS_VARIABLE: streams} if streams else {}):   # restored after
        run_bench(args.device, args.runs, args.epochs, 40 * GiB, args.train_subset, engines=("fused",),
                  precisions=(args.precision,))


def schedules(text: str) -> list[str]:
    """``--streams``: comma-separated DISTREP_CUDA_STREAMS settings."""
    values = [value.strip() for value in text.split(",") if value.strip()]
    wrong = [value for value in values if value not in STREAM_SCHEDULES]
    if wrong or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(STREAM_SCHEDULES)}, comma-separated")
    return values


def describe(setting) -> str:
    shape, operand, products = setting
    return f"the kernel at {'x'.join(map(str, shape))}, {products} output-layer products, the weight gradient reading {operand}"


if __name__ == "__main__":
    sys.exit(main())
