"""The batched engine against the reference trainer, and its bookkeeping."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distrep.data import load_dataset
from distrep.engine import (StackedRuns, Trainer, cross_entropy_backward, first_argmax,
                            first_linear, onednn_cpu)
from distrep.errors import DistrepError
from distrep.layers import OffsetL2
from distrep.models import ALIASES, create_model
from distrep.sweep import Sweep, SweepConfig, bytes_per_run, plan_chunks, verify_fp32_matmul
from distrep.train import TrainConfig, train

EXTRA = ["linear-relu-linear-relu-linear", "linear-tanh-linear+bias", "linear-gelu-offsetl2-neg",
         "linear-sigmoid-linear-softplus", "linear-elu-linear-abs-neg"]


def small(data, n_train=300, n_test=500):
    return replace(data.subset(n_train), x_test=data.x_test[:n_test], y_test=data.y_test[:n_test])


@pytest.fixture(scope="module")
def standardized():
    return small(load_dataset("mnist", "standardized"))


@pytest.fixture(scope="module")
def raw(mnist):
    return small(mnist)


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def sweep(data, models, **kw):
    cfg = SweepConfig(models=models, **{"runs": 2, "epochs": 60, "eval_every": 20, **kw})
    return Sweep(cfg, data, progress=False).run()


# How far a run may drift from its reference over 60 epochs. The engine's first layer rounds
# differently from nn.Linear's on the CPU (oneDNN, not MKL), and a unit whose input crosses a
# kink (ReLU or abs at 0) one step earlier or later moves the run by a bounded step: measured
# up to 3.5e-4 relative (Abs2-Neg on standardized inputs, runs agreeing to 1e-7 until epoch 10).
# A wrong gradient moves it by ~6e-3 (an output bias left untrained, a wrong activation mask).
DRIFT = 1e-3
EARLY = 10


def assert_matches_reference(results, data, preprocess, epochs, tol, drift=DRIFT):
    """Each run against the reference trainer from its seed: the first EARLY epochs' losses to
    rounding (``tol``), the whole loss curve and the final parameters to ``drift``."""
    for res in results:
        for i, seed in enumerate(res.seeds):
            ref = train(TrainConfig(res.spec, epochs=epochs, seed=int(seed), eval_every=20,
                                    preprocess=preprocess), data, progress=False)
            assert relative(res.arrays["train_loss"][i][:EARLY], ref.train_loss[:EARLY]) < tol, res.name
            assert relative(res.arrays["train_loss"][i], ref.train_loss) < max(tol, drift), res.name
            for name, p in ref.state.items():
                assert relative(res.params[name][i], p) < max(tol, drift), (res.name, name)
            assert abs(res.arrays["final_test_acc"][i] - ref.final["test_acc"]) <= 0.004, res.name
            np.testing.assert_allclose(res.arrays["test_acc"][i], ref.test_acc, atol=0.004)
            assert relative(res.arrays["test_loss"][i], ref.test_loss) < max(tol, drift), res.name
            for split in ("train", "test"):
                assert relative(res.arrays[f"final_{split}_loss"][i], ref.final[f"{split}_loss"]) < max(tol, drift)


@pytest.mark.parametrize("names", [list(ALIASES)[:9], list(ALIASES)[9:], EXTRA])
def test_every_variant_matches_the_reference_trainer(names, standardized):
    """60 epochs, 2 runs each, trained together; compared with each run trained alone."""
    results = sweep(standardized, names, preprocess="standardized")
    assert_matches_reference(results, standardized, "standardized", 60, tol=2e-5)


def test_raw_pixels_match_where_the_dynamics_are_not_chaotic(raw):
    """On raw pixels (lr 0.001 on inputs up to 255) the Abs family amplifies rounding
    differences chaotically (see the README), so exact agreement is checked on the others, and
    the first step is checked on all."""
    stable = ["ReLU", "ReLU2-Neg", "ReLU-L2", "Abs-L2-Neg", "ReLU2-Bias"]
    assert_matches_reference(sweep(raw, stable), raw, "raw", 60, tol=1e-4)
    results = sweep(raw, list(ALIASES), epochs=2, eval_every=1)
    for res in results:
        ref = train(TrainConfig(res.spec, epochs=2, seed=int(res.seeds[0])), raw, progress=False)
        assert relative(res.arrays["train_loss"][0], ref.train_loss) < 1e-5, res.name


@pytest.mark.parametrize("model", ["ReLU", "linear+nobias-abs-linear"])
def test_the_cpu_first_layer_is_one_onednn_product_with_its_bias_inside(model, raw, monkeypatch):
    """On the CPU the Trainer computes the first layer as ``[W_v | b + W_c c] [X_v | 1]^T`` through oneDNN
    (a bias or none): W x + b to fp32 rounding, for every stacked run; a ReLU after it is
    applied by the product (one tensor is the ReLU's input and output), any other activation
    is not."""
    import distrep.engine as engine
    calls = []
    monkeypatch.setattr(engine, "first_linear",
                        lambda *a, **k: calls.append(k.get("relu", False)) or first_linear(*a, **k))
    nets = [create_model(model, seed=s) for s in (0, 1)]
    group = StackedRuns.from_models(nets)
    trainer, x_t = Trainer([group]), raw.x_train.t().contiguous()
    inputs, _ = trainer._forward_group(0, group, x_t, None)
    assert trainer.first_input(x_t).rows is not None, "not oneDNN's operand"
    relu = nets[0].layer_specs[1].kind == "relu"
    assert calls == [relu], "the CPU step did not take oneDNN's path, or not with the ReLU in it"
    assert (inputs[2] is inputs[1]) == relu
    for r, net in enumerate(nets):
        expected = net[1](net[0](raw.x_train)) if relu else net[0](raw.x_train)
        assert relative(inputs[1][r], expected.t().detach()) < 1e-6, (model, r)


@pytest.mark.parametrize("model", ["ReLU", "linear+nobias-abs-linear"])
def test_constant_features_ride_in_the_bias_and_get_their_gradient_from_it(model):
    """oneDNN's first-layer products read only the features that vary over the training
    examples; a constant feature c_i reaches h through the bias and gets the gradient db c_i.
    Against autograd, with constant features of 0 (MNIST's border pixels) and of other values
    (standardized pixels), with a bias and without one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 9, generator=g)
    x[:, [0, 5]], x[:, 7] = 0.0, -0.42
    y = torch.arange(40) % 10
    inputs = Trainer([]).first_input(x.t().contiguous())
    assert inputs.split.varying.tolist() == [1, 2, 3, 4, 6, 8]
    assert inputs.split.constant.tolist() == [0, 5, 7]
    assert torch.equal(inputs.split.values, torch.tensor([0.0, 0.0, -0.42]))
    assert torch.equal(inputs.rows, torch.cat([x[:, [1, 2, 3, 4, 6, 8]], torch.ones(40, 1)], 1))
    assert torch.equal(inputs.columns, inputs.rows.t())
    models = [create_model(model, 16, in_features=9, seed=s) for s in (0, 1)]
    assert not _mismatches_with_autograd(model, models, x, y, tol=1e-5)
    # the bf16 products split their own (bf16) input the same way; bf16 rounding: 2 %
    assert not _mismatches_with_autograd(model, models, x, y, tol=2e-2, bf16=True)


def test_a_feature_split_pads_its_operand_and_takes_every_feature_into_the_bias_when_all_are_constant():
    from distrep.constant_features import FeatureSplit
    x = torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.0, 0.0]])             # [D = 3, n = 2]
    split = FeatureSplit.of(x)
    assert split.varying.tolist() == [0] and split.constant.tolist() == [1, 2]
    assert split.values.tolist() == [3.0, 0.0]
    operand = split.operand(x, torch.bfloat16, multiple=8)              # the fused step's rows
    assert operand.shape == (8, 2) and operand.dtype == torch.bfloat16
    assert operand[:2].tolist() == [[1.0, 2.0], [1.0, 1.0]] and not operand[2:].any()
    one = FeatureSplit.of(x[:, :1])       # one example: every feature constant, all in the bias
    assert one.varying.numel() == 0 and one.columns == 1
    w, b = torch.randn(4, 3), torch.randn(4)
    folded = one.weight(w, b, torch.full((4, 8), float("nan")))
    assert torch.allclose(folded[:, 0], w @ x[:, 0] + b) and not folded[:, 1:].any()
    product, grad_w, grad_b = torch.randn(4, 8), torch.empty(4, 3), torch.empty(4)
    one.gradients(product, grad_w, grad_b)                              # dW = db x^T, db
    assert torch.equal(grad_b, product[:, 0]) and torch.allclose(grad_w, product[:, :1] * x[:, 0])


