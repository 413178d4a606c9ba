"""Many runs of many variants, trained by the batched engine, with checkpoints and exact resume.

A sweep is R runs of each of several variants with one protocol. Run i of a variant starts
from ``create_model(variant, seed=seed_i)``, exactly as the reference trainer would start it,
and its seed depends only on the base seed, i and (in the unpaired design) the variant: never
on which other runs share its batch. In the default *paired* design seed_i = base_seed + i for
every variant, so run i of every variant starts from the same first-layer weights.

Results (``[runs, epochs]`` arrays per variant) and all state are checkpointed as plain tensors
(safetensors) at most every ``checkpoint_every`` seconds and after every chunk, atomically. A
job killed at any moment and started again resumes from its checkpoint and finishes with
results bit-identical to an uninterrupted job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distrep.data import Dataset, dataset_name, get_spec, load_dataset
from distrep.engine import (CUDA_PRECISIONS, EVAL_BATCH, PRECISIONS, AutogradRuns, CompiledRuns,
                            FusedRuns, StackedRuns, Trainer, computes, engine_path, stack_parameters)
from distrep.errors import DistrepError
from distrep.fused import example_major_input, head_products, offsetl2_kernel, partial_sums_bytes, unavailable
from distrep.graphs import step_function
from distrep.models import canonical_spec, create_model, display_name, name_digest, parse
from distrep.progress import progress
from distrep.provenance import describe_device, resolve_device, software_versions
from distrep.stopping import StopRequest
from distrep.storage import read_tensors, write_tensors
from distrep.train import MAX_SEED, check_fits, check_protocol, evaluation_epochs, run_bytes

GiB = 1 << 30
METRIC_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")
FINAL_KEYS = tuple(f"final_{k}" for k in METRIC_KEYS)


@dataclass
class SweepConfig:
    """R runs of each model under one protocol. Fields that change results are ``result_fields``."""

    models: list[str]
    runs: int = 20
    epochs: int = 5000
    lr: float = 1e-3
    width: int = 128
    dataset: str = "mnist"
    preprocess: str = "raw"
    train_subset: int | None = None
    eval_every: int = 10
    offsetl2_form: str = "paper"
    precision: str = "fp32"
    base_seed: int = 0
    paired: bool = True
    device: str = "cpu"
    max_memory: int = 8 * GiB
    checkpoint_every: float = 300.0
    max_runs_per_chunk: int | None = None
    engine: str = "auto"

    # device, engine path, memory budget and checkpoint interval never change a result (they
    # differ only in rounding); everything else does.
    @property
    def result_fields(self) -> dict:
        d = asdict(self)
        for key in ("device", "max_memory", "checkpoint_every", "max_runs_per_chunk", "engine"):
            d.pop(key)
        d["models"] = [canonical_spec(m) for m in self.models]
        return d

    def validate(self) -> "SweepConfig":
        if not self.models:
            raise DistrepError("no models given")
        specs = [canonical_spec(m) for m in self.models]   # unknown names raise here
        if len(set(specs)) != len(specs):
            raise DistrepError(f"a model is listed twice: {', '.join(self.models)}")
        if not isinstance(self.runs, int) or self.runs < 1:
            raise DistrepError(f"runs must be a positive integer, got {self.runs!r}")
        device = check_protocol(self)
        if self.base_seed < 0:
            raise DistrepError(f"base seed must be non-negative, got {self.base_seed}")
        check_fits(self.runs * sum(run_bytes(m, self.width, self.epochs, self.eval_every, self.dataset)
                                   for m in self.models),
                   f"{self.runs} runs of {len(self.models)} models at width {self.width} for "
                   f"{self.epochs} epochs would")
        top = max(self.base_seed + self._seed_offset(m) + self.runs - 1 for m in self.models)
        if top > MAX_SEED:
            raise DistrepError(f"seeds up to {top} do not fit in int64 (at most {MAX_SEED}); "
                               f"use a smaller --base-seed")
        if self.precision not in PRECISIONS:
            raise DistrepError(f"unknown precision {self.precision!r}; choose one of: "
                               f"{', '.join(PRECISIONS)}")
        if self.max_runs_per_chunk is not None and self.max_runs_per_chunk < 1:
            raise DistrepError(f"max runs per chunk must be at least 1, got {self.max_runs_per_chunk}")
        if self.max_memory <= 0:
            raise DistrepError(f"max memory must be positive, got {self.max_memory}")
        paths = {m: engine_path(self.layers(m), self.engine, device) for m in self.models}
        if self.precision == "bf16" and "autograd" in paths.values():
            raise DistrepError("bf16 is a precision of the engine's hand-written and compiled paths; "
                               "models on its autograd path (" + ", ".join(
                                   m for m, p in paths.items() if p == "autograd") + ") train in fp32 "
                               "(or tf32 on CUDA), or in bf16 with --engine compiled")
        others = ", ".join(f"{m} ({p})" for m, p in paths.items() if not computes(p, self.precision))
        if others:
            raise DistrepError(f"{self.precision} is a precision of the fused step (the paper's "
                               f"two-layer family, on CUDA); here these train on other paths: "
                               f"{others}; use fp32")
        if "fused" in paths.values() and unavailable(device):
            raise DistrepError(unavailable(device))
        if self.precision == "tf32" and device.type != "cuda":
            raise DistrepError("tf32 is a CUDA precision; on the CPU use fp32 or bf16")
        return replace(self, dataset=dataset_name(self.dataset))     # a directory: as recorded

    def layers(self, model: str):
        """``model``'s layers with their sizes: the width, and the dataset's input features and
        classes (which decide, on CUDA, whether the fused step covers it)."""
        data = get_spec(self.dataset)
        return parse(model, self.width, data.num_features, data.num_classes)

    def _seed_offset(self, model: str) -> int:
        return 0 if self.paired else 1_000_003 * (1 + zlib.crc32(canonical_spec(model).encode()) % 10_007)

    def seeds(self, model: str) -> list[int]:
        """Run i's seed: base + i (paired), or base + i + an offset fixed by the model's spec."""
        offset = self._seed_offset(model)
        return [self.base_seed + offset + i for i in range(self.runs)]

    def test_epochs(self) -> np.ndarray:
        return evaluation_epochs(self.epochs, self.eval_every)


@dataclass
class VariantResult:
    """The results of one variant's R runs: arrays ``[R, epochs]``, ``[R, k]`` and ``[R]``."""

    name: str
    spec: str
    seeds: np.ndarray
    arrays: dict[str, np.ndarray]          # train_loss, train_acc [R, E]; test_* [R, K]; final_* [R]
    diverged_epoch: np.ndarray             # [R], 0 where the run did not diverge
    params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)   # "0.weight": [R, ...]

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_epoch > 0


