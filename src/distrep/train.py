"""The reference trainer: one run, plain PyTorch, exactly the paper's recipe.

Full-batch SGD: each epoch is one forward pass over the whole training set, the mean
cross-entropy of the model's outputs taken as logits, one backward pass and one
``torch.optim.SGD`` step (no momentum, no weight decay). Everything is fp32. This is the
yardstick the batched engine is checked against, so it stays simple rather than fast.

Metrics (``[epochs]`` arrays, epoch e = 1..E):

- ``train_loss[e-1]``, ``train_acc[e-1]``: loss and accuracy of the forward pass of epoch e,
  i.e. of the parameters *before* that epoch's update (they come free with the step);
- ``test_acc``/``test_loss`` at ``test_epochs`` (every ``eval_every`` epochs and the last),
  measured *after* that epoch's update;
- ``final``: train and test loss and accuracy of the final parameters.

A run whose loss or parameters become non-finite is marked ``diverged`` and frozen: no further
updates; that epoch's and the remaining per-epoch entries are NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from distrep.data import PREPROCESS_MODES, Dataset, dataset_name, get_spec, load_dataset
from distrep.errors import DistrepError
from distrep.layers import OFFSETL2_FORMS
from distrep.models import canonical_spec, create_model, describe, display_name
from distrep.progress import progress as progress_bar
from distrep.provenance import describe_device, resolve_device, software_versions
from distrep.storage import read_json, write_arrays, write_json, write_tensors


@dataclass
class TrainConfig:
    """One run. Defaults are the paper's: lr 0.001, width 128, raw pixels, 5,000 epochs."""

    model: str
    epochs: int = 5000
    lr: float = 1e-3
    seed: int = 0
    width: int = 128
    dataset: str = "mnist"
    preprocess: str = "raw"
    train_subset: int | None = None
    eval_every: int = 1
    offsetl2_form: str = "paper"
    device: str = "cpu"

    @property
    def result_fields(self) -> dict:
        """The fields that change a result: all but the device (which differs only in rounding,
        as a sweep's does)."""
        d = asdict(self)
        d.pop("device")
        return d

    def validate(self) -> "TrainConfig":
        """Check every field; raise a one-line :class:`DistrepError` naming the bad one."""
        canonical_spec(self.model)  # unknown names raise with the list of valid ones
        check_protocol(self)
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise DistrepError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        check_fits(run_bytes(self.model, self.width, self.epochs, self.eval_every, self.dataset),
                   f"{display_name(self.model)} at width {self.width} for {self.epochs} epochs would")
        return replace(self, dataset=dataset_name(self.dataset))     # a directory: as recorded


