"""Time the fused step at several block shapes on one GPU (for choosing distrep.fused's
BLOCK_N and NUM_WARPS): Table 1's and Table 3's variants x RUNS runs on full MNIST, in bf16
and TF32, ms per run-epoch (step plus a tenth of a test pass), as `distrep bench` measures it.
Usage: PYTHONPATH=src python scripts/fused-tune.py [RUNS] [BNxWARPS ...]   (default 20 32x8 ...)
"""

import sys

import torch

from distrep import fused
from distrep.bench import engine
from distrep.data import load_dataset
from distrep.models import TABLE1, TABLE3
from distrep.sweep import GiB


def main(argv: list[str]) -> None:
    runs = int(argv[0]) if argv else 20
    shapes = [tuple(int(v) for v in s.split("x")) for s in argv[1:]] or [
        (32, 8), (64, 8), (64, 16), (16, 4), (32, 4), (128, 16)]
    device = torch.device("cuda")
    data = load_dataset("mnist", "raw")
    for block, warps in shapes:
        fused.BLOCK_N, fused.NUM_WARPS = block, warps
        for precision in ("bf16", "tf32"):
            for label, models in (("Table 1", TABLE1), ("Table 3", TABLE3)):
                try:
                    seconds, setup = engine(list(models), runs, data, device, precision, 5, 40 * GiB,
                                            engine_name="fused")
                    print(f"BN {block:>3} warps {warps:>2} {precision} {label}: {seconds * 1e3:.4f} ms per "
                          f"run-epoch = {1 / seconds:,.0f} run-epochs/s (warm-up {setup:.1f} s)", flush=True)
                except Exception as e:          # noqa: BLE001 - a shape that fails is a result here
                    print(f"BN {block:>3} warps {warps:>2} {precision} {label}: failed: {e!r}"[:300], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
