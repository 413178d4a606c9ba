"""The fused training step: the whole output layer in one pass over the hidden layer (Triton).

For the paper's two-layer family ``linear - act - head - post...`` (head: ``linear[+bias]`` or
``offsetl2``; act: relu, abs or none; post: up to two of relu, abs, neg) a step is

    P  = [W1 b1] [X; 1]             one matrix product, [R*H, D+1] @ [D+1, n], in the mode's dtype
    (one Triton kernel, per run and block of examples, reading P once and writing dP over it)
        h = act(P)                                   hidden activations, never stored
        z = head(h), logits = post(z)                the output layer, [C, block] on chip
        loss, correct, g = (softmax - onehot) / n    cross-entropy and its gradient
        g_z = post'(.) g                             back through the output activations
        dW2 += g_z h^T (linear)  or  sum_n g_s (h - mu), sum_n g_s (h - mu)^2 (OffsetL2)
        dP = act'(P) * dL/dh                         written over P
    [dW1 db1] = dP [X; 1]^T         one more matrix product
    p <- p - lr * grad              the SGD update (the Trainer's, as for every path)

so the ``[R, H, n]`` activations cross memory four times a step (P written, read, dP written
over it, read) instead of once or twice per elementwise operation, and stay in bf16 in bf16 mode.
The partial sums of each program are reduced in a fixed order, so a step is deterministic.

OffsetL2 distances are computed directly by default, s_c = sum_i w_ci (h_i - mu_ci)^2, class by
class in fp32: exact near a prototype without the float64 of the expanded form (~10 x 11
elementwise operations per hidden value forward and back, against ~3,100 in the first layer's
products); :data:`OFFSETL2_KERNEL` selects, per precision, the forms with products of exact
operands instead.

Precision: ``fp32`` keeps everything fp32 (IEEE fp32 products; a linear output layer's may run
as 3xtf32's, :data:`HEAD_PRODUCTS`); ``3xtf32`` keeps fp32 data and
runs every product on tensor cores as three TF32 products of exact halves (the first layer's two
through cuBLAS, :func:`tf32_halves`, a linear output layer's three in the kernel; OffsetL2's
distances direct, as in fp32), each product within 3 * 2^-22 of the exact one where IEEE fp32
rounds it to 2^-24; ``tf32`` runs the first layer's products and the output layer's in TF32,
``bf16`` stores P and dP in bf16 and runs the three products on bf16 operands, accumulating in
fp32. Losses, softmax, OffsetL2 distances and all parameter gradients are accumulated in fp32.

Triton runs the kernel on CUDA; on the CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1``, slow: for the tests), where products are computed in fp32 whatever the
mode (the interpreter's bf16 products are wrong in Triton 3.6-3.9).
"""

from __future__ import annotations

import functools
import os

import torch

from distrep.constant_features import FirstLayerInput
from distrep.errors import DistrepError
from distrep.layers import CODED_CLAMP, alpha_gradient, metric_weight
from distrep.models import LayerSpec
from distrep.provenance import lent

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:            # the fused step is optional: everything else runs without it
    triton = None

    class OutOfResources(Exception):
        """Stands in for Triton's, which nothing raises without Triton."""

HIDDEN = {"identity": 0, "relu": 1, "abs": 2}          # activation codes inside the kernel
POST = {"identity": 0, "relu": 1, "abs": 2, "neg": 3}
MAX_POST = 2
# The kernel's shape, BLOCK_N x WARPS x BLOCKS x STAGES: examples per block (a [H, BLOCK_N]
# tile of P per step of a program), warps per program, blocks per program and the stages of
# Triton's software pipeline (how many tiles of P its prefetch holds in shared memory; 3 is
# Triton's default on sm_90). A run's n examples are cut into ceil(n / (BLOCK_N * BLOCKS))
# programs whatever the GPU: many short programs keep a launch's last wave short, and the
# partial sums, hence the results, do not depend on the GPU's number of SMs. Measured on an
# H100 (docs/engine-h100-fused/): with 27 programs per run, 32 x 4 beat 32 x 8, 64 x 8, 64 x 16,
# 16 x 4 and 128 x 16 for ReLU2 and ReLU-L2 in bf16 and TF32 (ReLU2 bf16: 13,662 run-epochs/s
# against 32 x 8's 11,628): it needs the fewest warp instructions per example (ReLU2 bf16 at 32 x 4:
# 174 registers, no spill, 652 warp instructions per block and warp; scripts/kernel-stats.py,
# whose counts track the measured kernel times within ~25 %). Pass 3 (235 programs per run,
# scripts/fused-tune.py): 32 x 4 x 8 the fastest of 32 x 4 x {4, 8, 16}, 32 x 8 x 8, 64 x 4 x 8,
# 16 x {4, 8} x 8 in TF32 and fp32, within 7 % of the fastest in bf16 (64 x 4 x 8, which runs
# 2.6x slower in fp32); so it stays. Set per precision, since the best shape need not be the same:
# fp32's kernel runs its small products as IEEE FMAs, whose count per SM falls 12 % at one warp
# per program (32 x 1: ~9,300-10,800 warp instructions per block against 11,070-11,600 at 32 x 4
# over Table 1's six models, with more spilled; scripts/kernel-stats.py) though it leaves fewer
# warps per SM to hide latency, which fewer stages give back (one stage: 26 KB of shared memory
# instead of 58; docs/engine.md, "Fewer warps per program"); not yet timed on a GPU
# (scripts/gpu-pending.sh times it).
SHAPES: dict[str, tuple[int, int, int, int]] = {precision: (32, 4, 8, 3)
                                                for precision in ("fp32", "3xtf32", "tf32", "bf16")}


def shape(precision: str) -> tuple[int, int, int, int]:
    """(examples per block, warps per program, blocks per program, pipeline stages) of the
    kernel in ``precision`` (:data:`SHAPES`)."""
    return SHAPES[precision]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """A :data:`SHAPES` entry from ``BNxWARPSxBLOCKS[xSTAGES]`` (stages 3, Triton's default on
    sm_90, if not given), as the tuning scripts take it."""
    values = tuple(int(v) for v in text.split("x"))
    if len(values) not in (3, 4):
        raise ValueError(f"a shape is BNxWARPSxBLOCKS[xSTAGES], got {text!r}")
    return values + (3,) if len(values) == 3 else values


