"""The fused step (Triton; under Triton's interpreter on the CPU) against the hand-written one."""

import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from distrep import fused
from distrep.data import load_dataset
from distrep.engine import FusedRuns, engine_path, stack_parameters
from distrep.errors import DistrepError
from distrep.fused import fused_layout, interpreting, triton
from distrep.models import ALIASES, create_model, parse
from distrep.sweep import Sweep, SweepConfig, describe_model
from tests.test_engine import EXACT_ZEROS, alpha_off_its_start, assert_zero_where_autograds_is, exact_zeros

pytestmark = pytest.mark.skipif(triton is None, reason="Triton is not installed")
# On the CPU the kernel runs under Triton's interpreter (conftest switches it on where there is
# no GPU); on a GPU machine tests/test_cuda.py checks the compiled kernel instead.
interpreted = pytest.mark.skipif(not interpreting(), reason="Triton's interpreter is off (GPU machine)")

# Beyond the paper's names: two output activations after a bias, no hidden activation, a width
# that is not a power of two (the kernel pads it), both OffsetL2 forms, a first layer without a
# bias (its product then has no row of ones).
EXTRA = ["linear-abs-linear+bias-neg-relu", "linear-identity-linear-abs", "linear-offsetl2-abs-neg",
         "linear+nobias-relu-linear+bias-neg"]


BLOCK_N = 32          # examples per block in the tests, every precision


@pytest.fixture(autouse=True)
def two_blocks_per_program(monkeypatch):
    for precision in fused.SHAPES:
        monkeypatch.setitem(fused.SHAPES, precision, (BLOCK_N, 4, 2, 3))


@pytest.fixture(scope="module")
def data():
    """Two full blocks of examples and a partial one, over two programs per run of two blocks
    each (the second's second block is empty); 100 test examples."""
    d = load_dataset("mnist", "standardized")
    return replace(d.subset(2 * BLOCK_N + 6), x_test=d.x_test[:100], y_test=d.y_test[:100])


def run(data, models, engine, **kw):
    cfg = SweepConfig(models=models, **{"runs": 2, "epochs": 4, "eval_every": 2, "width": 20,
                                        "engine": engine, **kw})
    return Sweep(cfg, data, progress=False).run()


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_the_fused_step_covers_the_paper_and_only_what_it_can():
    assert all(fused_layout(parse(m)) is not None for m in ALIASES)
    for spec in ["linear-relu-linear-relu-linear", "linear-tanh-linear+bias", "linear-relu-rbf-neg",
                 "linear-relu-linear-abs-neg-relu", "offsetl2-relu-linear", "linear-relu-relu-linear"]:
        assert fused_layout(parse(spec)) is None, spec
        with pytest.raises(DistrepError, match="fused engine covers"):
            engine_path(parse(spec), "fused")
    layout = fused_layout(parse("Abs2-Neg-Bias"))
    assert layout["hidden"] == 2 and layout["head_bias"] and layout["post"] == (2, 3)


def test_auto_takes_the_fused_step_on_cuda_where_it_covers_the_model(monkeypatch):
    """No CUDA call is made: the decision reads the device's type only."""
    assert engine_path(parse("ReLU"), "auto", "cuda") == "fused"
    assert engine_path(parse("Abs-L2-Neg"), "auto", torch.device("cuda", 0)) == "fused"
    assert engine_path(parse("ReLU"), "auto", "cpu") == "hand-written"          # interpreter or not
    assert engine_path(parse("linear-relu-linear-relu-linear"), "auto", "cuda") == "hand-written"
    assert engine_path(parse("linear-relu-rbf-neg"), "auto", "cuda") == "autograd"
    assert engine_path(parse("ReLU"), "hand-written", "cuda") == "hand-written"
    monkeypatch.setattr("distrep.fused.triton", None)
    assert engine_path(parse("ReLU"), "auto", "cuda") == "hand-written"


def test_the_fused_step_takes_only_models_the_gpu_has_room_for(monkeypatch):
    """Its shared memory grows with the width: up to MAX_WIDTH units and MAX_CLASSES classes,
    and on a GPU only what its shared memory holds, the fused step; past that `auto` takes the
    hand-written step and `--engine fused` says why in one line. Here a GPU with 99 KB per block
    (an RTX 4090's), which holds the paper's width (60 KB) but not 256 units (117 KB), after an
    H100's 227 KB (the GPU's figure stubbed: on any machine, without one)."""
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fused, "max_shared_memory", lambda device: 232_448)
    assert engine_path(parse("ReLU", fused.MAX_WIDTH), "auto", "cuda") == "fused"
    for wide in (parse("ReLU", fused.MAX_WIDTH + 1), parse("ReLU-L2", 128, num_classes=fused.MAX_CLASSES + 1)):
        assert engine_path(wide, "auto", "cuda") == "hand-written"
        with pytest.raises(DistrepError, match=r"takes hidden layers of up to 256 units and up to 16 classes"):
            engine_path(wide, "fused", "cuda")
    assert fused.shared_memory_bound(128, 10) == 59_904 and fused.shared_memory_bound(256, 10) == 117_248
    monkeypatch.setattr(fused, "max_shared_memory", lambda device: 101_376)
    assert engine_path(parse("ReLU", 128), "auto", "cuda") == "fused"
    assert engine_path(parse("ReLU", 256), "auto", "cuda") == "hand-written"
    assert engine_path(parse("ReLU", 256), "auto", "cpu") == "hand-written"
    with pytest.raises(DistrepError, match=r"at width 256 needs up to 117,248 bytes of shared memory "
                                           r"per block, more than this GPU's 101,376; use --engine hand-written"):
        engine_path(parse("ReLU", 256), "fused", "cuda")
    # and config.json, the memory plan and the precision checks read the model at its width
    monkeypatch.setattr("distrep.sweep.check_protocol", lambda config: torch.device("cuda"))
    with pytest.raises(DistrepError, match=r"ReLU \(hand-written\)"):
        SweepConfig(models=["ReLU"], width=256, precision="3xtf32", device="cuda").validate()
    SweepConfig(models=["ReLU"], width=128, precision="3xtf32", device="cuda").validate()
    entry = describe_model(SweepConfig(models=["ReLU"], width=256, device="cuda"), "ReLU", torch.device("cuda"))
    assert entry["engine_path"] == "hand-written"
    from distrep.sweep import bytes_per_run
    monkeypatch.setattr("distrep.sweep.resolve_device", lambda device: torch.device("cuda"))
    data = load_dataset("mnist", "standardized").subset(64)
    plan = Sweep(SweepConfig(models=["ReLU"], width=256, device="cuda"), data, progress=False).memory_plan()[1]
    assert plan == [bytes_per_run("ReLU", 256, len(data.y_test), 784, 10, "hand-written", "cuda", "fp32")]


@interpreted
def test_a_kernel_the_gpu_cannot_hold_is_a_one_line_error(data, monkeypatch):
    """Should a GPU or a Triton refuse the kernel at its launch all the same (Triton raises
    OutOfResources there), the fused step says so in one line, not a traceback."""
    def refuse(*args, **kwargs):
        raise fused.OutOfResources(300_000, 232_448, "shared memory")

    group = FusedRuns.from_state(parse("ReLU", 20), stack_parameters([create_model("ReLU", 20, seed=0)]))
    monkeypatch.setattr(fused, "_head_kernel", {(1, 1): refuse})
    with pytest.raises(DistrepError, match=r"^the fused kernel at width 20 with 10 classes in fp32 needs "
                                           r"300,000 of shared memory where this GPU has 232,448; "
                                           r"use --engine hand-written$"):
        group.gradients(data.x_train[:40].t().contiguous(), data.y_train[:40])