def test_chunking_never_changes_a_result(raw):
    models, kw = ["ReLU2-Neg", "Abs-L2", "Abs2"], dict(runs=3, epochs=15, eval_every=5)
    whole = sweep(raw, models, **kw)
    per_run = SweepConfig(models=models, **kw).validate()
    fixed, cost = Sweep(per_run, raw, progress=False).memory_plan()     # the data, and per run
    assert fixed == 3 * 4 * (300 + 500) * 784        # the data three times (oneDNN's operands)
    assert cost == [bytes_per_run(m, 128, 500, 784, 10) for m in models]   # max(train, test)
    chunked_sweep = Sweep(replace(per_run, max_memory=fixed + 2 * max(cost)), raw, progress=False)
    assert len(chunked_sweep.chunks()) >= 4, "the budget should force small chunks"
    chunked = chunked_sweep.run()
    alone = sweep(raw, ["Abs-L2"], **kw)          # a variant trained without the others
    for a, b in zip(whole, chunked):
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name])
    for key in alone[0].arrays:
        np.testing.assert_array_equal(alone[0].arrays[key], whole[1].arrays[key])


def test_the_step_log_keeps_every_step_and_the_epoch_each_run_froze():
    """The sweep keeps each step's statistics on the device and writes them into the chunk's
    state a window at a time: the same arrays as writing every step (NaN once a run is
    frozen, its diverged epoch the first step after which it is), whether the run froze in the
    first window, a later one, or before the chunk started (resumed)."""
    from types import SimpleNamespace

    from distrep.sweep import StepLog
    R, E, n = 4, 7, 50
    state = {"A/diverged_epoch": torch.tensor([0, 0, 0, 1]), "A/epochs_done": torch.zeros(R, dtype=torch.int64),
             "A/train_loss": torch.zeros(R, E, dtype=torch.float64), "A/train_acc": torch.zeros(R, E, dtype=torch.float64)}
    work = SimpleNamespace(state=state, variants=["A"])
    froze_after = [None, 2, 5, 0]            # run 3 was frozen when the chunk (re)started
    log, flushes = StepLog([R], torch.device("cpu"), capacity=3), 0
    for epoch in range(1, E + 1):
        frozen = torch.tensor([f is not None and epoch >= f for f in froze_after])
        loss = torch.tensor([10.0 * epoch + r for r in range(R)], dtype=torch.float32)
        log.record(epoch, [(loss, torch.arange(R) * 10)], [frozen])
        if log.full():
            log.flush(work, n)
            flushes += 1
    log.flush(work, n)
    assert flushes == 2 and state["A/epochs_done"].tolist() == [E] * R
    assert state["A/diverged_epoch"].tolist() == [0, 2, 5, 1]
    for r, f in enumerate(froze_after):
        for epoch in range(1, E + 1):
            loss, acc = state["A/train_loss"][r, epoch - 1], state["A/train_acc"][r, epoch - 1]
            if f is not None and epoch >= f:
                assert loss.isnan() and acc.isnan(), (r, epoch)
            else:
                assert loss == 10.0 * epoch + r and acc == r * 10 / n, (r, epoch)


