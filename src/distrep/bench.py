"""``distrep bench``: the engine against an author-style training loop, side by side, one process
(and on the CPU, with ``--processes K``, also as K processes of one thread: :func:`engine_per_core`).

Everything printed is measured in the same invocation on the same device: the GEMM peak, an
author-style loop per table (one ``nn.Module``, ``torch.optim.SGD``, full batch, a test pass
every epoch, as the paper's code trains: ReLU2 for Table 1, ReLU-L2 with the author's fp32
OffsetL2 arithmetic for Table 3), and the engine on the paper's variants, each against its
table's loop. The GEMM peak and the author loop are measured again right before and right after
every engine case, so that each fraction and ratio compares moments minutes apart, not the
start of a long invocation with its end (a shared host drifts by tens of percent); with
``repeats`` each case is timed so several times and its median reading reported. Engine
times are steady state (after one warm-up step, buffers allocated), include a test pass every
10 epochs (the engine's default) and cover every chunk the memory budget asks for.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distrep import stats
from distrep.data import Dataset, load_dataset
from distrep.constant_features import FeatureSplit
from distrep.engine import (CUDA_PRECISIONS, PATHS, PRECISIONS, computes, engine_path, matmul_nt,
                            reads_varying_features)
from distrep.errors import DistrepError
from distrep.fused import head_products, offsetl2_kernel
from distrep.graphs import GraphedStep, step_function
from distrep.layers import CODED_CLAMP
from distrep.models import TABLE1, TABLE3, create_model, parse
from distrep.provenance import describe_device, resolve_device
from distrep.storage import atomic_write_bytes
from distrep.sweep import GiB, Sweep, SweepConfig, matmul_precision, sync, timed

# run-epochs of each table: runs x variants x epochs. Table 1 as the text states it (5,000 epochs)
# and as its numbers were produced (50,000; see distrep.paper); Table 3's baselines are Table 1's
# runs, so only its four OffsetL2 variants are extra.
PROTOCOL = {"Table 1 (stated)": (20 * 6, 5000), "Table 1 (as produced)": (20 * 6, 50000),
            "Table 2": (20 * 6, 5000), "Table 3": (20 * 4, 50000)}


# the side of the square product that measures a device's GEMM peak
PEAK_SIZE = {"cpu": 4096, "cuda": 8192}


def gemm_peak(device: torch.device, dtype=torch.float32, tf32: bool = False) -> float:
    """The best GFLOP/s of a large square product, through each path the engine may use
    (with ``tf32``: fp32 operands on CUDA's TF32 tensor cores)."""
    size = PEAK_SIZE[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    paths = [lambda: a @ b]
    if dtype == torch.float32:
        paths.append(lambda: matmul_nt(a, b))
    with matmul_precision("tf32" if tf32 else "none", device):
        return max(2 * size ** 3 / timed(p, device, 3) / 1e9 for p in paths)


def peak(device: torch.device, precision: str) -> float:
    """:func:`gemm_peak` of a precision's products: fp32, bf16, or fp32 on TF32 tensor cores;
    for 3xtf32, which computes fp32's products on tensor cores, fp32's (so it can pass 100 %)."""
    if precision == "bf16":
        return gemm_peak(device, torch.bfloat16)
    return gemm_peak(device, tf32=precision == "tf32")


def peak_name(precision: str) -> str:
    """The precision whose GEMM peak :func:`peak` measures for ``precision``."""
    return "fp32" if precision == "3xtf32" else precision


def skipped_flops(n: int, features: int, width: int = 128) -> float:
    """The arithmetic of one training epoch that a step reading only the varying input features
    does not do (:mod:`distrep.constant_features`): ``features`` columns of the first layer's
    forward and weight-gradient products, 2 x 2 x n x width each."""
    return 4.0 * n * width * features


def flops_per_run_epoch(model: str, n: int, n_test: int, eval_every: int, width: int = 128,
                        in_features: int = 784, classes: int = 10) -> float:
    """Multiply-adds x 2 of one training epoch (forward, weight gradients, input gradients
    where needed) plus a test forward pass every ``eval_every`` epochs."""
    train = test = 0.0
    for k, layer in enumerate(l for l in parse(model, width, in_features, classes) if l.affine):
        mac = layer.in_features * layer.out_features
        products = 2 if layer.kind == "offsetl2" else 1           # x^2 and x terms
        train += 2 * n * mac * products * (2 + (k > 0))           # forward, dW, dx
        test += 2 * n_test * mac * products
    return train + test / eval_every


class AuthorOffsetL2(nn.Module):
    """OffsetL2 as the author's code computes it, the baseline of Table 3's author-style loop:
    s = x^2 @ alpha^T + sum_i mu_i^2 alpha_i - 2 x @ (mu * alpha)^T in the input's precision
    (fp32; distrep accumulates s in float64), y = sqrt(max(s, 1e-12)). ``[n, in] -> [n, out]``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(out_features, in_features) * 0.1)
        self.alpha = nn.Parameter(torch.ones(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * x) @ self.alpha.T + (self.mu * self.mu * self.alpha).sum(1) - 2 * (x @ (self.mu * self.alpha).T)
        return torch.sqrt(torch.clamp(s, min=CODED_CLAMP))


# The model each table's author-style loop trains: ReLU2 for Table 1, ReLU-L2 for Table 3.
AUTHOR_MODELS = {"Table 1": "ReLU2", "Table 3": "ReLU-L2"}


def author_model(label: str) -> nn.Module:
    """The table's model from seed 0; for Table 3 its OffsetL2 computed the author's way (same
    initial parameters)."""
    model = create_model(AUTHOR_MODELS[label], seed=0)
    if label == "Table 3":
        head = AuthorOffsetL2(model[2].in_features, model[2].out_features)
        head.load_state_dict(model[2].state_dict())
        model[2] = head
    return model


def author_loop(data: Dataset, device: torch.device, epochs: int, label: str = "Table 1") -> float:
    """Seconds per run-epoch of the paper's own way for one table's kind of model (module,
    optimizer, full batch, test pass every epoch)."""
    model = author_model(label).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = data.x_train.to(device), data.y_train.to(device)
    xt, yt = data.x_test.to(device), data.y_test.to(device)

    def epoch():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            (model(xt).argmax(1) == yt).float().mean().item()
    return timed(epoch, device, epochs)


def engine(models: list[str], runs: int, data: Dataset, device: torch.device, precision: str,
           epochs: int, max_memory: int, eval_every: int = 10, engine_name: str = "auto",
           ready=None) -> tuple[float, float, str]:
    """(seconds per run-epoch of the engine summed over the chunks the memory budget needs,
    seconds of warm-up: the first steps, which compile on the compiled path, how the step was
    replayed: "" (not as a CUDA graph of its own), or "CUDA graphs" with the streams of its
    :func:`~distrep.graphs.stream_schedule` named: :func:`~distrep.graphs.step_function`).
    ``ready()``, if given, is called once, after the first chunk's warm-up and before its timing
    (where :func:`engine_per_core`'s processes wait for each other)."""
    config = SweepConfig(models=models, runs=runs, epochs=epochs, precision=precision,
                         device=str(device), max_memory=max_memory, eval_every=eval_every,
                         engine=engine_name)
    sweep = Sweep(config, data, progress=False)
    x_t, y = data.x_train.t().contiguous().to(device), data.y_train.to(device)
    x_test_t, y_test = data.x_test.t().contiguous().to(device), data.y_test.to(device)
    x_bf16 = x_t.bfloat16() if precision == "bf16" else None
    with matmul_precision(precision, device):
        return _engine_seconds(sweep, x_t, y, x_test_t, y_test, x_bf16, epochs, eval_every, ready)


def _engine_seconds(sweep, x_t, y, x_test_t, y_test, x_bf16, epochs, eval_every, ready=None
                    ) -> tuple[float, float, str]:
    device, runs, models = sweep.device, sweep.config.runs, sweep.specs
    total = setup = 0.0
    replay = ""
    for chunk in sweep.chunks():
        start = time.perf_counter()
        trainer, groups = sweep.chunk_trainer(chunk)
        frozen = [torch.zeros(g.runs, dtype=torch.bool, device=device) for g in groups]
        one_step = step_function(trainer, x_t, y, 1e-3, frozen, x_bf16)
        graphed = isinstance(one_step, GraphedStep)
        if graphed:
            replay = "CUDA graphs" + {"one": "", "per-variant": ", a stream per variant",
                                      "pipeline": ", products and kernels pipelined on two streams"
                                      }[one_step.schedule]
        # the step's own CUDA graph records on call WARMUP + 1; the compiled path's records on
        # the second call and replays from the third
        warmup = GraphedStep.WARMUP + 1 if graphed else 3 if sweep.config.engine == "compiled" else 1
        for _ in range(warmup):
            one_step()
            trainer.evaluate(x_test_t, y_test)
        sync(device)
        setup += time.perf_counter() - start
        if ready is not None:
            ready()
            ready = None
        step = timed(one_step, device, epochs, warmup=0)
        test = timed(lambda: trainer.evaluate(x_test_t, y_test), device, 1, warmup=0)
        total += step + test / eval_every
        trainer = groups = None   # free this chunk's buffers before building the next
    return total / (runs * len(models)), setup, replay


def split_runs(runs: int, processes: int) -> list[int]:
    """Each process's share of a variant's runs, as even as can be and none empty: 20 over 3 ->
    [7, 7, 6]; 1 over 2 -> [1]."""
    k = min(runs, processes)
    return [runs // k + (i < runs % k) for i in range(k)]


def per_core_seconds(readings: list[tuple[int, float]], runs: int) -> float:
    """Seconds per run-epoch of processes that start together, from each one's ``(runs, seconds
    per run-epoch of its own runs)``: the slowest bounds the wall time, max_k(r_k s_k) / runs."""
    return max(r * s for r, s in readings) / runs


def engine_per_core(models: list[str], runs: int, train_subset: int | None, precision: str,
                    epochs: int, max_memory: int, processes: int, engine_name: str = "auto",
                    timeout: float = 3600.0) -> dict:
    """The engine on the CPU run as ``processes`` processes of one thread each, each training its
    share (:func:`split_runs`) of every variant's runs within its share of ``max_memory``: how
    ``--executor ray --cpus-per-chunk 1`` trains a sweep's chunks on one machine. The processes
    wait for each other after their warm-up, so their timed steps run side by side.

    Returns ``{"s"``: seconds per run-epoch of them all (:func:`per_core_seconds`), ``"setup_s"``:
    the slowest warm-up, ``"start_spread_s"``: how far apart their timed steps began,
    ``"peak_rss_gib"``: their peak resident memory together (None where the OS does not say),
    ``"processes"``: each one's ``{"runs", "threads", "pid", "s", "setup_s", "peak_rss_gib"}}``."""
    shares = split_runs(runs, processes)
    context = multiprocessing.get_context("spawn")   # a fresh interpreter: no forked OpenMP state
    barrier, results = context.Barrier(len(shares)), context.Queue()
    workers = [context.Process(target=_per_core_worker, args=(
        k, models, share, train_subset, precision, epochs, max_memory // len(shares), engine_name,
        barrier, results)) for k, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    readings, began = [], time.monotonic()
    try:
        while len(readings) < len(workers):
            try:
                reading = results.get(timeout=1.0)
            except queue.Empty:
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead or time.monotonic() - began > timeout:
                    why = f"exited with status {dead[0]}" if dead else f"took over {timeout:.0f} s"
                    raise DistrepError(f"a bench process {why} before its reading") from None
                continue
            if isinstance(reading, str):
                raise DistrepError(f"a bench process failed: {reading}")
            readings.append(reading)
    finally:
        for worker in workers:
            worker.join(timeout=10.0 if len(readings) == len(workers) else 0.0)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    readings.sort(key=lambda r: r.pop("index"))
    started = [r.pop("started") for r in readings]
    rss = [r["peak_rss_gib"] for r in readings]
    return {"s": per_core_seconds([(r["runs"], r["s"]) for r in readings], runs),
            "setup_s": max(r["setup_s"] for r in readings),
            "start_spread_s": max(started) - min(started),
            "peak_rss_gib": None if None in rss else sum(rss), "processes": readings}


def _per_core_worker(index, models, runs, train_subset, precision, epochs, max_memory,
                     engine_name, barrier, results) -> None:
    """Process ``index`` of :func:`engine_per_core`: puts its reading, or the error's one-line
    description, on ``results``."""
    try:
        torch.set_num_threads(1)
        data = load_dataset("mnist", "raw").subset(train_subset)
        started = []

        def ready():
            barrier.wait()
            started.append(time.monotonic())     # CLOCK_MONOTONIC: one clock for all processes

        seconds, setup, _ = engine(models, runs, data, torch.device("cpu"), precision, epochs,
                                   max_memory, engine_name=engine_name, ready=ready)
        results.put({"index": index, "runs": runs, "threads": torch.get_num_threads(),
                     "pid": os.getpid(), "s": seconds, "setup_s": setup, "started": started[0],
                     "peak_rss_gib": _own_peak_rss_gib()})
    except BaseException as e:   # noqa: BLE001 - reported to the parent, which stops the rest
        results.put(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")


def _own_peak_rss_gib() -> float | None:
    """This process's peak resident memory from /proc (Linux), or None. (Not ``getrusage``: a
    spawned process's ``ru_maxrss`` starts from its parent's, which exec folds into it.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return None


def case_key(label: str, precision: str, path: str = "hand-written", per_core: bool = False) -> str:
    """``"Table 1 fp32"`` (the hand-written step), ``"Table 1 fp32 compiled"``, or timed as a
    process per core (:func:`engine_per_core`) ``"Table 1 fp32 per-core"``."""
    return (f"{label} {precision}" + ("" if path == "hand-written" else f" {path}")
            + (" per-core" if per_core else ""))


def describe_case(case: dict, label: str, precision: str, path: str, runs: int, processes: int,
                  repeats: int) -> str:
    """The line ``bench`` prints for one engine case (:func:`summarize`'s dict)."""
    how = f", {case['replay']}" if case["replay"] else ""
    if path == "fused" and head_products(precision) not in ("ieee", precision):
        how += f", a linear output layer's products {head_products(precision)}"     # fp32's choice
    if processes > 1:
        shares = split_runs(runs, processes)
        how += (f", {len(shares)} processes of one thread side by side, "
                f"{'/'.join(map(str, shares))} runs of each variant")
    return (f"engine ({path}{how}), {label} variants x {runs} runs, {precision}: "
            f"{case['s'] * 1e3:.3g} ms per run-epoch = {1 / case['s']:,.0f} run-epochs/s, "
            f"{case['gflops']:.0f} GFLOP/s = {case['fraction']:.0%} of the "
            f"{peak_name(precision)} GEMM peak measured around it ({case['peak_gflops']:.0f})"
            + (f" counting the model's arithmetic, {case['fraction_done']:.0%} counting what the step "
               f"does (its first-layer products skip the {case['skipped_features']} input features "
               f"constant over the training images)" if case.get("skipped_features") else "")
            + "; "
            f"{case['speedup']:.2f}x the author-style loop of {label} around it "
            f"({case['author_s'] * 1e3:.3g} ms; warm-up {case['setup_s']:.0f} s)"
            + (f"; the median of {repeats} repeats, each against its own peak and loop "
               f"(all: {case['fraction_range'][0]:.0%}-{case['fraction_range'][1]:.0%} of "
               f"the peak, {case['speedup_range'][0]:.2f}-{case['speedup_range'][1]:.2f}x "
               f"the loop)" if repeats > 1 else ""))


def summarize(readings: list[dict]) -> dict:
    """One engine case from its readings (each ``{"s", "gflops", "peak_gflops", "author_s",
    ...}``): the reading whose fraction of the GEMM peak is the median (the lower middle one
    for an even count), with its ``fraction`` (gflops / peak_gflops) and ``speedup``
    (author_s / s), the range of each over every reading, and the readings themselves under
    ``repeats`` (when more than one). Each fraction is taken against the peak measured around
    its own reading, so a slow spell of the host moves the engine and its peak together."""
    readings = [dict(r, fraction=r["gflops"] / r["peak_gflops"], speedup=r["author_s"] / r["s"],
                     **({"fraction_done": r["gflops_done"] / r["peak_gflops"]} if "gflops_done" in r else {}))
                for r in readings]
    case = dict(sorted(readings, key=lambda r: r["fraction"])[(len(readings) - 1) // 2])
    for name in ("fraction", "speedup"):
        values = [r[name] for r in readings]
        case[f"{name}_range"] = (min(values), max(values))
    if len(readings) > 1:
        case["repeats"] = readings
    return case


def run_bench(device_name: str = "auto", runs: int = 20, epochs: int = 2,
              max_memory: int = 8 * GiB, train_subset: int | None = None,
              bf16: bool = True, engines: tuple[str, ...] = ("auto",),
              precisions: tuple[str, ...] | None = None, repeats: int = 1, processes: int = 1,
              log=print) -> dict:
    """Times every engine case ``repeats`` times, each between its own measurements of the GEMM
    peak and the author loop, and reports the median reading with the range of them all. With
    ``processes`` > 1 (CPU) each case is also timed as that many processes of one thread side by
    side (:func:`engine_per_core`)."""
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    data = load_dataset("mnist", "raw").subset(train_subset)
    n, n_test = len(data.y_train), len(data.y_test)
    log(f"device: {describe_device(device)}; {n} training images, {runs} runs per variant, "
        f"{epochs} timed epochs after a warm-up")
    out: dict = {"device": describe_device(device), "n_train": n, "runs": runs}
    if precisions is None:
        precisions = ("fp32",) + (("bf16",) if bf16 else ()) + (CUDA_PRECISIONS if cuda else ())
    peaks = {name: peak(device, name) for name in dict.fromkeys(("fp32", *map(peak_name, precisions)))}
    out["peaks"] = peaks
    log(f"GEMM peak ({PEAK_SIZE[device.type]}^3): "
        + ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in peaks.items()))
    def loop(label: str) -> float:
        return author_loop(data, device, max(epochs, 3), label)

    out["author_s"] = {label: loop(label) for label in AUTHOR_MODELS}
    for label, model in AUTHOR_MODELS.items():
        log(f"author-style loop, {label} ({model}; nn.Module + torch.optim.SGD, test pass every "
            f"epoch): {out['author_s'][label] * 1e3:.3g} ms per run-epoch")

    # input features constant over the training images, which some paths' products skip
    constant = len(FeatureSplit.of(data.x_train.t()).constant)
    per_core_rss: list[float | None] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # each engine asked for as the path it takes here (auto: fused on CUDA), each path once
    paths = dict.fromkeys(engine_path(parse(TABLE1[0]), e, device) for e in engines)
    for path in paths:
        for label in ("Table 1", "Table 3"):
            for precision in filter(lambda p: computes(path, p), precisions):
                models = list(TABLE3 if label == "Table 3" else TABLE1)
                flops = np.mean([flops_per_run_epoch(m, n, n_test, 10) for m in models])
                skipped = constant if reads_varying_features(path) else 0
                flops_done = flops - skipped_flops(n, skipped)

                def reading(k: int) -> dict:
                    # A shared host's speed drifts by tens of percent within minutes, so the GEMM
                    # peak and the table's author loop are measured right before and right after
                    # the case, and the engine is compared with the better of each (a slow moment
                    # in one of the two cannot flatter the engine).
                    peak_before, loop_before = peak(device, precision), loop(label)
                    replay = ""
                    if k == 1:
                        seconds, setup, replay = engine(models, runs, data, device, precision,
                                                        epochs, max_memory, engine_name=path)
                    else:
                        side_by_side = engine_per_core(models, runs, train_subset, precision,
                                                       epochs, max_memory, k, path)
                        seconds, setup = side_by_side["s"], side_by_side["setup_s"]
                        per_core_rss.append(side_by_side["peak_rss_gib"])
                    return {"s": seconds, "gflops": flops / seconds / 1e9, "setup_s": setup,
                            "gflops_done": flops_done / seconds / 1e9, "skipped_features": skipped,
                            "replay": replay, "peak_gflops": max(peak_before, peak(device, precision)),
                            "author_s": min(loop_before, loop(label))}

                for k in dict.fromkeys((1, processes)):
                    key = case_key(label, precision, path, per_core=k > 1)
                    out[key] = case = summarize([reading(k) for _ in range(repeats)])
                    log(describe_case(case, label, precision, path, runs, k, repeats))
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    else:
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    children = ""
    if per_core_rss and None not in per_core_rss:
        out["peak_memory_per_core_gib"] = max(per_core_rss)
        children = (f"; the processes of one thread side by side at most "
                    f"{out['peak_memory_per_core_gib']:.2f} GiB together")
    log(f"peak memory: {out['peak_memory_gib']:.2f} GiB "
        f"({'CUDA allocations' if cuda else 'process RSS'}{children}; budget {max_memory / GiB:.1f} GiB)")
    if n == 60000:
        for line in projections(out):
            log(line)
    return out


def measured_cases(out: dict, label: str, precision: str) -> list[tuple[str, float]]:
    """``(engine, seconds per run-epoch)`` of every case of ``label`` in ``precision`` that
    ``out`` holds, e.g. ``("hand-written", 0.14)``, ``("hand-written, a process per core", 0.13)``."""
    cases = []
    for path in PATHS:
        for per_core, how in ((False, ""), (True, ", a process per core")):
            key = case_key(label, precision, path, per_core)
            if key in out:
                cases.append((path + how, out[key]["s"]))
    return cases


def projections(out: dict) -> list[str]:
    """Projected wall time of each table, and of the whole paper as produced (every run once),
    from the measured seconds per run-epoch ``out["Table 1 fp32"]["s"]`` etc., for every
    engine and precision measured; for the whole paper also the fastest engine per table."""
    lines = []
    for table, (run_count, table_epochs) in PROTOCOL.items():
        label = "Table 3" if table == "Table 3" else "Table 1"
        for precision in PRECISIONS:
            for name, seconds in measured_cases(out, label, precision):
                hours = run_count * table_epochs * seconds / 3600
                lines.append(f"projected {table} ({run_count} runs x {table_epochs} epochs, "
                             f"{precision} {name}): {format_hours(hours)}"
                             + (" (Table 2's variants cost what Table 1's do)" if table == "Table 2" else ""))
    baseline = sum(r * e for t, (r, e) in PROTOCOL.items() if t in ("Table 1 (as produced)", "Table 2"))
    offsetl2 = PROTOCOL["Table 3"][0] * PROTOCOL["Table 3"][1]
    for precision in PRECISIONS:
        best = {label: min(cases, key=lambda case: case[1])
                for label in ("Table 1", "Table 3") if (cases := measured_cases(out, label, precision))}
        if len(best) == 2:
            hours = (baseline * best["Table 1"][1] + offsetl2 * best["Table 3"][1]) / 3600
            lines.append(f"projected: the whole paper as produced (Tables 1-3, every run once: "
                         f"{(baseline + offsetl2) / 1e6:.1f} million run-epochs, {precision}, "
                         f"Table 1 {best['Table 1'][0]}, Table 3 {best['Table 3'][0]}): "
                         f"{format_hours(hours)}")
    return lines


def format_hours(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


# Models whose runs are chaotic on raw pixels (README): a rounding difference sends a run down
# another trajectory, so run-by-run agreement cannot be expected of any precision, fp32 on
# another device included; only their distributions over runs can be compared.
CHAOTIC = ("Abs2-Neg", "ReLU2")
MARGIN = 0.1          # points of test accuracy: the equivalence margin for the stable models


def equivalence(diffs: np.ndarray, margin: float = MARGIN) -> tuple[np.ndarray, str]:
    """(paired 95 % interval of the mean difference, verdict) for per-run differences ``diffs``
    (points): "equivalent" when the interval lies within +-margin, "different" when it excludes
    0 and lies outside the margin, else "inconclusive"."""
    ci = stats.t_interval(diffs)
    if np.isnan(ci).any():
        return ci, "inconclusive (too few runs)"
    if -margin <= ci[0] and ci[1] <= margin:
        return ci, f"equivalent within ±{margin:g}"
    if ci[0] > margin or ci[1] < -margin:
        return ci, f"different (beyond ±{margin:g})"
    return ci, "inconclusive (interval reaches past the margin)"


def paired_rows(reference: dict[str, np.ndarray], other: dict[str, np.ndarray],
                label: str) -> list[dict]:
    """Per model of ``reference`` (model -> final test accuracy per run, points, NaN for a
    diverged run) that ``other`` has too: ``other - reference`` run by run, paired by index
    (the same seed), as a row of the accuracy report: both means, the mean difference, its
    paired 95 % interval, the largest per-run difference and the :func:`equivalence` verdict;
    for the :data:`CHAOTIC` models a Welch test of the two distributions instead."""
    rows = []
    for model, a in reference.items():
        if model not in other:
            continue
        a, b = np.asarray(a, dtype=float), np.asarray(other[model], dtype=float)
        if len(a) != len(b):
            raise DistrepError(f"{model}: {len(a)} runs against {len(b)}; paired runs need the same seeds")
        both = ~np.isnan(a) & ~np.isnan(b)
        d = b[both] - a[both]
        ci, verdict = equivalence(d)
        if model in CHAOTIC:
            welch = stats.welch_t(b[~np.isnan(b)], a[~np.isnan(a)])
            verdict = (f"chaotic: runs do not pair; distributions "
                       f"{'differ' if welch.p < 0.05 else 'show no difference'} (Welch p = {welch.p:.2f})")
        rows.append({"precision": label, "model": model, "fp32": stats.mean(a[both]),
                     "other": stats.mean(b[both]), "diff": stats.mean(d), "ci": ci.tolist(),
                     "max_abs": float(np.abs(d).max()) if len(d) else float("nan"),
                     "pairs": int(both.sum()), "verdict": verdict})
    return rows


def describe_row(row: dict, other: str, reference: str) -> str:
    """One line for a row of :func:`paired_rows`: the difference ``other - reference``, its
    interval, the verdict."""
    return (f"{row['model']:<12} {other} - {reference}: {row['diff']:+.3f} points "
            f"{interval(row['ci'])} over {row['pairs']} paired runs, largest "
            f"|difference| {row['max_abs']:.2f}: {row['verdict']}")


def interval(ci) -> str:
    """``[lo, hi]`` in points, or what stands in for it where there is none (fewer than two
    pairs, or runs that do not pair)."""
    lo, hi = ci
    return f"[{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) and np.isfinite(hi) else "(no interval)"


def accuracy_check(device_name: str = "cpu", precisions: tuple[str, ...] = ("bf16",), runs: int = 5,
                   epochs: int = 300, train_subset: int | None = 10000, engine_name: str = "auto",
                   out_dir=None, log=print) -> dict:
    """Train Table 1's and Table 3's models (Table 3 as the author's code computes it) in fp32
    and in each of ``precisions`` from the same seeds on the same data, and compare each
    run's final test accuracy with its fp32 twin: per model the mean difference, its paired
    95 % interval and an equivalence verdict against ``MARGIN`` (the chaotic models: a Welch
    test of the two distributions instead). With ``out_dir``: ``accuracy.json`` (every run's
    accuracy and the precision it trained in) and ``accuracy.md``, written atomically."""
    data = load_dataset("mnist", "raw")
    resolved = resolve_device(device_name)
    device = str(resolved)
    models = list(TABLE1 + TABLE3)
    path = engine_path(parse(models[0]), engine_name, resolved)
    finals, seconds = {}, {}
    for precision in ("fp32", *precisions):
        config = SweepConfig(models=models, runs=runs, epochs=epochs, train_subset=train_subset,
                             precision=precision, eval_every=epochs, device=device,
                             offsetl2_form="coded", engine=engine_name,
                             max_memory=(40 if resolved.type == "cuda" else 8) * GiB)
        start = time.perf_counter()
        results = Sweep(config, data, progress=False).run()
        seconds[precision] = time.perf_counter() - start
        finals[precision] = {r.name: 100 * r.arrays["final_test_acc"] for r in results}
        log(f"{precision}: {len(models)} models x {runs} runs x {epochs} epochs trained in "
            f"{seconds[precision]:.0f} s")          # progress, for a pass that may be cut short
    rows = []
    for precision in precisions:
        judged = paired_rows(finals["fp32"], finals[precision], precision)
        for row in judged:
            log(describe_row(row, precision, "fp32"))
        rows += judged
    n = train_subset or len(data.y_train)
    protocol = (f"{runs} paired runs x {len(models)} models x {epochs} epochs on {n} MNIST images "
                f"(raw pixels, lr 0.001, OffsetL2 coded), engine {path}, {describe_device(resolved)}")
    if path == "fused":
        protocol += "; the kernel's OffsetL2 form: " + ", ".join(
            f"{p} {offsetl2_kernel(p)}" for p in ("fp32", *precisions)) + "; its linear output layer's products: " + ", ".join(
            f"{p} {head_products(p)}" for p in ("fp32", *precisions))
    log("wall time " + ", ".join(f"{p} {seconds[p]:.0f} s" for p in seconds) + f" ({protocol})")
    out = {"protocol": protocol, "margin": MARGIN, "seconds": seconds, "rows": rows,
           "runs": {p: {m: v.tolist() for m, v in per.items()} for p, per in finals.items()}}
    if out_dir is not None:
        write_accuracy(Path(out_dir), out)
    return out


def read_accuracy_runs(path: Path, precision: str) -> dict[str, np.ndarray]:
    """The final test accuracy of every run in ``precision`` (model -> per-run points) from an
    ``accuracy.json`` that :func:`accuracy_check` wrote."""
    try:
        runs = json.loads(Path(path).read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DistrepError(f"{path}: not an accuracy.json of distrep bench --accuracy ({e})") from None
    if precision not in runs:
        raise DistrepError(f"{path}: no runs in {precision} (it has {', '.join(runs)})")
    return {m: np.array(v, dtype=float) for m, v in runs[precision].items()}


def compare_records(reference: Path, reference_precision: str, other: Path,
                    other_precision: str) -> list[dict]:
    """Rows of :func:`paired_rows` for ``other``'s runs in ``other_precision`` against
    ``reference``'s in ``reference_precision``, two ``accuracy.json`` files from the same seeds:
    how far apart two implementations (two devices, two versions of the code, two precisions)
    train the same runs. fp32 against fp32 gives the floor that any change of rounding sets."""
    a = read_accuracy_runs(reference, reference_precision)
    b = read_accuracy_runs(other, other_precision)
    rows = paired_rows(a, b, other_precision)
    if not rows:
        raise DistrepError(f"{reference} and {other} share no model")
    return rows


def write_accuracy(directory: Path, out: dict) -> None:
    """``accuracy.json`` and ``accuracy.md`` (the verdict table) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# Reduced precision against fp32", "", f"Protocol: {out['protocol']}.", "",
             f"Each run's final test accuracy minus that of its fp32 twin (same seed, same data); "
             f"the paired 95 % interval of the mean difference; equivalent when it lies within "
             f"±{out['margin']:g} points. The chaotic models' runs do not pair (a rounding "
             f"difference changes the trajectory), so their distributions are compared instead.",
             "", "| precision | model | fp32 mean | its mean | difference | 95 % interval | "
             "largest per-run | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['precision']} | {r['model']} | {r['fp32']:.2f} | {r['other']:.2f} | "
                     f"{r['diff']:+.3f} | {interval(r['ci'])} | {r['max_abs']:.2f} | "
                     f"{r['verdict']} |")
    lines += ["", "Wall time: " + ", ".join(f"{p} {s:.0f} s" for p, s in out["seconds"].items()), ""]
    atomic_write_bytes(directory / "accuracy.json", json.dumps(out, indent=1).encode())
    atomic_write_bytes(directory / "accuracy.md", "\n".join(lines).encode())