# --------------------------------------------------------------------------- memory and chunks

def bytes_per_run(model: str, width: int, n: int, in_features: int, num_classes: int,
                  engine: str = "auto", device: torch.device | str = "cpu", precision: str = "fp32",
                  n_eval: int = 0) -> int:
    """Working memory of one run in the engine: fp32 buffers for every layer's output and the
    gradient flowing back (n values per feature; twice that on the autograd path), float64
    copies inside OffsetL2, a head's intermediates (Mahalanobis: ``[n, out, rank]``), parameters
    with their gradients. The hand-written, autograd and compiled steps reallocate their buffers
    for a test pass: for them ``n`` is the larger of training's and a test pass's examples. The
    fused step keeps a test pass's beside training's, so ``n`` is training's and ``n_eval`` the
    examples a test pass holds at once: its first layer's output for each (``[H, n]`` and
    ``[H, n_eval]``, in bf16 in bf16 mode; training's written over by dP), in 3xtf32 dP's low
    half, the test pass's logits, its programs' partial sums, and ``[H, kp]`` buffers (kp <=
    in_features + 8): the folded first-layer weight for each input (in 3xtf32 with its TF32
    halves beside it) and the weight gradient's temporaries."""
    total, fan_in = 0, in_features
    layers = parse(model, width, in_features, num_classes)
    path = engine_path(layers, engine, device)
    if path == "fused":
        hidden = layers[0].out_features
        three = precision == "3xtf32"
        first_layer_outputs = (2 if precision == "bf16" else 4) * hidden * (n + n_eval)
        dp_low_half = 4 * hidden * n if three else 0
        # [H, kp] buffers: the folded weight per input (2; in 3xtf32 with their halves, 8) and
        # the step's temporaries (2; in 3xtf32 5: the fold's halves, dP's products with X's)
        weight_sized = 4 * hidden * (in_features + 8) * (8 + 5 if three else 2 + 2)
        return (first_layer_outputs + dp_low_half + weight_sized + 4 * num_classes * n_eval
                + partial_sums_bytes(n, hidden, num_classes, precision)
                + sum(3 * 4 * parameter_count_of(layer) for layer in layers if layer.affine))
    autograd = path != "hand-written"
    for layer in layers:
        features = layer.out_features if layer.affine else fan_in
        total += (4 if autograd else 2) * 4 * n * features     # autograd keeps more per layer
        if layer.kind == "offsetl2":
            total += 4 * 8 * n * layer.in_features + 3 * 4 * 2 * layer.in_features * layer.out_features
        elif layer.kind == "linear":
            total += 3 * 4 * layer.in_features * layer.out_features
        elif layer.affine:     # a head or a user's layer: its intermediates, forward and backward
            inner = (layer.in_features + layer.out_features if layer.kind in ("rbf", "gmlvq", "cosine")
                     else layer.in_features * layer.out_features)     # mahalanobis, or unknown
            total += 4 * 4 * n * inner + 3 * 4 * parameter_count_of(layer)   # 4: measured
        fan_in = features
    return total


