"""The fused kernel's static cost on an H100/H200, measured without a GPU.

Compiles the kernel for sm_90 on the CPU (distrep.fused.compile_for_gpu: Triton's compiler and
ptxas, specialized as the JIT specializes a launch on MNIST), disassembles it (nvdisasm and
cuobjdump ship with Triton) and counts warp instructions per block of examples: the block
loop's body once, each class loop inside it C times, the code around the loops spread over the
blocks of a program (distrep.fused.SHAPES: examples per block, warps, blocks per program,
pipeline stages). Printed per case: registers, spilled bytes, shared memory, warp instructions
per block per warp and times the warps of a program (the work an SM does per block), the
commonest instructions, and the kernel time this predicts.

Calibration (H100, docs/engine-h100-fused pass 1: the kernel's time in a step of 20 runs on full
MNIST, bf16, measured in its breakdown at 32x8 and inferred from the shape sweep's step
times elsewhere, against this count times the warps for the kernel as timed): ReLU2 32x4
0.51 ms / 3,822 and 32x8 0.77 / 5,515, 16x4 0.73 / 3,012 per 16 examples; ReLU-L2 direct 32x4
3.24 / 31,328 and 32x8 4.45 / 42,624; expanded (every product in three TF32 passes) 32x8
2.85 / 19,968; hybrid 32x8 4.9 / 31,708; and 5 more shapes: 0.10-0.17 ms per 1,000 warp
instructions per 32 examples, whatever the form (the most spilling shapes the slowest per
instruction). The kernel is neither issue- nor memory-bound at these sizes (well under one
instruction per cycle per SM), but its time follows its instruction count: a change that cuts
the count cuts the time about as much.

Usage: python scripts/kernel-stats.py [MODEL ...] [--precisions bf16,tf32,fp32,3xtf32]
       [--forms direct,expanded,hybrid] [--shapes 32x4,32x8] [--maxnreg 168,128]
       [--head-products ieee,3xtf32]
       (default ReLU2 ReLU-L2, bf16, 32x4, distrep.fused.MAX_REGISTERS and HEAD_PRODUCTS)
Needs Triton's JIT (not its interpreter): run it without TRITON_INTERPRET.
"""

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from distrep import fused  # noqa: E402 (after the environment is set)
from distrep.models import parse  # noqa: E402

DEFAULT_SHAPES = dict(fused.SHAPES)     # stats() sets a case's shape in fused.SHAPES
MS_PER_1000 = (0.10, 0.17)        # calibration above: H100, 20 runs, 60,000 examples
CALIBRATION_BLOCKS = 20 * 60000 / 32

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def disassemble(kernel) -> str:
    tools = os.path.join(os.path.dirname(fused.triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return sass, usage


def instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, instruction) pairs and the address of each label."""
    code, labels, pending = [], {}, None
    for line in sass.splitlines():
        label = LABEL.match(line)
        if label:
            pending = label.group(1)
            continue
        m = INSTRUCTION.match(line)
        if m:
            address = int(m.group(1), 16)
            code.append((address, m.group(2)))
            if pending:
                labels[pending], pending = address, None
    return code, labels


def opcode(instruction: str) -> str:
    """``@!P0 FADD.FTZ R1, ...`` -> ``FADD``."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def per_block(sass: str, blocks: int, classes: int) -> collections.Counter:
    """Warp instructions per block of examples, by opcode: loops are the ranges a backward branch
    closes; depth 1 (the block loop) counts once, depth 2 (a class loop) ``classes`` times,
    code outside every loop 1 / ``blocks`` times."""
    code, labels = instructions(sass)
    loops = [(labels[m.group(1)], address) for address, text in code
             for m in [BRANCH.search(text)] if m and labels.get(m.group(1), address + 1) < address]
    counts = collections.Counter()
    for address, text in code:
        depth = sum(start <= address <= end for start, end in loops)
        counts[opcode(text)] += 1 / blocks if depth == 0 else classes ** (depth - 1)
    return counts


def stats(model: str, precision: str, form: str, shape: tuple[int, ...]) -> str:
    """One case's counts; ``shape`` (examples per block, warps[, stages]) with the precision's
    blocks per program (and stages, if not given)."""
    block_n, warps, *stages = shape
    _, _, blocks, default_stages = DEFAULT_SHAPES[precision]
    fused.SHAPES[precision] = (block_n, warps, blocks, *(stages or [default_stages]))
    specs = parse(model)
    fused.OFFSETL2_KERNEL[precision] = form
    layout = fused.fused_layout(specs)
    classes = specs[layout["head_index"]].out_features
    kernel = fused.compile_for_gpu(specs, precision)
    sass, usage = disassemble(kernel)
    registers = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    counts = per_block(sass, fused.SHAPES[precision][2], classes)
    warp = sum(counts.values())
    sm = warp * warps
    blocks = CALIBRATION_BLOCKS * 32 / block_n
    low, high = (sm / 1000 * ms * blocks / CALIBRATION_BLOCKS for ms in MS_PER_1000)
    top = ", ".join(f"{op} {n:.0f}" for op, n in counts.most_common(8))
    name = model + (f" {form}" if layout["offsetl2"] else "")
    return (f"{name:<21} {precision} {'x'.join(map(str, shape))}: {registers} registers, {stack} B spilled, "
            f"{kernel.metadata.shared / 1024:.0f} KB shared; {warp:,.0f} warp instructions per block "
            f"per warp, x{warps} = {sm:,.0f} (predicted {low:.2f}-{high:.2f} ms per step of 20 "
            f"runs on full MNIST on an H100)\n    {top}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["ReLU2", "ReLU-L2"])
    parser.add_argument("--precisions", default="bf16")
    parser.add_argument("--forms", default=None, help="OffsetL2 kernel forms (default: each precision's)")
    parser.add_argument("--shapes", default=None, metavar="BNxWARPS[xSTAGES][,...]",
                        help="default: each precision's (distrep.fused.SHAPES)")
    parser.add_argument("--maxnreg", default=None, metavar="N[,N]",
                        help="registers per thread to cap at (default: the precision's MAX_REGISTERS)")
    parser.add_argument("--head-products", default=None, metavar="KIND[,KIND]",
                        help="fp32's output-layer products, ieee and/or 3xtf32 "
                             "(default: distrep.fused.HEAD_PRODUCTS)")
    args = parser.parse_args(argv)
    for precision in args.precisions.split(","):
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] \
            if args.shapes else [DEFAULT_SHAPES[precision][:2] + DEFAULT_SHAPES[precision][3:]]
        forms = args.forms.split(",") if args.forms else [fused.offsetl2_kernel(precision)]
        caps = [int(v) for v in args.maxnreg.split(",")] if args.maxnreg else [fused.MAX_REGISTERS[precision]]
        products = args.head_products.split(",") if args.head_products else [fused.HEAD_PRODUCTS[precision]]
        for model in args.models:
            offsetl2 = fused.fused_layout(parse(model))["offsetl2"]
            for form, shape, cap, kind in itertools.product(forms if offsetl2 else forms[:1], shapes, caps,
                                                            products[:1] if offsetl2 else products):
                fused.MAX_REGISTERS[precision], fused.HEAD_PRODUCTS[precision] = cap, kind
                first, top = stats(model, precision, form, shape).split("\n", 1)
                extra = "".join([f", at most {cap} registers" if cap else "",
                                 f", {kind} output-layer products" if args.head_products else ""])
                print(first + extra + "\n" + top, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
