"""``distrep bench``: the engine against an author-style training loop, side by side, one process.

Everything printed is measured in the same invocation on the same device: the GEMM peak, the
author-style loop (one ``nn.Module``, ``torch.optim.SGD``, full batch, a test pass every epoch,
as the paper's code trains), and the engine on the paper's variants. Engine times are steady
state (after one warm-up step, buffers allocated), include a test pass every 10 epochs (the
engine's default) and cover every chunk the memory budget asks for.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from distrep.data import Dataset, load_dataset
from distrep.engine import matmul_nt
from distrep.models import TABLE1, TABLE3, create_model, parse
from distrep.provenance import describe_device, resolve_device
from distrep.sweep import GiB, Sweep, SweepConfig, matmul_precision

# run-epochs of each table's protocol: runs x variants x epochs
# run-epochs of each table: runs x variants x epochs. Table 1 as the text states it (5,000 epochs)
# and as its numbers were produced (50,000; see distrep.paper); Table 3's baselines are Table 1's
# runs, so only its four OffsetL2 variants are extra.
PROTOCOL = {"Table 1 (stated)": (20 * 6, 5000), "Table 1 (as produced)": (20 * 6, 50000),
            "Table 2": (20 * 6, 5000), "Table 3": (20 * 4, 50000)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Seconds per call of ``fn`` (after one untimed call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def gemm_peak(device: torch.device, dtype=torch.float32, tf32: bool = False) -> float:
    """The best GFLOP/s of a large square product, through each path the engine may use
    (with ``tf32``: fp32 operands on CUDA's TF32 tensor cores)."""
    size = 4096 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    paths = [lambda: a @ b]
    if dtype == torch.float32:
        paths.append(lambda: matmul_nt(a, b))
    with matmul_precision("tf32" if tf32 else "none", device):
        return max(2 * size ** 3 / timed(p, device, 3) / 1e9 for p in paths)


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


def author_loop(data: Dataset, device: torch.device, epochs: int) -> float:
    """Seconds per run-epoch of the paper's own way: module, optimizer, test pass every epoch."""
    model = create_model("ReLU2", seed=0).to(device)
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
           epochs: int, max_memory: int, eval_every: int = 10) -> float:
    """Seconds per run-epoch of the engine, summed over the chunks the memory budget needs."""
    config = SweepConfig(models=models, runs=runs, epochs=epochs, precision=precision,
                         device=str(device), max_memory=max_memory, eval_every=eval_every)
    sweep = Sweep(config, data, progress=False)
    x_t, y = data.x_train.t().contiguous().to(device), data.y_train.to(device)
    x_test_t, y_test = data.x_test.t().contiguous().to(device), data.y_test.to(device)
    x_bf16 = x_t.bfloat16() if precision == "bf16" else None
    with matmul_precision(precision, device):
        return _engine_seconds(sweep, x_t, y, x_test_t, y_test, x_bf16, epochs, eval_every)


def _engine_seconds(sweep, x_t, y, x_test_t, y_test, x_bf16, epochs, eval_every) -> float:
    device, runs, models = sweep.device, sweep.config.runs, sweep.specs
    total = 0.0
    for chunk in sweep.chunks():
        trainer, groups = sweep.chunk_trainer(chunk)
        frozen = [torch.zeros(g.runs, dtype=torch.bool, device=device) for g in groups]
        step = timed(lambda: trainer.step(x_t, y, 1e-3, frozen, x_bf16), device, epochs)
        test = timed(lambda: trainer.evaluate(x_test_t, y_test), device, 1)
        total += step + test / eval_every
        trainer = groups = None   # free this chunk's buffers before building the next
    return total / (runs * len(models))