# At most this many registers per thread, by precision (None: ptxas decides; it spills the
# rest). An H100 SM holds 65,536 registers: a program of 4 warps at 174 registers fits twice,
# at 168 three times, at 128 four, and more programs per SM hide more of the latency the kernel
# waits on (it runs far below one instruction per cycle per SM: scripts/kernel-stats.py).
# Static cost at 32 x 4 (kernel-stats.py --maxnreg): ReLU2 bf16 at 128 spills 8 B for 2 % more
# instructions, TF32 at 168 104 B for 6 %, expanded ReLU-L2 bf16 at 168 120 B for 2 %, fp32 at
# 168 960 B for 9 %. Spilling moves no arithmetic, so a cap should change no bit
# (tests/test_cuda.py checks it: it changed none on an H200). Timed there (scripts/fused-tune.py,
# docs/engine-h200-3xtf32/log-tune.txt), no cap pays: bf16 ReLU2 1 % faster at 168, 1 % slower at
# 128, the expanded ReLU-L2 5 and 17 % slower, TF32 2-75 % slower, fp32 5 and 7 % slower.
MAX_REGISTERS: dict[str, int | None] = {"fp32": None, "3xtf32": None, "tf32": None, "bf16": None}
# How the weight gradient dP [X; 1]^T reads the input, by precision: "columns", the operand the
# forward product reads, [kp, n], transposed (cuBLAS's NT product), or "rows", a second copy
# held example-major, [n, kp] (NN; one more [n, kp] per chunk, which the memory plan counts).
# In IEEE fp32 the two products run at 49 and 50 TFLOP/s against a square product's ~51, and
# 90 % of the GEMM peak needs 0.18 ms off a 10.9 ms step (docs/engine.md); which layout cuBLAS
# runs faster is a GPU's to say (scripts/fp32-products.py times both, scripts/shape-check.py
# --operand rows benches it). 3xtf32 reads its TF32 halves as columns whatever this says.
GRADIENT_OPERAND: dict[str, str] = {"fp32": "columns", "3xtf32": "columns", "tf32": "columns", "bf16": "columns"}


def example_major_input(precision: str) -> bool:
    """Whether the fused step in ``precision`` keeps its training input example-major too
    (:data:`GRADIENT_OPERAND`)."""
    return GRADIENT_OPERAND[precision] == "rows" and precision != "3xtf32"


# How the kernel runs a linear output layer's three small products (z = W2 h, dW2 += g h^T,
# dL/dh = W2^T g), by precision: "ieee" (IEEE fp32 FMAs), "3xtf32" (three TF32 products of
# exact halves on tensor cores, each within 3 * 2^-22 of the exact product where IEEE rounds it
# to 2^-24: fp32's accuracy, tests/test_fused.py), "tf32" or "bf16" (one product of such operands).
# Only fp32 has a choice: "ieee" or "3xtf32". Its first layer's two products, ~98 % of Table 1's
# arithmetic, stay IEEE fp32 in cuBLAS either way, and run at 95 % of the fp32 GEMM peak; the
# kernel's IEEE FMAs (1.75 ms of a 10.9 ms step on an H200) are what keeps the step at 88 %.
# The kernel with three TF32 passes instead counts 45 % fewer warp instructions over Table 1's
# six models (scripts/kernel-stats.py --head-products, docs/engine.md) and, timed on an H200,
# takes Table 1's fp32 step from 88 % to 97 % of the fp32 GEMM peak (1,824 -> 2,005
# run-epochs/s; its gradients within 5e-7 of IEEE's, its 40-epoch losses as close to the CPU's
# as IEEE's: docs/engine-h200-fp32-head), so fp32 takes it. OffsetL2's distances are direct in
# fp32 whatever this says.
HEAD_PRODUCTS: dict[str, str] = {"fp32": "3xtf32", "3xtf32": "3xtf32", "tf32": "tf32", "bf16": "bf16"}
HEAD_PRODUCT_CHOICES = {"fp32": ("ieee", "3xtf32"), "3xtf32": ("3xtf32",), "tf32": ("tf32",), "bf16": ("bf16",)}


def head_products(precision: str) -> str:
    """How the kernel runs a linear output layer's products in ``precision``
    (:data:`HEAD_PRODUCTS`); a value the precision cannot take is an error."""
    products = HEAD_PRODUCTS[precision]
    if products not in HEAD_PRODUCT_CHOICES[precision]:
        raise DistrepError(f"the fused step in {precision} runs its output layer's products as "
                           f"{' or '.join(HEAD_PRODUCT_CHOICES[precision])}, not {products!r}")
    return products