def test_a_graphed_step_runs_eagerly_then_records_once_then_replays(monkeypatch):
    """The order GraphedStep needs on CUDA, with the CUDA calls replaced by stand-ins: WARMUP
    eager steps, then one step recorded (not run) inside the capture and replayed, then only
    replays; the statistics returned are the recorded step's. step_function graphs the step on
    CUDA unless DISTREP_CUDA_GRAPHS=0, never on the CPU."""
    import contextlib
    import types

    import distrep.graphs as graphs
    events = []

    class Trainer:
        groups = []

        def step(self, *args):
            events.append("step")
            return [("loss", len(events))]

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        events.append("capture")
        yield
        events.append("end capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    step = graphs.GraphedStep(Trainer(), ())
    outs = [step() for _ in range(5)]
    assert events == ["step", "step", "capture", "step", "end capture", "replay", "replay", "replay"]
    assert outs[2] is outs[4] and outs[2] == [("loss", 4)]
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"))      # only its device is read
    assert isinstance(graphs.step_function(Trainer(), on_cuda, None, 0.1, []), graphs.GraphedStep)
    monkeypatch.setenv("DISTREP_CUDA_GRAPHS", "1")
    plain = graphs.step_function(Trainer(), torch.zeros(2, 3), None, 0.1, [])
    assert not isinstance(plain, graphs.GraphedStep)
    monkeypatch.setenv("DISTREP_CUDA_GRAPHS", "0")
    assert not isinstance(graphs.step_function(Trainer(), on_cuda, None, 0.1, []), graphs.GraphedStep)


class CudaStandIns:
    """Stand-ins for the CUDA calls a graphed step records with (streams, events, the capture),
    installed over ``torch.cuda``: each call appends to ``events`` what it would do; new streams
    are named s0, s1, ..., the capture's stream "capture"; :meth:`where` names the stream that
    work is being recorded on. Replays do nothing."""

    def __init__(self, monkeypatch):
        import contextlib
        import types
        events, current, made = [], [], {"stream": 0, "event": 0}
        self.events, self._current = events, current

        class Stream:
            def __init__(self, name=None):
                if name is None:
                    name, made["stream"] = f"s{made['stream']}", made["stream"] + 1
                self.name = name

            def wait_stream(self, other):
                events.append(f"{self.name} waits {other.name}")

            def wait_event(self, event):
                events.append(f"{self.name} waits {event.name}")

        class Event:
            def __init__(self):
                self.name, made["event"] = f"event {made['event']}", made["event"] + 1

            def record(self, stream):
                events.append(f"{self.name} on {stream.name}")

        @contextlib.contextmanager
        def on(stream):
            current.append(stream)
            yield
            current.pop()

        @contextlib.contextmanager
        def capture(graph):
            events.append("capture")
            yield
            events.append("end capture")

        capture_stream = Stream("capture")
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
        monkeypatch.setattr(torch.cuda, "graph", capture)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: capture_stream)
        monkeypatch.setattr(torch.cuda, "stream", on)

    def where(self) -> str:
        return self._current[-1].name if self._current else "capture"


def test_a_graphed_step_with_concurrent_groups_forks_each_onto_its_own_stream(monkeypatch):
    """With DISTREP_CUDA_STREAMS=1 the recorded step forks every group onto a stream of its own
    from the capture's stream (each waits for it), records that group's step there alone, and
    joins every stream back before the capture ends; the statistics are the groups' in order.
    Without it, or with one group, the step records on the capture's stream. (CUDA stand-ins;
    tests/test_cuda.py checks the bits on a GPU.)"""
    import distrep.graphs as graphs
    cuda = CudaStandIns(monkeypatch)
    events = cuda.events

    class Trainer:
        groups = ["A", "B", "C"]

        def step(self, *args):
            events.append("whole step")
            return [("all", 0)]

        def step_group(self, gi, *args):
            events.append(f"group {gi} on {cuda.where()}")
            return (f"loss {gi}", gi)

    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "1")
    step = graphs.GraphedStep(Trainer(), ())
    stats = [step() for _ in range(4)][-1]
    assert events == ["whole step", "whole step", "capture",
                      "s0 waits capture", "group 0 on s0", "s1 waits capture", "group 1 on s1",
                      "s2 waits capture", "group 2 on s2",
                      "capture waits s0", "capture waits s1", "capture waits s2", "end capture"]
    assert stats == [("loss 0", 0), ("loss 1", 1), ("loss 2", 2)]
    one = Trainer()
    one.groups = ["A"]
    for trainer, streams in ((one, "1"), (Trainer(), "0")):     # both record the whole step
        monkeypatch.setenv("DISTREP_CUDA_STREAMS", streams)
        events.clear()
        step = graphs.GraphedStep(trainer, ())
        [step() for _ in range(4)]
        assert events == ["whole step", "whole step", "capture", "whole step", "end capture"], streams


