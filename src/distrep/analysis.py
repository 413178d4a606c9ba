"""Geometric analyses of trained runs: dead units, class distributions along the output
hyperplanes, activation clamping, OffsetL2 prototypes.

Every function works on stacked runs (:class:`~distrep.engine.StackedRuns`, parameters
``[runs, ...]``) and feature-major data ``x_t [in, n]``, so all runs and units are handled by
tensor operations; the only Python loops are over clamp levels and chunks of units or
examples. Each analysis is a function on a model and data (usable on your own models through
``StackedRuns.from_models``) and, through :func:`analyze`, a set of arrays saved under
``analysis/<model>/`` of an experiment directory, which the report reads.

Terms. The *output layer* is the model's last affine layer (linear or OffsetL2); its output,
before any activation or negation after it, is the *pre-activation* ``z [R, C, n]``. The
*hidden activations* are that layer's input ``a [R, H, n]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distrep.engine import StackedActivation, StackedOffsetL2, StackedRuns, first_argmax
from distrep.models import parse
from distrep.storage import read_arrays, read_json, read_tensors, write_arrays
from distrep.sweep import model_dir

# Rectifying activations, whose units can be "dead" (output exactly 0 on an input).
RECTIFIERS = ("relu", "abs")
THRESHOLDS = (0.01, 0.05)      # "rarely active": the author's code used < 1 %, the paper < 5 %
ANALYSES = ("dead_units", "hyperplanes", "clamping", "prototypes")


def _batches(x_t: torch.Tensor, batch: int):
    for start in range(0, x_t.shape[1], batch):
        yield start, x_t[:, start:start + batch].contiguous()


def output_layer(group: StackedRuns) -> int:
    """Index of the last affine layer (linear or OffsetL2)."""
    return max(k for k, spec in enumerate(group.specs) if spec.affine)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose first maximal logit is the label: ``[R, C, n]`` -> ``[R]``."""
    return (first_argmax(logits) == y).double().mean(1)


# --------------------------------------------------------------------------- dead units

@torch.no_grad()
def activation_rates(group: StackedRuns, x_t: torch.Tensor, batch: int = 10000) -> dict[int, torch.Tensor]:
    """For every rectifying activation layer k: the fraction of inputs on which each unit's
    output is non-zero, ``[runs, units]``. ``x_t`` is the input, feature-major ``[in, n]``."""
    counts: dict[int, torch.Tensor] = {}
    for _, xs in _batches(x_t, batch):
        outputs = group.forward(xs)
        for k, layer in enumerate(group.layers):
            if isinstance(layer, StackedActivation) and layer.kind in RECTIFIERS:
                active = (outputs[k] != 0).sum(2)
                counts[k] = counts[k] + active if k in counts else active
    return {k: c.double() / x_t.shape[1] for k, c in counts.items()}


def unit_census(rates: torch.Tensor, thresholds=THRESHOLDS) -> dict[str, np.ndarray]:
    """Per run, the number of units never active, and active on fewer than each threshold's
    fraction of inputs. ``rates [runs, units]`` -> ``{"never": [runs], "below_1%": [runs], ...}``."""
    out = {"never": (rates == 0).sum(1).numpy(), "units": np.full(rates.shape[0], rates.shape[1])}
    for t in thresholds:
        out[f"below_{t:.0%}"] = (rates < t).sum(1).numpy()
    return out


