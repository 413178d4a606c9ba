"""``distrep reproduce``: the paper's experiments as presets, trained by the engine, reported.

A preset is a plain dict of :class:`~distrep.sweep.SweepConfig` fields; every field can be
overridden. Defaults follow what produced the paper's numbers: raw pixels (the published
code's input), the paper's OffsetL2 formula, lr 0.001, full MNIST, 20 runs, and the paired
design (run i of every model starts from the same first-layer weights).
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from distrep.data import Dataset, load_dataset
from distrep.errors import DistrepError
from distrep.executors import LocalExecutor
from distrep.models import HEAD_MODELS, TABLE1, TABLE2, TABLE3
from distrep.experiment import experiment_lock, run_experiment
from distrep.sweep import Sweep, SweepConfig

# Each preset reproduces what produced the published numbers (see distrep.paper): raw pixels,
# 20 runs, the epochs the evidence says; every test pass at a multiple of 10, so a 50,000-epoch
# run can also be read at the 5,000 epochs the text states (`distrep report --at-epoch 5000`).
PRESETS: dict[str, dict] = {
    # Table 1: the six no-bias models; its numbers came from 50,000-epoch runs
    "table1": {"models": list(TABLE1), "epochs": 50000, "runs": 20},
    # Table 2: their output-bias twins, 5,000 epochs
    "table2": {"models": list(TABLE2), "epochs": 5000, "runs": 20},
    # Table 3: the four OffsetL2 models as the author's code computes them, and the six
    # baselines it lists (Table 1's numbers), 50,000 epochs
    "table3": {"models": list(TABLE1 + TABLE3), "epochs": 50000, "runs": 20, "offsetl2_form": "coded"},
    # A reduced protocol for a 2-core CPU in under 10 minutes (sized by measurement; README):
    # Table 1's and Table 3's models, 5 runs, 1,500 epochs on the first 2,000 training images.
    "quick": {"models": list(TABLE1 + TABLE3), "epochs": 1500, "runs": 5, "train_subset": 2000,
              "eval_every": 100},
}
# Beyond the paper: its Table 1 and Table 3 models beside the prior-art heads (distrep.heads),
# under one protocol on MNIST and on Fashion-MNIST, its report testing the paper's two claims
# on each (distrep.claims.BEYOND_CLAIMS). Inputs are standardized, as the paper's text states:
# on raw pixels (its code's input) at lr 0.001 the squared-distance heads (RBF, GMLVQ) and, on
# Fashion-MNIST, Abs and Abs2 diverge in most runs (measured; README), which would make the
# study one of numerical blow-up. The full study is the stated protocol otherwise (5,000
# epochs, 20 runs, the paper's OffsetL2 formula); the quick one is sized for a 2-core CPU in
# under 10 minutes for both datasets (measured; README).
BEYOND_MODELS = list(TABLE1 + TABLE3 + HEAD_MODELS)
for _dataset in ("mnist", "fashion-mnist"):
    PRESETS[f"beyond-{_dataset}"] = {"models": BEYOND_MODELS, "epochs": 5000, "runs": 20,
                                     "dataset": _dataset, "preprocess": "standardized",
                                     "eval_every": 100}
    PRESETS[f"beyond-quick-{_dataset}"] = {"models": BEYOND_MODELS, "epochs": 600, "runs": 5,
                                           "train_subset": 1000, "dataset": _dataset,
                                           "preprocess": "standardized", "eval_every": 50}

# A group trains several presets, each into its own subdirectory {label: preset}, and writes
# one report over them. "all" trains each run of the paper once: table3 holds Table 1's six
# models at Table 1's producing protocol (its report compares them with Table 1 and, at epoch
# 5,000, with the stated protocol), and table2 the bias variants.
GROUPS: dict[str, dict[str, str]] = {
    "all": {"table2": "table2", "table3": "table3"},
    "beyond": {"mnist": "beyond-mnist", "fashion-mnist": "beyond-fashion-mnist"},
    "beyond-quick": {"mnist": "beyond-quick-mnist", "fashion-mnist": "beyond-quick-fashion-mnist"},
}
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


def plan_text(preset: str, config: SweepConfig, data: Dataset, seconds: float,
              where: str = "this device") -> str:
    n = config.train_subset or len(data.y_train)
    return (f"{preset}: {len(config.models)} models x {config.runs} runs x {config.epochs} epochs "
            f"on {n} {config.dataset} training images ({config.preprocess} pixels), lr {config.lr}, "
            f"width {config.width}, OffsetL2 form {config.offsetl2_form}, {config.precision} on "
            f"{config.device}, {'paired' if config.paired else 'unpaired'} seeds from "
            f"{config.base_seed}\n  models: {', '.join(config.models)}\n"
            f"  estimated time on {where}: {format_duration(seconds)}")


def requested_device(overrides: dict) -> str:
    """The device a preset with ``overrides`` asks for (the presets leave it to the caller)."""
    return overrides.get("device") or SweepConfig.device


def timed_on(executor) -> str:
    """Where :meth:`Sweep.estimate_seconds` timed a chunk with ``executor``."""
    if executor.name == "local":
        return "this device"
    return f"a {executor.name} worker, one chunk after another"


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def dry_run(preset: str, overrides: dict, log=print, executor=None) -> SweepConfig:
    """Print what ``preset`` with ``overrides`` would train (models, runs, epochs, run-epochs)
    and the estimated time where ``executor`` trains (default: here; for Ray, in its session,
    on a worker); train nothing."""
    executor = executor or LocalExecutor()
    with executor.session(requested_device(overrides)):
        config = resolve_preset(preset, overrides)
        data = load_dataset(config.dataset, config.preprocess)
        seconds = Sweep(config, data, progress=False).estimate_seconds(executor)
    total = config.runs * config.epochs * len(config.models)
    log(plan_text(preset, config, data, seconds, timed_on(executor)))
    log(f"  total: {total:,} run-epochs")
    return config


def reproduce(preset: str, out: Path, overrides: dict, force: bool = False,
              progress: bool = True, log=lambda m: print(m, file=sys.stderr),
              executor=None) -> Path:
    """Train (or resume) one preset into ``out``, write its results and report; return ``out``."""
    from distrep.report import write_report

    executor = executor or LocalExecutor()

    def plan(config, data, sweep):
        log(plan_text(preset, config, data, sweep.estimate_seconds(executor), timed_on(executor)))
        if executor.name != "local":
            log(f"  ({len(sweep.chunks())} chunks on {executor.name}: a cluster divides the time)")

    with executor.session(requested_device(overrides)):
        config = resolve_preset(preset, overrides)
        with experiment_lock(out):
            _, _, trained = run_experiment(out, config, force, progress, extra={"preset": preset},
                                           log=log, before_training=plan, executor=executor)
            if not trained:
                log(f"{out}: already finished; regenerating the report")
            write_report(out)
    return out