# How the kernel computes OffsetL2, by precision: "direct", sum_i w (h_i - mu_i)^2 class by class
# in fp32, forward and back (exact; ~110 elementwise operations per hidden value, and a
# reduction across the hidden units per class); "expanded" into products on tensor cores,
#     s = w @ h^2 - 2 (w mu) @ h + sum_i (w mu)^2 / w,
# whose terms cancel near a prototype, so its products must be exact: h, w, w mu and g_s are
# rounded once to the mode's operands (bf16 or TF32: u = 2^-8 or 2^-11), h^2 is split into two
# such operands (hi + lo, exactly), and each product then runs in one pass, its products exact
# and only the fp32 sums rounding (~1e-7 of sum w h^2). The distance computed is the exact one
# to the rounded parameters w' and mu' = (w mu)' / w' at the rounded h', within
# 6u sqrt(s sum w h^2) + u s + 9u^2 sum w h^2 of the true one: what the mode's own rounding of
# h does, with no cancellation left (tests/test_fused.py, prototypes 1e-3 |h| from h; rounding
# h^2 once instead is off by ~u sum w h^2 / sqrt(H)). The gradients are the same products of
# the same operands (sum g_s h, sum g_s h^2, sum g_s, and dL/dh = 2 h (w^T g_s) - 2 (w mu)^T g_s),
# from which gradients() recovers the direct form's sums. "hybrid": the direct distances with
# those gradients. Cost (scripts/kernel-stats.py, bf16, 32 x 4, warp instructions per block
# and warp): direct 7,583; expanded 1,525 (36 KB shared), where three TF32 passes for the
# distances and sum g_s h^2 took 2,650 (before the bias moved into the first product, which
# saved ~250 more). Timed on an H100 (docs/engine-h100-fused/pass3/, `bench`, Table 3's four
# variants x 20 runs, full MNIST): bf16 13,017 run-epochs/s expanded against 6,288 direct
# (Table 1: 16,643), TF32 6,505 against 4,702. Checked against fp32 by `bench --accuracy`
# (16 paired runs x 500 epochs, every Table 3 model): TF32 expanded equivalent within 0.1
# point for all four; bf16 expanded within 0.06 point on average, equivalent for the two -Neg
# models, its intervals reaching 0.004 and 0.025 past the margin for ReLU-L2 and Abs-L2
# (direct bf16, 4 runs: all four equivalent).
# Hence expanded in TF32 and bf16, the modes chosen for speed; fp32 and 3xtf32 keep the exact form.
OFFSETL2_KERNEL_FORMS = ("direct", "expanded", "hybrid")
OFFSETL2_KERNEL = {"fp32": "direct", "3xtf32": "direct", "tf32": "expanded", "bf16": "expanded"}


def offsetl2_kernel(precision: str) -> str:
    """The OffsetL2 form the kernel computes in ``precision`` (:data:`OFFSETL2_KERNEL`)."""
    return OFFSETL2_KERNEL[precision]


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32's 11 significant bits (to nearest, ties away from zero, on the
    bits: the 13 low bits dropped), still fp32: an operand a TF32 product reads exactly. The
    kernel's ``_operand(x, 1)``."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def tf32_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of fp32 ``x``, both exact TF32 operands: hi = round_to_tf32(x), lo =
    round_to_tf32(x - hi) (x - hi is exact in fp32), so x = hi + lo to 2^-22 |x|. A product
    a @ b is then three TF32 products, a_lo b_hi + a_hi b_lo + a_hi b_hi, each exact in the
    fp32 accumulator (11 x 11 bits), with a_lo b_lo (~2^-22 |a b|) dropped: each term within
    3 * 2^-22 of the exact product. The kernel's ``_tf32_pair``."""
    hi = round_to_tf32(x)
    return hi, round_to_tf32(x - hi)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_layout(specs: tuple[LayerSpec, ...]) -> dict | None:
    """What the kernel needs to know of a model (activation codes, head, biases), or None if the
    fused step does not cover it: ``linear`` (any bias), at most one hidden activation among
    relu/abs/identity, a ``linear`` or ``offsetl2`` output layer, then at most two of
    relu/abs/neg/identity."""
    kinds = [s.kind for s in specs]
    if len(specs) < 2 or kinds[0] != "linear":
        return None
    k, hidden = 1, "identity"
    if kinds[1] in HIDDEN:
        hidden, k = kinds[1], 2
    if k >= len(specs) or kinds[k] not in ("linear", "offsetl2"):
        return None
    post = kinds[k + 1:]
    if len(post) > MAX_POST or any(p not in POST for p in post):
        return None
    post = post + ["identity"] * (MAX_POST - len(post))
    return {"hidden": HIDDEN[hidden], "head_index": k, "offsetl2": kinds[k] == "offsetl2",
            "head_bias": specs[k].bias and kinds[k] == "linear",
            "post": tuple(POST[p] for p in post)}


def unavailable(device: torch.device) -> str | None:
    """Why the fused step cannot run on ``device`` (one line), or None if it can (as the
    process that trains there said, where the device is lent: :mod:`distrep.provenance`)."""
    if facts := lent(device):
        return facts.fused_unavailable
    if triton is None:
        return "the fused engine needs Triton (pip install triton)"
    if device.type != "cuda" and not interpreting():
        return ("the fused engine runs on CUDA (on the CPU only under Triton's interpreter, "
                "TRITON_INTERPRET=1, for testing)")
    return None


