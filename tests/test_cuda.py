"""The CUDA path of the engine and the reference trainer, checked against the CPU.

Skipped where PyTorch sees no CUDA GPU (as on CI); on a GPU machine run
``pytest tests/test_cuda.py -s`` (``-s`` shows the measured differences).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from distrep.errors import DistrepError
from distrep.models import ALIASES
from distrep.sweep import Sweep, SweepConfig, matmul_precision, verify_fp32_matmul
from distrep.train import TrainConfig, train
from tests.test_engine import EXTRA, raw, relative, standardized, sweep  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_every_variant_on_cuda_matches_the_cpu(standardized):
    """60 epochs, 2 runs of every variant: CUDA and CPU differ only by fp32 rounding, which the
    Abs family amplifies (measured on an H200: Abs2-Neg's first-layer weights 3.1e-4 apart,
    Abs, ReLU and Abs2 under 1e-4)."""
    names = list(ALIASES) + EXTRA
    cpu = sweep(standardized, names, preprocess="standardized")
    cuda = sweep(standardized, names, preprocess="standardized", device="cuda")
    loss = {a.name: relative(b.arrays["train_loss"], a.arrays["train_loss"]) for a, b in zip(cpu, cuda)}
    params = {a.name: max(relative(b.params[k], a.params[k]) for k in a.params) for a, b in zip(cpu, cuda)}
    print("\nCUDA vs CPU after 60 epochs, largest relative difference (train loss / parameters):")
    for name in loss:
        print(f"  {name:<40} {loss[name]:.1e} / {params[name]:.1e}")
    for a, b in zip(cpu, cuda):
        assert loss[a.name] < 1e-4 and params[a.name] < 2e-3, a.name
        np.testing.assert_allclose(b.arrays["test_acc"], a.arrays["test_acc"], atol=0.004)


def test_reference_trainer_on_cuda_matches_the_cpu(standardized):
    for name in ("ReLU2-Neg", "Abs-L2"):
        cfg = TrainConfig(name, epochs=30, eval_every=10, preprocess="standardized")
        cpu = train(cfg, standardized, progress=False)
        cuda = train(replace(cfg, device="cuda"), standardized, progress=False)
        assert relative(cuda.train_loss, cpu.train_loss) < 1e-4, name
        for key, p in cpu.state.items():
            assert relative(cuda.state[key].cpu(), p) < 1e-4, (name, key)


def test_chunking_on_cuda(raw):
    """On the CPU chunking is bit-identical (test_engine); cuBLAS may pick other kernels for
    other batch shapes, so on CUDA the results must agree to rounding, and the test says
    whether they are bit-identical too."""
    models, kw = ["ReLU2-Neg", "Abs-L2", "ReLU-L2"], dict(runs=3, epochs=15, eval_every=5, device="cuda")
    whole = sweep(raw, models, **kw)
    config = SweepConfig(models=models, **kw)
    fixed, cost = Sweep(config, raw, progress=False).memory_plan()
    config = replace(config, max_memory=fixed + 2 * max(cost))
    chunked = Sweep(config, raw, progress=False).run()
    identical = True
    for a, b in zip(whole, chunked):
        assert relative(b.arrays["train_loss"], a.arrays["train_loss"]) < 1e-5, a.name
        identical &= all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    print(f"\nCUDA chunked vs whole: bit-identical {identical}")


def test_diverged_run_is_frozen_on_cuda(raw):
    cfg = SweepConfig(models=["ReLU"], runs=3, epochs=10, eval_every=5, device="cuda").validate()
    s = Sweep(cfg, raw, progress=False)
    s.params[0] = s.initial_params(0)
    s.params[0]["2.weight"][1] *= 1e38
    broken = s.params[0]["2.weight"][1].clone()
    res = s.run()[0]
    clean = sweep(raw, ["ReLU"], runs=3, epochs=10, eval_every=5, device="cuda")[0]
    assert res.diverged.tolist() == [False, True, False]
    assert torch.equal(res.params["2.weight"][1], broken)
    np.testing.assert_array_equal(res.arrays["train_loss"][[0, 2]], clean.arrays["train_loss"][[0, 2]])


def test_tf32_and_bf16_on_cuda(raw):
    before = torch.backends.cuda.matmul.allow_tf32
    fp32 = sweep(raw, ["ReLU", "ReLU2-Neg"], runs=2, epochs=40, device="cuda")
    for precision in ("tf32", "bf16"):
        other = sweep(raw, ["ReLU", "ReLU2-Neg"], runs=2, epochs=40, device="cuda", precision=precision)
        for a, b in zip(fp32, other):
            assert not np.array_equal(a.arrays["train_loss"], b.arrays["train_loss"]), precision
            assert np.abs(a.arrays["final_test_acc"] - b.arrays["final_test_acc"]).max() < 0.03
    assert torch.backends.cuda.matmul.allow_tf32 == before, "the global setting is restored"
    again = sweep(raw, ["ReLU", "ReLU2-Neg"], runs=2, epochs=40, device="cuda")
    for a, b in zip(fp32, again):
        np.testing.assert_array_equal(a.arrays["train_loss"], b.arrays["train_loss"])


def test_fp32_check_catches_tf32_on_cuda():
    verify_fp32_matmul(torch.device("cuda"))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(DistrepError, match="reduced-precision"):
            verify_fp32_matmul(torch.device("cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_compiled_step_on_cuda_matches_the_cpu(standardized):
    """The compiled step (Inductor kernels, CUDA graphs) against the hand-written step on the
    CPU: the same training to fp32 rounding, for a Table 1, a Table 3 and a head model; bf16
    close to it."""
    names = ["ReLU2-Neg", "Abs-L2-Neg", "linear-relu-rbf-neg"]
    kw = dict(preprocess="standardized", runs=2, epochs=40)
    cpu = sweep(standardized, names, **kw)
    cuda = sweep(standardized, names, device="cuda", engine="compiled", **kw)
    bf16 = sweep(standardized, names, device="cuda", engine="compiled", precision="bf16", **kw)
    for a, b, c in zip(cpu, cuda, bf16):
        loss = relative(b.arrays["train_loss"], a.arrays["train_loss"])
        params = max(relative(b.params[k], a.params[k]) for k in a.params)
        low = relative(c.arrays["train_loss"], a.arrays["train_loss"])
        print(f"\ncompiled CUDA vs CPU, {a.name}: loss {loss:.1e}, params {params:.1e}; bf16 loss {low:.1e}")
        assert loss < 1e-4 and params < 2e-3, a.name
        assert low < 3e-2, a.name


def test_fused_step_on_cuda_matches_the_cpu(standardized):
    """The fused step (the Triton kernel compiled for the GPU) against the hand-written step on
    the CPU: fp32 the same training to rounding for every model it covers; TF32 and bf16 close
    to it (and not identical: the mode is applied) for three (each model and mode compiles its
    own kernels, a second or two each)."""
    from distrep.fused import fused_layout
    from distrep.models import parse
    names = [m for m in list(ALIASES) + EXTRA if fused_layout(parse(m)) is not None]
    low_names = ["ReLU2-Neg", "Abs2-Bias", "Abs-L2-Neg"]
    kw = dict(preprocess="standardized", runs=2, epochs=40)
    cpu = {r.name: r for r in sweep(standardized, names, **kw)}
    fp32 = sweep(standardized, names, device="cuda", engine="fused", **kw)
    low = {p: {r.name: r for r in sweep(standardized, low_names, device="cuda", engine="fused",
                                        precision=p, **kw)} for p in ("tf32", "bf16")}
    print("\nfused CUDA vs hand-written CPU after 40 epochs (train loss / parameters; TF32, bf16 loss):")
    for b in fp32:
        a = cpu[b.name]
        loss = relative(b.arrays["train_loss"], a.arrays["train_loss"])
        params = max(relative(b.params[k], a.params[k]) for k in a.params)
        others = {p: relative(low[p][b.name].arrays["train_loss"], a.arrays["train_loss"])
                  for p in low if b.name in low[p]}
        print(f"  {a.name:<40} {loss:.1e} / {params:.1e}"
              + "".join(f"; {p} {v:.1e}" for p, v in others.items()))
        assert loss < 1e-4 and params < 2e-3, a.name
        np.testing.assert_allclose(b.arrays["test_acc"], a.arrays["test_acc"], atol=0.004)
        for p, value in others.items():
            assert 0 < value < 3e-2, (a.name, p)


def test_fused_step_on_cuda_takes_the_widths_the_gpu_holds():
    """The shared memory per block Triton allows on this GPU (232,448 bytes on an H100 or H200)
    decides which widths take the fused step: the paper's width on any GPU of the last years,
    past MAX_WIDTH none; a model past its GPU's figure goes to the hand-written step."""
    from distrep import fused
    from distrep.engine import engine_path
    from distrep.models import parse
    limit = fused.max_shared_memory(torch.device("cuda"))
    print(f"\n{torch.cuda.get_device_name()}: {limit:,} bytes of shared memory per block")
    if torch.cuda.get_device_capability() == (9, 0):
        assert limit == 232_448
    assert engine_path(parse("ReLU"), "auto", "cuda") == "fused"
    fits = fused.shared_memory_bound(fused.MAX_WIDTH, 10) <= limit
    assert engine_path(parse("ReLU", fused.MAX_WIDTH), "auto", "cuda") == ("fused" if fits else "hand-written")
    assert engine_path(parse("ReLU", 4 * fused.MAX_WIDTH), "auto", "cuda") == "hand-written"


