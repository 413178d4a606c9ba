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

import os
from pathlib import Path

import numpy as np
import torch

from distrep.engine import StackedActivation, StackedOffsetL2, StackedRuns, engine_path, first_argmax
from distrep.models import parse
from distrep.storage import read_arrays, read_json, read_tensors, write_arrays
from distrep.sweep import model_dir, results_dir

# Rectifying activations, whose units can be "dead" (output exactly 0 on an input).
RECTIFIERS = ("relu", "abs")
THRESHOLDS = (0.01, 0.05)      # "rarely active": the author's code used < 1 %, the paper < 5 %
ANALYSES = ("dead_units", "hyperplanes", "clamping", "prototypes", "author")


def _batches(x_t: torch.Tensor, batch: int):
    """``(start, x_t[..., start:start + batch])`` over the examples, the last dimension of
    ``[in, n]`` or per-run ``[R, in, n]``."""
    for start in range(0, x_t.shape[-1], batch):
        yield start, x_t[..., start:start + batch].contiguous()


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
    return {k: c.double() / x_t.shape[-1] for k, c in counts.items()}


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
    a = hidden_activations(group, x_t)
    return _layer_clamped(group, a, y, clamp_levels(a, percents), percents, batch)


def _layer_clamped(group: StackedRuns, a: torch.Tensor, y: torch.Tensor, levels: torch.Tensor,
                   percents, batch: int = 2000) -> dict[str, np.ndarray]:
    """Accuracy with the hidden layer ``a [R, H, n]`` clamped at ``levels [P, R, H or 1, 1]``."""
    head = group.tail(output_layer(group))
    n = a.shape[2]

    def acc(transform) -> np.ndarray:
        correct = sum(accuracy(head.forward(transform(a[:, :, i:i + batch]))[-1], y[i:i + batch])
                      * len(y[i:i + batch]) for i in range(0, n, batch))
        return (correct / n).numpy()
    out = {"percents": np.asarray(percents, dtype=np.float64), "unclamped": acc(lambda b: b)}
    for kind in ("floor", "ceiling"):
        out[kind] = np.stack([acc(lambda b: clamp(b, L, kind)) for L in levels], 1)
    return out