def test_a_stream_per_variant_is_the_default_only_where_it_was_measured_to_pay(monkeypatch):
    """Unset (or ``auto``), a graphed step gives each variant its own stream for the fused step
    in TF32, 3xTF32 and bf16 only (faster there on an H200; fp32 slower, hand-written not timed;
    graphs.FUSED_STREAMS, per precision);
    DISTREP_CUDA_STREAMS=1/0/pipeline forces a schedule (the pipeline only for fused groups);
    one variant never forks; any other value is refused."""
    import types

    from distrep import engine, graphs

    fused = object.__new__(engine.FusedRuns)
    hand = object.__new__(engine.StackedRuns)

    def schedule(precision, *groups):
        return graphs.stream_schedule(types.SimpleNamespace(precision=precision, groups=list(groups)))

    monkeypatch.delenv("DISTREP_CUDA_STREAMS", raising=False)
    assert schedule("bf16", fused, fused) == schedule("tf32", fused, fused) == "per-variant"
    assert schedule("3xtf32", fused, fused) == "per-variant"
    assert schedule("fp32", fused, fused) == "one"
    assert schedule("bf16", hand, hand) == schedule("bf16", fused, hand) == "one"
    assert schedule("bf16", fused) == "one"
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "auto")
    assert schedule("bf16", fused, fused) == "per-variant"
    monkeypatch.setitem(graphs.FUSED_STREAMS, "fp32", "pipeline")     # one table decides, per precision
    assert schedule("fp32", fused, fused) == "pipeline" and schedule("fp32", hand, hand) == "one"
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "1")
    assert schedule("fp32", hand, hand) == "per-variant"
    assert schedule("fp32", hand) == "one"
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "0")
    assert schedule("bf16", fused, fused) == "one"
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "pipeline")
    assert schedule("fp32", fused, fused) == schedule("bf16", fused, fused) == "pipeline"
    assert schedule("fp32", fused) == "one"
    with pytest.raises(DistrepError, match="pipeline needs the fused step"):
        schedule("fp32", fused, hand)
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "yes")
    with pytest.raises(DistrepError, match="DISTREP_CUDA_STREAMS='yes'"):
        schedule("bf16", fused, fused)


def test_a_pipelined_graphed_step_runs_each_kernel_beside_the_next_product(monkeypatch):
    """DISTREP_CUDA_STREAMS=pipeline: the products and each variant's rest of the step in order
    on the capture's stream, variant i + 1's product recorded before variant i's rest, each
    kernel on the second stream after its product (a wait on the capture's stream) and before
    its rest (a wait on the kernel's event), the second stream joined back before the capture
    ends; the statistics are the variants' in order. (CUDA stand-ins.)"""
    import distrep.graphs as graphs
    cuda = CudaStandIns(monkeypatch)
    events, where = cuda.events, cuda.where

    class Trainer:
        groups = ["A", "B", "C"]

        def step(self, *args):
            events.append("whole step")

        def fused_phases(self, gi, *args):
            return (lambda: events.append(f"product {gi} on {where()}"),
                    lambda: events.append(f"kernel {gi} on {where()}"),
                    lambda: events.append(f"rest {gi} on {where()}") or (f"loss {gi}", gi))

    monkeypatch.setattr(graphs, "stream_schedule", lambda trainer: "pipeline")
    step = graphs.GraphedStep(Trainer(), ())
    stats = [step() for _ in range(4)][-1]
    assert events == [
        "whole step", "whole step", "capture",
        "product 0 on capture", "s0 waits capture", "kernel 0 on s0", "event 0 on s0",
        "product 1 on capture", "s0 waits capture", "kernel 1 on s0", "event 1 on s0",
        "capture waits event 0", "rest 0 on capture",
        "product 2 on capture", "s0 waits capture", "kernel 2 on s0", "event 2 on s0",
        "capture waits event 1", "rest 1 on capture",
        "capture waits event 2", "rest 2 on capture",
        "capture waits s0", "end capture"]
    assert stats == [("loss 0", 0), ("loss 1", 1), ("loss 2", 2)]


def test_finite_rows_finds_every_non_finite_value():
    """A run is finite when every value of every one of its tensors is: NaN, +inf or -inf
    anywhere (first, last or middle of a row, in any tensor) marks it; the largest finite fp32
    values do not (a sum would overflow on them; a max without |.| would miss -inf)."""
    from distrep.engine import finite_rows
    big = torch.finfo(torch.float32).max
    a, b = torch.randn(7, 3, 5), torch.randn(7, 4)
    a[1, 0, 0], a[2, 2, 4], a[3, 1, 2] = float("nan"), float("inf"), -float("inf")
    b[4, 3], a[5] = -float("inf"), big
    b[5], a[6, :, 0] = -big, big
    assert finite_rows([a, b]).tolist() == [True, False, False, False, False, True, True]
    assert finite_rows([b]).tolist() == [True, True, True, True, False, True, True]


