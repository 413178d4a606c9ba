"""Try the fused kernel at another shape for one precision on a GPU, in one process: its CUDA
tests (the fused step against the CPU, its CUDA graphs bit for bit, the memory plan against the
peak), then `distrep bench` of that precision on Table 1's and Table 3's variants (run-epochs/s
and the fraction of the GEMM peak, against the present shape measured in the same call). With
--operand rows, the weight gradient also reads the input held example-major
(distrep.fused.GRADIENT_OPERAND): the CUDA tests run with both changes, and a third bench times
the shape with it.

    python scripts/shape-check.py PRECISION BNxWARPSxBLOCKS[xSTAGES] [--pick TUNE_LOG] [--epochs 5]
        [--operand rows] [--device cuda] [--runs 20] [--train-subset N]   (a smoke test: --device
        cpu under TRITON_INTERPRET=1 with --train-subset 64 --epochs 1 --runs 2; no CUDA test runs)

With --pick, that shape is the fallback and the shape taken is the one that
scripts/fused-tune.py logged as fastest for PRECISION on the case whose name starts with
"Abs ..." (Table 1's six variants), present shape included; if that is the present shape, only
the bench runs.
"""

from __future__ import annotations

import argparse
import re
import sys

import pytest

from distrep import fused
from distrep.bench import run_bench
from distrep.sweep import GiB

LINE = re.compile(r"BN\s+(\d+) warps\s+(\d+) blocks\s+(\d+) stages (\d+) (\S+) Abs \.\.\..*?"
                  r"= ([\d,]+) run-epochs/s")


def fastest(log: str, precision: str) -> tuple[int, int, int, int] | None:
    """The shape of the highest Table 1 rate that fused-tune.py logged for ``precision``."""
    rates = [(int(m.group(6).replace(",", "")), tuple(int(m.group(i)) for i in (1, 2, 3, 4)))
             for m in LINE.finditer(log) if m.group(5) == precision]
    return max(rates)[1] if rates else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("precision", choices=list(fused.SHAPES))
    parser.add_argument("shape", help="BNxWARPSxBLOCKS[xSTAGES], e.g. 32x1x8x1")
    parser.add_argument("--pick", metavar="TUNE_LOG", help="take the fastest shape this log shows")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--operand", choices=["columns", "rows"], default=None,
                        help="also bench the shape with this GRADIENT_OPERAND")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--train-subset", type=int, default=None)
    args = parser.parse_args()
    present = fused.SHAPES[args.precision]
    shape = fused.parse_shape(args.shape)
    if args.pick:
        shape = fastest(open(args.pick).read(), args.precision) or shape
    operand = fused.GRADIENT_OPERAND[args.precision]
    print(f"{args.precision}: present shape {present}, trying {shape}"
          + (f"; weight gradient's operand {operand}, trying {args.operand}" if args.operand else ""), flush=True)
    status = 0
    if shape != present or args.operand not in (None, operand):
        fused.SHAPES[args.precision] = shape
        fused.GRADIENT_OPERAND[args.precision] = args.operand or operand
        status = pytest.main(["-q", "-s", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k",
                              f"fused_step_on_cuda or (graphs and fused and {args.precision}) "
                              f"or (memory_plan and {args.precision})"])
        status = 0 if status == pytest.ExitCode.NO_TESTS_COLLECTED else status
        print(f"CUDA tests at {shape}: {'passed' if status == 0 else f'FAILED ({status})'}", flush=True)
    cases = [("present", present, operand)] + ([("tried", shape, operand)] if shape != present else []) \
        + ([("tried", shape, args.operand)] if args.operand not in (None, operand) else [])
    for label, value, reads in cases:
        fused.SHAPES[args.precision], fused.GRADIENT_OPERAND[args.precision] = value, reads
        print(f"=== bench, {args.precision} at {value}, the weight gradient reading {reads} ({label})",
              flush=True)
        run_bench(args.device, args.runs, args.epochs, 40 * GiB, args.train_subset, engines=("fused",),
                  precisions=(args.precision,))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
