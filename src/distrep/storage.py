"""Atomic writes of the plain files distrep produces (JSON, NumPy arrays, safetensors).

Every result file is first written to a temporary file in the same directory, flushed to disk,
and then renamed over its final name. A rename within one file system is atomic, so a reader
(or a job restarted after a crash) sees either the old complete file or the new complete file,
never a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from distrep.errors import DistrepError


def _umask() -> int:
    mask = os.umask(0o022)      # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written: a temporary file
    in the same directory, flushed, given the mode an ordinary write would (0666 less the
    umask; mkstemp's 0600 would hide results from the group), renamed over ``path``, and the
    directory synced so that the rename itself survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:            # some file systems cannot sync a directory; the data is synced
        pass
    finally:
        os.close(fd)


def _damaged(path, e: Exception) -> DistrepError:
    if isinstance(e, FileNotFoundError):
        return DistrepError(f"{path} is missing")
    detail = (str(e).splitlines() or [""])[0] or type(e).__name__
    return DistrepError(f"{path} is damaged or not the file distrep wrote ({detail[:120]})")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a missing or unparsable file is a one-line :class:`DistrepError`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path, e) from None


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> Path:
    """Write named arrays as an uncompressed ``.npz`` (readable with ``numpy.load``), atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: _to_numpy(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.npz`` written by :func:`write_arrays`; never unpickles objects."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:       # zipfile, pickle refusal, truncation: each its own type
        raise _damaged(path, e) from None


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Write named tensors as safetensors (plain data, loaded without executing code), atomically."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, _st_save(data, metadata=dict(metadata or {})))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return _st_load(Path(path).read_bytes())
    except Exception as e:       # safetensors raises its own error types for damaged files
        raise _damaged(path, e) from None


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