def test_diverged_run_is_frozen_and_others_continue(raw):
    cfg = SweepConfig(models=["ReLU"], runs=3, epochs=10, eval_every=5).validate()
    s = Sweep(cfg, raw, progress=False)
    s.params[0] = s.initial_params(0)
    s.params[0]["2.weight"][1] *= 1e38                 # run 1's logits overflow at once
    broken = s.params[0]["2.weight"][1].clone()
    res = s.run()[0]
    clean = sweep(raw, ["ReLU"], runs=3, epochs=10, eval_every=5)[0]
    assert res.diverged.tolist() == [False, True, False] and res.diverged_epoch[1] == 1
    for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert np.isnan(res.arrays[name][1]).all() and np.isfinite(res.arrays[name][[0, 2]]).all(), name
    assert torch.equal(res.params["2.weight"][1], broken), "a diverged run is frozen"
    for r in (0, 2):
        np.testing.assert_array_equal(res.arrays["train_loss"][r], clean.arrays["train_loss"][r])
        assert torch.equal(res.params["0.weight"][r], clean.params["0.weight"][r])


def test_a_step_that_overflows_the_parameters_freezes_the_run_at_that_epoch(raw):
    """lr 3e38: epoch 1's loss is finite and its update overflows the parameters. The run is
    frozen at epoch 1 by the parameters' check (as the reference trainer is), not an epoch later
    by the loss the overflowed parameters give; its parameters overflowed where the reference
    trainer's did."""
    res = sweep(raw, ["ReLU"], runs=2, epochs=5, eval_every=5, lr=3e38)[0]
    ref = train(TrainConfig("ReLU", epochs=5, seed=0, lr=3e38), raw, progress=False)
    assert ref.diverged_epoch == 1 and res.diverged.all() and res.diverged_epoch.tolist() == [1, 1]
    assert np.isnan(res.arrays["train_loss"]).all()
    for name, p in ref.state.items():
        assert torch.equal(res.params[name][0].isfinite(), p.isfinite()), name


