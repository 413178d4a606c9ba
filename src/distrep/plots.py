"""Figures. Each function draws on ``ax`` (a new figure if None) and returns the axes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only: no display is assumed anywhere distrep runs

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.ticker import FuncFormatter  # noqa: E402

from distrep.models import name_digest  # noqa: E402
from distrep.storage import atomic_write_bytes  # noqa: E402

_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")   # 20, not 2×10^1, on log axes


COLOURS = 10          # matplotlib's default colour cycle: the eleventh line repeats the first's colour


def line_style(i: int) -> str:
    """The dash pattern of a figure's ``i``-th model: solid for the first ten (a colour each),
    then dashed, dotted and dash-dotted, so that lines sharing a colour are told apart."""
    return ("-", "--", ":", "-.")[i // COLOURS % 4]


def legend_columns(entries: int) -> int:
    """Columns of a legend of ``entries`` models beside the axes, a column per 25; 0 for up to
    ten, which sit inside them (more would cover the lines)."""
    return -(-entries // 25) if entries > COLOURS else 0


def model_legend(ax, entries: int) -> None:
    """The legend of ``entries`` models: in two columns inside the axes, or beside them
    (:func:`legend_columns`; :func:`legend_width` widens the figure for it)."""
    beside = legend_columns(entries)
    if beside:
        ax.legend(fontsize=8, ncol=beside, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, ncol=2)


def legend_width(entries: int) -> float:
    """Inches a figure needs beside its axes for :func:`model_legend` of ``entries`` models."""
    return 3.5 * legend_columns(entries)


def figure_label(name: str, limit: int = 40) -> str:
    """A model's name as a figure shows it: whole up to ``limit`` characters, else its head and
    tail around an ellipsis and a tag from its SHA-256 (a spec of many layers as a legend entry
    or tick label would crowd the plot out; the tag keeps apart specs that differ only in the
    middle, e.g. in depth, and is the start of the hash in the folder name of a spec too long
    for a file name, :func:`distrep.sweep.model_dir`; the report's tables give the name whole)."""
    if len(name) <= limit:
        return name
    tag = name_digest(name)[:6]
    keep = limit - len(tag) - 4                          # the ellipsis, " (" and ")"
    head = keep // 2
    return f"{name[:head]}…{name[len(name) - (keep - head):]} ({tag})"


def _log_y(ax) -> None:
    """A log y axis, where the axes hold something positive and finite to show on one (a plot
    of runs that all diverged holds only NaN: it keeps its linear axis and says so)."""
    low, high = ax.dataLim.intervaly
    if not (np.isfinite(low) and np.isfinite(high) and high > 0):
        ax.text(0.5, 0.5, "no finite values (every run diverged?)", transform=ax.transAxes,
                ha="center", va="center")
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.yaxis.set_minor_formatter(_PLAIN)
    ax.grid(True, which="both", alpha=0.3)


def plot_train_loss(train_loss: np.ndarray, ax=None, label: str | None = None):
    """Training loss ``[epochs]`` against epoch (1-based), log scale."""
    ax = ax or plt.figure().add_subplot()
    epochs = np.arange(1, len(train_loss) + 1)
    ax.plot(epochs, train_loss, label=label)
    ax.set(xlabel="epoch", ylabel="train loss (cross-entropy)", title="training loss")
    _log_y(ax)
    return ax


def plot_test_error(test_epochs: np.ndarray, test_acc: np.ndarray, ax=None, label: str | None = None):
    """Test error in percent (100 - accuracy) against epoch, log scale."""
    ax = ax or plt.figure().add_subplot()
    ax.plot(test_epochs, 100 * (1 - np.asarray(test_acc)), label=label)
    ax.set(xlabel="epoch", ylabel="test error (%)", title="test error")
    _log_y(ax)
    return ax


def plot_per_run(values: dict[str, np.ndarray], ylabel: str, title: str, ax=None):
    """One value per run of each model ``{name: [runs]}`` (NaN: left out) as points over the
    model's box plot, the models along x; without ``ax``, on a figure of its own sized for the
    models."""
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.8 * len(values)), 4.5), layout="constrained")
    kept = [v[~np.isnan(v)] for v in values.values()]
    ax.boxplot(kept, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)                             # fixed jitter: same picture each time
    for i, v in enumerate(kept, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=12, alpha=0.7, zorder=3)
    ax.set_xticks(range(1, len(values) + 1), [figure_label(n) for n in values], rotation=30,
                  ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def save_figure(fig, path, dpi: int = 120) -> None:
    """Save ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_figure(metrics: dict[str, np.ndarray], title: str):
    """Training loss and test error of one run, side by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    plot_train_loss(metrics["train_loss"], ax=left)
    plot_test_error(metrics["test_epochs"], metrics["test_acc"], ax=right)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- analyses

def plot_hyperplanes(hist: np.ndarray, edges: np.ndarray, classes, title: str):
    """Per output unit j, the distribution of its pre-activation for each class (one run):
    ``hist [U, C, bins]`` counts over ``edges [U, bins + 1]``. Unit j's own class is drawn in
    colour, the others in grey, each normalised to its class's size."""
    U = hist.shape[0]
    cols = min(U, 5)
    rows = -(-U // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), layout="constrained",
                             squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= U:
            ax.axis("off")
            continue
        centres = (edges[j, :-1] + edges[j, 1:]) / 2
        density = hist[j] / np.maximum(hist[j].sum(1, keepdims=True), 1)
        for c in range(hist.shape[1]):
            if c != j:
                ax.plot(centres, density[c], color="0.65", lw=0.8)
        if j < hist.shape[1]:
            ax.plot(centres, density[j], color="C3", lw=2, label=f"class {classes[j]}")
        ax.axvline(0, color="k", lw=0.6, ls=":")
        ax.set_title(f"unit {j} (class {classes[j] if j < len(classes) else '?'})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    fig.suptitle(f"{title}: pre-activation of each output unit, by class "
                 f"(own class in red, others grey; dotted: 0)", fontsize=10)
    return fig


def plot_clamping(curves: dict[str, dict[str, np.ndarray]]):
    """Test accuracy against the clamp level p (mean ± std over runs), floor and ceiling."""
    fig, axes = plt.subplots(1, 2, figsize=(11 + legend_width(len(curves)), 4), layout="constrained",
                             sharey=True)
    for ax, kind in zip(axes, ("floor", "ceiling")):
        for i, (name, c) in enumerate(curves.items()):
            acc = 100 * c[kind]
            mu, sd = acc.mean(0), acc.std(0)
            line, = ax.plot(c["percents"], mu, line_style(i), label=figure_label(name))
            ax.fill_between(c["percents"], mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
        ax.set(xlabel=f"{kind} level p (% of the way from each unit's min to its max)",
               title=f"hidden layer clamped to a {kind}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    model_legend(axes[1], len(curves))
    return fig


def plot_prototypes(weight: np.ndarray, distance: np.ndarray, classes, title: str):
    """OffsetL2: the metric weights ``weight [C, H]`` of one run as a heat map, and the
    distance from each class mean to each prototype ``distance [C (prototypes), C (classes)]``
    relative to that class's mean distance to all prototypes (< 1, blue: nearer than usual)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), layout="constrained",
                                      gridspec_kw={"width_ratios": [3, 1]})
    im = left.imshow(weight, aspect="auto", cmap="viridis", interpolation="nearest")
    left.set(xlabel="hidden unit i", ylabel="output j", title="metric weights w_ji (run 0)")
    left.set_yticks(range(len(classes)), classes)
    fig.colorbar(im, ax=left, fraction=0.03)
    relative = distance / distance.mean(0, keepdims=True)    # each class against its own scale
    im = right.imshow(relative, cmap="RdBu_r", vmin=2 - relative.max(), vmax=relative.max(),
                      interpolation="nearest")
    right.set(xlabel="class c (its mean hidden vector)", ylabel="prototype mu_j",
              title="d(m_c, mu_j) / mean_j d(m_c, mu_j)")
    right.set_xticks(range(len(classes)), classes, fontsize=7)
    right.set_yticks(range(len(classes)), classes, fontsize=7)
    fig.colorbar(im, ax=right, fraction=0.05)
    fig.suptitle(title)
    return fig


def plot_first_layer(weight: np.ndarray, title: str, image_shape: tuple[int, int] = (28, 28),
                     columns: int = 16):
    """First-layer weights ``[units, height*width]`` of one run as one mosaic of images (red > 0
    > blue, each unit scaled to its own largest |w|)."""
    units, _ = weight.shape
    height, width = image_shape
    rows = -(-units // columns)
    mosaic = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), np.nan)   # 1 px gaps
    scale = np.abs(weight).max(1, keepdims=True)
    scaled = weight / np.where(scale > 0, scale, 1.0)
    for u in range(units):
        r, c = divmod(u, columns)
        top, left = r * (height + 1), c * (width + 1)
        mosaic[top:top + height, left:left + width] = scaled[u].reshape(height, width)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")     # gaps between units: white
    fig, ax = plt.subplots(figsize=(columns * 0.6, rows * 0.6 + 0.4), layout="constrained")
    ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return fig