def test_a_gpus_facts_lent_to_a_driver_are_what_it_reads_itself():
    """What a Ray worker tells a driver without its GPU (provenance.device_facts): the GPU's
    name, that the fused step runs, its shared memory; lent, they decide as the GPU itself does."""
    from distrep import fused
    from distrep.engine import engine_path
    from distrep.models import parse
    from distrep.provenance import describe_device, device_facts, lent_device
    facts = device_facts("cuda")
    cuda = torch.device("cuda")
    assert (facts.device, facts.fused_unavailable) == ("cuda", None)
    assert facts.description == describe_device(cuda) and torch.cuda.get_device_name() in facts.description
    assert facts.shared_memory == fused.max_shared_memory(cuda) > 0
    wide = parse("ReLU", fused.MAX_WIDTH)
    with lent_device(replace(facts, shared_memory=fused.shared_memory_bound(fused.MAX_WIDTH, 10) - 1)):
        assert engine_path(wide, "auto", "cuda") == "hand-written"
    assert device_facts("auto").device == "cuda"


# (precision, fp32's output-layer products: distrep.fused.HEAD_PRODUCTS["fp32"]) by case
THREE_PASS_CASES = {"fp32": ("fp32", "ieee"), "3xtf32": ("3xtf32", "ieee"),
                    "fp32 3xTF32 head": ("fp32", "3xtf32"), "tf32": ("tf32", "ieee")}