def test_the_test_pass_in_batches_weighs_every_example_once():
    """Trainer.evaluate in uneven batches (7 of 7 examples and one of 3 here; 10,000 at a time
    in a sweep) gives every example's loss its weight once, as one batch does, and counts every
    example right once."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(31, 6, generator=g), torch.arange(31) % 3
    models = [create_model("ReLU2-Neg", 5, in_features=6, num_classes=3, seed=s) for s in (0, 1)]
    trainer = Trainer([StackedRuns.from_models(models)], "fp32")
    (loss, correct), = trainer.evaluate(x.t().contiguous(), y, batch=7)
    (whole, right), = trainer.evaluate(x.t().contiguous(), y, batch=31)
    with torch.no_grad():
        expected = [F.cross_entropy(m(x), y) for m in models]
        hits = [int((m(x).argmax(1) == y).sum()) for m in models]
    torch.testing.assert_close(loss, torch.stack(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(whole, loss, rtol=1e-6, atol=0)
    assert correct.tolist() == right.tolist() == hits


def test_paired_and_unpaired_designs():
    paired = SweepConfig(models=["ReLU", "Abs2-Neg", "Abs-L2"], runs=3)
    assert paired.seeds("ReLU") == paired.seeds("Abs-L2") == [0, 1, 2]
    first = [create_model(m, seed=paired.seeds(m)[2])[0].weight for m in paired.models]
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])
    unpaired = replace(paired, paired=False, base_seed=5)
    seeds = {m: unpaired.seeds(m) for m in unpaired.models}
    assert len({s for v in seeds.values() for s in v}) == 9, "every run its own seed"
    # a model's seeds do not depend on which other models are in the sweep
    assert replace(unpaired, models=["Abs-L2"]).seeds("Abs-L2") == seeds["Abs-L2"]
    assert seeds["ReLU"][1] - seeds["ReLU"][0] == 1
    # ... nor on how the model was named: an alias and its spec draw the same seeds
    assert unpaired.seeds("linear-relu-linear") == seeds["ReLU"]


def test_cross_entropy_and_argmax_match_pytorch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 10, 40, generator=g, dtype=torch.float64)
    z[1, :, :20] = 0.0                                  # ties, as a dead ReLU output gives
    y = torch.randint(0, 10, (40,), generator=g)
    grad = torch.empty_like(z)
    loss, correct = cross_entropy_backward(z, y, grad)
    for r in range(3):
        zr = z[r].t().clone().requires_grad_()
        ref = F.cross_entropy(zr, y)
        ref.backward()
        assert loss[r].item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(grad[r].t(), zr.grad, atol=1e-15)
        assert correct[r].item() == (zr.argmax(1) == y).sum().item()
    z[2, 4, 7] = float("nan")
    assert torch.equal(first_argmax(z), z.argmax(1))
    # past 255 classes a loop over them: the first of tied maxima, the first NaN, as argmax
    wide = torch.randint(0, 3, (2, 300, 50), generator=g).double()      # many ties at 2
    wide[0, 280, 3] = wide[1, 17, 4] = wide[1, 290, 4] = float("nan")
    wide[0, 5, 3] = 9.0                                                 # before the NaN: NaN wins
    assert torch.equal(first_argmax(wide), wide.argmax(1))
    assert first_argmax(wide)[0, 3] == 280 and first_argmax(wide)[1, 4] == 17


def test_bf16_trains_close_to_fp32(raw):
    fp32 = sweep(raw, ["ReLU"], runs=2, epochs=40)[0]
    bf16 = sweep(raw, ["ReLU"], runs=2, epochs=40, precision="bf16")[0]
    assert np.abs(fp32.arrays["final_test_acc"] - bf16.arrays["final_test_acc"]).max() < 0.03
    assert not np.array_equal(fp32.arrays["train_loss"], bf16.arrays["train_loss"])


def test_memory_plan_and_errors(raw):
    assert plan_chunks([(0, 0), (0, 1), (1, 0), (1, 1)], [3, 5], 8) == [[(0, 0), (0, 1)], [(1, 0)], [(1, 1)]]
    assert plan_chunks([(0, 0), (0, 1)], [4], 8) == [[(0, 0), (0, 1)]], "exactly the budget fits"
    runs = [(0, r) for r in range(5)]
    assert plan_chunks(runs, [1], 100, max_runs=2) == [runs[:2], runs[2:4], runs[4:]]
    tiny = SweepConfig(models=["ReLU"], runs=2, epochs=2, max_memory=1 << 20)
    with pytest.raises(DistrepError, match="--max-memory 0.00 GiB is too small"):
        Sweep(tiny, raw, progress=False).run()
    with pytest.raises(DistrepError, match="listed twice"):
        SweepConfig(models=["ReLU", "linear-relu-linear"]).validate()
    with pytest.raises(DistrepError, match="tf32 is a CUDA precision"):
        SweepConfig(models=["ReLU"], precision="tf32").validate()
    with pytest.raises(DistrepError, match="affine first layer"):
        Trainer([StackedRuns.from_models([create_model("relu-linear")])])
    with pytest.raises(DistrepError, match="3xtf32 is a precision of the fused step only"):
        Trainer([StackedRuns.from_models([create_model("ReLU")])], precision="3xtf32")


def test_fp32_check_catches_reduced_precision(monkeypatch):
    verify_fp32_matmul(torch.device("cpu"))
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: real(a.bfloat16(), b.bfloat16()).float())
    with pytest.raises(DistrepError, match="reduced-precision"):
        verify_fp32_matmul(torch.device("cpu"))


def test_flop_count_by_hand():
    from distrep.bench import flops_per_run_epoch
    # ReLU, one example, no test pass: first layer forward + dW (2 x 784x128 MACs), output
    # layer forward + dW + dx (3 x 128x10 MACs), 2 FLOPs per MAC
    assert flops_per_run_epoch("ReLU", 1, 0, 10) == 2 * (2 * 784 * 128 + 3 * 128 * 10)
    # OffsetL2 heads do two products (x^2 and x terms) in each direction
    assert flops_per_run_epoch("ReLU-L2", 1, 0, 10) == 2 * (2 * 784 * 128 + 2 * 3 * 128 * 10)
    assert flops_per_run_epoch("ReLU", 0, 100, 10) == 2 * 100 * (784 * 128 + 128 * 10) / 10


# --------------------------------------------------------------------------- every activation chain

def _chains():
    """Every activation, ordered pair and triple of the grammar's activations, between two linear layers, and
    every pair around the output layer (with and without its bias; the first layer's bias dropped
    in every other one), before an OffsetL2 head and after one, and each activation before an
    OffsetL2 head with each after it."""
    from itertools import product

    from distrep.layers import ACTIVATIONS
    acts = list(ACTIVATIONS)
    specs = [f"linear-{a}-linear" for a in acts]
    specs += [f"linear-{a}-{b}-linear" for a, b in product(acts, repeat=2)]
    specs += [f"linear-{a}-{b}-{c}-linear" for a, b, c in product(acts, repeat=3)]
    specs += [f"linear-{a}-linear-{b}" for a, b in product(acts, repeat=2)]
    specs += [f"linear{'+nobias' if i % 2 else ''}-{a}-linear+bias-{b}"
              for i, (a, b) in enumerate(product(acts, repeat=2))]
    specs += [f"linear-{a}-{b}-offsetl2" for a, b in product(acts, repeat=2)]
    specs += [f"linear-relu-offsetl2-{a}-{b}" for a, b in product(acts, repeat=2)]
    specs += [f"linear-{a}-offsetl2-{b}" for a, b in product(acts, repeat=2)]
    return specs


def alpha_off_its_start(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with its OffsetL2 scales drawn from U(0.5, 1.5), the first feature's negated,
    instead of their start at 1: there alpha^2 = alpha, so the paper's form and the coded one
    weigh alike and a step that took one form's weight for the other's would pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, OffsetL2):
                layer.alpha.copy_(torch.empty(layer.alpha.shape).uniform_(0.5, 1.5, generator=g))
                layer.alpha[:, 0] *= -1
    return model


def _mismatches_with_autograd(label: str, models: list, x: torch.Tensor, y: torch.Tensor,
                              lrs=(1.0,), tol: float = 1e-9, bf16: bool = False) -> list[str]:
    """Train ``models`` stacked, one engine step per learning rate in ``lrs`` (all but the
    last 0, so that the parameters move only in the last), and compare each run's movement with
    its gradient from PyTorch's autograd at the initial parameters (relative ``tol``); with
    ``bf16`` the engine's first-layer products take bf16 operands."""
    group = StackedRuns.from_models(models)
    before = {k: v.clone() for k, v in group.state().items()}
    trainer = Trainer([group], "bf16" if bf16 else "fp32")
    x_t = x.t().contiguous()
    for lr in lrs:
        trainer.step(x_t, y, lr, [torch.zeros(len(models), dtype=torch.bool)],
                     x_t.bfloat16() if bf16 else None)
    failures = []
    for r, model in enumerate(models):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            got = before[name][r] - group.state()[name][r]          # lr 1: the gradient
            err = (got - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)
            if not err < tol:
                failures.append(f"{label} run {r} {name}: relative error {float(err):.1e}")
    return failures


def test_every_activation_chain_matches_autograd_in_float64():
    """One engine step against PyTorch's autograd on the same nn.Sequential, in float64, for every
    chain the grammar allows (not a hand-picked list). Buffer reuse inside the step (gradients
    written over activations, derivatives built in place) is where chains can go wrong: abs
    after tanh/sigmoid/elu once overwrote the output tanh's backward still needed."""
    _assert_every_chain_matches_autograd(torch.float64, tol=1e-9)