def parameter_count_of(layer) -> int:
    """Parameters of one affine layer of a spec (sizes only; nothing allocated)."""
    from distrep.models import _build
    with torch.device("meta"):
        return sum(p.numel() for p in _build(layer, "paper").parameters())


def plan_chunks(units: list[tuple[int, int]], cost: list[int], budget: int,
                max_runs: int | None = None) -> list[list[tuple[int, int]]]:
    """Split ``(variant, run)`` units, in order, into consecutive chunks whose summed ``cost``
    (per variant) stays within ``budget`` and that hold at most ``max_runs`` runs."""
    chunks, current, used = [], [], 0
    for unit in units:
        c = cost[unit[0]]
        if current and (used + c > budget or len(current) == (max_runs or len(units) + 1)):
            chunks.append(current)
            current, used = [], 0
        current.append(unit)
        used += c
    if current:
        chunks.append(current)
    return chunks


def verify_fp32_matmul(device: torch.device) -> None:
    """Refuse to run 'fp32' if matrix products on ``device`` are silently done in lower
    precision (TF32 or bf16 back-ends): their error would be ~1e-3 instead of ~1e-6."""
    from distrep.engine import matmul_nt
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
    exact = torch.from_numpy(a.double().numpy() @ b.double().numpy())
    a, b = a.to(device), b.to(device)
    rel = max(float((got.double().cpu() - exact).abs().max() / exact.abs().max())
              for got in (a @ b, matmul_nt(a, b.t().contiguous())))   # both paths the engine uses
    if rel > 1e-5:
        raise DistrepError(f"fp32 matrix products on {device} have relative error {rel:.1e}: a "
                           f"reduced-precision back-end is enabled (TF32?); refusing to call it fp32")