@interpreted
@pytest.mark.parametrize("names", [list(ALIASES)[:9], list(ALIASES)[9:] + EXTRA])
def test_every_covered_model_matches_the_hand_written_step(names, data):
    """4 epochs of 2 runs each, fp32: losses, test accuracy and every parameter agree with the
    hand-written step (itself checked against the reference trainer) to fp32 rounding."""
    assert_trains_as_the_hand_written_step(data, names)


def assert_trains_as_the_hand_written_step(data, names, precision: str = "fp32") -> None:
    """The fused step (4 epochs of 2 runs, in ``precision``) against the hand-written one in
    fp32: losses and parameters to 2e-6 relative, train and test accuracy exactly."""
    for f, h in zip(run(data, names, "fused", precision=precision), run(data, names, "auto")):
        assert relative(f.arrays["train_loss"], h.arrays["train_loss"]) < 2e-6, f.name
        np.testing.assert_array_equal(f.arrays["train_acc"], h.arrays["train_acc"])
        np.testing.assert_array_equal(f.arrays["test_acc"], h.arrays["test_acc"])
        for name, p in h.params.items():
            assert relative(f.params[name], p) < 2e-6, (f.name, name)


@interpreted
def test_each_precision_runs_its_own_shape(data, monkeypatch):
    """fused.SHAPES is per precision: fp32 at 16 examples per block, 1 warp, 2 blocks per
    program and one pipeline stage cuts each run's 70 examples into 3 programs (bf16, at 32 x 4
    x 2 x 3, into 2), and trains as the hand-written step all the same."""
    monkeypatch.setitem(fused.SHAPES, "fp32", (16, 1, 2, 1))
    assert fused.compile_options("fp32") == {"num_warps": 1, "num_stages": 1}
    assert fused.compile_options("bf16") == {"num_warps": 4, "num_stages": 3}
    n = len(data.y_train)
    assert (fused.programs_per_run(n, "fp32"), fused.programs_per_run(n, "bf16")) == (3, 2)
    cfg = SweepConfig(models=["ReLU2"], runs=2, epochs=1, width=20, engine="fused")
    sweep = Sweep(cfg, data, progress=False)
    trainer, (group,) = sweep.chunk_trainer(sweep.chunks()[0])
    P = group._first_layer(data.x_train.t().contiguous(), "train")
    parts = group._launch(P, group._head_weights(), data.y_train, None)
    assert parts["loss"].shape == (2, 3)
    assert_trains_as_the_hand_written_step(data, ["ReLU2", "Abs-L2-Neg"])


@interpreted
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_weight_gradient_may_read_the_input_held_example_major(data, precision, monkeypatch):
    """GRADIENT_OPERAND "rows": training's input is held example-major too, the weight gradient
    reads it (a wrong layout there would not train as the hand-written step), the memory plan
    counts the copy, and the test pass's operand has none."""
    cfg = SweepConfig(models=["ReLU2", "Abs-L2-Neg"], runs=2, epochs=1, width=20, engine="fused",
                      precision=precision)
    columns = Sweep(cfg, data, progress=False).memory_plan()[0]
    monkeypatch.setitem(fused.GRADIENT_OPERAND, precision, "rows")
    sweep = Sweep(cfg, data, progress=False)
    size = 2 if precision == "bf16" else 4
    assert sweep.memory_plan()[0] - columns == size * len(data.y_train) * (data.num_features + 8)
    trainer, groups = sweep.chunk_trainer(sweep.chunks()[0])
    x_t = data.x_train.t().contiguous()
    x_bf16 = x_t.bfloat16() if precision == "bf16" else None
    trainer.step(x_t, data.y_train, 1e-3, [torch.zeros(2, dtype=torch.bool) for _ in groups], x_bf16)
    trainer.evaluate(data.x_test.t().contiguous(), data.y_test)
    inputs = groups[0].inputs
    assert inputs["train"].rows.shape == inputs["train"].columns.t().shape
    assert inputs["train"].rows.element_size() == size and inputs["eval"].rows is None
    assert groups[0].grads["0.weight"].abs().max() > 0
    inputs["train"].rows.zero_()            # the weight gradient reads the rows: now it is 0
    trainer.step(x_t, data.y_train, 1e-3, [torch.zeros(2, dtype=torch.bool) for _ in groups], x_bf16)
    assert all(g.grads["0.weight"].abs().max() == 0 for g in groups)
    if precision == "fp32":
        assert_trains_as_the_hand_written_step(data, ["ReLU2", "Abs-L2-Neg"])


@interpreted
def test_the_fused_step_splits_each_input_once(data, monkeypatch):
    """The features that vary over an input (its first-layer operand) are found once per input
    tensor, not once per step, per test pass or per variant (a chunk's fused variants share the
    operand): the training images, the test images, and the training images again for the
    final pass, however many epochs."""
    from distrep.constant_features import FeatureSplit
    splits = []
    of = FeatureSplit.of
    monkeypatch.setattr(FeatureSplit, "of", classmethod(lambda cls, x: splits.append(x.shape) or of(x)))
    for epochs in (2, 4):
        splits.clear()
        run(data, ["ReLU", "Abs2-Neg", "ReLU-L2"], "fused", epochs=epochs, eval_every=1)
        assert splits == [data.x_train.t().shape, data.x_test.t().shape, data.x_train.t().shape,
                          data.x_test.t().shape], epochs


@interpreted
def test_a_test_pass_leaves_the_training_steps_buffers_where_they_were(data):
    """A CUDA graph replays a step at the addresses it recorded, so a test pass (whose input
    has its own constant features, so other shapes) must not reallocate what a step uses."""
    x_test = data.x_test.t().contiguous()
    x_test[:5] = 0.25                               # constant features the training images lack
    cfg = SweepConfig(models=["ReLU"], runs=2, epochs=1, width=20, engine="fused")
    sweep = Sweep(cfg, data, progress=False)
    trainer, (group,) = sweep.chunk_trainer(sweep.chunks()[0])
    x_t, frozen = data.x_train.t().contiguous(), [torch.zeros(2, dtype=torch.bool)]
    trainer.step(x_t, data.y_train, 1e-3, frozen)
    before = {key: buf.data_ptr() for key, buf in group._buffers.items()}
    trainer.evaluate(x_test, data.y_test)
    trainer.step(x_t, data.y_train, 1e-3, frozen)
    assert {key: group._buffers[key].data_ptr() for key in before} == before