def run_bench(device_name: str = "auto", runs: int = 20, epochs: int = 2,
              max_memory: int = 8 * GiB, train_subset: int | None = None,
              bf16: bool = True, log=print) -> dict:
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    data = load_dataset("mnist", "raw").subset(train_subset)
    n, n_test = len(data.y_train), len(data.y_test)
    log(f"device: {describe_device(device)}; {n} training images, {runs} runs per variant, "
        f"{epochs} timed epochs after a warm-up")
    out: dict = {"device": describe_device(device), "n_train": n, "runs": runs}
    peaks = {"fp32": gemm_peak(device)}
    if bf16:
        peaks["bf16"] = gemm_peak(device, torch.bfloat16)
    if cuda:
        peaks["tf32"] = gemm_peak(device, tf32=True)
    out["peaks"] = peaks
    log("GEMM peak (4096^3 on CPU / 8192^3 on GPU): "
        + ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in peaks.items()))
    out["author_s"] = author_loop(data, device, max(epochs, 3))
    log(f"author-style loop (nn.Module + torch.optim.SGD, test pass every epoch): "
        f"{out['author_s'] * 1e3:.3g} ms per run-epoch")

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cases = [("Table 1", "fp32"), ("Table 3", "fp32")]
    cases += [("Table 1", "bf16")] if bf16 else []
    cases += [("Table 1", "tf32")] if cuda else []
    for label, precision in cases:
        models = list(TABLE3 if label == "Table 3" else TABLE1)
        seconds = engine(models, runs, data, device, precision, epochs, max_memory)
        flops = np.mean([flops_per_run_epoch(m, n, n_test, 10) for m in models])
        key = f"{label} {precision}"
        out[key] = {"s": seconds, "gflops": flops / seconds / 1e9}
        log(f"engine, {label} variants x {runs} runs, {precision}: {seconds * 1e3:.3g} ms per run-epoch, "
            f"{out[key]['gflops']:.0f} GFLOP/s = {out[key]['gflops'] / peaks[precision]:.0%} of the "
            f"{precision} GEMM peak; {out['author_s'] / seconds:.2f}x the author-style loop")
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    else:
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    log(f"peak memory: {out['peak_memory_gib']:.2f} GiB "
        f"({'CUDA allocations' if cuda else 'process RSS'}; budget {max_memory / GiB:.1f} GiB)")
    if n == 60000:
        for line in projections(out):
            log(line)
    return out


def projections(out: dict) -> list[str]:
    """Projected wall time of each table, and of the whole paper as produced (every run once),
    from the measured seconds per run-epoch ``out["Table 1 fp32"]["s"]`` etc."""
    lines = []
    for table, (run_count, table_epochs) in PROTOCOL.items():
        label = "Table 3" if table == "Table 3" else "Table 1"
        for precision in ("fp32", "bf16", "tf32"):
            if f"{label} {precision}" in out:
                hours = run_count * table_epochs * out[f"{label} {precision}"]["s"] / 3600
                lines.append(f"projected {table} ({run_count} runs x {table_epochs} epochs, {precision}): "
                             f"{format_hours(hours)}"
                             + (" (Table 2's variants cost what Table 1's do)" if table == "Table 2" else ""))
    baseline = sum(r * e for t, (r, e) in PROTOCOL.items() if t in ("Table 1 (as produced)", "Table 2"))
    offsetl2 = PROTOCOL["Table 3"][0] * PROTOCOL["Table 3"][1]
    for precision in ("fp32", "bf16", "tf32"):
        if f"Table 1 {precision}" in out and f"Table 3 {precision}" in out:
            hours = (baseline * out[f"Table 1 {precision}"]["s"]
                     + offsetl2 * out[f"Table 3 {precision}"]["s"]) / 3600
            lines.append(f"projected: the whole paper as produced (Tables 1-3, every run once: "
                         f"{(baseline + offsetl2) / 1e6:.1f} million run-epochs, {precision}): "
                         f"{format_hours(hours)}")
    return lines


def format_hours(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def accuracy_check(device_name: str = "cpu", precisions: tuple[str, ...] = ("bf16",), runs: int = 5,
                   epochs: int = 300, train_subset: int | None = 10000, log=print) -> dict:
    """Final test accuracy of the Table 1 variants in fp32 and in each of ``precisions``
    (same seeds, same data), compared variant by variant."""
    data = load_dataset("mnist", "raw")
    device = str(resolve_device(device_name))
    out, results = {}, {}
    for precision in ("fp32", *precisions):
        config = SweepConfig(models=list(TABLE1), runs=runs, epochs=epochs, train_subset=train_subset,
                             precision=precision, eval_every=epochs, device=device)
        start = time.perf_counter()
        results[precision] = Sweep(config, data, progress=False).run()
        out[f"{precision}_s"] = time.perf_counter() - start
    for precision in precisions:
        for a, b in zip(results["fp32"], results[precision]):
            fa, fb = 100 * a.arrays["final_test_acc"], 100 * b.arrays["final_test_acc"]
            out[(a.name, precision)] = (fa.mean(), fb.mean())
            log(f"{a.name:<10} fp32 {fa.mean():6.2f} %  {precision} {fb.mean():6.2f} %  difference "
                f"of means {fb.mean() - fa.mean():+.2f} points, largest per-run |difference| "
                f"{np.abs(fa - fb).max():.2f}")
    log("wall time " + ", ".join(f"{p} {out[f'{p}_s']:.0f} s" for p in ("fp32", *precisions))
        + f" ({runs} runs x {len(TABLE1)} variants x {epochs} epochs on "
        f"{train_subset or len(data.y_train)} images, {device})")
    return out