def dead_unit_arrays(group: StackedRuns, splits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The census on each split: keys ``<split>/layer<k>/<count>``, each ``[runs]``."""
    arrays = {}
    for split, x_t in splits.items():
        for k, rates in activation_rates(group, x_t).items():
            for key, value in unit_census(rates).items():
                arrays[f"{split}/layer{k}/{key}"] = value
    return arrays


# --------------------------------------------------------------------------- output hyperplanes

@torch.no_grad()
def preactivations(group: StackedRuns, x_t: torch.Tensor, batch: int = 10000) -> torch.Tensor:
    """The output layer's pre-activation ``z [R, C, n]`` (for a linear layer, the signed
    distance to each unit's hyperplane times ``||w_j||``; for OffsetL2, the distance itself)."""
    k = output_layer(group)
    return torch.cat([group.forward(xs, stop=k + 1)[-1] for _, xs in _batches(x_t, batch)], 2)


def hyperplane_summary(z: torch.Tensor, y: torch.Tensor, classes: int, bins: int = 40) -> dict[str, np.ndarray]:
    """Where each class lies along each output unit, for ``z [R, U, n]`` and labels ``y [n]``.

    Unit j's target class is class j. Returns, with ``[R, U, C]`` per-class statistics:
      ``class_mean`` mean z;  ``class_abs_mean`` mean |z|;
      ``target_rank_abs [R, U]``: rank of the target class by mean |z| among the C classes,
      1 = nearest zero (a distance reading puts the target at 1, an intensity reading at C);
      ``target_rank_signed [R, U]``: rank by mean z, 1 = largest;
      ``hist [R, U, C, bins]`` counts of z per class over ``edges [R, U, bins + 1]``
      (evenly spaced from each unit's min to max).
    """
    z = z.double()
    R, U, n = z.shape
    onehot = torch.nn.functional.one_hot(y, classes).double()                   # [n, C]
    count = onehot.sum(0)                                                        # [C]
    class_mean = (z @ onehot) / count
    class_abs = (z.abs() @ onehot) / count
    target = torch.arange(U)
    own_abs = class_abs[:, target, target % classes]                              # [R, U]
    own_mean = class_mean[:, target, target % classes]
    rank_abs = 1 + (class_abs < own_abs.unsqueeze(2)).sum(2)
    rank_signed = 1 + (class_mean > own_mean.unsqueeze(2)).sum(2)
    lo, hi = z.amin(2, keepdim=True), z.amax(2, keepdim=True)
    width = (hi - lo).clamp_min(1e-12)
    index = ((z - lo) / width * bins).long().clamp_(0, bins - 1)                # [R, U, n]
    flat = (torch.arange(R * U).view(R, U, 1) * classes + y.view(1, 1, n)) * bins + index
    hist = torch.bincount(flat.reshape(-1), minlength=R * U * classes * bins).view(R, U, classes, bins)
    steps = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    edges = lo + (hi - lo) * steps
    return {"class_mean": class_mean.numpy(), "class_abs_mean": class_abs.numpy(),
            "target_rank_abs": rank_abs.numpy(), "target_rank_signed": rank_signed.numpy(),
            "hist": hist.numpy(), "edges": edges.numpy()}


# --------------------------------------------------------------------------- clamping

@torch.no_grad()
def hidden_activations(group: StackedRuns, x_t: torch.Tensor) -> torch.Tensor:
    """The output layer's input ``a [R, H, n]``."""
    k = output_layer(group)
    if k == 0:
        raise ValueError("the model has a single affine layer: there are no hidden activations")
    return group.forward(x_t, stop=k)[-1]


def clamp_levels(a: torch.Tensor, percents: np.ndarray) -> torch.Tensor:
    """Levels p % of the way from each unit's observed minimum to its maximum over the inputs:
    ``L_p = min + p/100 (max - min)`` for ``a [R, H, n]``; returns ``[P, R, H, 1]``."""
    lo, hi = a.amin(2, keepdim=True), a.amax(2, keepdim=True)
    p = torch.as_tensor(np.asarray(percents, dtype=np.float64) / 100, dtype=a.dtype).view(-1, 1, 1, 1)
    return lo + p * (hi - lo)


def clamp(a: torch.Tensor, level: torch.Tensor, kind: str) -> torch.Tensor:
    """Floor: max(a, level); ceiling: min(a, level)."""
    return torch.maximum(a, level) if kind == "floor" else torch.minimum(a, level)


@torch.no_grad()
def clamping_curves(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor,
                    percents=np.arange(101), batch: int = 2000) -> dict[str, np.ndarray]:
    """Test accuracy with the whole hidden layer clamped, each unit at its own level p % of the
    way between its observed min and max: ``floor [R, P]``, ``ceiling [R, P]``, ``unclamped [R]``.
    Examples go through the output layer ``batch`` at a time (small temporaries are reused by
    the allocator; large ones cost page faults on every call)."""
    k = output_layer(group)
    a = hidden_activations(group, x_t)
    head = group.tail(k)
    levels = clamp_levels(a, percents)
    n = a.shape[2]

    def acc(transform) -> np.ndarray:
        correct = sum(accuracy(head.forward(transform(a[:, :, i:i + batch]))[-1], y[i:i + batch])
                      * len(y[i:i + batch]) for i in range(0, n, batch))
        return (correct / n).numpy()
    out = {"percents": np.asarray(percents, dtype=np.float64), "unclamped": acc(lambda b: b)}
    for kind in ("floor", "ceiling"):
        out[kind] = np.stack([acc(lambda b: clamp(b, L, kind)) for L in levels], 1)
    return out


@torch.no_grad()
def unit_clamping_curves(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor,
                         percents=np.arange(0, 101, 5), memory: int = 1 << 25) -> dict[str, np.ndarray]:
    """Test accuracy with ONE hidden unit clamped at a time: ``unit_floor [R, H, P]`` and
    ``unit_ceiling [R, H, P]``.

    Clamping unit u changes only u's term of the output layer, so its effect is added to the
    unclamped pre-activation instead of recomputing the whole layer (H times less work):
        linear:   z' = z + W[:, u] (a'_u - a_u)
        OffsetL2: s' = s + w_u ((a'_u - mu_u)^2 - (a_u - mu_u)^2),  y' = sqrt(s')
    then the layers after it (OffsetL2 in float64, as the engine computes it). Chunks of units
    hold ~``memory`` bytes of work at a time."""
    k = output_layer(group)
    outputs = group.forward(x_t, stop=k + 1)
    a, layer, after = outputs[k - 1], group.layers[k], group.layers[k + 1:]  # a [R, H, n]
    R, H, n = a.shape
    if isinstance(layer, StackedOffsetL2):
        a64 = a.double()
        base = layer.squared_distance(a64, a64 * a64, shared=False)                # s [R, C, n]
        weight, mu = layer.metric_weight(), layer.mu.double()                       # [R, C, H]
    else:
        base, weight = outputs[k], layer.weight                                     # z [R, C, n]
    C, work = base.shape[1], base.dtype
    levels = clamp_levels(a, percents)                                              # [P, R, H, 1]
    out = {kind: np.empty((R, H, len(percents))) for kind in ("unit_floor", "unit_ceiling")}
    chunk = max(1, min(H, memory // (3 * base.element_size() * R * C * n)))
    for first in range(0, H, chunk):
        units = torch.arange(first, min(first + chunk, H))
        T = len(units)
        old = a[:, units].to(work).unsqueeze(2)                                     # [R, T, 1, n]
        w_u = weight[:, :, units].transpose(1, 2).unsqueeze(3)                      # [R, T, C, 1]
        if isinstance(layer, StackedOffsetL2):
            mu_u = mu[:, :, units].transpose(1, 2).unsqueeze(3)
        for kind in ("floor", "ceiling"):
            for i, L in enumerate(levels):
                new = clamp(old, L[:, units].unsqueeze(2).to(work), kind)
                if isinstance(layer, StackedOffsetL2):
                    s = base.unsqueeze(1) + w_u * ((new - mu_u) ** 2 - (old - mu_u) ** 2)
                    h = layer.root(s)[0]
                else:
                    h = base.unsqueeze(1) + w_u * (new - old)                       # [R, T, C, n]
                h = h.to(a.dtype).reshape(R * T, C, n)
                for later in after:
                    h = later.forward(h, shared=False, keep=False)
                out[f"unit_{kind}"][:, units, i] = accuracy(h, y).view(R, T).numpy()
    out["unit_percents"] = np.asarray(percents, dtype=np.float64)
    return out


def half_drop(percents: np.ndarray, acc: np.ndarray, baseline: np.ndarray, kind: str) -> np.ndarray:
    """The clamp level p at which accuracy first falls to half of ``baseline``, moving from
    where the clamp does nothing (p = 0 for a floor, p = 100 for a ceiling), linearly
    interpolated between grid points; NaN where it never falls that far.
    ``acc [..., P]`` over ascending ``percents [P]``, ``baseline [...]`` -> ``[...]``."""
    p = np.asarray(percents, dtype=np.float64)
    acc = np.asarray(acc, dtype=np.float64)
    if kind == "ceiling":
        p, acc = p[::-1], acc[..., ::-1]
    half = np.asarray(baseline, dtype=np.float64)[..., None] / 2
    below = acc <= half
    i = below.argmax(-1)
    prev = np.maximum(i - 1, 0)
    a0, a1 = np.take_along_axis(acc, prev[..., None], -1)[..., 0], np.take_along_axis(acc, i[..., None], -1)[..., 0]
    p0, p1 = p[prev], p[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(a1 != a0, (half[..., 0] - a0) / (a1 - a0), 0.0)
    result = np.where(i == 0, p[0], p0 + frac * (p1 - p0))
    return np.where(below.any(-1), result, np.nan)


# --------------------------------------------------------------------------- OffsetL2 prototypes

def class_means(h: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """Mean of ``h [R, H, n]`` over each class's examples: ``[R, C, H]`` (0 for a class with
    no examples)."""
    onehot = torch.nn.functional.one_hot(y, classes).to(h.dtype)
    return (h @ onehot).transpose(1, 2) / onehot.sum(0).clamp_min(1).view(1, -1, 1)


@torch.no_grad()
def prototype_summary(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor, classes: int,
                      batch: int = 10000) -> dict[str, np.ndarray] | None:
    """For a model whose output layer is OffsetL2: its prototypes ``mu [R, C, H]`` and metric
    weights ``weight [R, C, H]`` (alpha^2 in the paper's form, alpha in the coded form); the
    class means ``m [R, C, H]`` of the layer's input; ``distance [R, C, C]`` =
    ``||m_c - mu_j||`` (j rows, c columns) and ``weighted_distance`` =
    ``sqrt(sum_i w_ji (m_ci - mu_ji)^2)`` (the layer's own metric, negative weights clipped
    at 0); ``own_rank [R, C]``: rank of class j among the classes by weighted distance to
    mu_j, 1 = mu_j nearest its own class's mean (``own_rank_euclidean`` likewise);
    ``own_prototype_rank [R, C]``: rank of mu_c among the prototypes by weighted distance from
    class c's mean, 1 = its own prototype is the nearest, C = the farthest. None if the output
    layer is not OffsetL2."""
    k = output_layer(group)
    layer = group.layers[k]
    if not isinstance(layer, StackedOffsetL2):
        return None
    sums = 0.0
    for start, xs in _batches(x_t, batch):                                      # the layer's input
        h = hidden_activations(group, xs) if k > 0 else xs.unsqueeze(0).expand(group.runs, -1, -1)
        onehot = torch.nn.functional.one_hot(y[start:start + batch], classes).double()
        sums = sums + (h.double() @ onehot).transpose(1, 2)
    means = sums / torch.bincount(y, minlength=classes).clamp_min(1).view(1, -1, 1)   # [R, C, H]
    mu, w = layer.mu.double(), layer.metric_weight()
    diff2 = (means.unsqueeze(1) - mu.unsqueeze(2)) ** 2                         # [R, j, c, H]
    euclid = diff2.sum(3).sqrt()
    weighted = (w.clamp_min(0).unsqueeze(2) * diff2).sum(3).sqrt()
    own = torch.arange(mu.shape[1])

    def rank(d):
        mine = d[:, own, own % classes].unsqueeze(2)
        return (1 + (d < mine).sum(2)).numpy()
    # seen from class c's mean: where its own prototype mu_c ranks among all prototypes (this
    # compares distances at one point, so classes of different spread do not mix)
    mine = weighted[:, own, own % classes].unsqueeze(1)                         # [R, 1, C]
    own_prototype_rank = (1 + (weighted[:, :, :len(own)] < mine).sum(1)).numpy()
    return {"mu": mu.numpy(), "weight": w.numpy(), "class_means": means.numpy(),
            "distance": euclid.numpy(), "weighted_distance": weighted.numpy(),
            "own_rank": rank(weighted), "own_rank_euclidean": rank(euclid),
            "own_prototype_rank": own_prototype_rank}


# --------------------------------------------------------------------------- experiment directories

def analyze_runs(group: StackedRuns, train: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], classes: int,
                 unit_examples: int = 2000) -> dict[str, dict[str, np.ndarray]]:
    """Every analysis of one model's stacked runs: ``{analysis: arrays}``. ``train`` and
    ``test`` are ``(x_t [in, n], y [n])``. Dead units on both splits; the rest on the test
    data (per-unit clamping on its first ``unit_examples`` examples); clamping only where there
    is a hidden layer, prototypes only for an OffsetL2 output layer."""
    (x_train, y_train), (x_test, y_test) = train, test
    found = {"dead_units": dead_unit_arrays(group, {"train": x_train, "test": x_test}),
             "hyperplanes": hyperplane_summary(preactivations(group, x_test), y_test, classes)}
    if output_layer(group) > 0:
        curves = clamping_curves(group, x_test, y_test)
        x_few, y_few = x_test[:, :unit_examples].contiguous(), y_test[:unit_examples]
        curves |= unit_clamping_curves(group, x_few, y_few)
        curves["unit_unclamped"] = accuracy(group.forward(x_few)[-1], y_few).numpy()
        for kind in ("floor", "ceiling"):
            curves[f"{kind}_half"] = half_drop(curves["percents"], curves[kind], curves["unclamped"], kind)
            curves[f"unit_{kind}_half"] = half_drop(curves["unit_percents"], curves[f"unit_{kind}"],
                                                    curves["unit_unclamped"][:, None], kind)
        found["clamping"] = curves
    prototypes = prototype_summary(group, x_train, y_train, classes)
    if prototypes is not None:
        found["prototypes"] = prototypes
    return found


def analyze(directory: Path, unit_examples: int = 2000, log=lambda m: None) -> dict[str, dict[str, dict]]:
    """:func:`analyze_runs` for every model of an experiment directory, on the data it was
    trained on; saved as ``analysis/<model>/<analysis>.npz`` and returned."""
    from distrep.data import load_dataset
    directory = Path(directory)
    config = read_json(directory / "config.json")
    cfg = config["config"]
    data = load_dataset(cfg["dataset"], cfg["preprocess"]).subset(cfg["train_subset"])
    train = (data.x_train.t().contiguous(), data.y_train)
    test = (data.x_test.t().contiguous(), data.y_test)
    results = {}
    for model in config["models"]:
        name = model["name"]
        log(f"analysing {name}")
        params = read_tensors(directory / "models" / model_dir(name) / "params.safetensors")
        specs = parse(model["spec"], cfg["width"], data.num_features, data.num_classes)
        group = StackedRuns.from_state(specs, params, cfg["offsetl2_form"])
        found = analyze_runs(group, train, test, data.num_classes, unit_examples)
        for analysis, arrays in found.items():
            write_arrays(directory / "analysis" / model_dir(name) / f"{analysis}.npz", arrays)
        results[name] = found
    return results


def load_analyses(directory: Path, models: list[str]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{analysis: {model: arrays}}`` of whatever ``distrep analyze`` saved for ``models``
    (empty if nothing)."""
    out: dict[str, dict] = {}
    for name in models:
        for analysis in ANALYSES:
            path = Path(directory, "analysis", model_dir(name), f"{analysis}.npz")
            if path.exists():
                out.setdefault(analysis, {})[name] = read_arrays(path)
    return out