def test_tf32_halves_are_exact_operands_whose_three_products_keep_fp32s_accuracy():
    """3xtf32's products on the CPU, as cuBLAS and the kernel run them on tensor cores: hi and lo
    carry no bit below TF32's 11 significant bits (so every product of two of them is exact in
    fp32), hi + lo = x to 2^-22 |x|, and lo b_hi + hi b_lo + hi b_hi (fp32 sums) comes as close
    to the exact product as IEEE fp32 (measured: 1.0e-7 against 1.2e-7 of sum |a||b|), where
    the high halves alone (one TF32 product) and the products without either cross term are
    hundreds of times farther (5e-5 to 8e-5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 300, generator=g) * torch.logspace(-20, 20, 300)
    hi, lo = fused.tf32_halves(x)
    for half in (hi, lo):
        assert (half.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((hi.double() + lo.double() - x.double()).abs() <= 2.0 ** -22 * x.double().abs()).all()
    assert torch.equal(fused.round_to_tf32(hi), hi)
    assert fused.round_to_tf32(torch.tensor([1 + 2 ** -11])).item() == 1 + 2 ** -10      # a tie: away from 0

    a, b = torch.randn(300, 400, generator=g), torch.rand(400, 500, generator=g)   # b >= 0: pixels
    exact = a.double() @ b.double()
    scale = (a.double().abs() @ b.double().abs()).max()
    (a_hi, a_lo), (b_hi, b_lo) = fused.tf32_halves(a), fused.tf32_halves(b)
    error = {name: float((product.double() - exact).abs().max() / scale) for name, product in {
        "ieee": a @ b,
        "3xtf32": torch.cat([a_lo, a_hi, a_hi], 1) @ torch.cat([b_hi, b_lo, b_hi]),  # as the first layer
        "high": a_hi @ b_hi, "no a_lo": a_hi @ b_lo + a_hi @ b_hi, "no b_lo": a_lo @ b_hi + a_hi @ b_hi,
    }.items()}
    assert error["3xtf32"] < 2 * error["ieee"], error
    for name in ("high", "no a_lo", "no b_lo"):
        assert error[name] > 100 * error["3xtf32"], (name, error)


@interpreted
def test_3xtf32_trains_as_the_hand_written_fp32_step(data):
    """--precision 3xtf32: the first layer's two products through cuBLAS (here torch.mm) on the
    TF32 halves of the folded weight, of the input, and of dP (which the kernel writes as its
    halves), and a linear output layer's three in the kernel, every product exact in the fp32
    accumulator, so the interpreter computes what the GPU does but for the order of the sums.
    Within 2e-6 of the hand-written fp32 step after 4 epochs, as the IEEE kernel is (each
    gradient's own check: the next test)."""
    names = ["ReLU", "Abs2-Neg", "ReLU2-Neg-Bias", "linear-abs-linear+bias-neg-relu",
             "linear+nobias-relu-linear+bias-neg", "linear-identity-linear-abs", "ReLU-L2"]
    assert_trains_as_the_hand_written_step(data, names, "3xtf32")


def one_step_gradients(data, names, precision):
    """Each model's gradients (2 runs) of one fused step in ``precision`` from its first
    parameters."""
    x_t, y = data.x_train.t().contiguous(), data.y_train
    cfg = SweepConfig(models=names, runs=2, epochs=1, width=20, engine="fused", precision=precision)
    sweep = Sweep(cfg, data, progress=False)
    _, groups = sweep.chunk_trainer(sweep.chunks()[0])
    for group in groups:
        group.gradients(x_t, y)
    return [{k: v.clone() for k, v in group.grads.items()} for group in groups]


@interpreted
def test_3xtf32_gradients_are_fp32s(data):
    """One step's gradients in 3xtf32 against the fused fp32 step's, from the same parameters:
    within 5e-6 relative in every tensor (measured: at most 9e-7). Each of the first layer's
    low halves left out (the weight's, the input's, dP's) moves some gradient by 2e-4 or more
    (2e-4 to 4e-2, measured), as a product in TF32 alone would."""
    names = ["ReLU", "Abs2-Neg", "ReLU2-Neg-Bias", "linear+nobias-relu-linear+bias-neg", "ReLU-L2"]
    fp32, three = one_step_gradients(data, names, "fp32"), one_step_gradients(data, names, "3xtf32")
    for name, ours, theirs in zip(names, three, fp32):
        for k in theirs:
            assert relative(ours[k], theirs[k]) < 5e-6, (name, k)


@interpreted
def test_fp32_may_run_its_output_layer_in_three_tf32_passes(data, monkeypatch):
    """HEAD_PRODUCTS["fp32"] = "3xtf32": a linear output layer's three small products run as
    three TF32 products of exact halves (DOT 3) while the first layer's stay IEEE fp32 (dP
    written whole: no split) and OffsetL2's distances direct (its step the same bits). One
    step's gradients within 5e-6 relative of IEEE fp32's in every tensor (measured: at most
    3.4e-7), and 4 epochs as the hand-written fp32 step. fp32 takes no other value."""
    names = ["ReLU", "Abs2-Neg", "ReLU2-Neg-Bias", "linear+nobias-relu-linear+bias-neg", "ReLU-L2"]
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", "ieee")
    ieee = one_step_gradients(data, names, "fp32")
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", "3xtf32")             # the default
    meta = {m: fused.kernel_constants(fused_layout(parse(m)), "paper", 128, 10, True, "fp32")
            for m in ("ReLU", "ReLU-L2")}
    assert (meta["ReLU"]["DOT"], meta["ReLU"]["SPLIT_DP"], meta["ReLU-L2"]["DOT"]) == (3, False, 0)
    for name, ours, theirs in zip(names, one_step_gradients(data, names, "fp32"), ieee):
        distance = max(relative(ours[k], theirs[k]) for k in theirs)
        assert (distance == 0) if name == "ReLU-L2" else (0 < distance < 5e-6), (name, distance)
    assert_trains_as_the_hand_written_step(data, names[:4], "fp32")
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", "tf32")
    with pytest.raises(DistrepError, match="fused step in fp32 runs its output layer's products as ieee or 3xtf32"):
        fused.head_products("fp32")


def test_3xtf32_is_the_fused_steps_and_splits_every_product():
    def meta(model, precision, train=True):
        layout = fused_layout(parse(model))
        return fused.kernel_constants(layout, "paper", 128, 10, train, precision)

    assert meta("ReLU", "3xtf32")["DOT"] == meta("Abs2-Neg-Bias", "3xtf32")["DOT"] == 3
    assert meta("ReLU-L2", "3xtf32")["DOT"] == 0                                         # direct
    # fp32's output layer in three TF32 passes by default (HEAD_PRODUCTS), its dP whole
    assert meta("ReLU", "fp32")["DOT"] == 3 and not meta("ReLU", "fp32")["SPLIT_DP"]
    assert meta("ReLU-L2", "3xtf32")["HEAD"] == 1 and meta("ReLU", "3xtf32")["ROUND"] == 0
    assert meta("ReLU", "3xtf32")["SPLIT_DP"] and meta("ReLU-L2", "3xtf32")["SPLIT_DP"]
    assert not meta("ReLU", "3xtf32", train=False)["SPLIT_DP"] and not meta("ReLU", "tf32")["SPLIT_DP"]
    on_the_cpu = (r"3xtf32 is a precision of the fused step.*ReLU \(hand-written\), "
                  r"ReLU-RBF-Neg \(autograd\); use fp32")
    with pytest.raises(DistrepError, match=on_the_cpu):
        SweepConfig(models=["ReLU", "ReLU-RBF-Neg"], precision="3xtf32").validate()
    # dP's low half is memory the plan counts: one more [H, n] fp32 per run, beside the
    # folded weight's halves and the temporaries of its [H, kp] products (kp <= 784 + 8)
    from distrep.sweep import bytes_per_run
    assert (bytes_per_run("ReLU", 128, 1000, 784, 10, "fused", "cuda", "3xtf32")
            - bytes_per_run("ReLU", 128, 1000, 784, 10, "fused", "cuda", "fp32")
            == 4 * 128 * 1000 + 4 * 128 * 792 * 9)


@interpreted
@pytest.mark.parametrize("precision", ["fp32", "bf16", "3xtf32"])
def test_the_memory_plan_counts_every_buffer_the_fused_step_keeps(precision):
    """The fused step keeps a test pass's buffers beside training's (its first layer's output
    for each input, the folded weight for each, in 3xtf32 their halves and dP's low half), so
    the plan counts both sets, not the larger one, and a test pass's as the final pass over the
    training images needs them (up to EVAL_BATCH examples at once): after a step and both
    passes, what each variant holds stays within its runs' share of the plan, and the shared
    operands (each input's, with its halves in 3xtf32) within the plan's fixed part beyond the
    data. A plan sized at max(train, test) examples, at the test set for a test pass, or without
    the [H, kp] buffers, falls short."""
    full = load_dataset("mnist", "standardized")      # a final pass larger than the [H, kp] buffers
    data = replace(full.subset(6000), x_test=full.x_test[:100], y_test=full.y_test[:100])
    models = ["ReLU-Bias", "Abs"]     # (an OffsetL2 head keeps the same buffers, interpreted slowly)
    cfg = SweepConfig(models=models, runs=1, epochs=1, width=20, engine="fused", precision=precision)
    sweep = Sweep(cfg, data, progress=False)
    trainer, groups = sweep.chunk_trainer(sweep.chunks()[0])
    x_t = data.x_train.t().contiguous()
    frozen = [torch.zeros(1, dtype=torch.bool) for _ in groups]
    trainer.step(x_t, data.y_train, 1e-3, frozen)
    trainer.evaluate(data.x_test.t().contiguous(), data.y_test)
    trainer.evaluate(x_t, data.y_train)                  # the final pass, over the training images
    if precision == "3xtf32":           # the input's halves are made once, kept with the input
        halves = groups[0].inputs["train"].column_halves
        trainer.step(x_t, data.y_train, 1e-3, frozen)
        assert groups[0].inputs["train"].column_halves is halves

    def size(tensors) -> int:
        unique = {t.data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(unique.values())

    fixed, per_run = sweep.memory_plan()
    for group, cost in zip(groups, per_run):
        held = size([*group._buffers.values(), *group.params.values(), *group.grads.values()])
        assert held <= group.runs * cost, (group.specs, held, group.runs * cost)
    operands = [t for v in groups[0].inputs.values()
                for t in [v.columns, *([v.column_halves] if precision == "3xtf32" else [])]]
    assert all(g.inputs is groups[0].inputs for g in groups)        # one copy per chunk
    n_train, n_test, D, H = len(data.y_train), len(data.y_test), data.num_features, 20
    assert size(operands) <= fixed - 3 * 4 * (n_train + n_test) * D   # beyond the CPU's 3 copies
    # the plan's first-layer outputs: one [H, n] per input, bf16 in bf16
    P = groups[0]._buffers["eval"]
    assert P.shape == (1, H, n_train) and P.element_size() == (2 if precision == "bf16" else 4)
    from distrep.sweep import bytes_per_run
    assert (bytes_per_run("ReLU", H, n_train, D, 10, "fused", "cpu", precision, n_eval=n_test)
            - bytes_per_run("ReLU", H, n_train, D, 10, "fused", "cpu", precision)
            == P.element_size() * H * n_test + 4 * 10 * n_test)


@pytest.mark.parametrize("precision", ["fp32", "3xtf32"])
def test_the_pipelined_order_of_the_fused_phases_trains_the_same_bits(data, precision):
    """The pipelined schedule (DISTREP_CUDA_STREAMS=pipeline) calls each variant's three phases
    (Trainer.fused_phases: product, kernel, rest with the update) with variant i + 1's product
    and kernel before variant i's rest. Variants share no buffer they write (only the input's
    operand, which they read), so in that order the step trains what Trainer.step trains, bit
    for bit (in 3xtf32 too, whose dP low half is a buffer per variant); a diverging run is
    frozen the same way."""
    models = ["ReLU", "Abs2-Neg", "ReLU-L2"]
    cfg = SweepConfig(models=models, runs=2, epochs=3, width=20, engine="fused", precision=precision).validate()
    x_t, y = data.x_train.t().contiguous(), data.y_train
    trained = []
    for pipelined in (False, True):
        sweep = Sweep(cfg, data, progress=False)
        sweep.params[1] = sweep.initial_params(1)
        sweep.params[1]["2.weight"][1] *= 1e38          # Abs2-Neg's run 1 overflows at once
        trainer, groups = sweep.chunk_trainer(sweep.chunks()[0])
        frozen = [torch.zeros(g.runs, dtype=torch.bool) for g in groups]
        stats = []
        for _ in range(3):
            if not pipelined:
                stats.append(trainer.step(x_t, y, 0.01, frozen))
                continue
            phases = [trainer.fused_phases(gi, x_t, y, 0.01, frozen) for gi in range(len(groups))]
            step = []
            for i in range(len(groups) + 1):
                if i < len(groups):
                    phases[i][0]()
                    phases[i][1]()
                if i > 0:
                    step.append(phases[i - 1][2]())
            stats.append(step)
        trained.append((stats, [g.state() for g in groups], frozen))
    (stats_a, params_a, frozen_a), (stats_b, params_b, frozen_b) = trained
    assert [f.tolist() for f in frozen_a] == [f.tolist() for f in frozen_b] == [
        [False, False], [False, True], [False, False]]
    for step_a, step_b in zip(stats_a, stats_b):
        for (loss_a, correct_a), (loss_b, correct_b) in zip(step_a, step_b):
            torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(correct_a, correct_b)
    for group_a, group_b in zip(params_a, params_b):
        for name in group_a:
            assert torch.equal(group_a[name], group_b[name]), name


def fused_grammar() -> list[str]:
    """Every model the fused step covers, as spec strings: each hidden activation (or none) x
    each output layer (linear, linear with a bias, OffsetL2) x each chain of up to MAX_POST
    output activations (identity alone: in a pair it is its other member), the first layer's
    bias dropped in every other one."""
    hidden = [None] + [a for a in fused.HIDDEN if a != "identity"]
    acts = [a for a in fused.POST if a != "identity"]
    chains = [()] + [("identity",)] + [c for k in range(1, fused.MAX_POST + 1)
                                       for c in itertools.product(acts, repeat=k)]
    specs = [[h, head, *chain] for h in hidden for head in ("linear", "linear+bias", "offsetl2")
             for chain in chains]
    return ["-".join(["linear+nobias" if i % 2 else "linear"] + [t for t in spec if t])
            for i, spec in enumerate(specs)]


@interpreted
@pytest.mark.parametrize("products", ["ieee", "3xtf32"])
def test_every_model_the_fused_step_covers_matches_autograd(products, data, monkeypatch):
    """One fused fp32 step of each model of the fused step's grammar (fused_grammar: 126, all of
    them, not the paper's 18) against PyTorch's autograd in float64 on the same nn.Module: the
    loss, the correct count and every parameter's gradient, and the test pass's logits. The
    kernel picks its code per model at compile time and reuses its registers and its buffers
    (dL/dP over P) within a step, so any chain could go wrong alone. 3 classes (padded to 16)
    and 40 examples (a block and a part) keep the interpreter to ~12 s; OffsetL2 in the paper's
    and the coded form in turn, its scales off their start at 1 (alpha_off_its_start). With a
    linear output layer's products in three TF32 passes (HEAD_PRODUCTS, linear heads only:
    OffsetL2's step does not change) too. Measured, every gradient relative to its largest
    entry: at most 9.2e-7 (IEEE, an OffsetL2 model), 8.1e-7 (three passes); 5e-6 asserted."""
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", products)
    specs = fused_grammar()
    assert len(specs) == 3 * 3 * (2 + 3 + 9) and all(fused_layout(parse(s)) for s in specs)
    if products != "ieee":
        specs = [spec for spec in specs if "offsetl2" not in spec]
    x, y = data.x_train[:40], data.y_train[:40] % 3
    x_t = x.t().contiguous()
    for i, spec in enumerate(specs):
        form = "coded" if "offsetl2" in spec and i % 2 else "paper"
        nets = [alpha_off_its_start(create_model(spec, 20, num_classes=3, offsetl2_form=form, seed=seed), seed)
                for seed in (0, 1)]
        runs = FusedRuns.from_state(nets[0].layer_specs, stack_parameters(nets), form)
        loss, correct = runs.gradients(x_t, y)
        logits = runs.forward(x_t)[0]
        for r, model in enumerate(nets):
            model.double()
            out = model(x.double())
            reference = torch.nn.functional.cross_entropy(out, y)
            reference.backward()
            assert abs(float(loss[r]) - reference.item()) < 5e-6 * reference.item(), (spec, r)
            assert int(correct[r]) == int((out.argmax(1) == y).sum()), (spec, r)
            assert close(logits[r].t(), out.detach()), (spec, r, "logits")
            for name, p in model.named_parameters():
                assert close(runs.grads[name][r], p.grad), (spec, form, r, name)


@interpreted
@pytest.mark.parametrize("spec, form", EXACT_ZEROS)
def test_derivatives_at_exactly_zero_are_autograds(spec, form, data):
    """Where an activation or a distance is exactly 0 the fused step takes the subgradient
    autograd takes: abs and relu 0 (a unit whose pre-activation is 0 gets no gradient; the
    hand-written step's sign(h) too), OffsetL2's 0 at its prototype; and the coded form's
    distance there is its clamp's sqrt(1e-12), the paper's 0."""
    x, y = data.x_train[:40], data.y_train[:40] % 3
    nets = [exact_zeros(spec, form, seed) for seed in (0, 1)]
    runs = FusedRuns.from_state(nets[0].layer_specs, stack_parameters(nets), form)
    runs.gradients(x.t().contiguous(), y)
    logits = runs.forward(x.t().contiguous())[0]
    for r, model in enumerate(nets):
        model.double()
        out = model(x.double())
        torch.nn.functional.cross_entropy(out, y).backward()
        assert close(logits[r].t(), out.detach()), (spec, r)
        for name, p in model.named_parameters():
            assert close(runs.grads[name][r], p.grad), (spec, r, name)
    assert_zero_where_autograds_is(spec, form, runs.grads, logits[:, 0].abs())   # |logit 0|: neg or not


def close(a, b, tol: float = 5e-6) -> bool:
    """``a`` within ``tol`` of ``b`` relative to b's largest entry; exactly where b is all zero
    (a model whose output activations zero every logit, e.g. offsetl2-neg-relu)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool((a - b).abs().max() <= tol * b.abs().max())


@interpreted
def test_the_coded_offsetl2_form_matches_too(data):
    models = ["ReLU-L2", "Abs-L2-Neg"]
    for f, h in zip(run(data, models, "fused", offsetl2_form="coded"),
                    run(data, models, "auto", offsetl2_form="coded")):
        assert relative(f.arrays["train_loss"], h.arrays["train_loss"]) < 2e-6, f.name
        for name, p in h.params.items():
            assert relative(f.params[name], p) < 2e-6, (f.name, name)


@interpreted
@pytest.mark.parametrize("kernel", ["expanded", "hybrid"])
def test_the_other_offsetl2_kernels_match_too(kernel, data, monkeypatch):
    """The kernel's OffsetL2 forms with products (fp32 products under the interpreter)."""
    monkeypatch.setitem(fused.OFFSETL2_KERNEL, "fp32", kernel)
    models = ["ReLU-L2", "Abs-L2-Neg", "linear-offsetl2-abs-neg"]
    for form in ("paper", "coded"):
        for f, h in zip(run(data, models, "fused", offsetl2_form=form),
                        run(data, models, "auto", offsetl2_form=form)):
            assert relative(f.arrays["train_loss"], h.arrays["train_loss"]) < 1e-5, (form, f.name)
            for name, p in h.params.items():
                assert relative(f.params[name], p) < 1e-5, (form, f.name, name)


@interpreted
def test_each_precision_takes_its_own_offsetl2_kernel(data, monkeypatch):
    """The kernel and the gradients' assembly read the same precision's entry: in bf16 the
    expanded kernel gives the direct kernel's gradients to bf16's rounding of its products'
    operands (h, w, w mu, g_s: a few 2^-8, emulated under the interpreter) for both forms of
    OffsetL2; an assembly that read another precision's entry is off by O(1)."""
    x_t = data.x_train.t().contiguous()

    def gradients(model, form):
        cfg = SweepConfig(models=[model], runs=2, epochs=1, width=20, engine="fused",
                          precision="bf16", offsetl2_form=form)
        sweep = Sweep(cfg, data, progress=False)
        _, (group,) = sweep.chunk_trainer(sweep.chunks()[0])
        group.gradients(x_t, data.y_train, x_t.bfloat16())
        return group.grads

    for model, form in [("ReLU-L2", "paper"), ("Abs-L2-Neg", "coded")]:
        with monkeypatch.context() as m:
            m.setitem(fused.OFFSETL2_KERNEL, "bf16", "direct")
            direct = gradients(model, form)
        with monkeypatch.context() as m:
            m.setitem(fused.OFFSETL2_KERNEL, "bf16", "expanded")
            expanded = gradients(model, form)
        for name, g in direct.items():
            assert relative(expanded[name], g) < 3e-2, (model, name)


UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "tf32": 2.0 ** -11}


def operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t rounded to the mode's product operands on the host (bf16, or TF32's 11 bits), in fp64."""
    if precision == "bf16":
        return t.bfloat16().double()
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).double()


def distances_near_a_prototype(data, precision: str, device: str = "cpu",
                               width: int = 20) -> tuple[float, float]:
    """Every prototype 10^-3 |h| from example 0's own hidden activation h (a bias that keeps h
    off the operands' grid): (largest error of the kernel's squared distance s over its bound,
    the same for the expanded sum with h^2 rounded once to an operand, computed on the host).
    The bound is what rounding h, w and w mu to the mode's operands moves s by,
    6u sqrt(s sum w h^2) + u s + 9u^2 sum w h^2 (|w' - w| <= u w, |h' - h| <= u h,
    |mu' - mu| <= 2u mu); the true s ~ 1e-6 sum w h^2."""
    from distrep.sweep import matmul_precision
    cfg = SweepConfig(models=["ReLU-L2"], runs=2, epochs=1, width=width, engine="fused",
                      precision=precision, device=device)
    sweep = Sweep(cfg, data, progress=False)
    _, (group,) = sweep.chunk_trainer(sweep.chunks()[0])
    x_t = data.x_train.t().contiguous().to(device)
    b1 = group.params["0.bias"]
    b1.copy_(0.1 * torch.randn(b1.shape, generator=torch.Generator().manual_seed(0)))
    with matmul_precision(precision, torch.device(device)):
        h = torch.relu(group._first_layer(x_t, "eval").float())    # the bias is in P
        h0 = h[:, :, :1].transpose(1, 2)                          # [R, 1, H] at example 0
        sign = torch.tensor([(-1.0) ** i for i in range(h0.shape[2])], device=device)
        mu = (h0 + 1e-3 * h0.abs() * sign).expand_as(group.params["2.mu"])
        group.params["2.mu"].copy_(mu)
        s = group.forward(x_t)[0][:, :, 0].double() ** 2          # [R, C]
    w = fused.metric_weight(group.params["2.alpha"], "paper").double()
    h0, mu = h0.double(), mu.double()
    true = (w * (h0 - mu) ** 2).sum(2)
    scale = (w * h0 ** 2).sum(2)                                  # sum_i w h^2
    u = UNIT_ROUNDOFF[precision]
    bound = 6 * u * (true * scale).sqrt() + u * true + 9 * u * u * scale
    r = lambda t: operand(t, precision)                           # noqa: E731
    hr, wr, wmu = r(h0), r(w), r(w * mu)
    naive = (wr * r(hr * hr) - 2 * wmu * hr + wmu * wmu / wr).sum(2)
    return ((s - true).abs() / bound).max().item(), ((naive - true).abs() / bound).max().item()


@interpreted
@pytest.mark.parametrize("kernel", ["expanded", "direct"])
def test_distances_near_a_prototype_do_not_cancel_away(kernel, data, monkeypatch):
    """bf16, prototypes 10^-3 |h| from an example's own h (:func:`distances_near_a_prototype`):
    the expanded form (products of exact operands, h^2 split in two; the interpreter emulates
    the rounding) stays within what the mode's rounding of h moves the distance by, where the
    same sum with h^2 rounded once is off by several times that; the direct form is exact."""
    monkeypatch.setitem(fused.OFFSETL2_KERNEL, "bf16", kernel)
    error, naive = distances_near_a_prototype(data, "bf16")
    print(f"\n{kernel}: error / bound {error:.2f}; with h^2 rounded once {naive:.1f}")
    assert error <= 1 and naive > 3, (error, naive)
    if kernel == "direct":
        assert error < 0.01


def test_config_json_records_how_the_kernel_computes_a_fused_models_output_layer(monkeypatch):
    """describe_model writes each model's entry of config.json (describe_sweep's models): the
    OffsetL2 kernel's form, or a linear layer's products."""
    cuda = torch.device("cuda")                 # only its type is read
    config = SweepConfig(models=["ReLU-L2", "ReLU"], engine="auto", precision="bf16")
    l2, relu = (describe_model(config, m, cuda) for m in config.models)
    assert l2["engine_path"] == "fused" and l2["offsetl2_kernel"] == "expanded" and "head_products" not in l2
    assert relu["engine_path"] == "fused" and "offsetl2_kernel" not in relu and relu["head_products"] == "bf16"
    monkeypatch.setitem(fused.OFFSETL2_KERNEL, "bf16", "direct")
    assert describe_model(config, "ReLU-L2", cuda)["offsetl2_kernel"] == "direct"
    fp32 = replace(config, precision="fp32")
    assert describe_model(fp32, "ReLU-L2", cuda)["offsetl2_kernel"] == "direct"
    assert describe_model(fp32, "ReLU", cuda)["head_products"] == "3xtf32"     # measured faster
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", "ieee")
    assert describe_model(fp32, "ReLU", cuda)["head_products"] == "ieee"
    on_cpu = describe_model(config, "ReLU-L2", torch.device("cpu"))
    assert on_cpu["engine_path"] == "hand-written" and "offsetl2_kernel" not in on_cpu
    assert "head_products" not in describe_model(config, "ReLU", torch.device("cpu"))


@interpreted
def test_bf16_keeps_the_first_layer_output_in_bf16_and_trains_close_to_fp32(data, monkeypatch):
    monkeypatch.setitem(fused.MAX_REGISTERS, "bf16", 128)     # a launch option the interpreter takes too
    models = ["ReLU", "Abs-L2"]
    bf16, fp32 = run(data, models, "fused", precision="bf16"), run(data, models, "fused")
    for b, f in zip(bf16, fp32):
        assert not np.array_equal(b.arrays["train_loss"], f.arrays["train_loss"]), b.name
        assert relative(b.arrays["train_loss"], f.arrays["train_loss"]) < 1e-2, b.name
    cfg = SweepConfig(models=["ReLU"], runs=2, epochs=1, width=20, engine="fused", precision="bf16")
    sweep = Sweep(cfg, data, progress=False)
    trainer, (group,) = sweep.chunk_trainer(sweep.chunks()[0])
    x_t = data.x_train.t().contiguous()
    group.gradients(x_t, data.y_train, x_t.bfloat16())
    assert isinstance(group, FusedRuns) and group._buffers["train"].dtype == torch.bfloat16


@interpreted
@pytest.mark.parametrize("precision", ["fp32", "3xtf32"])
def test_a_diverged_run_is_frozen_and_the_others_continue(data, precision):
    cfg = SweepConfig(models=["ReLU2"], runs=3, epochs=6, eval_every=3, width=20, engine="fused",
                      precision=precision).validate()
    s = Sweep(cfg, data, progress=False)
    s.params[0] = s.initial_params(0)
    s.params[0]["2.weight"][1] *= 1e38                 # run 1's logits overflow at once
    broken = s.params[0]["2.weight"][1].clone()
    res = s.run()[0]
    clean = run(data, ["ReLU2"], "fused", runs=3, epochs=6, eval_every=3, precision=precision)[0]
    assert res.diverged.tolist() == [False, True, False] and res.diverged_epoch[1] == 1
    assert torch.equal(res.params["2.weight"][1], broken), "a diverged run is frozen"
    for r in (0, 2):
        np.testing.assert_array_equal(res.arrays["train_loss"][r], clean.arrays["train_loss"][r])
        assert torch.equal(res.params["0.weight"][r], clean.params["0.weight"][r])


@interpreted
def test_offsetl2_divergence_is_caught_and_nan_stays_nan(data):
    res = run(data, ["ReLU-L2"], "fused", epochs=6, lr=1e6)[0]
    finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in res.params.values()]).all(0)
    assert res.diverged.any() and (~finite.numpy() <= res.diverged).all()
    assert np.isnan(res.arrays["train_loss"][res.diverged, -1]).all()