if triton is not None:
    @triton.jit
    def _act(x, CODE: tl.constexpr):
        if CODE == 1:
            return tl.maximum(x, 0.0)
        elif CODE == 2:
            return tl.abs(x)
        elif CODE == 3:
            return -x
        else:
            return x

    @triton.jit
    def _act_backward(g, x, CODE: tl.constexpr):
        """g * f'(x) for the activation ``CODE`` at its input x (relu: 1[x > 0]; abs: sign x)."""
        if CODE == 1:
            return tl.where(x > 0, g, 0.0)
        elif CODE == 2:
            return tl.where(x > 0, g, tl.where(x < 0, -g, 0.0))
        elif CODE == 3:
            return -g
        else:
            return g

    @triton.jit
    def _dot(a, b, DOT: tl.constexpr):
        """a @ b accumulated in fp32: operands in bf16 (DOT 2), TF32 (1) or IEEE fp32 (0)."""
        if DOT == 2:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        elif DOT == 1:
            return tl.dot(a, b, input_precision="tf32")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _operand(x, ROUND: tl.constexpr):
        """x rounded to the significant bits a product of the mode reads (ROUND 2: bf16's 8,
        1: TF32's 11; to nearest, ties away from zero), still in fp32, so that the product of
        two such operands is exact in the fp32 accumulator; x itself in fp32 (0). Done on the
        bits: the same on the GPU and under the interpreter (whose bf16 arithmetic is wrong)."""
        if ROUND == 2:                               # drop the 16 low bits, rounding
            bits = x.to(tl.int32, bitcast=True)
            return ((bits + 0x8000) & -0x10000).to(tl.float32, bitcast=True)
        elif ROUND == 1:                             # drop the 13 low bits, rounding
            bits = x.to(tl.int32, bitcast=True)
            return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        else:
            return x

    @triton.jit
    def _tf32_pair(x):
        """(hi, lo), both exact TF32 operands (:func:`_operand`), hi + lo = x to 2^-22 |x|: an
        fp32 operand in the two halves a product of three TF32 passes reads."""
        hi, lo = _split(x, 1)
        return hi, _operand(lo, 1)

    @triton.jit
    def _dot_tf32x3(a_hi, a_lo, b_hi, b_lo):
        """a @ b from the :func:`_tf32_pair` halves of fp32 a and b, as three TF32 products
        (a_lo b_hi + a_hi b_lo + a_hi b_hi, small terms first; a_lo b_lo, ~2^-22 |a b|, dropped):
        every product exact in the fp32 accumulator, each term within 3 * 2^-22 of the exact
        product, on tensor cores, and the same under the interpreter as on the GPU."""
        acc = tl.dot(a_lo, b_hi, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")

    @triton.jit
    def _split(x, ROUND: tl.constexpr):
        """(hi, lo), both exact operands (:func:`_operand`), hi + lo = x for x with at most
        twice their significant bits (the square of an operand)."""
        hi = _operand(x, ROUND)
        return hi, x - hi

    @triton.jit
    def _head_kernel(P, dP, DP_LO, W, B2, MU, LABELS, LOGITS,
                     PART_A, PART_B, PART_DB2, PART_LOSS, PART_CORRECT,
                     n, inv_n, clamp, ROUNDS: tl.constexpr,
                     H: tl.constexpr, C: tl.constexpr, HP: tl.constexpr, CP: tl.constexpr,
                     BN: tl.constexpr, HIDDEN: tl.constexpr, HEAD: tl.constexpr,
                     PAPER: tl.constexpr, HAS_B2: tl.constexpr,
                     POST1: tl.constexpr, POST2: tl.constexpr, TRAIN: tl.constexpr,
                     DOT: tl.constexpr, ROUND: tl.constexpr, SPLIT_DP: tl.constexpr):
        """One program: run ``r`` = program_id(0), every ``S``-th block of BN examples from
        block program_id(1). P, dP ``[R, H, n]`` (dP may be P); W ``[R, C, H]`` (the linear
        weight, or OffsetL2's metric weight w with MU its prototypes). HEAD: 0 linear, 1
        OffsetL2 in the direct form, 2 OffsetL2 expanded into DOT products of exact operands
        (h, w, w mu and g_s rounded to the mode's operands once, h^2 split in two),
            s = w @ h^2 - 2 (w mu) @ h + sum_i (w mu)^2 / w
            dL/dh = 2 h * (w^T g_s) - 2 (w mu)^T g_s,
        3 the direct form's distances with the expanded form's gradients. Partial sums per
        program ``[R, S, ...]``: PART_A dW (linear), sum g_s (h - mu) (direct) or sum g_s h^T
        (products); PART_B (OffsetL2 only) sum g_s (h - mu)^2 (direct) or sum g_s (h^2)^T
        (products), both ``[CP, HP]`` with only their C x H entries written; PART_DB2 ``[CP]``
        db2 (linear) or sum g_s (products); loss and correct counts. P holds the first
        layer's bias (it rides in the product), so its gradient comes from the next product.
        With SPLIT_DP (3xtf32) dP is written as its TF32 halves, hi to dP and lo to DP_LO, the
        operands of the next product's three TF32 passes. Without TRAIN the logits go to LOGITS
        ``[R, C, n]`` and nothing is differentiated."""
        r = tl.program_id(0)
        s = tl.program_id(1)
        S = tl.num_programs(1)
        rh = tl.arange(0, HP)
        rc = tl.arange(0, CP)
        hm = rh < H
        cm = rc < C
        if HEAD != 1:                    # the direct form reads its rows class by class instead
            w = tl.load(W + r * C * H + rc[:, None] * H + rh[None, :],
                        mask=cm[:, None] & hm[None, :], other=0.0)
        if HEAD >= 2:
            mu = tl.load(MU + r * C * H + rc[:, None] * H + rh[None, :],
                         mask=cm[:, None] & hm[None, :], other=0.0)
            # the products' operands, rounded once per program: the distance to the rounded
            # parameters (w, w mu) = (w', w' mu') is computed exactly, s0 = sum w' mu'^2
            w = _operand(w, ROUND)
            wmu = _operand(w * mu, ROUND)
            s0 = tl.sum(tl.where(w != 0, wmu * wmu / tl.where(w != 0, w, 1.0), 0.0), axis=1)
            w2, wmu2 = 2.0 * w, 2.0 * wmu          # exact: the gradient's factor 2 taken once
        if HEAD == 0 and DOT == 3:        # the weight's TF32 halves, once per program
            w_hi, w_lo = _tf32_pair(w)
        if HAS_B2:
            b2 = tl.load(B2 + r * C + rc, mask=cm, other=0.0)
        acc_a = tl.zeros((CP, HP), dtype=tl.float32)
        acc_b = tl.zeros((CP, HP), dtype=tl.float32)
        acc_db2 = tl.zeros((CP,), dtype=tl.float32)
        loss_sum = tl.zeros((BN,), dtype=tl.float32)      # per column, summed at the end
        correct_sum = tl.zeros((BN,), dtype=tl.int32)
        base = r.to(tl.int64) * H * n        # R * H * n passes 2^31 at ~280 runs of full MNIST
        for i in range(0, ROUNDS):           # blocks s, s + S, ...; the last may be empty
            cols = (s + i * S) * BN + tl.arange(0, BN)
            nm = cols < n
            m2 = hm[:, None] & nm[None, :]
            a = tl.load(P + base + rh[:, None] * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            h = _act(a, HIDDEN)        # [HP, BN]; 0 outside the block's examples and hidden units
            if HEAD >= 2:
                hr = _operand(h, ROUND)                 # h as the products read it
                sq_hi, sq_lo = _split(hr * hr, ROUND)
            if HEAD != 0:
                if HEAD == 2:       # exact products: only the fp32 sums round (cancel) below
                    z = _dot(w, sq_hi, DOT) + _dot(w, sq_lo, DOT) - _dot(wmu2, hr, DOT) + s0[:, None]
                    z = tl.where(z < 0, 0.0, z)       # cancellation can undercut 0 (NaN kept)
                else:
                    z = tl.zeros((CP, BN), dtype=tl.float32)
                    for c in range(0, C):
                        sel = (rc == c)[:, None]
                        mu_c = tl.load(MU + r * C * H + c * H + rh, mask=hm, other=0.0)  # [HP]
                        w_c = tl.load(W + r * C * H + c * H + rh, mask=hm, other=0.0)
                        d = h - mu_c[:, None]            # padded rows: w_c = 0
                        s_c = tl.sum(w_c[:, None] * d * d, axis=0)
                        z = tl.where(sel, s_c[None, :], z)
                if PAPER:                          # a diverged run's NaN must stay NaN
                    active = z > 0
                    zh = tl.sqrt(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL))
                else:
                    active = z > clamp
                    zh = tl.sqrt(tl.maximum(z, clamp, propagate_nan=tl.PropagateNan.ALL))
            else:
                if DOT == 3:
                    h_hi, h_lo = _tf32_pair(h)
                    zh = _dot_tf32x3(w_hi, w_lo, h_hi, h_lo)              # [CP, BN]
                else:
                    zh = _dot(w, h, DOT)                                  # [CP, BN]
                if HAS_B2:
                    zh = zh + b2[:, None]
            u1 = _act(zh, POST1)
            logits = _act(u1, POST2)
            valid = cm[:, None] & nm[None, :]
            if TRAIN:
                label = tl.load(LABELS + cols, mask=nm, other=0)
                zl = tl.where(cm[:, None], logits, float("-inf"))
                zmax = tl.max(zl, axis=0)
                e = tl.exp(zl - zmax[None, :])
                total = tl.sum(e, axis=0)
                onehot = rc[:, None] == label[None, :]
                target = tl.sum(tl.where(onehot, zl, 0.0), axis=0)
                loss_sum += tl.where(nm, zmax + tl.log(total) - target, 0.0)
                pred = tl.argmax(zl, axis=0)
                correct_sum += tl.where(nm & (pred == label), 1, 0)
                g = (e / total[None, :] - tl.where(onehot, 1.0, 0.0)) * inv_n
                g = tl.where(valid, g, 0.0)
                g = _act_backward(g, u1, POST2)
                g = _act_backward(g, zh, POST1)                           # dL/d(head output)
                if HEAD != 0:                                             # dL/ds = g / (2 y)
                    gs = tl.where(active, g / (2.0 * tl.where(active, zh, 1.0)), 0.0)
                if HEAD >= 2:       # sums of exact products (the direct form's: gradients())
                    gs = _operand(gs, ROUND)
                    acc_a += _dot(gs, tl.trans(hr), DOT)
                    acc_b += _dot(gs, tl.trans(sq_hi), DOT) + _dot(gs, tl.trans(sq_lo), DOT)
                    acc_db2 += tl.sum(gs, axis=1)
                    dh = hr * _dot(tl.trans(w2), gs, DOT) - _dot(tl.trans(wmu2), gs, DOT)
                elif HEAD == 1:
                    dh = tl.zeros((HP, BN), dtype=tl.float32)
                    for c in range(0, C):
                        sel = (rc == c)[:, None]
                        mu_c = tl.load(MU + r * C * H + c * H + rh, mask=hm, other=0.0)
                        w_c = tl.load(W + r * C * H + c * H + rh, mask=hm, other=0.0)
                        gs_c = tl.sum(tl.where(sel, gs, 0.0), axis=0)       # [BN]
                        d = h - mu_c[:, None]
                        gd = gs_c[None, :] * d               # 0 outside the block: gs_c = 0
                        dh += 2.0 * w_c[:, None] * gd
                        acc_a += tl.where(sel, tl.sum(gd, axis=1)[None, :], 0.0)
                        acc_b += tl.where(sel, tl.sum(gd * d, axis=1)[None, :], 0.0)
                # db2 is summed inside each of the two branches below: summed after both, the
                # compiled kernels are no longer the ones timed (bf16's ReLU2: 648 for 652)
                elif DOT == 3:
                    g_hi, g_lo = _tf32_pair(g)
                    acc_a += _dot_tf32x3(g_hi, g_lo, tl.trans(h_hi), tl.trans(h_lo))
                    acc_db2 += tl.sum(g, axis=1)
                    dh = _dot_tf32x3(tl.trans(w_hi), tl.trans(w_lo), g_hi, g_lo)
                else:
                    acc_a += _dot(g, tl.trans(h), DOT)                    # [CP, HP]
                    acc_db2 += tl.sum(g, axis=1)
                    dh = _dot(tl.trans(w), g, DOT)                         # [HP, BN]
                dpre = _act_backward(dh, a, HIDDEN)
                if SPLIT_DP:
                    d_hi, d_lo = _tf32_pair(dpre)
                    tl.store(DP_LO + base + rh[:, None] * n + cols[None, :], d_lo, mask=m2)
                    dpre = d_hi
                tl.store(dP + base + rh[:, None] * n + cols[None, :], dpre.to(dP.dtype.element_ty), mask=m2)
            else:
                tl.store(LOGITS + r * C * n + rc[:, None] * n + cols[None, :], logits, mask=valid)
        if TRAIN:
            part = r * S + s
            # only the C x H entries that are read back: the padding is never written or read
            ch = cm[:, None] & hm[None, :]
            tl.store(PART_A + part * CP * HP + rc[:, None] * HP + rh[None, :], acc_a, mask=ch)
            if HEAD != 0:                  # a linear output layer has no second partial sum
                tl.store(PART_B + part * CP * HP + rc[:, None] * HP + rh[None, :], acc_b, mask=ch)
            tl.store(PART_DB2 + part * CP + rc, acc_db2)
            tl.store(PART_LOSS + part, tl.sum(loss_sum, axis=0))
            tl.store(PART_CORRECT + part, tl.sum(correct_sum, axis=0))


# --------------------------------------------------------------------------- a model's runs

# The widest hidden layer and the most classes the kernel takes (padded to powers of two). It
# holds a block's [BLOCK_N, HP] hidden layer in registers and STAGES tiles of P in shared memory,
# whose size grows with the width: fp32, 32 x 4 x 8 x 3, sm_90, Triton 3.6: 60 KB at 128 units
# and 10 classes, 117 KB at 256, 232 KB at 512 (all of an H100's 227 KB) and 461 KB at 1,024;
# and with more than 16 classes, more in some modes than others (TF32 with OffsetL2 at 128
# units: 54 KB for 10 classes, 263 KB for 40). Wider models and more classes take the
# hand-written step.
MAX_WIDTH, MAX_CLASSES = 256, 16


def shared_memory_bound(H: int, C: int) -> int:
    """Bytes of shared memory a program of the kernel needs at most, for width ``H`` and ``C``
    classes within :data:`MAX_WIDTH` and :data:`MAX_CLASSES`, in any mode and with either output
    layer: ``STAGES BN HP 4 + CP HP 4 + BN CP 4 + 512`` (the pipeline's tiles of P, the output
    layer's weight and a tile of logits, in fp32), with the largest shape of any mode. It is
    what fp32's kernel with a linear output layer takes, to the byte, and no mode or output
    layer takes more (tested against the sm_90 compile of each)."""
    HP, CP = _padded(H), _padded(C)
    return max(stages * bn * HP * 4 + CP * HP * 4 + bn * CP * 4 + 512 for bn, _, _, stages in SHAPES.values())


def too_large(specs: tuple[LayerSpec, ...], device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot take a model the grammar covers (:func:`fused_layout`), one line,
    or None: a hidden layer wider than :data:`MAX_WIDTH` or more classes than
    :data:`MAX_CLASSES`, or, on a CUDA ``device``, more shared memory
    (:func:`shared_memory_bound`) than it has per block."""
    layout = fused_layout(specs)
    H, C = specs[0].out_features, specs[layout["head_index"]].out_features
    if H > MAX_WIDTH or C > MAX_CLASSES:
        return (f"the fused engine takes hidden layers of up to {MAX_WIDTH} units and up to "
                f"{MAX_CLASSES} classes (this model: {H} and {C}); use --engine hand-written")
    limit = max_shared_memory(torch.device(device)) if device is not None else None
    if limit is not None:
        need = shared_memory_bound(H, C)
        if need > limit:
            return (f"the fused kernel at width {H} needs up to {need:,} bytes of shared memory per "
                    f"block, more than this GPU's {limit:,}; use --engine hand-written or a narrower model")
    return None


def max_shared_memory(device: torch.device) -> int | None:
    """The shared memory a block may take on the CUDA ``device``, bytes, as Triton reads it
    (and checks a kernel against at its first launch), or as the process that trains there
    read it (a lent device); None where there is no GPU to read it from."""
    if facts := lent(device):
        return facts.shared_memory
    if device.type != "cuda" or triton is None or interpreting() or not torch.cuda.is_available():
        return None
    return _max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _max_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _padded(x: int) -> int:
    """The next power of two, at least 16 (the smallest side of a Triton product)."""
    return max(16, 1 << (x - 1).bit_length())


def programs_per_run(n: int, precision: str) -> int:
    """How many programs share a run's n examples in ``precision``: ceil(n / (examples per
    block x blocks per program))."""
    block_n, _, blocks, _ = shape(precision)
    return -(-n // (block_n * blocks))


def partial_sums_bytes(n: int, width: int, classes: int, precision: str) -> int:
    """Bytes of one run's per-program partial sums in a step (at most two ``[CP, HP]`` fp32
    tiles per program, and small ones), for the memory budget."""
    return 4 * programs_per_run(n, precision) * (2 * _padded(classes) * _padded(width)
                                                 + _padded(classes) + 2)


def kernel_constants(layout: dict, form: str, H: int, C: int, train: bool, precision: str) -> dict:
    """The kernel's compile-time arguments for a model (:func:`fused_layout`), hidden width H,
    C classes (the precision's :func:`shape`: blocks of examples per program). Products (DOT,
    :func:`head_products`): bf16 operands in bf16 mode, TF32 in tf32, IEEE fp32 in fp32 and
    under the interpreter (whose bf16 products are wrong), three TF32 products of exact halves
    for a linear output layer in 3xtf32 (3; and in fp32 where HEAD_PRODUCTS says so; OffsetL2's
    distances stay direct, in fp32). Those halves, and the operands of the
    OffsetL2 forms with products, rounded to the mode's (ROUND), are made by the kernel itself,
    under the interpreter too, whose fp32 products of such exact operands are exact as the GPU's
    are. SPLIT_DP: a 3xtf32 training step writes dP as its TF32 halves."""
    dot = {"ieee": 0, "tf32": 1, "bf16": 2, "3xtf32": 3}[head_products(precision)]
    if dot == 3 and layout["offsetl2"]:          # OffsetL2's distances: direct, in fp32
        dot = 0
    elif dot in (1, 2) and interpreting():       # exact operands, products in fp32
        dot = 0
    round_to = {"fp32": 0, "3xtf32": 0, "tf32": 1, "bf16": 2}[precision]
    head = 0 if not layout["offsetl2"] else OFFSETL2_KERNEL_FORMS.index(offsetl2_kernel(precision)) + 1
    block_n, _, blocks, _ = shape(precision)
    return dict(ROUNDS=blocks, H=H, C=C, HP=_padded(H), CP=_padded(C), BN=block_n,
                HIDDEN=layout["hidden"], HEAD=head, PAPER=form == "paper",
                HAS_B2=layout["head_bias"], POST1=layout["post"][0],
                POST2=layout["post"][1], TRAIN=train, DOT=dot, ROUND=round_to,
                SPLIT_DP=train and precision == "3xtf32")


def compile_options(precision: str) -> dict:
    """Triton's compile options for the kernel in ``precision``: warps and pipeline stages
    (:data:`SHAPES`), and registers where :data:`MAX_REGISTERS` caps them."""
    _, warps, _, stages = shape(precision)
    cap = MAX_REGISTERS[precision]
    return {"num_warps": warps, "num_stages": stages, **({"maxnreg": cap} if cap else {})}


def compile_for_gpu(specs: tuple[LayerSpec, ...], precision: str = "bf16", train: bool = True,
                    form: str = "paper", arch: int = 90):
    """Compile the kernel for a model without a GPU (Triton's compiler and ptxas run on the
    CPU): proof that it compiles for CUDA architecture ``arch`` (90: H100/H200), and the
    compiled kernel (``.asm["cubin"]``, ``.metadata``) for register and spill counts. Needs
    Triton's JIT, not its interpreter (unset TRITON_INTERPRET before importing distrep)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    layout = fused_layout(specs)
    H, C = specs[0].out_features, specs[layout["head_index"]].out_features
    meta = kernel_constants(layout, form, H, C, train, precision)
    p = "*bf16" if precision == "bf16" else "*fp32"
    types = {"P": p, "dP": p, "DP_LO": "*fp32", "LABELS": "*i64", "PART_CORRECT": "*i32", "n": "i32",
             "inv_n": "fp32", "clamp": "fp32"}
    names = _head_kernel.arg_names
    signature = {name: "constexpr" if name in meta else types.get(name, "*fp32") for name in names}
    # what Triton's JIT assumes at a launch on MNIST: every pointer 16-byte aligned (PyTorch's
    # allocations are) and n a multiple of 16 (60,000 and 10,000); its loads' layouts follow
    aligned = [(names.index(k),) for k, t in signature.items() if t.startswith("*") or k == "n"]
    source = ASTSource(fn=_head_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in meta.items()},
                       attrs={key: [["tt.divisibility", 16]] for key in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=compile_options(precision))


