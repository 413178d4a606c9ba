"""Time fp32's two first-layer products in the layouts and libraries cuBLAS offers, for IEEE
fp32's last two points of the GEMM peak (issue 11: >= 90 %; 88 % measured on an H200).

In fp32 the fused step is the two SIMT products, P = [W1 b1] [X; 1] and dW = dP [X; 1]^T, at
49-50 TFLOP/s against a square product's ~51, and the kernel between them (docs/engine.md,
"Where a GPU step's time goes"). 90 % needs a step 0.18 ms shorter: the products at the square
product's rate would give 0.25 ms. This times, side by side in one process, each product as the
step runs it (per variant: [R*H, kp] @ [kp, n] and [R*H, n] @ [n, kp], X held as [kp, n]) and
in other forms: X also held transposed ([n, kp], so the weight gradient reads it row-major), all
variants' runs in one product (the six Table 1 variants share X: one [V*R*H, kp] product), and
cuBLASLt instead of cuBLAS; with the square product's rate for reference. Prints TFLOP/s of
each, the best form of each product, and the step those forms would give.

    python scripts/fp32-products.py [--runs 20] [--variants 6] [--n 60000] [--kp 720]
    python scripts/fp32-products.py --device cpu --runs 2 --variants 2 --n 2000 --square 512   (a smoke test)
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Seconds per call of ``fn`` (after two warm-up calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--kp", type=int, default=720, help="input columns the products read "
                        "(MNIST: 717 varying features and the bias, padded)")
    parser.add_argument("--square", type=int, default=8192, help="side of the reference product")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False          # IEEE fp32, as the fp32 mode
    dev = torch.device(args.device)
    m, n, kp, v = args.runs * args.hidden, args.n, args.kp, args.variants
    x = torch.randn(kp, n, device=dev)                     # [kp, n]: how the step holds X
    x_rows = x.t().contiguous()                            # [n, kp]
    w = torch.randn(v * m, kp, device=dev)
    p = torch.empty(v * m, n, device=dev)
    dw = torch.empty(v * m, kp, device=dev)
    side = args.square
    a, b = torch.randn(side, side, device=dev), torch.randn(side, side, device=dev)

    forward = {   # one variant's P, or all variants' at once
        "as the step: W @ X": lambda: [torch.mm(w[i * m:(i + 1) * m], x, out=p[i * m:(i + 1) * m])
                                       for i in range(v)],
        "X held [n, kp]: W @ Xr^T": lambda: [torch.mm(w[i * m:(i + 1) * m], x_rows.t(),
                                                      out=p[i * m:(i + 1) * m]) for i in range(v)],
        "all variants in one: W_all @ X": lambda: torch.mm(w, x, out=p),
    }
    gradient = {
        "as the step: dP @ X^T": lambda: [torch.mm(p[i * m:(i + 1) * m], x.t(), out=dw[i * m:(i + 1) * m])
                                          for i in range(v)],
        "X held [n, kp]: dP @ Xr": lambda: [torch.mm(p[i * m:(i + 1) * m], x_rows,
                                                     out=dw[i * m:(i + 1) * m]) for i in range(v)],
        "all variants in one: dP_all @ X^T": lambda: torch.mm(p, x.t(), out=dw),
        "all variants in one, X held [n, kp]": lambda: torch.mm(p, x_rows, out=dw),
    }
    flop = 2 * v * m * n * kp
    best = {}
    for library in ("cublas", "cublaslt") if dev.type == "cuda" else ("default",):
        if dev.type == "cuda":
            torch.backends.cuda.preferred_blas_library(library)
        peak = 2 * side ** 3 / timed(lambda: a @ b, dev) / 1e12
        print(f"{library}: square product {side}: {peak:.1f} TFLOP/s")
        for what, table in (("forward", forward), ("weight gradient", gradient)):
            for name, fn in table.items():
                seconds = timed(fn, dev)
                rate = flop / seconds / 1e12
                print(f"  {what:15s} {name:40s} {1e3 * seconds:7.3f} ms  {rate:5.1f} TFLOP/s "
                      f"({rate / peak:4.0%} of the square)")
                if what not in best or seconds < best[what][0]:
                    best[what] = (seconds, f"{library}, {name}")
    if dev.type == "cuda":
        torch.backends.cuda.preferred_blas_library("cublas")
    for what, (seconds, name) in best.items():
        print(f"fastest {what}: {name}, {1e3 * seconds / v:.3f} ms per variant of {args.runs} runs")


if __name__ == "__main__":
    main()