def test_without_a_gpu_or_the_interpreter_the_fused_engine_says_so(monkeypatch, tmp_path):
    from tests.test_cli import assert_one_line_error, distrep
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(DistrepError, match="runs on CUDA"):
        SweepConfig(models=["ReLU"], engine="fused").validate()
    for args in (["sweep", "--models", "ReLU", "--engine", "fused", "--out", tmp_path / "s"],
                 ["bench", "--engine", "auto,fused", "--epochs", 1]):     # before any timing
        assert_one_line_error(distrep(*args), "the fused engine runs on CUDA")
    assert not (tmp_path / "s").exists()
    with pytest.raises(DistrepError, match="fused engine covers"):
        SweepConfig(models=["ReLU", "ReLU-RBF-Neg"], engine="fused").validate()
    monkeypatch.setattr("distrep.fused.triton", None)
    with pytest.raises(DistrepError, match="needs Triton"):
        SweepConfig(models=["ReLU"], engine="fused").validate()


COMPILE = """
import itertools
import os
import re
import triton
print("triton", triton.__version__)
from distrep import fused
from distrep.fused import compile_for_gpu
from distrep.models import TABLE1, TABLE3, parse
cases = [(m, "bf16", True, "paper") for m in TABLE1 + TABLE3] + [
    ("Abs2-Neg-Bias", "tf32", True, "paper"), ("Linear-L2-Neg", "fp32", True, "coded"),
    ("ReLU", "bf16", False, "paper"), ("Abs-L2", "tf32", False, "coded")]
for model, precision, train, form in cases:
    compile_for_gpu(parse(model), precision, train, form)
kernels = [("direct", "ReLU-L2", "bf16", True), ("expanded", "Abs-L2-Neg", "tf32", False),
           ("hybrid", "Abs-L2-Neg", "bf16", True), ("expanded", "ReLU-L2", "bf16", True)]
for kernel, model, precision, train in kernels:
    fused.OFFSETL2_KERNEL[precision] = kernel
    ptx = compile_for_gpu(parse(model), precision, train).asm["ptx"]
print("compiled", len(cases) + len(kernels))
products = r"mma[.]sync[.]aligned[.]\\w+[.]row[.]col[.]f32[.](\\w+)"
print("expanded bf16 products:", sorted(set(re.findall(products, ptx))))
fused.HEAD_PRODUCTS["fp32"] = "ieee"                  # fp32's output layer in IEEE FMAs
for precision in ("fp32", "3xtf32"):
    compile_for_gpu(parse("ReLU"), precision, False)                  # the test pass
    compile_for_gpu(parse("ReLU-L2"), precision, True)
    ptx = compile_for_gpu(parse("Abs2-Neg"), precision, True).asm["ptx"]
    print(f"{precision} products:", sorted(set(re.findall(products, ptx))), len(re.findall(products, ptx)))
fused.HEAD_PRODUCTS["fp32"] = "3xtf32"                # fp32's output layer in three TF32 passes
ptx = compile_for_gpu(parse("Abs2-Neg"), "fp32", True).asm["ptx"]
print("fp32 3xtf32-head products:", sorted(set(re.findall(products, ptx))), len(re.findall(products, ptx)))
fused.HEAD_PRODUCTS["fp32"] = "ieee"
over = []                   # shared memory against its bound, every mode and output layer, at the widest
for precision, model, train in itertools.product(fused.SHAPES, ("ReLU", "ReLU-L2"), (True, False)):
    shared = compile_for_gpu(parse(model, fused.MAX_WIDTH), precision, train).metadata.shared
    if shared > fused.shared_memory_bound(fused.MAX_WIDTH, 10):
        over.append((precision, model, train, shared))
exact = [compile_for_gpu(parse("ReLU", w), "fp32", True).metadata.shared == fused.shared_memory_bound(w, 10)
         for w in (20, 128, 256)]
fused.HEAD_PRODUCTS["fp32"] = "3xtf32"                # and fp32's default, three TF32 passes
over += [("fp32 3xtf32-head", model, train, shared) for model, train in itertools.product(("ReLU", "ReLU-L2"), (True, False))
         if (shared := compile_for_gpu(parse(model, fused.MAX_WIDTH), "fp32", train).metadata.shared)
         > fused.shared_memory_bound(fused.MAX_WIDTH, 10)]
print("shared memory over the bound:", over, "fp32's to the byte:", exact)
fused.MAX_REGISTERS["bf16"] = 128
capped = compile_for_gpu(parse("ReLU2"), "bf16", True)
print("capped:", re.findall(r"[.]maxnreg \\d+", capped.asm["ptx"]), capped.metadata.num_warps)
three = compile_for_gpu(parse("ReLU2"), "fp32", True).metadata
fused.SHAPES["fp32"] = (32, 1, 8, 1)                  # a precision's shape reaches the compiler
one = compile_for_gpu(parse("ReLU2"), "fp32", True).metadata
print("fp32 at 32x1x8x1:", one.num_warps, one.num_stages, one.shared < three.shared, three.num_stages)
"""