MAX_SEED = 2**63 - 1                 # seeds are stored as int64
FP32_TINY, FP32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def check_protocol(cfg) -> torch.device:
    """Check the training-protocol fields a run and a sweep share (epochs, width, eval_every,
    lr, train_subset, preprocess, offsetl2_form, device); return the device."""
    for name in ("epochs", "width", "eval_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise DistrepError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise DistrepError(f"lr must be a positive finite number, got {cfg.lr!r}")
    if not FP32_TINY <= cfg.lr <= FP32_MAX:    # the update runs in fp32: lr must be one
        raise DistrepError(f"lr {cfg.lr!r} is not a normal fp32 number (between {FP32_TINY:.3g} "
                           f"and {FP32_MAX:.3g})")
    if cfg.train_subset is not None and cfg.train_subset < 1:
        raise DistrepError(f"train subset must be a positive integer, got {cfg.train_subset}")
    for value, allowed, what in ((cfg.preprocess, PREPROCESS_MODES, "preprocessing"),
                                 (cfg.offsetl2_form, OFFSETL2_FORMS, "OffsetL2 form")):
        if value not in allowed:
            raise DistrepError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    return resolve_device(cfg.device)


def evaluation_epochs(epochs: int, every: int) -> np.ndarray:
    """Every ``every``-th epoch and the last, ``[k]``."""
    out = np.arange(every, epochs + 1, every)
    return out if out.size and out[-1] == epochs else np.append(out, epochs)


def check_fits(needed: float, what: str) -> None:
    """Refuse, before allocating anything, a run whose arrays would not fit in this machine's
    memory (``needed`` bytes)."""
    from distrep.provenance import machine_memory
    have = machine_memory()
    if have and needed > 0.8 * have:
        raise DistrepError(f"{what} need {needed / 2**30:.3g} GiB of memory; this machine has "
                           f"{have / 2**30:.3g} GiB (use fewer runs, epochs or a smaller width)")


def run_bytes(model: str, width: int, epochs: int, eval_every: int, dataset: str = "mnist") -> float:
    """Memory of one run's parameters (with gradient and copies; their sizes from the dataset's
    features and classes) and its per-epoch metrics."""
    from distrep.models import parameter_count
    spec = get_spec(dataset)
    return (4 * 4 * parameter_count(model, width, spec.num_features, spec.num_classes)
            + 8 * (2 * epochs + 2 * (epochs // eval_every + 1)))


@dataclass
class RunResult:
    """What one run produced. Arrays are ``[epochs]`` except ``test_*``, which are ``[k]``."""

    config: TrainConfig
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_epochs: np.ndarray
    test_acc: np.ndarray
    test_loss: np.ndarray
    final: dict[str, float]
    diverged: bool
    diverged_epoch: int | None
    state: dict[str, torch.Tensor] = field(repr=False)
    data: dict = field(default_factory=dict)
    wall_time: float = 0.0


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction correct) of ``model`` on ``x [n, d]``, ``y [n]``."""
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def train(config: TrainConfig, data: Dataset | None = None, progress: bool = True) -> RunResult:
    """Train one model with full-batch SGD as described in the module docstring.

    ``data`` defaults to ``load_dataset(config.dataset, config.preprocess)``; its training set
    is cut to ``config.train_subset`` examples here.
    """
    config = config.validate()
    if data is None:
        data = load_dataset(config.dataset, config.preprocess)
    data = data.subset(config.train_subset)
    device = resolve_device(config.device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)

    model = create_model(config.model, config.width, in_features=data.num_features,
                         num_classes=data.num_classes, offsetl2_form=config.offsetl2_form,
                         seed=config.seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)

    E = config.epochs
    train_loss, train_acc = np.full(E, np.nan), np.full(E, np.nan)
    test_epochs = evaluation_epochs(E, config.eval_every)
    test_acc, test_loss = np.full(len(test_epochs), np.nan), np.full(len(test_epochs), np.nan)
    diverged_epoch, k = None, 0
    start = time.perf_counter()
    bar = progress_bar(E, display_name(config.model), "epochs", progress)
    for epoch in range(1, E + 1):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        train_loss[epoch - 1] = loss.item()
        if not math.isfinite(train_loss[epoch - 1]):
            diverged_epoch = epoch
            train_loss[epoch - 1] = np.nan
            break
        train_acc[epoch - 1] = (logits.argmax(1) == y).double().mean().item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            diverged_epoch = epoch          # the step itself overflowed (as the engine sees it)
            train_loss[epoch - 1] = train_acc[epoch - 1] = np.nan
            break
        if epoch == test_epochs[k]:
            test_loss[k], test_acc[k] = evaluate(model, x_test, y_test)
            bar.set_postfix(loss=f"{train_loss[epoch - 1]:.4f}", test_acc=f"{test_acc[k]:.4f}",
                            refresh=False)
            k += 1
        bar.update(1)
    bar.close()
    final_train_loss, final_train_acc = evaluate(model, x, y)
    final_test_loss, final_test_acc = evaluate(model, x_test, y_test)
    return RunResult(
        config=config, train_loss=train_loss, train_acc=train_acc, test_epochs=test_epochs,
        test_acc=test_acc, test_loss=test_loss,
        final={"train_loss": final_train_loss, "train_acc": final_train_acc,
               "test_loss": final_test_loss, "test_acc": final_test_acc},
        diverged=diverged_epoch is not None, diverged_epoch=diverged_epoch,
        state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        data=data.describe(), wall_time=time.perf_counter() - start)


# --------------------------------------------------------------------------- run directories

CONFIG_FILE, METRICS_FILE, MODEL_FILE, CURVES_FILE, RESULT_FILE = (
    "config.json", "metrics.npz", "model.safetensors", "curves.png", "result.json")


def save_run(result: RunResult, out_dir) -> None:
    """Write a run directory: ``config.json``, ``metrics.npz``, ``model.safetensors``,
    ``curves.png`` and, last, ``result.json`` (its presence marks a complete run). Every file is
    written atomically."""
    from distrep.plots import figure_label, run_figure, save_figure

    cfg = result.config
    device = resolve_device(cfg.device)
    write_json(f"{out_dir}/{CONFIG_FILE}", {
        "config": asdict(cfg),
        "model": {"name": display_name(cfg.model), "spec": canonical_spec(cfg.model),
                  "layers": describe(cfg.model, cfg.width, result.data["n_features"],
                                     result.data["num_classes"])},
        "data": result.data,
        "protocol": {"optimizer": "SGD (full batch, no momentum)", "loss": "mean cross-entropy",
                     "precision": "fp32", "train_metrics": "before each epoch's update",
                     "test_metrics": "after the update of the listed epoch"},
        "versions": software_versions(), "device": describe_device(device)})
    write_arrays(f"{out_dir}/{METRICS_FILE}", {
        "train_loss": result.train_loss, "train_acc": result.train_acc,
        "test_epochs": result.test_epochs, "test_acc": result.test_acc,
        "test_loss": result.test_loss})
    write_tensors(f"{out_dir}/{MODEL_FILE}", result.state,
                  metadata={"spec": canonical_spec(cfg.model), "offsetl2_form": cfg.offsetl2_form})
    metrics = {"train_loss": result.train_loss, "test_epochs": result.test_epochs,
               "test_acc": result.test_acc}
    save_figure(run_figure(metrics, f"{figure_label(display_name(cfg.model))}, seed {cfg.seed}, "
                                    f"{result.data['n_train']} training images, "
                                    f"{result.data['preprocess']} pixels"),
                f"{out_dir}/{CURVES_FILE}")
    write_json(f"{out_dir}/{RESULT_FILE}", {
        **result.final, "diverged": result.diverged, "diverged_epoch": result.diverged_epoch,
        "epochs": cfg.epochs, "wall_time_s": result.wall_time})


def existing_config(out_dir) -> dict | None:
    """The config of a complete run in ``out_dir``, or None if there is none."""
    try:
        read_json(f"{out_dir}/{RESULT_FILE}")
        return read_json(f"{out_dir}/{CONFIG_FILE}")["config"]
    except (DistrepError, KeyError, TypeError):
        return None
