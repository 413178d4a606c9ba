"""Geometric analyses of trained runs. So far: dead and rarely active units.

Works on stacked runs (:class:`~distrep.engine.StackedRuns`, ``[runs, ...]`` parameters), so
every run and unit is handled by tensor operations, never a Python loop over them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distrep.engine import StackedActivation, StackedRuns, Trainer
from distrep.models import parse
from distrep.storage import read_arrays, read_json, read_tensors, write_arrays

# Rectifying activations, whose units can be "dead" (output exactly 0 on an input).
RECTIFIERS = ("relu", "abs")
THRESHOLDS = (0.01, 0.05)      # "rarely active": the author's code used < 1 %, the paper < 5 %


@torch.no_grad()
def activation_rates(group: StackedRuns, x_t: torch.Tensor, batch: int = 10000) -> dict[int, torch.Tensor]:
    """For every rectifying activation layer k: the fraction of inputs on which each unit's
    output is non-zero, ``[runs, units]``. ``x_t`` is the input, feature-major ``[in, n]``."""
    trainer = Trainer([group])
    counts: dict[int, torch.Tensor] = {}
    n = x_t.shape[1]
    for start in range(0, n, batch):
        inputs, z = trainer._forward_group(0, group, x_t[:, start:start + batch].contiguous(), False, None)
        outputs = inputs[1:] + [z]
        for k, layer in enumerate(group.layers):
            if isinstance(layer, StackedActivation) and layer.kind in RECTIFIERS:
                active = (outputs[k] != 0).sum(2)
                counts[k] = counts[k] + active if k in counts else active
    return {k: c.double() / n for k, c in counts.items()}


def unit_census(rates: torch.Tensor, thresholds=THRESHOLDS) -> dict[str, np.ndarray]:
    """Per run, the number of units never active, and active on fewer than each threshold's
    fraction of inputs. ``rates [runs, units]`` -> ``{"never": [runs], "below_1%": [runs], ...}``."""
    out = {"never": (rates == 0).sum(1).numpy(), "units": np.full(rates.shape[0], rates.shape[1])}
    for t in thresholds:
        out[f"below_{t:.0%}"] = (rates < t).sum(1).numpy()
    return out


def dead_units(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Dead-unit census of every model in an experiment directory, on train and test data;
    written to ``analysis/<model>/dead_units.npz`` (keys ``<split>/layer<k>/<count>``, each
    ``[runs]``) and returned."""
    from distrep.data import load_dataset
    directory = Path(directory)
    config = read_json(directory / "config.json")
    cfg = config["config"]
    data = load_dataset(cfg["dataset"], cfg["preprocess"]).subset(cfg["train_subset"])
    splits = {"train": data.x_train.t().contiguous(), "test": data.x_test.t().contiguous()}
    results = {}
    for model in config["models"]:
        params = read_tensors(directory / "models" / model["name"] / "params.safetensors")
        specs = parse(model["spec"], cfg["width"], data.num_features, data.num_classes)
        group = StackedRuns.from_state(specs, params, cfg["offsetl2_form"])
        arrays = {}
        for split, x_t in splits.items():
            for k, rates in activation_rates(group, x_t).items():
                for key, value in unit_census(rates).items():
                    arrays[f"{split}/layer{k}/{key}"] = value
        write_arrays(directory / "analysis" / model["name"] / "dead_units.npz", arrays)
        results[model["name"]] = arrays
    return results


def load_dead_units(directory: Path) -> dict[str, dict[str, np.ndarray]] | None:
    """The saved census of every model, or None if ``distrep analyze`` has not run."""
    directory = Path(directory)
    files = {p.parent.name: p for p in (directory / "analysis").glob("*/dead_units.npz")}
    return {name: read_arrays(path) for name, path in sorted(files.items())} or None