def _assert_every_chain_matches_autograd(dtype: torch.dtype, tol: float) -> None:
    """Every chain of :func:`_chains`, two runs in ``dtype``, one step against autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, generator=g, dtype=dtype)
    x[:, 1], x[:, 4] = 0.0, 1.5        # constant features: the CPU step folds them into the bias
    y = torch.arange(24) % 3
    failures = []
    for spec in _chains():
        models = [alpha_off_its_start(create_model(spec, 5, in_features=6, num_classes=3, seed=s), s).to(dtype)
                  for s in (0, 1)]
        failures += _mismatches_with_autograd(spec, models, x, y, tol=tol)
    assert not failures, f"{len(failures)} mismatches, e.g. " + "; ".join(failures[:5])


def test_every_activation_chain_matches_autograd_in_fp32_on_onednns_path():
    """The same in fp32, where the CPU step computes the first layer through oneDNN and applies a
    ReLU right after it inside that product (one tensor is then the ReLU's input and output, and
    the gradient flowing back into it needs a buffer of its own). fp32 rounding: relative 1e-3
    (the largest seen: 4.3e-5, an fp32 OffsetL2 after sigmoid-sigmoid); the ReLU's input
    overwritten by the gradient is off by 0.8 to 9."""
    assert onednn_cpu(torch.zeros(1))
    _assert_every_chain_matches_autograd(torch.float32, tol=1e-3)


# Models with a derivative taken at exactly zero (exact_zeros), both steps test them
EXACT_ZEROS = [("linear-abs-linear", "paper"), ("linear-relu-linear-abs", "paper"),
               ("linear-abs-linear+bias-relu-neg", "paper"), ("linear-relu-offsetl2-neg", "paper"),
               ("linear-abs-offsetl2", "coded")]


def exact_zeros(spec: str, form: str = "paper", seed: int = 0, in_features: int = 784) -> torch.nn.Module:
    """A model of ``spec`` (20 hidden units, 3 classes) arranged so that a derivative is taken
    at exactly zero: hidden unit 0's weights and bias zero (its pre-activation 0 on every
    example); with a linear output layer, output 0's weights zero (its output 0); with OffsetL2,
    every first-layer weight zero (h the same for every example) and prototype 0 at that h
    (distance 0)."""
    model = create_model(spec, 20, in_features=in_features, num_classes=3, offsetl2_form=form, seed=seed)
    first, head = model[0], model[2]
    with torch.no_grad():
        first.weight[0], first.bias[0] = 0.0, 0.0
        if hasattr(head, "mu"):
            first.weight.zero_()
            head.mu[0] = model[1](first.bias)
        else:
            head.weight[0] = 0.0
    return model


@pytest.mark.parametrize("spec, form", EXACT_ZEROS)
def test_derivatives_at_exactly_zero_are_autograds(spec, form):
    """The hand-written step where an activation or a distance is exactly 0 (exact_zeros): the
    subgradients autograd takes (abs and relu 0, OffsetL2 0 at its prototype), so a unit whose
    pre-activation is 0 gets no gradient. One fp32 step against autograd (the CPU's OffsetL2
    distances are direct in fp32: exactly 0 at the prototype, where float64's expanded form
    leaves ~1e-8 of cancellation), and exactly 0 where autograd's is; the coded form's distance
    at its prototype is its clamp's sqrt(1e-12), the paper's 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, generator=g)
    y = torch.arange(24) % 3
    models = [exact_zeros(spec, form, seed, in_features=6) for seed in (0, 1)]
    assert not _mismatches_with_autograd(spec, models, x, y, tol=1e-5)
    group = StackedRuns.from_models(models)
    before = {k: v.clone() for k, v in group.state().items()}
    Trainer([group], "fp32").step(x.t().contiguous(), y, 1.0, [torch.zeros(2, dtype=torch.bool)], None)
    moved = {k: before[k] - v for k, v in group.state().items()}          # lr 1: the gradient
    assert moved["0.weight"].any()
    distances = StackedRuns.from_models(models).forward(x.t().contiguous())[2]    # OffsetL2's, if any
    assert_zero_where_autograds_is(spec, form, moved, distances[:, 0])


def assert_zero_where_autograds_is(spec: str, form: str, grads: dict, distance: torch.Tensor) -> None:
    """What :func:`exact_zeros` makes exactly zero stays so in a step's gradients ``grads``
    (name -> ``[runs, ...]``): with OffsetL2, prototype 0's and its metric's (``distance``,
    ``[runs, n]``, is then its distance: 0 in the paper's form, sqrt(1e-12) in the coded one);
    else hidden unit 0's weights and bias, and output 0's weights where an abs follows it."""
    if "offsetl2" in spec:
        assert torch.allclose(distance, torch.full_like(distance, 1e-6 if form == "coded" else 0.0),
                              rtol=1e-3, atol=0)
        assert not grads["2.mu"][:, 0].any() and not grads["2.alpha"][:, 0].any()
    else:
        assert not grads["0.weight"][:, 0].any() and not grads["0.bias"][:, 0].any()
        if spec == "linear-relu-linear-abs":                  # output 0 is 0: abs' = 0 there
            assert not grads["2.weight"][:, 0].any()