def test_3xtf32_on_cuda_is_as_close_to_the_cpu_as_fp32(standardized, monkeypatch):
    """--precision 3xtf32 compiled for the GPU (cuBLAS's TF32 products of the first layer's
    exact halves, the kernel's three TF32 products for the output layer), and fp32 with only
    the output layer's products in three TF32 passes (HEAD_PRODUCTS["fp32"] = "3xtf32"): one
    step's gradients within 5e-6 of the fused fp32 step's (as under the interpreter; a TF32
    product anywhere moves them by 2e-4 or more), and after 40 epochs as close to the CPU as the
    IEEE products (within 10x of their difference, or 1e-6), where TF32 mode is farther. The
    four stable Table 1 models and ReLU-L2 (the chaotic ones amplify any rounding)."""
    from distrep import fused
    names = ["ReLU", "ReLU2-Neg", "Abs", "Abs2", "ReLU-L2"]
    x_t, y = standardized.x_train.t().contiguous().cuda(), standardized.y_train.cuda()
    kw = dict(preprocess="standardized", runs=2, epochs=40)
    grads, cuda = {}, {}
    for case, (precision, products) in THREE_PASS_CASES.items():
        monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", products)
        if case != "tf32":
            cfg = SweepConfig(models=names, runs=2, epochs=1, engine="fused", device="cuda", precision=precision)
            s = Sweep(cfg, standardized, progress=False)
            _, groups = s.chunk_trainer(s.chunks()[0])
            with matmul_precision(precision, torch.device("cuda")):
                for group in groups:
                    group.gradients(x_t, y)
            grads[case] = [{k: v.cpu() for k, v in group.grads.items()} for group in groups]
        cuda[case] = sweep(standardized, names, device="cuda", engine="fused", precision=precision, **kw)
    for case in ("3xtf32", "fp32 3xTF32 head"):
        print(f"\n{case} against fp32 on CUDA, one step's gradients, largest relative difference:")
        for name, ours, theirs in zip(names, grads[case], grads["fp32"]):
            diffs = {k: relative(ours[k], theirs[k]) for k in theirs}
            print(f"  {name:<12} " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
            assert max(diffs.values()) < 5e-6, (case, name, diffs)

    cpu = sweep(standardized, names, **kw)
    print(f"fused CUDA vs hand-written CPU after 40 epochs, train loss ({' / '.join(cuda)}):")
    for i, a in enumerate(cpu):
        d = {case: relative(r[i].arrays["train_loss"], a.arrays["train_loss"]) for case, r in cuda.items()}
        print(f"  {a.name:<12} " + " / ".join(f"{v:.1e}" for v in d.values()))
        for case in ("3xtf32", "fp32 3xTF32 head"):
            assert d[case] < max(10 * d["fp32"], 1e-6) and d[case] < d["tf32"], (case, a.name)
            np.testing.assert_allclose(cuda[case][i].arrays["test_acc"], a.arrays["test_acc"], atol=0.004)


def assert_same_bits(expected, results) -> None:
    """Two sweeps' results (VariantResults) agree bit for bit: every metric array and parameter."""
    for a, b in zip(expected, results, strict=True):
        for key in a.arrays:
            np.testing.assert_array_equal(b.arrays[key], a.arrays[key], err_msg=f"{a.name} {key}")
        for name in a.params:
            assert torch.equal(b.params[name], a.params[name]), (a.name, name)


@pytest.mark.parametrize("engine,precision", [("fused", "bf16"), ("fused", "tf32"), ("fused", "fp32"),
                                              ("fused", "3xtf32"), ("hand-written", "fp32")])
def test_cuda_graphs_replay_the_fused_and_hand_written_steps_exactly(raw, engine, precision, monkeypatch):
    """The step captured once as a CUDA graph and replayed (the default on CUDA) trains what the
    eager step (DISTREP_CUDA_GRAPHS=0) trains, bit for bit: the same kernels on the same
    addresses. Three models (a linear and an OffsetL2 head, one diverging family), 12 epochs,
    a test pass every 4."""
    models = ["ReLU", "Abs2-Neg", "ReLU-L2"]
    kw = dict(runs=3, epochs=12, eval_every=4, device="cuda", engine=engine, precision=precision)
    monkeypatch.setenv("DISTREP_CUDA_GRAPHS", "0")
    eager = sweep(raw, models, **kw)
    monkeypatch.delenv("DISTREP_CUDA_GRAPHS")
    graphed = sweep(raw, models, **kw)
    assert_same_bits(eager, graphed)


@pytest.mark.parametrize("engine,precision,streams", [
    ("fused", "bf16", "1"), ("fused", "tf32", "1"), ("fused", "fp32", "1"), ("hand-written", "fp32", "1"),
    ("fused", "3xtf32", "1"), ("fused", "fp32", "pipeline"), ("fused", "bf16", "pipeline"),
    ("fused", "3xtf32", "pipeline")])
def test_groups_on_concurrent_streams_train_the_same_bits(raw, engine, precision, streams, monkeypatch):
    """DISTREP_CUDA_STREAMS=1 records each variant's step on a stream of its own (the default
    for the fused step in TF32, 3xTF32 and bf16), =pipeline the fused step's products on one
    stream and its kernels on another; the variants share no buffer they write (the input's
    operand they only read) and each variant's calls keep their order, so what they train is
    what the one-stream graph (=0) trains, bit for bit."""
    models = ["ReLU", "Abs2-Neg", "ReLU-L2"]
    kw = dict(runs=3, epochs=12, eval_every=4, device="cuda", engine=engine, precision=precision)
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", "0")
    one_stream = sweep(raw, models, **kw)
    monkeypatch.setenv("DISTREP_CUDA_STREAMS", streams)
    concurrent = sweep(raw, models, **kw)
    assert_same_bits(one_stream, concurrent)


@pytest.mark.parametrize("precision,cap", [("bf16", 128), ("tf32", 168), ("fp32", 168)])
def test_fused_kernel_with_fewer_registers_trains_the_same_bits(raw, precision, cap, monkeypatch):
    """distrep.fused.MAX_REGISTERS caps the kernel's registers so that more programs share an
    SM; ptxas spills what does not fit but computes the same operations in the same order, so
    the capped kernel trains what the uncapped one trains, bit for bit (checked before a cap
    becomes a default)."""
    from distrep import fused
    models = ["ReLU2", "Abs-L2-Neg"]
    kw = dict(runs=2, epochs=8, eval_every=4, device="cuda", engine="fused", precision=precision)
    uncapped = sweep(raw, models, **kw)
    monkeypatch.setitem(fused.MAX_REGISTERS, precision, cap)
    capped = sweep(raw, models, **kw)
    assert_same_bits(uncapped, capped)


@pytest.mark.parametrize("kernel", ["expanded", "hybrid"])
def test_fused_offsetl2_kernels_with_products_match_the_direct_one_on_cuda(standardized, kernel, monkeypatch):
    """In TF32 and bf16 the kernels that compute OffsetL2 with tensor-core products of exact
    operands (distrep.fused.OFFSETL2_KERNEL) give the direct kernel's gradients in the same mode,
    for both forms of the layer, to the rounding of their operands: relative 1e-2 (TF32) or
    5e-2 (bf16) per parameter (under the interpreter, which emulates the rounding: up to 1.5e-2
    in bf16), and not bit for bit. A gradient built from the wrong partial sums or a product with
    a wrong sign is off by O(1)."""
    from distrep import fused
    x_t = standardized.x_train.t().contiguous().cuda()
    y = standardized.y_train.cuda()
    bound = {"tf32": 1e-2, "bf16": 5e-2}

    def gradients(model, form, precision):
        cfg = SweepConfig(models=[model], runs=2, epochs=1, engine="fused", device="cuda",
                          precision=precision, offsetl2_form=form)
        s = Sweep(cfg, standardized, progress=False)
        _, (group,) = s.chunk_trainer(s.chunks()[0])
        group.gradients(x_t, y, x_t.bfloat16() if precision == "bf16" else None)
        return {k: v.clone() for k, v in group.grads.items()}

    print(f"\n{kernel} against direct, largest relative difference per parameter:")
    for precision in ("tf32", "bf16"):
        for model, form in [("ReLU-L2", "paper"), ("Abs-L2-Neg", "coded")]:
            with monkeypatch.context() as m:
                m.setitem(fused.OFFSETL2_KERNEL, precision, "direct")
                direct = gradients(model, form, precision)
            with monkeypatch.context() as m:
                m.setitem(fused.OFFSETL2_KERNEL, precision, kernel)
                other = gradients(model, form, precision)
            diffs = {name: relative(other[name].cpu(), g.cpu()) for name, g in direct.items()}
            print(f"  {precision} {model} {form}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
            assert all(v < bound[precision] for v in diffs.values()), (precision, model, diffs)
            assert max(diffs.values()) > 0, (precision, model)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_fused_expanded_distances_near_a_prototype_on_cuda(standardized, precision, monkeypatch):
    """The expanded OffsetL2 kernel on the GPU's tensor cores, prototypes 10^-3 |h| from an
    example's own h (tests.test_fused.distances_near_a_prototype): the products of the rounded
    operands are exact and summed in fp32, so the distance stays within what the mode's rounding
    of h moves it by, where rounding h^2 once is off by several times that."""
    from distrep import fused
    from tests.test_fused import distances_near_a_prototype
    monkeypatch.setitem(fused.OFFSETL2_KERNEL, precision, "expanded")
    error, naive = distances_near_a_prototype(standardized, precision, "cuda")
    print(f"\nexpanded, CUDA, {precision}: error / bound {error:.2f}; with h^2 rounded once {naive:.1f}")
    assert error <= 1 and naive > 3, (error, naive)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "3xtf32"])
