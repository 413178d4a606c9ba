"""``distrep reproduce``: the paper's experiments as presets, trained by the engine, reported.

A preset is a plain dict of :class:`~distrep.sweep.SweepConfig` fields; every field can be
overridden. Defaults follow what produced the paper's numbers: raw pixels (the published
code's input), the paper's OffsetL2 formula, lr 0.001, full MNIST, 20 runs, and the paired
design (run i of every model starts from the same first-layer weights).
"""

from __future__ import annotations

import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from distrep.data import Dataset, load_dataset
from distrep.engine import StackedRuns, Trainer
from distrep.errors import DistrepError
from distrep.models import TABLE1, TABLE2, TABLE3
from distrep.provenance import resolve_device
from distrep.experiment import experiment_lock, run_experiment
from distrep.sweep import Sweep, SweepConfig

PRESETS: dict[str, dict] = {
    "table1": {"models": list(TABLE1), "epochs": 5000, "runs": 20},
    "table2": {"models": list(TABLE2), "epochs": 5000, "runs": 20},
    "table3": {"models": list(TABLE3), "epochs": 50000, "runs": 20},
    # A reduced protocol for a 2-core CPU in under 10 minutes (sized by measurement; README):
    # Table 1's and Table 3's models, 5 runs, 1,500 epochs on the first 2,000 training images.
    "quick": {"models": list(TABLE1 + TABLE3), "epochs": 1500, "runs": 5, "train_subset": 2000,
              "eval_every": 100},
}
# "all" runs table1, table2 and table3, each in its own subdirectory.
GROUPS = {"all": ("table1", "table2", "table3")}
PRESET_NAMES = tuple(PRESETS) + tuple(GROUPS)


def resolve_preset(preset: str, overrides: dict) -> SweepConfig:
    """The preset's config with ``overrides`` (None values ignored), validated."""
    if preset not in PRESETS:
        raise DistrepError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    known = {f.name for f in fields(SweepConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise DistrepError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return SweepConfig(**values).validate()


def estimate_seconds(config: SweepConfig, data: Dataset) -> float:
    """Wall time estimate: two timed steps of one run of each model (plus a test pass), scaled
    to runs x epochs. One run alone is less efficient than a batch, so this errs long."""
    device = resolve_device(config.device)
    d = data.subset(config.train_subset)
    x_t, y = d.x_train.t().contiguous().to(device), d.y_train.to(device)
    x_test_t, y_test = d.x_test.t().contiguous().to(device), d.y_test.to(device)
    total = 0.0
    probe = Sweep(replace(config, runs=1), d, progress=False)
    for v in range(len(probe.specs)):
        trainer = Trainer([StackedRuns.from_models([probe.build_model(v, 0)], device)], config.precision)
        frozen = [torch.zeros(1, dtype=torch.bool, device=device)]
        trainer.step(x_t, y, config.lr, frozen)
        start = time.perf_counter()
        for _ in range(2):
            trainer.step(x_t, y, config.lr, frozen)
        step = (time.perf_counter() - start) / 2
        start = time.perf_counter()
        trainer.evaluate(x_test_t, y_test)
        total += step + (time.perf_counter() - start) / config.eval_every
    return total * config.runs * config.epochs


def plan_text(preset: str, config: SweepConfig, data: Dataset, seconds: float) -> str:
    n = config.train_subset or len(data.y_train)
    return (f"{preset}: {len(config.models)} models x {config.runs} runs x {config.epochs} epochs "
            f"on {n} {config.dataset} training images ({config.preprocess} pixels), lr {config.lr}, "
            f"width {config.width}, OffsetL2 form {config.offsetl2_form}, {config.precision} on "
            f"{config.device}, {'paired' if config.paired else 'unpaired'} seeds from "
            f"{config.base_seed}\n  models: {', '.join(config.models)}\n"
            f"  estimated time on this device: {format_duration(seconds)}")


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def reproduce(preset: str, out: Path, overrides: dict, force: bool = False,
              progress: bool = True, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """Train (or resume) one preset into ``out``, write its results and report; return ``out``."""
    from distrep.report import write_report

    config = resolve_preset(preset, overrides)

    def plan(config, data):
        log(plan_text(preset, config, data, estimate_seconds(config, data)))

    with experiment_lock(out):
        _, _, trained = run_experiment(out, config, force, progress, extra={"preset": preset},
                                       log=log, before_training=plan)
        if not trained:
            log(f"{out}: already finished; regenerating the report")
        write_report(out)
    return out
