"""Figures. Each function draws on ``ax`` (a new figure if None) and returns the axes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only: no display is assumed anywhere distrep runs

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.ticker import FuncFormatter  # noqa: E402

from distrep.storage import atomic_write_bytes  # noqa: E402

_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")   # 20, not 2×10^1, on log axes


def _log_y(ax) -> None:
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