# The Triton of the GPU image (torch 2.11's, 3.6 on the H100s and H200s that ran
# scripts/gpu-*.sh) can reject a kernel this machine's compiles: 3.6 needs 16 rows of K in an
# fp32 product where 3.9 takes 8. .ci/run installs it apart (pip --target) and names it here.
GPU_TRITON_VARIABLE = "DISTREP_GPU_TRITON"


TRITON_INSTALLS = ["this environment's", "the GPU image's"]


@pytest.fixture(scope="module")
def compiling_for_sm90():
    """The compile script started under each Triton install at once (each is one process,
    mostly single-threaded: Triton's passes, then ptxas), so that the two overlap; None for an
    install that is not there."""
    started = {}
    for install in TRITON_INSTALLS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tempfile.mkdtemp()) / "triton")     # compile, not reuse
        folder = os.environ.get(GPU_TRITON_VARIABLE) if install == "the GPU image's" else None
        if install == "the GPU image's":
            if not folder:
                started[install] = None
                continue
            env["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, [env.get("PYTHONPATH")])])
        started[install] = (folder, subprocess.Popen([sys.executable, "-c", COMPILE], stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True, env=env))
    yield started
    for entry in started.values():
        if entry and entry[1].poll() is None:
            entry[1].kill()
            entry[1].communicate()


@pytest.mark.parametrize("triton_install", TRITON_INSTALLS)
def test_the_kernel_compiles_for_an_h100_without_one(triton_install, compiling_for_sm90):
    """Triton's compiler and ptxas run on the CPU: every Table 1 and Table 3 model's kernel,
    fp32 and 3xtf32, both OffsetL2 forms and the three OffsetL2 kernels, and the test pass
    compile for sm_90 (the interpreter accepts code the compiler rejects: it caught one such
    line), with this environment's Triton and, where DISTREP_GPU_TRITON names a folder holding
    another (`pip install --no-deps --target DIR triton==3.6.0`), with that one. The expanded
    kernel in bf16 runs every product in bf16 (exact operands, one pass each): no TF32 product
    is in its PTX; fp32's output layer runs IEEE FMAs, or, with HEAD_PRODUCTS["fp32"] =
    "3xtf32", as many TF32 products as 3xtf32's. At the widest hidden layer the kernel takes,
    no mode and neither output layer needs more shared memory than fused.shared_memory_bound,
    which is fp32's with a linear output layer to the byte."""
    if compiling_for_sm90[triton_install] is None:
        pytest.skip(f"{GPU_TRITON_VARIABLE} names no Triton install (.ci/run sets it)")
    folder, process = compiling_for_sm90[triton_install]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0 and "compiled 18" in stdout, stderr[-3000:]
    if folder:
        expected = next(Path(folder).glob("triton-*.dist-info")).name.removesuffix(".dist-info").split("-")[1]
        assert f"triton {expected}" in stdout, stdout[:200]
    assert "expanded bf16 products: ['bf16']" in stdout, stdout
    # fp32's output layer: no tensor-core product in IEEE, only TF32 ones in three passes
    assert "fp32 products: [] 0" in stdout, stdout
    three = re.search(r"3xtf32 products: \['tf32'\] (\d+)", stdout)
    assert three and f"fp32 3xtf32-head products: ['tf32'] {three.group(1)}" in stdout, stdout
    # fused.shared_memory_bound, which keeps models the GPU cannot hold off the fused step
    assert "shared memory over the bound: [] fp32's to the byte: [True, True, True]" in stdout, stdout
    assert "capped: ['.maxnreg 128'] 4" in stdout, stdout     # MAX_REGISTERS reaches ptxas
    assert "fp32 at 32x1x8x1: 1 1 True 3" in stdout, stdout   # and SHAPES, stages too


def test_kernel_stats_counts_the_class_loops_once_per_class():
    """scripts/kernel-stats.py (the kernel's static cost on sm_90, without a GPU): the direct
    OffsetL2 kernel runs two loops over the 10 classes per block of examples, so counted right
    it costs several times the expanded kernel (measured on an H100: 3.24 against ~2 ms a step);
    counted once per loop it would cost less."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(tempfile.mkdtemp()) / "triton")
    script = Path(__file__).parent.parent / "scripts" / "kernel-stats.py"
    result = subprocess.run([sys.executable, str(script), "ReLU2", "ReLU-L2", "--forms", "direct,expanded"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_warp = {line.split(" bf16")[0].strip(): float(line.split("; ")[1].split(" warp")[0].replace(",", ""))
                for line in result.stdout.splitlines() if "warp instructions per block" in line}
    assert set(per_warp) == {"ReLU2", "ReLU-L2 direct", "ReLU-L2 expanded"}, result.stdout
    assert per_warp["ReLU-L2 direct"] > 2 * per_warp["ReLU-L2 expanded"] > 2 * per_warp["ReLU2"], per_warp


def test_shape_check_picks_the_fastest_shape_fused_tune_logged(monkeypatch, capsys):
    """scripts/shape-check.py --pick reads scripts/fused-tune.py's log: the fastest Table 1 case
    of the precision asked, whatever the other precisions and Table 3's cases say. Asked for the
    present kernel, it has nothing to try and times nothing; otherwise it benches the present
    kernel and each change before the CUDA tests; output-layer products a precision cannot take
    are a usage error before anything runs."""
    import importlib.util
    scripts = Path(__file__).parent.parent / "scripts"
    tune, check = (importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, scripts / f"{name}.py"))
                   for name in ("fused-tune", "shape-check"))
    for module in (tune, check):
        module.__spec__.loader.exec_module(module)
    table1 = "Abs ... ReLU2-Neg (6 variants)"
    shape = fused.parse_shape
    log = "\n".join([tune.rate_line(f"{tune.label(shape('32x4x8'))} fp32 {table1}", 0.55e-3, 3.0, ", 88.0% of ..."),
                     tune.rate_line(f"{tune.label(shape('32x1x8x1'))} fp32 {table1}", 0.53e-3, 3.0),
                     tune.rate_line(f"{tune.label(shape('64x1x8'))} fp32 ReLU-L2 ... Abs-L2-Neg (4 variants) direct", 0.4e-3, 3.0),
                     tune.rate_line(f"{tune.label(shape('16x1x4x2'))} bf16 {table1}", 0.05e-3, 3.0),
                     f"{tune.label(shape('16x2x8'))} fp32 {table1}: failed: RuntimeError()"])
    assert check.fastest(log, "fp32") == ((32, 1, 8, 1), None)
    assert check.fastest(log, "bf16") == ((16, 1, 4, 2), None)
    assert check.fastest(log, "tf32") is None
    # TUNE_HEAD_PRODUCTS: the output layer's products are logged after the precision
    log += "\n" + "\n".join([tune.rate_line(f"{tune.label(shape('32x4x8'))} fp32:ieee {table1}", 0.54e-3, 3.0),
                             tune.rate_line(f"{tune.label(shape('32x4x8'))} fp32:3xtf32 {table1}", 0.50e-3, 3.0)])
    assert check.fastest(log, "fp32") == ((32, 4, 8, 3), "3xtf32")

    monkeypatch.setattr(check, "run_bench", lambda *a, **k: pytest.fail("nothing to time"))
    present = "x".join(map(str, fused.SHAPES["fp32"]))
    monkeypatch.setattr(sys, "argv", ["shape-check.py", "fp32", present])
    assert check.main() == 0 and "nothing to try" in capsys.readouterr().out
    # the benches first (the present kernel, the tried one, the tried one reading rows), then
    # the CUDA tests with every change, the three-pass test among them; the tables restored
    # (the present kernel here: IEEE products, columns)
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", "ieee")
    calls = []
    monkeypatch.setattr(check, "run_bench", lambda *a, **k: calls.append(
        ("bench", fused.HEAD_PRODUCTS["fp32"], fused.GRADIENT_OPERAND["fp32"])))
    monkeypatch.setattr(check.pytest, "main", lambda args: calls.append(
        ("tests", fused.HEAD_PRODUCTS["fp32"], fused.GRADIENT_OPERAND["fp32"], "3xtf32_on_cuda" in args[-1])) or 0)
    monkeypatch.setattr(sys, "argv", ["shape-check.py", "fp32", present, "--head-products", "3xtf32",
                                      "--operand", "rows"])
    with monkeypatch.context() as m:
        for table in (fused.HEAD_PRODUCTS, fused.GRADIENT_OPERAND):
            m.setitem(table, "fp32", table["fp32"])      # undone after the script sets them
        assert check.main() == 0
    assert calls == [("bench", "ieee", "columns"), ("bench", "3xtf32", "columns"), ("bench", "3xtf32", "rows"),
                     ("tests", "3xtf32", "rows", True)]
    # --streams: the last kernel benched again with each schedule, the present one included, and
    # the tests that hold the schedules to one stream's bits run too; the variable restored
    calls.clear()
    monkeypatch.delenv("DISTREP_CUDA_STREAMS", raising=False)
    monkeypatch.setattr(check, "run_bench", lambda *a, **k: calls.append(
        ("bench", fused.HEAD_PRODUCTS["fp32"], os.environ.get("DISTREP_CUDA_STREAMS"))))
    monkeypatch.setattr(check.pytest, "main", lambda args: calls.append(
        ("tests", "concurrent_streams and fused and fp32" in args[-1])) or 0)
    monkeypatch.setattr(sys, "argv", ["shape-check.py", "fp32", present, "--streams", "1,pipeline"])
    assert check.main() == 0 and "DISTREP_CUDA_STREAMS" not in os.environ
    assert calls == [("bench", "ieee", None), ("bench", "ieee", "1"), ("bench", "ieee", "pipeline"), ("tests", True)]
    for argv in (["bf16", "32x4x8", "--head-products", "3xtf32"], ["fp32", present, "--streams", "2"]):
        monkeypatch.setattr(sys, "argv", ["shape-check.py", *argv])
        with pytest.raises(SystemExit) as stopped:
            check.main()
        assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "bf16 runs its output layer's products as bf16" in err and "'2': give some of 0, 1, pipeline" in err
    assert shape("32x1x8") == (32, 1, 8, 3)          # the stages Triton takes by default
    with pytest.raises(ValueError):
        shape("32x4")