class UnitClamp:
    """Accuracy with ONE hidden unit clamped at a time, for every unit and run at once.

    Clamping unit u changes only u's term of the output layer, so its effect is added to the
    unclamped pre-activation instead of recomputing the whole layer (H times less work):
        linear:   z' = z + W[:, u] (a'_u - a_u)
        OffsetL2: s' = s + w_u ((a'_u - mu_u)^2 - (a_u - mu_u)^2)
                     = s + w_u (a'_u - a_u) (a'_u + a_u - 2 mu_u),  y' = sqrt(s')
    then the layers after it (OffsetL2's s and its updates in float64: the update is a
    difference of squares, which fp32 would round). Chunks of units
    hold ~``memory`` bytes of work at a time."""

    @torch.no_grad()
    def __init__(self, group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor, memory: int = 1 << 25):
        k = output_layer(group)
        outputs = group.forward(x_t, stop=k + 1)
        self.a, self.layer, self.after, self.y = outputs[k - 1], group.layers[k], group.layers[k + 1:], y
        if isinstance(self.layer, StackedOffsetL2):
            self.base = self.layer.squared_distance(self.layer.stacked_inputs(self.a))   # s [R, C, n]
            self.weight, self.mu = self.layer.metric_weight(), self.layer.mu.double()
        else:
            self.base, self.weight = outputs[k], self.layer.weight                 # z [R, C, n]
        R, C, n = self.base.shape
        self.chunk = max(1, min(self.a.shape[1], memory // (3 * self.base.element_size() * R * C * n)))

    @torch.no_grad()
    def accuracy(self, levels: torch.Tensor, kind: str, which: torch.Tensor | None = None) -> np.ndarray:
        """Accuracy ``[R, U]`` with unit u of run r alone clamped (floor or ceiling) at
        ``levels [R, H, 1]``, for the units ``which`` (default: all H)."""
        a, base = self.a, self.base
        R, H, n = a.shape
        C, work = base.shape[1], base.dtype
        which = torch.arange(H) if which is None else which
        out = np.empty((R, H))
        for first in range(0, len(which), self.chunk):
            units = which[first:first + self.chunk]
            T = len(units)
            old = a[:, units].to(work).unsqueeze(2)                                 # [R, T, 1, n]
            w_u = self.weight[:, :, units].transpose(1, 2).unsqueeze(3)             # [R, T, C, 1]
            new = clamp(old, levels[:, units].unsqueeze(2).to(work), kind)
            if isinstance(self.layer, StackedOffsetL2):
                mu_u = self.mu[:, :, units].transpose(1, 2).unsqueeze(3)
                # (new - mu)^2 - (old - mu)^2 as (new - old)(new + old - 2 mu): three passes
                # over [R, T, C, n] instead of seven (an exact identity; the rounding differs)
                h = self.layer.root_(torch.addcmul(base.unsqueeze(1), w_u * (new - old),
                                                   (new + old) - 2 * mu_u))
            else:
                h = torch.addcmul(base.unsqueeze(1), w_u, new - old)                # [R, T, C, n]
            h = h.to(a.dtype).reshape(R * T, C, n)
            for later in self.after:
                h = later.forward(h, shared=False, keep=False)
            out[:, units.numpy()] = accuracy(h, self.y).view(R, T).numpy()
        return out[:, which.numpy()]


@torch.no_grad()
def unit_clamping_curves(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor,
                         percents=np.arange(0, 101, 5), memory: int = 1 << 25) -> dict[str, np.ndarray]:
    """Test accuracy with ONE hidden unit clamped at a time (see :class:`UnitClamp`), each at
    the level p % of the way between its own min and max: ``unit_floor [R, H, P]`` and
    ``unit_ceiling [R, H, P]``."""
    clamper = UnitClamp(group, x_t, y, memory)
    levels = clamp_levels(clamper.a, percents)                                      # [P, R, H, 1]
    out = {f"unit_{kind}": np.stack([clamper.accuracy(L, kind) for L in levels], 2)
           for kind in ("floor", "ceiling")}
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


# --------------------------------------------------------------------------- the author's readings
#
# The paper's analysis numbers come from the author's scripts, which compute their quantities
# their own way. Each function below reproduces one script's procedure on stacked runs, so that
# the paper's numbers can be compared like for like (distrep's own readings are the functions
# above). All of them read the TRAINING data, as the scripts do.

AUTHOR_ACTIVE = 1e-6       # analyze_dead_nodes.py: a unit is active where |a| > 1e-6
AUTHOR_TOLERANCE = 0.001   # analyze_node_perturbation.py: accuracies within 0.1 points meet
AUTHOR_MAX_EVALUATIONS = 100


def author_hooked_layers(group: StackedRuns) -> list[int]:
    """The layers whose outputs ``analyze_layer_perturbation.py`` takes its range over: every
    ReLU and Abs activation (its hook tests ``isinstance(m, nn.ReLU)`` or 'Abs' in the type's
    name), and, for a model with an Abs layer, the model's final output: the root module's
    class (``Model_Abs``, ``Model_Abs2_Neg``, ...) has 'Abs' in its name too."""
    kinds = [spec.kind for spec in group.specs]
    layers = [k for k, kind in enumerate(kinds) if kind in ("relu", "abs")]
    if "abs" in kinds:
        layers.append(len(kinds) - 1)
    return sorted(set(layers))


@torch.no_grad()
def author_layer_clamping(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor,
                          percents=np.arange(101), batch: int = 10000) -> dict[str, np.ndarray]:
    """``analyze_layer_perturbation.py``: ONE level for the whole hidden layer, p % of the way
    from the global minimum to the global maximum over the outputs of
    :func:`author_hooked_layers` (per run), L_p = min + p/100 (max - min); the hidden layer
    (the output layer's input) clamped to max(a, L_p) (floor) or min(a, L_p) (ceiling);
    accuracy on ``x_t, y`` (the training data in the script). Returns ``floor``, ``ceiling``
    ``[R, P]``, ``unclamped [R]``, ``range [R, 2]``."""
    hooked = author_hooked_layers(group)
    lo = hi = None
    for _, xs in _batches(x_t, batch):
        outputs = group.forward(xs)
        for k in hooked:
            o = outputs[k].flatten(1)
            lo = o.amin(1) if lo is None else torch.minimum(lo, o.amin(1))
            hi = o.amax(1) if hi is None else torch.maximum(hi, o.amax(1))
    a = hidden_activations(group, x_t)
    p = torch.as_tensor(np.asarray(percents, dtype=np.float64) / 100, dtype=torch.float64)
    levels = (lo.double() + p.view(-1, 1) * (hi - lo).double()).to(a.dtype).view(len(p), -1, 1, 1)
    out = _layer_clamped(group, a, y, levels, percents)
    out["range"] = torch.stack([lo, hi], 1).double().numpy()
    return out


def author_dropoff(percents: np.ndarray, curves: np.ndarray, unclamped: np.ndarray, kind: str) -> float:
    """The drop-off point as the author's notes read it off the curves: the first grid point p,
    moving from where the clamp does nothing (0 for a floor, 100 for a ceiling), at which the
    MEAN curve over runs has lost half the mean unclamped accuracy; NaN if it never does."""
    mean, half = np.nanmean(curves, 0), np.nanmean(unclamped) / 2
    order = range(len(percents)) if kind == "floor" else range(len(percents) - 1, -1, -1)
    return next((float(percents[i]) for i in order if mean[i] <= half), float("nan"))


@torch.no_grad()
def author_dead_units(group: StackedRuns, x_t: torch.Tensor, batch: int = 10000) -> dict[str, np.ndarray]:
    """``analyze_dead_nodes.py``: for the output of every Linear, ReLU, Abs and Neg layer, the
    units with |a| > 1e-6 on no input (``never``) and on fewer than 1 % of inputs (``below_1%``),
    ``layer<k>/<count>`` ``[runs]``. (Its root-module hook, which also fires for Abs models, is
    skipped by its own report.)"""
    counted = [k for k, spec in enumerate(group.specs) if spec.kind in ("linear", "relu", "abs", "neg")]
    counts: dict[int, torch.Tensor] = {}
    n = x_t.shape[-1]
    for _, xs in _batches(x_t, batch):
        outputs = group.forward(xs)
        for k in counted:
            c = (outputs[k].abs() > AUTHOR_ACTIVE).sum(2)
            counts[k] = c if k not in counts else counts[k] + c
    out = {}
    for k, c in counts.items():
        out[f"layer{k}/units"] = np.full(c.shape[0], c.shape[1])
        out[f"layer{k}/never"] = (c == 0).sum(1).numpy()
        out[f"layer{k}/below_1%"] = (c < 0.01 * n).sum(1).numpy()
    return out


@torch.no_grad()
def author_equilibrium(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor,
                       tolerance: float = AUTHOR_TOLERANCE,
                       max_evaluations: int = AUTHOR_MAX_EVALUATIONS) -> dict[str, np.ndarray]:
    """``analyze_node_perturbation.py``: each hidden unit's equilibrium point, the level t
    between the unit's own min and max (on ``x_t``, the training data) at which clamping that
    unit alone to a floor max(a_u, t) and to a ceiling min(a_u, t) give the same accuracy
    (within ``tolerance``), found by the script's bisection: mid = (left + right) / 2; if the
    floor's accuracy is higher, search above, else below. A unit whose search runs past
    ``max_evaluations`` or reaches either end gets t = its minimum (percentage 0), as in the
    script. All units and runs are searched at once. Returns ``threshold``, ``percentage``
    (100 (t - min) / (max - min)), ``evaluations``, ``met`` (False: the fallback) ``[R, H]``."""
    clamper = UnitClamp(group, x_t, y)
    a = clamper.a
    lo, hi = a.amin(2).double(), a.amax(2).double()                                # [R, H]
    left, right = lo.clone(), hi.clone()
    threshold, evaluations = lo.clone(), torch.zeros(lo.shape, dtype=torch.int64)
    met = torch.zeros(lo.shape, dtype=torch.bool)
    searching = torch.ones(lo.shape, dtype=torch.bool)
    while searching.any():
        mid = (left + right) / 2
        level = mid.to(a.dtype).unsqueeze(2)
        which = searching.any(0).nonzero()[:, 0]          # only units some run still searches
        floor, ceiling = (torch.zeros(lo.shape, dtype=torch.float64) for _ in range(2))
        floor[:, which] = torch.from_numpy(clamper.accuracy(level, "floor", which))
        ceiling[:, which] = torch.from_numpy(clamper.accuracy(level, "ceiling", which))
        evaluations += searching
        give_up = searching & ((evaluations > max_evaluations) | (mid == hi) | (mid == lo))
        meet = searching & ~give_up & ((floor - ceiling).abs() <= tolerance)
        threshold = torch.where(meet, mid, threshold)            # give_up keeps t = min
        met |= meet
        searching &= ~(give_up | meet)
        up = floor > ceiling
        left = torch.where(searching & up, mid, left)
        right = torch.where(searching & ~up, mid, right)
    span = (hi - lo)
    percentage = torch.where(span > 0, 100 * (threshold - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return {"threshold": threshold.numpy(), "percentage": percentage.numpy(),
            "evaluations": evaluations.numpy(), "met": met.numpy()}


@torch.no_grad()
def author_boundaries(group: StackedRuns, x_t: torch.Tensor, y: torch.Tensor,
                      thresholds: np.ndarray, classes: int) -> np.ndarray:
    """``analyze_feature_boundaries.py``: for each hidden unit, the share of each class's
    (training) examples at or below the unit's equilibrium threshold and above it:
    ``[R, H, C, 2]`` (below, above), each class's pair summing to 1."""
    a = hidden_activations(group, x_t)
    below = (a <= torch.as_tensor(thresholds, dtype=a.dtype).unsqueeze(2)).double()  # [R, H, n]
    onehot = torch.nn.functional.one_hot(y, classes).double()                       # [n, C]
    share = (below @ onehot) / onehot.sum(0).clamp_min(1)                           # [R, H, C]
    return torch.stack([share, 1 - share], 3).numpy()


def author_readings(group: StackedRuns, x_train: torch.Tensor, y_train: torch.Tensor,
                    classes: int) -> dict[str, np.ndarray]:
    """Every author-mode analysis of one model's runs, on the training data, as one dict of
    arrays (saved as ``analysis/<model>/author.npz``)."""
    out = {f"dead/{key}": value for key, value in author_dead_units(group, x_train).items()}
    if output_layer(group) > 0:
        if author_hooked_layers(group):       # the script finds no range without a ReLU or Abs
            clamping = author_layer_clamping(group, x_train, y_train)
            out |= {f"clamping/{key}": value for key, value in clamping.items()}
            for kind in ("floor", "ceiling"):
                out[f"clamping/{kind}_dropoff"] = np.array(author_dropoff(
                    clamping["percents"], clamping[kind], clamping["unclamped"], kind))
        eq = author_equilibrium(group, x_train, y_train)
        out |= {f"equilibrium/{key}": value for key, value in eq.items()}
        out["boundaries"] = author_boundaries(group, x_train, y_train, eq["threshold"], classes)
    return out


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
    found["author"] = author_readings(group, x_train, y_train, classes)
    return found


def analysis_path(directory: str | os.PathLike, name: str, analysis: str) -> Path:
    """Where an experiment keeps one analysis of a model: ``analysis/<model_dir(name)>/<analysis>.npz``
    (beside ``models/<model_dir(name)>/``, see :func:`distrep.sweep.results_dir`)."""
    return Path(directory) / "analysis" / model_dir(name) / f"{analysis}.npz"


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
        specs = parse(model["spec"], cfg["width"], data.num_features, data.num_classes)
        if engine_path(specs) != "hand-written":
            # the analyses read layers the engine implements by hand; a head or a user's layer
            # has no stacked form to clamp or take apart
            log(f"skipping {name}: the analyses cover models of linear, OffsetL2 and activation layers")
            continue
        log(f"analysing {name}")
        params = read_tensors(results_dir(directory, name) / "params.safetensors")
        group = StackedRuns.from_state(specs, params, cfg["offsetl2_form"])
        found = analyze_runs(group, train, test, data.num_classes, unit_examples)
        for analysis, arrays in found.items():
            write_arrays(analysis_path(directory, name, analysis), arrays)
        results[name] = found
    return results


def load_analyses(directory: Path, models: list[str]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{analysis: {model: arrays}}`` of whatever ``distrep analyze`` saved for ``models``
    (empty if nothing)."""
    out: dict[str, dict] = {}
    for name in models:
        for analysis in ANALYSES:
            path = analysis_path(directory, name, analysis)
            if path.exists():
                out.setdefault(analysis, {})[name] = read_arrays(path)
    return out