def test_the_memory_plan_bounds_a_fused_sweeps_peak_on_cuda(mnist, precision):
    """A sweep's chunk must fit the budget it was planned for: on full MNIST (the test pass's
    buffers beside training's, as the fused step keeps them), a fused chunk of two variants x 4
    runs, 3 epochs with a test pass each, CUDA graphs as by default, peaks within the plan
    (:meth:`Sweep.memory_plan`), give or take 128 MiB of CUDA's own workspaces outside any
    chunk; and the plan is no gross overestimate (more than half of it used)."""
    cfg = SweepConfig(models=["ReLU2-Neg", "Abs-L2"], runs=4, epochs=3, eval_every=1,
                      device="cuda", engine="fused", precision=precision, max_memory=40 << 30)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sweep = Sweep(cfg, mnist, progress=False)
    fixed, per_run = sweep.memory_plan()
    assert len(sweep.chunks()) == 1
    sweep.run()
    peak = torch.cuda.max_memory_allocated() - before
    plan = fixed + cfg.runs * sum(per_run)
    print(f"\n{precision}: peak {peak / 2**20:.0f} MiB against a plan of {plan / 2**20:.0f} MiB "
          f"({peak / plan:.0%})")
    assert peak <= plan + (128 << 20)
    assert peak > plan / 2