def test_offsetl2_matches_autograd_with_its_gradient_over_its_input():
    """OffsetL2 builds dL/dx in its float64 work buffer and copies it to its fp32 destination,
    which may be its own input (after relu, abs) or a buffer of its own (after tanh); the input
    may be shared (OffsetL2 first). Both forms, two steps (the second reuses the buffer of the
    first), against autograd in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64)
    y = torch.arange(300) % 3
    failures = []
    for spec in ("linear-relu-offsetl2", "linear-abs-offsetl2-neg", "linear-tanh-offsetl2", "offsetl2-neg"):
        for form in ("paper", "coded"):
            models = [alpha_off_its_start(create_model(spec, 7, in_features=7, num_classes=3,
                                                       offsetl2_form=form, seed=s), s).double() for s in (0, 1, 2)]
            failures += _mismatches_with_autograd(f"{spec} {form}", models, x, y, lrs=(0.0, 1.0))
    assert not failures, f"{len(failures)} mismatches, e.g. " + "; ".join(failures[:5])


@pytest.mark.parametrize("form", ["paper", "coded"])
def test_offsetl2_divergence_is_detected_in_every_path(raw, form):
    """lr 1e6 blows OffsetL2 runs up. A NaN squared distance once became y = 0 in the paper form
    (loss ln C, run 'training' on with NaN parameters): now every run with non-finite parameters
    is marked diverged, in the engine and in the reference trainer, and no NaN becomes a number."""
    res = sweep(raw, ["ReLU-L2", "Abs-L2-Neg"], epochs=30, lr=1e6, offsetl2_form=form)
    for r in res:
        finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in r.params.values()]).all(0)
        assert r.diverged.any() or form == "coded", (form, r.name)   # coded alpha can clamp to 0
        assert (~finite.numpy() <= r.diverged).all(), (form, r.name, "NaN parameters, not diverged")
        assert np.isnan(r.arrays["train_loss"][r.diverged, -1]).all()
        ref = train(TrainConfig(r.spec, epochs=30, lr=1e6, offsetl2_form=form, seed=int(r.seeds[0])),
                    raw, progress=False)
        finite = all(torch.isfinite(p).all() for p in ref.state.values())
        assert ref.diverged or finite, (form, r.name)


def test_nan_input_to_offsetl2_stays_nan():
    from distrep.layers import offset_l2, safe_sqrt
    assert torch.isnan(safe_sqrt(torch.tensor([float("nan"), 0.0, 4.0]))).tolist() == [True, False, False]
    mu = torch.zeros(2, 3)
    mu[0, 0] = float("nan")
    for form in ("paper", "coded"):
        y = offset_l2(torch.ones(4, 3), mu, torch.ones(2, 3), form)
        assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1]).all(), form
    layer = StackedRuns.from_models([create_model("linear-offsetl2", 4, in_features=3, num_classes=2,
                                                  seed=0)]).layers[1]
    layer.mu[0, 0, 0] = float("nan")
    y = layer.forward(torch.ones(1, 4, 5), shared=False, keep=False)
    assert torch.isnan(y[0, 0]).all() and torch.isfinite(y[0, 1]).all()


def test_offsetl2_direct_form_on_the_cpu_matches_the_float64_form(monkeypatch):
    """The CPU's compiled direct form (fp32, class by class) against the float64 expanded form
    (itself checked against autograd above), with prototypes placed on examples so that some
    distances are ~0, in both forms, the input gradient written over the input itself (after
    abs) or into a buffer of its own (after a ReLU applied inside the first product); and the
    fall-back to float64 when compiling fails."""
    from distrep.engine import StackedOffsetL2
    g = torch.Generator().manual_seed(0)
    R, C, H, n = 3, 10, 24, 700
    x = 50 * torch.rand(R, H, n, generator=g)
    mu = x[:, :, :C].transpose(1, 2).contiguous() + 0.01 * torch.randn(R, C, H, generator=g)
    alpha = 0.5 + torch.rand(R, C, H, generator=g)
    grad = torch.randn(R, C, n, generator=g)

    def step(form, over_input=True):
        layer = StackedOffsetL2(mu.clone(), alpha.clone(), form)
        xin = x.clone()
        y = layer.forward(xin, shared=False)
        direct = layer._cache[0] is None
        into = xin if over_input else torch.full_like(xin, float("nan"))
        dx = layer.backward(grad, xin, shared=False, need_dx=True, dx_out=into)
        assert dx.data_ptr() == into.data_ptr()
        return direct, [y, dx, layer.grads["mu"], layer.grads["alpha"]]

    reference = {}
    for form in ("paper", "coded"):
        monkeypatch.setattr(StackedOffsetL2, "direct", False)
        took_float64, float64 = reference[form] = step(form)
        monkeypatch.setattr(StackedOffsetL2, "direct", True)
        assert not took_float64
        for over_input in (True, False):
            took_direct, direct = step(form, over_input)
            assert took_direct
            for name, a, b in zip(("y", "dx", "dmu", "dalpha"), direct, float64):
                assert relative(a, b) < 2e-6, (form, over_input, name)
        near = direct[0][:, range(C), range(C)]             # example j sits ~0.01 from prototype j
        assert relative(near, float64[0][:, range(C), range(C)]) < 1e-5, form

    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no compiler")
        return fail

    from distrep import engine
    monkeypatch.setattr(engine, "_COMPILED", {})
    monkeypatch.setattr(engine.torch, "compile", broken)
    with pytest.warns(UserWarning, match="did not compile"):
        took_direct, fallen_back = step("paper")
    assert not took_direct and StackedOffsetL2.direct is False
    for a, b in zip(fallen_back, reference["paper"][1]):
        assert relative(a, b) < 1e-12