class FusedRuns:
    """R runs of one model trained by the fused step: their gradients (:meth:`gradients`) and
    test-pass logits (:meth:`forward`) for the engine's :class:`~distrep.engine.Trainer`, which
    updates the stacked parameters ``params`` (``{"0.weight": [R, H, D], ...}``) in place."""

    precision = "fp32"          # set by the Trainer

    def __init__(self, specs: tuple[LayerSpec, ...], params: dict[str, torch.Tensor],
                 layout: dict, offsetl2_form: str):
        self.specs, self.params, self.layout, self.form = specs, params, layout, offsetl2_form
        self.grads = {name: torch.zeros_like(p) for name, p in params.items()}
        self._buffers: dict = {}
        # the first layer's operand of each input by role (_first_input; in 3xtf32 with its TF32
        # halves); a Trainer gives its fused groups one dict, so a chunk holds one copy
        self.inputs: dict = {}
        k = layout["head_index"]
        self.head = (f"{k}.mu", f"{k}.alpha") if layout["offsetl2"] else (f"{k}.weight", f"{k}.bias")

    @classmethod
    def from_state(cls, specs: tuple[LayerSpec, ...], state: dict[str, torch.Tensor],
                   offsetl2_form: str = "paper") -> "FusedRuns":
        layout = fused_layout(specs)
        if layout is None:
            raise DistrepError("the fused engine covers linear - [relu|abs] - linear|offsetl2 "
                               "- up to two of relu/abs/neg; use --engine auto for this model")
        reason = unavailable(next(iter(state.values())).device)
        if reason:
            raise DistrepError(reason)
        return cls(specs, state, layout, offsetl2_form)

    def state(self) -> dict[str, torch.Tensor]:
        return self.params

    @property
    def runs(self) -> int:
        return self.params["0.weight"].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first layer's products and of P: bf16 in bf16 mode, else fp32."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype:
            self._buffers.pop(key, None)               # free the old one before allocating
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=self.params["0.weight"].device)
        return buf

    def _first_input(self, x: torch.Tensor, key: str) -> FirstLayerInput:
        """The first layer's operand for the input ``x [D, n]``: its varying features, a row of
        ones for the bias and rows of zeros, ``[X_v; 1; 0...]`` ``[kp, n]`` in the mode's dtype,
        kp = k + 1 rounded up to a multiple of 8 (products on tensor cores want 16-byte rows;
        :mod:`distrep.constant_features`), kept while ``x`` is the same tensor (in ``inputs``,
        which a Trainer's fused groups share)."""
        cached = self.inputs.get(key)
        if cached is None or cached.source is not x:
            rows = key == "train" and example_major_input(self.precision)   # for the weight gradient
            self.inputs[key] = cached = FirstLayerInput.of(x, self.dtype, multiple=8, example_major=rows)
        return cached

    def _first_layer(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """P = [W1_v  b1 + W1_c c] [x_v; 1] ``[R, H, n]`` for the shared input ``x [D, n]`` (in the
        mode's dtype): the product reads only the features that vary over x's examples, and the
        bias rides in it as the weight of the row of ones, so the kernel neither adds it nor
        sums its gradient (ReLU2, bf16: 652 instead of 943 warp instructions per block,
        scripts/kernel-stats.py)."""
        w1, b1 = self.params["0.weight"], self.params.get("0.bias")
        R, H, D = w1.shape
        inputs = self._first_input(x, key)
        kp, n = inputs.columns.shape
        P = self._buffer(key, (R, H, n), self.dtype)
        # a folded weight per input: a test pass's split may differ from training's, and a CUDA
        # graph's step must find its buffers where it left them
        weight = inputs.split.weight(w1.view(R * H, D), None if b1 is None else b1.view(R * H),
                                     self._buffer(f"{key} weight", (R * H, kp), torch.float32))
        if self.precision == "3xtf32":
            # W_lo X_hi + W_hi X_lo + W_hi X_hi as one TF32 product over 3 kp columns, small terms first
            hi, lo = tf32_halves(weight)
            halves = self._buffer(f"{key} weight halves", (R * H, 3 * kp), torch.float32)
            torch.cat([lo, hi, hi], dim=1, out=halves)
            torch.mm(halves, inputs.column_halves, out=P.view(R * H, -1))
        else:
            torch.mm(weight.to(self.dtype), inputs.columns, out=P.view(R * H, -1))
        return P

    def _head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W, B2, MU) as the kernel reads them: the output layer's weight and bias, or
        OffsetL2's metric weight w (alpha^2 or alpha) and prototypes."""
        first, second = (self.params.get(name) for name in self.head)
        if not self.layout["offsetl2"]:
            return first.contiguous(), second, None
        return metric_weight(second, self.form).contiguous(), None, first.contiguous()

    def _launch(self, P: torch.Tensor, head: tuple, y: torch.Tensor | None, logits: torch.Tensor | None):
        """Run the head kernel over P with the output layer's ``head`` (:meth:`_head_weights`);
        the per-program partial sums when training (``y``), else the logits written into
        ``logits``."""
        R, H, n = P.shape
        W, B2, MU = head
        C = W.shape[1]
        HP, CP = _padded(H), _padded(C)
        splits = programs_per_run(n, self.precision)
        train = y is not None
        f32 = dict(dtype=torch.float32, device=P.device)
        parts = {"a": torch.empty(R, splits, CP, HP, **f32),
                 "db2": torch.empty(R, splits, CP, **f32), "loss": torch.empty(R, splits, **f32),
                 "correct": torch.empty(R, splits, dtype=torch.int32, device=P.device)} if train else {}
        if train and self.layout["offsetl2"]:
            parts["b"] = torch.empty(R, splits, CP, HP, **f32)
        dummy = W
        meta = kernel_constants(self.layout, self.form, H, C, train, self.precision)
        if meta["SPLIT_DP"]:                         # dP's low TF32 half (its high half over P)
            parts["dP lo"] = self._buffer("train dP lo", (R, H, n), torch.float32)
        try:
            _head_kernel[(R, splits)](
                P, P, parts.get("dP lo", dummy), W, B2 if B2 is not None else dummy,
                MU if MU is not None else dummy, y if train else dummy, logits if logits is not None else dummy,
                *(parts.get(k, dummy) for k in ("a", "b", "db2", "loss", "correct")),
                n, 1.0 / n, CODED_CLAMP, **meta, **compile_options(self.precision))
        except OutOfResources as e:      # a GPU or a Triton that too_large() did not foresee
            raise DistrepError(f"the fused kernel at width {H} with {C} classes in {self.precision} "
                               f"needs {e.required:,} of {e.name} where this GPU has {e.limit:,}; "
                               f"use --engine hand-written") from None
        return parts

    def gradients(self, x_t: torch.Tensor, y: torch.Tensor, x_bf16: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every run's gradient on ``x_t [D, n]`` into ``grads``; ``(loss [R], correct [R])``.
        The :class:`~distrep.engine.Trainer` applies the update, as for the hand-written step.
        The three phases of :meth:`phases` in order."""
        product, kernel, finish = self.phases(x_t, y, x_bf16)
        product()
        kernel()
        return finish()

    def phases(self, x_t: torch.Tensor, y: torch.Tensor, x_bf16: torch.Tensor | None = None):
        """:meth:`gradients` as three calls, run in this order (a pipelined schedule may put the
        kernel on another stream, after the product and before the rest): the first layer's
        product P; the head kernel, which writes dL/dP over P and its partial sums; then the
        weight-gradient product dP [X; 1]^T and the sums into ``grads``, returning
        ``(loss [R], correct [R])``."""
        x = x_bf16 if self.dtype == torch.bfloat16 and x_bf16 is not None else x_t.to(self.dtype)
        state: dict = {}

        def product() -> None:
            state["P"] = self._first_layer(x, "train")

        def kernel() -> None:
            state["head"] = head = self._head_weights()
            state["parts"] = self._launch(state["P"], head, y, None)

        def finish() -> tuple[torch.Tensor, torch.Tensor]:
            return self._weight_gradients(x, state["P"], state["head"], state["parts"])
        return product, kernel, finish

    def _weight_gradients(self, x: torch.Tensor, P: torch.Tensor, head: tuple, parts: dict
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's gradient dP [X; 1]^T (P holds dL/dP after the kernel) and the
        output layer's from the kernel's partial sums, into ``grads``; ``(loss, correct)``."""
        R, H, D = self.params["0.weight"].shape
        n = x.shape[1]
        C = head[0].shape[1]
        g = self.grads
        inputs = self._first_input(x, "train")
        bias = g["0.bias"].view(R * H) if "0.bias" in g else None
        if self.precision == "3xtf32":      # P holds dP_hi: dP_lo X_hi + dP_hi X_lo, then + dP_hi X_hi
            kp = inputs.columns.shape[0]
            halves = inputs.column_halves
            high = torch.mm(P.view(R * H, n), halves[:2 * kp].t())          # [dP_hi X_hi | dP_hi X_lo]
            product = torch.addmm(high[:, kp:], parts["dP lo"].view(R * H, n), halves[:kp].t())
            product += high[:, :kp]
        else:                               # X read as columns transposed, or held as rows
            product = torch.mm(P.view(R * H, n), inputs.columns.t() if inputs.rows is None else inputs.rows)
        inputs.split.gradients(product, g["0.weight"].view(R * H, D), bias)     # dP [X_v; 1]^T
        a = parts["a"][:, :, :C, :H].sum(1)
        if self.layout["offsetl2"]:
            mu_name, alpha_name = self.head
            w, mu = head[0], self.params[mu_name]
            b = parts["b"][:, :, :C, :H].sum(1)
            if offsetl2_kernel(self.precision) != "direct":   # a = sum g_s h, b = sum g_s h^2, q = sum g_s
                q = parts["db2"][:, :, :C].sum(1).unsqueeze(2)
                a, b = a - mu * q, b - 2 * mu * a + mu * mu * q
            g[mu_name].copy_(-2 * w * a)        # a = sum g_s (h - mu), b = sum g_s (h - mu)^2
            g[alpha_name].copy_(alpha_gradient(self.params[alpha_name], b, self.form))
        else:
            weight_name, bias_name = self.head
            g[weight_name].copy_(a)
            if bias_name in g:
                torch.sum(parts["db2"][:, :, :C], 1, out=g[bias_name])
        return parts["loss"].sum(1) / n, parts["correct"].sum(1)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor) -> list[torch.Tensor]:
        """``[logits [R, C, n]]`` for the shared input ``x_t [D, n]``, in the mode's precision."""
        P = self._first_layer(x_t, "eval")
        head = self._head_weights()
        logits = torch.empty(P.shape[0], head[0].shape[1], P.shape[2], dtype=torch.float32, device=P.device)
        self._launch(P, head, None, logits)
        return [logits]