@contextmanager
def matmul_precision(name: str, device: torch.device):
    """Within the block, CUDA fp32 matrix products use TF32 exactly when ``name`` is tf32 or
    3xtf32 (whose products read exact TF32 halves); the global setting is restored afterwards.
    For fp32 the products are checked to be fp32."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = name in CUDA_PRECISIONS
        if name == "fp32":
            verify_fp32_matmul(device)
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --------------------------------------------------------------------------- checkpoints

RECOVER = "rerun with --force to discard it and start over, or use another --out"


def config_key(config: SweepConfig) -> str:
    """The result fields of a config as one string: what a checkpoint must have been made with."""
    return json.dumps(config.result_fields, sort_keys=True)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: what a checkpoint
    must still hold when it is read back."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path: Path, config: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, refused with a one-line error if it is unreadable, its
    checksum does not match its contents, or (given ``config``) it was made with another config."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = read_tensors(path)
    except Exception as e:   # safetensors raises its own error types for damaged files
        raise DistrepError(f"checkpoint {path} is damaged ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); {RECOVER}") from None
    if meta.get("sha256") != tensor_digest(tensors):
        raise DistrepError(f"checkpoint {path} is damaged (its checksum does not match its "
                           f"contents); {RECOVER}")
    if config is not None and meta.get("config") != config:
        raise DistrepError(f"checkpoint {path} was made with a different config; {RECOVER}")
    return tensors


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


# --------------------------------------------------------------------------- the sweep

class Sweep:
    """Trains a :class:`SweepConfig` with the engine, checkpointing into ``checkpoint`` (a path
    or None). ``run()`` returns one :class:`VariantResult` per model."""

    def __init__(self, config: SweepConfig, data: Dataset | None = None,
                 checkpoint: str | os.PathLike | None = None, progress: bool = True):
        self.config = config.validate()
        data = data if data is not None else load_dataset(config.dataset, config.preprocess)
        self.data = data.subset(config.train_subset)
        self.device = resolve_device(config.device)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.names = [display_name(m) for m in config.models]
        self.specs = [canonical_spec(m) for m in config.models]
        R, E, K = config.runs, config.epochs, len(config.test_epochs())
        self.state: dict[str, torch.Tensor] = {
            "epochs_done": torch.zeros(len(self.specs), R, dtype=torch.int64),
            "diverged_epoch": torch.zeros(len(self.specs), R, dtype=torch.int64),
            "wall_time_s": torch.zeros((), dtype=torch.float64)}   # summed over every session
        for v in range(len(self.specs)):
            for key, cols in (("train_loss", E), ("train_acc", E), ("test_loss", K), ("test_acc", K)):
                self.state[f"{v}/{key}"] = torch.full((R, cols), float("nan"), dtype=torch.float64)
            for key in FINAL_KEYS:
                self.state[f"{v}/{key}"] = torch.full((R,), float("nan"), dtype=torch.float64)
        self.params: dict[int, dict[str, torch.Tensor]] = {}     # variant -> stacked [R, ...] (CPU)
        self.chunk_log: list[dict] = []     # where and how long each chunk of this call trained
        self._last_save = self._last_clock = time.monotonic()
        self._load_checkpoint()
        self.chunks()                      # refuses a memory budget too small for one run, now

    # ---- checkpoint

    def _meta(self) -> dict:
        return {"config": config_key(self.config)}

    def _load_checkpoint(self) -> None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        saved = read_checkpoint(self.checkpoint, self._meta()["config"])
        missing = [key for key in self.state if key not in saved or saved[key].shape != self.state[key].shape]
        if missing:
            raise DistrepError(f"checkpoint {self.checkpoint} does not hold this sweep's state "
                               f"({missing[0]}); {RECOVER}")
        for key in self.state:
            self.state[key] = saved[key]
        self._last_clock = time.monotonic()
        for key, tensor in saved.items():
            if key.startswith("params/"):
                _, v, name = key.split("/", 2)
                self.params.setdefault(int(v), {})[name] = tensor

    def _clock(self) -> None:
        now = time.monotonic()
        self.state["wall_time_s"] += now - self._last_clock
        self._last_clock = now

    def save_checkpoint(self) -> None:
        self._clock()
        if self.checkpoint is None:
            return
        tensors = dict(self.state)
        for v, params in self.params.items():
            tensors.update({f"params/{v}/{name}": p for name, p in params.items()})
        write_tensors(self.checkpoint, tensors, metadata={**self._meta(), "sha256": tensor_digest(tensors)})
        self._last_save = time.monotonic()

    # ---- training

    def initial_params(self, v: int) -> dict[str, torch.Tensor]:
        """Stacked initial parameters of every run of variant v (each from its own seed)."""
        return stack_parameters([self.build_model(v, s) for s in self.config.seeds(self.specs[v])])

    def build_model(self, v: int, seed: int):
        c = self.config
        return create_model(self.specs[v], c.width, in_features=self.data.num_features,
                            num_classes=self.data.num_classes, offsetl2_form=c.offsetl2_form, seed=seed)

    def memory_plan(self) -> tuple[int, list[int]]:
        """``(fixed, per_run)``: the bytes a chunk holds whatever its runs (the data and the first
        layer's operands) and the bytes of one run of each variant (:func:`bytes_per_run`)."""
        c, d = self.config, self.data
        n_train, n_test = len(d.y_train), len(d.y_test)
        # a test pass holds at most EVAL_BATCH examples at once, of the test images or, for the
        # final pass, of the training images
        n_eval = min(EVAL_BATCH, max(n_train, n_test))
        fused = [engine_path(parse(s, c.width, d.num_features, d.num_classes), c.engine, self.device) == "fused"
                 for s in self.specs]
        per_run = [bytes_per_run(s, c.width, n_train if f else max(n_train, n_test), d.num_features,
                                 d.num_classes, c.engine, self.device, c.precision,
                                 n_eval=n_eval if f else 0) for s, f in zip(self.specs, fused)]
        # the data and the first layer's operands (its varying features: constant_features.FirstLayerInput),
        # training's and the test set's: feature-major, on oneDNN's path also example-major; in
        # bf16, half-size copies of both
        copies = 3 if self.device.type == "cpu" else 2
        fixed = 4 * (n_train + n_test) * d.num_features * copies
        if any(fused):
            # and the fused step's first-layer operand of each, with its row of ones (padded
            # rows); in 3xtf32 its TF32 halves too, three times its size; training's held
            # example-major too where the weight gradient reads it so (GRADIENT_OPERAND)
            size = {"bf16": 2, "3xtf32": 16}.get(c.precision, 4)
            fixed += size * (n_train + n_eval) * (d.num_features + 8)
            if example_major_input(c.precision):
                fixed += size * n_train * (d.num_features + 8)
        return fixed, per_run

    def chunks(self) -> list[list[tuple[int, int]]]:
        """The unfinished ``(variant, run)`` units, grouped into chunks that fit the memory budget
        (and ``max_runs_per_chunk``) and share a starting epoch."""
        c = self.config
        fixed, cost = self.memory_plan()
        budget = c.max_memory - fixed
        if budget < max(cost):
            need = (fixed + max(cost)) / GiB
            raise DistrepError(f"--max-memory {c.max_memory / GiB:.2f} GiB is too small: one run "
                               f"needs {need:.2f} GiB with the data")
        done = self.state["epochs_done"]
        units = [(v, r) for v in range(len(self.specs)) for r in range(c.runs) if done[v, r] < c.epochs]
        chunks = []
        for start in sorted({int(done[v, r]) for v, r in units}):
            chunks += plan_chunks([u for u in units if done[u] == start], cost, budget,
                                  c.max_runs_per_chunk)
        return chunks

    def chunk_work(self, chunk: list[tuple[int, int]]) -> "ChunkWork":
        """The chunk as a self-contained :class:`ChunkWork`: copies of its rows of the state and
        of the parameters (drawn from the seeds for a variant not started yet)."""
        state, params = {}, {}
        for v in sorted({v for v, _ in chunk}):
            rows = torch.tensor([r for w, r in chunk if w == v])
            if v not in self.params:
                self.params[v] = self.initial_params(v)
            for key in METRIC_KEYS + FINAL_KEYS:
                state[f"{v}/{key}"] = self.state[f"{v}/{key}"][rows].clone()
            for key in ("epochs_done", "diverged_epoch"):
                state[f"{v}/{key}"] = self.state[key][v, rows].clone()
            params[v] = {name: p[rows].clone() for name, p in self.params[v].items()}
        return ChunkWork(self.config, [tuple(u) for u in chunk], state, params)

    def merge(self, work: "ChunkWork") -> None:
        """Write a (partly or wholly) trained chunk back into the sweep's state."""
        for v in work.variants:
            rows = work.rows(v)
            for key in METRIC_KEYS + FINAL_KEYS:
                self.state[f"{v}/{key}"][rows] = work.state[f"{v}/{key}"]
            for key in ("epochs_done", "diverged_epoch"):
                self.state[key][v, rows] = work.state[f"{v}/{key}"]
            for name, p in work.params[v].items():
                self.params[v][name][rows] = p

    def run(self, executor=None, on_chunk: Callable[[dict], None] | None = None,
            stop: StopRequest | None = None) -> list[VariantResult]:
        """Train every unfinished run with ``executor`` (default: this process, chunk after
        chunk), checkpointing after every chunk and, within a local chunk, every
        ``checkpoint_every`` seconds and when ``stop`` is set (:mod:`distrep.stopping`: the
        local executor then stops at the end of the epoch). ``on_chunk(info)`` after each chunk
        with where it trained."""
        from distrep.executors import LocalExecutor
        c = self.config
        chunks = self.chunks()
        remaining = sum(c.epochs - int(self.state["epochs_done"][u]) for chunk in chunks for u in chunk)
        bar = progress(remaining, "training", "run-epochs", self.progress)
        runs_left, runs_done = sum(len(chunk) for chunk in chunks), [0]

        def finished(work: ChunkWork, info: dict) -> None:
            self.merge(work)
            self.save_checkpoint()
            self.chunk_log.append(info)
            runs_done[0] += len(work.units)
            bar.set_postfix_str(f"{runs_done[0]} of {runs_left} runs finished", refresh=False)
            if on_chunk is not None:
                on_chunk(info)

        def partial(work: ChunkWork) -> None:
            self.merge(work)
            self.save_checkpoint()

        works = (self.chunk_work(chunk) for chunk in chunks)
        try:
            (executor or LocalExecutor()).run(works, self.data, finished, partial, bar.update, stop=stop)
        finally:
            bar.close()
        return self.results()

    def chunk_trainer(self, chunk: list[tuple[int, int]]):
        """(trainer, groups) for a chunk: each variant's runs of the chunk as one
        :class:`StackedRuns` on the device, over copies of the stored parameters."""
        return build_trainer(self.chunk_work(chunk), self.data, self.device)

    def estimate_seconds(self, executor=None) -> float:
        """Wall time of the training left, one chunk after another: the first chunk's seconds per
        run-epoch (:func:`time_chunk`, where ``executor`` trains: default this process) times
        the run-epochs left. Trains nothing that is kept."""
        from distrep.executors import LocalExecutor
        chunks = self.chunks()
        if not chunks:
            return 0.0
        per_run_epoch = (executor or LocalExecutor()).time_chunk(self.chunk_work(chunks[0]), self.data)
        c = self.config
        left = sum(c.epochs - int(self.state["epochs_done"][u]) for chunk in chunks for u in chunk)
        return per_run_epoch * left

    def results(self) -> list[VariantResult]:
        out = []
        for v, (name, spec) in enumerate(zip(self.names, self.specs)):
            arrays = {key: self.state[f"{v}/{key}"].numpy() for key in METRIC_KEYS + FINAL_KEYS}
            out.append(VariantResult(name, spec, np.array(self.config.seeds(spec)), arrays,
                                     self.state["diverged_epoch"][v].numpy(),
                                     self.params.get(v, {})))
        return out


# --------------------------------------------------------------------------- one chunk

@dataclass
class ChunkWork:
    """One chunk of a sweep as a self-contained unit of work: what a worker needs to train it
    and, trained, what the sweep merges back. ``units`` are ``(variant, run)`` pairs; ``state``
    holds only the chunk's rows, per variant in the order of ``units``: ``"{v}/{metric}"``
    (``[n_v, epochs]`` or ``[n_v, tests]``), ``"{v}/final_{metric}"``, ``"{v}/epochs_done"`` and
    ``"{v}/diverged_epoch"`` (``[n_v]``); ``params[v]`` holds the stacked parameters
    ``[n_v, ...]`` on the CPU."""

    config: SweepConfig
    units: list[tuple[int, int]]
    state: dict[str, torch.Tensor]
    params: dict[int, dict[str, torch.Tensor]]

    @property
    def variants(self) -> list[int]:
        return sorted({v for v, _ in self.units})

    def rows(self, v: int) -> torch.Tensor:
        return torch.tensor([r for w, r in self.units if w == v])


def chunk_key(work: ChunkWork) -> str:
    """A name for the chunk: its config, units and starting epochs."""
    starts = [int(work.state[f"{v}/epochs_done"].min()) for v in work.variants]
    text = json.dumps([config_key(work.config), [list(u) for u in work.units], starts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_chunk(path: str | os.PathLike, work: ChunkWork) -> None:
    """Write a chunk's state and parameters (atomic, checksummed) as a checkpoint of its own."""
    tensors = dict(work.state)
    for v, params in work.params.items():
        tensors.update({f"params/{v}/{name}": p for name, p in params.items()})
    write_tensors(Path(path), tensors, metadata={"config": config_key(work.config),
                                                 "sha256": tensor_digest(tensors)})


def load_chunk(path: str | os.PathLike, work: ChunkWork) -> ChunkWork:
    """The chunk an earlier attempt at ``work`` saved at ``path``, further along; ``work``
    itself if that file is damaged or holds something else."""
    try:
        saved = read_checkpoint(Path(path), config_key(work.config))
    except DistrepError:
        return work
    names = {f"params/{v}/{n}": p for v, ps in work.params.items() for n, p in ps.items()}
    expected = {**work.state, **names}
    if set(saved) != set(expected) or any(saved[k].shape != t.shape for k, t in expected.items()):
        return work
    params = {v: {n: saved[f"params/{v}/{n}"] for n in ps} for v, ps in work.params.items()}
    return ChunkWork(work.config, work.units, {k: saved[k] for k in work.state}, params)


def build_trainer(work: ChunkWork, data: Dataset, device: torch.device):
    """(trainer, groups): each variant's runs of the chunk as one :class:`StackedRuns` on the
    device, over copies of the chunk's parameters."""
    c, groups = work.config, []
    for v in work.variants:
        specs = parse(canonical_spec(c.models[v]), c.width, data.num_features, data.num_classes)
        runs = {"hand-written": StackedRuns, "autograd": AutogradRuns,
                "compiled": CompiledRuns, "fused": FusedRuns}[engine_path(specs, c.engine, device)]
        groups.append(runs.from_state(specs, {name: p.to(device, copy=True)
                                              for name, p in work.params[v].items()}, c.offsetl2_form))
    return Trainer(groups, c.precision), groups


def time_chunk(work: ChunkWork, data: Dataset, device: torch.device) -> float:
    """Seconds per run-epoch of training ``work`` on ``device``: one step and one test pass,
    each timed after warm-ups (buffers allocated, kernels compiled, as in training), the test
    pass counted once per ``eval_every`` epochs. ``work`` itself is not changed."""
    c = work.config
    trainer, groups = build_trainer(work, data, device)
    x_t, y = data.x_train.t().contiguous().to(device), data.y_train.to(device)
    x_test_t, y_test = data.x_test.t().contiguous().to(device), data.y_test.to(device)
    frozen = [torch.zeros(g.runs, dtype=torch.bool, device=device) for g in groups]
    with matmul_precision(c.precision, device):
        step = step_function(trainer, x_t, y, c.lr, frozen, x_t.bfloat16() if c.precision == "bf16" else None)
        # two warm-ups (measured: one left a 13-min estimate of an 8-min run), then the
        # best of three (a CUDA graph's replays from the fourth)
        timings = [timed(step, device, 1, warmup=0) for _ in range(5)]
        # after a warm-up: the first test pass compiles (or loads) the fused kernel's test
        # form, seconds on a GPU, which, counted in every tenth epoch, made a 5-min run read
        # 2.9 h (docs/paper-h200-bf16)
        test = timed(lambda: trainer.evaluate(x_test_t, y_test), device, 1, warmup=1)
    return (min(timings[2:]) + test / c.eval_every) / len(work.units)


def train_chunk(work: ChunkWork, data: Dataset, device: torch.device,
                advance: Callable[[int], None] | None = None,
                save: Callable[[ChunkWork], None] | None = None,
                stop: StopRequest | None = None) -> ChunkWork:
    """Train the chunk (in place) from the epoch its runs have reached to the sweep's last, on
    ``data`` (the sweep's training subset) and ``device``: the same computation wherever it
    runs. ``advance(n)`` after every epoch with the run-epochs just trained; ``save(work)``
    every ``checkpoint_every`` seconds with the state so far, parameters included, and, once
    ``stop`` is set (a signal: :mod:`distrep.stopping`), at the end of the epoch, before
    raising :class:`~distrep.stopping.Stopped`. Returns ``work``."""
    c, st, variants = work.config, work.state, work.variants
    trainer, groups = build_trainer(work, data, device)
    x_t, y = data.x_train.t().contiguous().to(device), data.y_train.to(device)
    x_test_t, y_test = data.x_test.t().contiguous().to(device), data.y_test.to(device)
    n = len(y)
    test_index = {int(e): k for k, e in enumerate(c.test_epochs())}
    start = int(st[f"{variants[0]}/epochs_done"][0])
    frozen = [(st[f"{v}/diverged_epoch"] > 0).to(device) for v in variants]
    log = StepLog([g.runs for g in groups], device)
    last_save = time.monotonic()
    with matmul_precision(c.precision, device):
        step = step_function(trainer, x_t, y, c.lr, frozen, x_t.bfloat16() if c.precision == "bf16" else None)
        for epoch in range(start + 1, c.epochs + 1):
            log.record(epoch, step(), frozen)
            if epoch in test_index:
                _evaluate_into(trainer, work, frozen, x_test_t, y_test, test_index[epoch])
            if log.full():
                log.flush(work, n)
            if advance is not None:
                advance(len(work.units))
            stopping = bool(stop) and epoch < c.epochs
            if save is not None and (stopping or time.monotonic() - last_save > c.checkpoint_every):
                log.flush(work, n)
                _store_params(groups, work)
                save(work)
                last_save = time.monotonic()
            if stopping:
                stop.stop(f"at epoch {epoch:,} of {c.epochs:,}")
        log.flush(work, n)
        _store_params(groups, work)
        _finalize(trainer, work, x_t, y, x_test_t, y_test)
    return work


class StepLog:
    """Every step's ``(loss, correct)`` and frozen runs, per variant, kept on the device and
    moved into the chunk's state ``capacity`` steps at a time (and before a checkpoint and at
    the end): copying them to the host every step would wait for the device every step, so
    that it could never run ahead of the Python that launches its kernels."""

    def __init__(self, runs: list[int], device: torch.device, capacity: int = 100):
        self.capacity, self.epochs = capacity, []
        self.loss = [torch.empty(r, capacity, dtype=torch.float64, device=device) for r in runs]
        self.correct = [torch.empty(r, capacity, dtype=torch.float64, device=device) for r in runs]
        self.frozen = [torch.empty(r, capacity, dtype=torch.bool, device=device) for r in runs]

    def record(self, epoch: int, stats: list[tuple[torch.Tensor, torch.Tensor]],
               frozen: list[torch.Tensor]) -> None:
        """Keep one step's per-group ``(loss [R], correct [R])`` and ``frozen [R]`` after it."""
        j = len(self.epochs)
        for gi, (loss, correct) in enumerate(stats):
            self.loss[gi][:, j].copy_(loss)
            self.correct[gi][:, j].copy_(correct)
            self.frozen[gi][:, j].copy_(frozen[gi])
        self.epochs.append(epoch)

    def full(self) -> bool:
        return len(self.epochs) == self.capacity

    def flush(self, work: "ChunkWork", n: int) -> None:
        """Write the kept steps into ``work.state``: train loss and accuracy (NaN for a run
        frozen by then), the epoch a run diverged (the first step after which it is frozen),
        and how many epochs are done."""
        if not self.epochs:
            return
        k, first = len(self.epochs), self.epochs[0]
        st, window = work.state, slice(first - 1, self.epochs[-1])
        for gi, v in enumerate(work.variants):
            loss, correct, now = (t[:, :k].cpu() for t in (self.loss[gi], self.correct[gi], self.frozen[gi]))
            newly = now.any(1) & ~(st[f"{v}/diverged_epoch"] > 0)
            st[f"{v}/diverged_epoch"][newly] = first + now[newly].int().argmax(1)  # frozen stays so
            st[f"{v}/train_loss"][:, window] = torch.where(now, float("nan"), loss)
            st[f"{v}/train_acc"][:, window] = torch.where(now, float("nan"), correct / n)
            st[f"{v}/epochs_done"][:] = self.epochs[-1]
        self.epochs = []


def _evaluate_into(trainer, work: ChunkWork, frozen, x_t, y, k: int) -> None:
    for gi, (loss, correct) in enumerate(trainer.evaluate(x_t, y)):
        v, dead = work.variants[gi], frozen[gi].cpu()
        work.state[f"{v}/test_loss"][:, k] = torch.where(dead, float("nan"), loss.double().cpu())
        work.state[f"{v}/test_acc"][:, k] = torch.where(dead, float("nan"), correct.double().cpu() / len(y))


def _finalize(trainer, work: ChunkWork, x_t, y, x_test_t, y_test) -> None:
    """Loss and accuracy of the final parameters on the training and test sets."""
    for split, xs, ys in (("train", x_t, y), ("test", x_test_t, y_test)):
        for gi, (loss, correct) in enumerate(trainer.evaluate(xs, ys)):
            v = work.variants[gi]
            work.state[f"{v}/final_{split}_loss"][:] = loss.double().cpu()
            work.state[f"{v}/final_{split}_acc"][:] = correct.double().cpu() / len(ys)


def _store_params(groups, work: ChunkWork) -> None:
    for group, v in zip(groups, work.variants):
        work.params[v] = {name: p.detach().to("cpu", copy=True) for name, p in group.state().items()}


def describe_model(config: SweepConfig, model: str, device: torch.device) -> dict:
    """A model's entry in ``config.json``: its name, spec, seeds, the engine path that trains it
    on ``device`` and, on the fused path, how the kernel computes the output layer in this
    precision: an OffsetL2 layer's form (:data:`distrep.fused.OFFSETL2_KERNEL`), a linear
    layer's products (:data:`distrep.fused.HEAD_PRODUCTS`)."""
    specs = config.layers(model)
    entry = {"name": display_name(model), "spec": canonical_spec(model), "seeds": config.seeds(model),
             "engine_path": engine_path(specs, config.engine, device)}
    if entry["engine_path"] == "fused":
        if any(s.kind == "offsetl2" for s in specs):
            entry["offsetl2_kernel"] = offsetl2_kernel(config.precision)
        else:
            entry["head_products"] = head_products(config.precision)
    return entry


def describe_sweep(config: SweepConfig, device: torch.device) -> dict:
    return {"config": asdict(config), "result_fields": config.result_fields,
            "models": [describe_model(config, m, device) for m in config.models],
            "design": "paired: run i of every model starts from the same first-layer weights"
                      if config.paired else "unpaired: every model has its own seeds",
            "versions": software_versions(), "device": describe_device(device)}


# --------------------------------------------------------------------------- results on disk

SUMMARY_COLUMNS = ("model", "spec", "run", "seed", "test_acc", "train_acc", "train_loss",
                   "test_loss", "epochs", "diverged", "diverged_epoch")


_SAFE_NAME = re.compile(r"[A-Za-z0-9+._-]{1,100}")


def model_dir(name: str) -> str:
    """The folder of a model's files (``models/<this>``, ``analysis/<this>``): its name where that
    is a short, safe file name, else a safe prefix of it and a hash of the whole name (a spec can
    be longer than a file name may be)."""
    if _SAFE_NAME.fullmatch(name) and name not in (".", ".."):
        return name
    prefix = re.sub(r"[^A-Za-z0-9+._-]", "_", name)[:64]
    return f"{prefix}-{name_digest(name)[:12]}"


def results_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """Where an experiment keeps a model's results: ``models/<model_dir(name)>``."""
    return Path(out_dir) / "models" / model_dir(name)


def save_results(results: list[VariantResult], config: SweepConfig, out_dir: str | os.PathLike) -> None:
    """Write ``summary.csv`` (one row per run) and, per model, ``models/<name>/metrics.npz``
    (``train_loss``/``train_acc`` ``[runs, epochs]``, ``test_loss``/``test_acc`` ``[runs, k]``,
    ``test_epochs [k]``, ``final_*``/``seeds``/``diverged_epoch`` ``[runs]``) and
    ``models/<name>/params.safetensors`` (stacked ``[runs, ...]``). All atomic."""
    from distrep.storage import atomic_write_bytes, write_arrays
    out = Path(out_dir)
    lines = [",".join(SUMMARY_COLUMNS)]
    for res in results:
        folder = results_dir(out, res.name)
        write_arrays(folder / "metrics.npz", {**res.arrays, "test_epochs": config.test_epochs(),
                                              "seeds": res.seeds, "diverged_epoch": res.diverged_epoch})
        write_tensors(folder / "params.safetensors", res.params, metadata={"spec": res.spec})
        for r in range(config.runs):
            a = res.arrays
            lines.append(",".join(str(v) for v in (
                res.name, res.spec, r, int(res.seeds[r]), repr(float(a["final_test_acc"][r])),
                repr(float(a["final_train_acc"][r])), repr(float(a["final_train_loss"][r])),
                repr(float(a["final_test_loss"][r])), config.epochs, bool(res.diverged[r]),
                int(res.diverged_epoch[r]))))
    atomic_write_bytes(out / "summary.csv", ("\n".join(lines) + "\n").encode())
