"""Executors: who trains a sweep's chunks, and where.

A sweep splits its unfinished runs into chunks (:meth:`distrep.sweep.Sweep.chunks`); each chunk
is a self-contained :class:`~distrep.sweep.ChunkWork` (config, units, their state and
parameters) that :func:`~distrep.sweep.train_chunk` trains anywhere. An executor runs a list of
them and hands each back, trained, to the sweep's ``finished(work, info)``; the sweep merges it,
checkpoints and, in the end, writes the same files whichever executor ran.

- :class:`LocalExecutor` trains the chunks one after another in this process; every
  ``checkpoint_every`` seconds it hands the chunk's partial state to ``partial(work)``, which
  the sweep checkpoints (so a long chunk on one GPU resumes where it stopped), and so it does
  at the end of the epoch when ``stop`` is set (:mod:`distrep.stopping`), then stops.
- :class:`RayExecutor` makes each chunk a Ray task (Ray is imported only there). The dataset
  goes through Ray's object store and the trained chunk comes back as the task's result, so no
  shared filesystem is needed; a worker that dies mid-chunk is retried by Ray (the chunk is
  deterministic, so the retry gives the same result), and with ``checkpoint_dir`` (a directory
  every node sees) a retried chunk resumes from its own checkpoint there.

Both have a ``session(device)``, the context in which a sweep is checked, planned, trained and
recorded: for Ray, the cluster joined and the device as a worker with a chunk's resources sees
it, lent to the driver (:func:`distrep.provenance.lent_device`), so that a head node without
the workers' GPUs drives them; and ``time_chunk(work, data)``, a chunk's seconds per run-epoch
where its chunks train (the time estimate).
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distrep.errors import DistrepError

EXECUTORS = ("local", "ray")
RAY_MISSING = ("--executor ray needs Ray, which is not installed; install it with "
               "`pip install 'distrep[ray]'` (or `pip install ray`)")


def chunk_info(work, seconds: float, device: str, attempt_node: str | None = None) -> dict:
    """What run.json records of a trained chunk: its runs, where and how long."""
    from distrep.models import display_name
    return {"runs": [[display_name(work.config.models[v]), r] for v, r in work.units],
            "node": attempt_node or socket.gethostname(), "device": device,
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@dataclass
class LocalExecutor:
    """Train the chunks one after another in this process."""

    name = "local"

    def session(self, device: str):
        """Nothing to join, and the device is this process's own."""
        return nullcontext()

    def time_chunk(self, work, data) -> float:
        """Seconds per run-epoch of ``work`` here (:func:`distrep.sweep.time_chunk`)."""
        from distrep.provenance import resolve_device
        from distrep.sweep import time_chunk
        return time_chunk(work, data, resolve_device(work.config.device))

    def run(self, works: list, data, finished: Callable, partial: Callable, advance: Callable,
            stop=None) -> None:
        from distrep.provenance import describe_device, resolve_device
        from distrep.sweep import train_chunk
        for k, work in enumerate(works):
            if stop:                 # the chunks before were checkpointed as they finished
                stop.stop("after a chunk" if k else "before training", trained=k > 0)
            device = resolve_device(work.config.device)
            began = time.perf_counter()
            trained = train_chunk(work, data, device, advance=advance, save=partial, stop=stop)
            finished(trained, chunk_info(trained, time.perf_counter() - began, describe_device(device)))


@dataclass
class RayExecutor:
    """Each chunk a Ray task. ``address``: None starts a local Ray instance (shut down at the
    end), ``"auto"`` or ``"host:port"`` joins a running cluster. A chunk asks for
    ``cpus_per_chunk`` CPUs (and trains with that many threads) and ``gpus_per_chunk`` GPUs
    (None: one when the sweep's device is CUDA, or ``auto`` on a cluster with GPUs; else none:
    Ray hides the GPUs from a task that asks for none)."""

    address: str | None = None
    cpus_per_chunk: int = 1
    gpus_per_chunk: float | None = None
    checkpoint_dir: Path | None = None
    max_retries: int = 3
    name = "ray"

    @contextmanager
    def session(self, device: str):
        """The cluster joined (or a local one started, and shut down at the end) for the calls
        within, and ``device`` resolved, checked and described by a worker with a chunk's
        resources, its answer lent to this process (:func:`distrep.provenance.lent_device`):
        the sweep's checks, engine choice, memory plan and records are then the workers'.
        Where the cluster cannot be joined but this process can use ``device`` itself, the
        calls within go on with it: a finished experiment needs nothing more (its report is
        rebuilt), and training tries to join again, and says why it cannot."""
        from distrep.provenance import lent_as, lent_device
        ray = _import_ray()
        if lent_as(device) and ray.is_initialized():      # within a session already (the CLI's)
            yield
            return
        stack = ExitStack()
        try:
            stack.enter_context(self._joined(ray))
            joined = True
        except DistrepError:
            if not _usable_here(device):
                raise
            joined = False
        with stack:
            if joined:
                stack.enter_context(lent_device(self._ask_worker(ray, device)))
            yield

    def time_chunk(self, work, data) -> float:
        """Seconds per run-epoch of ``work`` on a worker with a chunk's resources (in a
        :meth:`session`)."""
        ray = _import_ray()
        with self._joined(ray):      # (Ray would start a local instance of its own)
            task = ray.remote(_time_on_worker).options(**self._resources(ray, work.config.device))
            try:
                return ray.get(task.remote(work, data, self.cpus_per_chunk))
            except ray.exceptions.RayError as e:
                raise DistrepError(f"timing a chunk on a Ray worker failed: {_last_line(e)}") from None

    def run(self, works: list, data, finished: Callable, partial: Callable, advance: Callable,
            stop=None) -> None:
        """(``stop`` is not used: a signal interrupts the driver at once, and Ray's workers keep
        their own checkpoints with ``checkpoint_dir``.)"""
        ray = _import_ray()
        works = list(works)          # every chunk is submitted at once
        if works:
            with self._joined(ray):
                self._run(ray, works, data, finished, advance)

    @contextmanager
    def _joined(self, ray):
        """Ray as it is (in a session), or this executor's cluster joined (a local one started)
        for the calls within, and left (stopped) at the end."""
        started_here = not ray.is_initialized()
        if started_here:
            self._connect(ray)
        try:
            yield
        finally:
            if started_here:
                ray.shutdown()

    def _resources(self, ray, device: str) -> dict:
        """A chunk's Ray options (CPUs, GPUs: by default one for a CUDA device, and for ``auto``
        where the cluster has GPUs), checked against the cluster's (else Ray would wait for them
        forever)."""
        available = ray.cluster_resources()
        gpus = self.gpus_per_chunk
        if gpus is None:
            cuda = device.startswith("cuda") or (device == "auto" and available.get("GPU", 0) >= 1)
            gpus = 1 if cuda else 0
        for what, need in (("CPU", self.cpus_per_chunk), ("GPU", gpus)):
            if need and available.get(what, 0) < need:
                raise DistrepError(f"a chunk asks for {need:g} {what}(s) but the Ray cluster has "
                                   f"{available.get(what, 0):g}; lower --{what.lower()}s-per-chunk "
                                   f"or add nodes")
        return {"num_cpus": self.cpus_per_chunk, "num_gpus": gpus}

    def _ask_worker(self, ray, device: str):
        """:func:`distrep.provenance.device_facts` of ``device`` on a worker with a chunk's
        resources; what it could not use, one line naming the worker."""
        options = self._resources(ray, device)
        task = ray.remote(_device_on_worker).options(**options, max_retries=self.max_retries)
        try:
            facts, node = ray.get(task.remote(device, self.cpus_per_chunk))
        except ray.exceptions.RayError as e:
            raise DistrepError(f"asking a Ray worker for --device {device} failed: "
                               f"{_last_line(e)}") from None
        if isinstance(facts, str):
            raise DistrepError(f"--device {device} on a Ray worker with a chunk's resources "
                               f"({options['num_cpus']} CPU, {options['num_gpus']:g} GPU; {node}): "
                               f"{facts}")
        return facts

    def _connect(self, ray) -> None:
        import logging
        if self.address not in (None, "auto", "local") and not self.address.startswith("ray://"):
            _check_reachable(self.address)      # Ray itself retries an unreachable one for minutes
        try:
            ray.init(address=self.address or "local", include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True,
                     configure_logging=True)
        except ConnectionError as e:
            raise DistrepError(f"cannot join the Ray cluster at {self.address!r} ({e}); start one "
                               f"with `ray start --head` (a cluster with token authentication "
                               f"also needs RAY_AUTH_MODE=token here), or leave --ray-address out "
                               f"to start a local one") from None

    def _run(self, ray, works, data, finished, advance) -> None:
        from distrep.sweep import chunk_key
        task = ray.remote(_train_on_worker).options(
            **self._resources(ray, works[0].config.device), max_retries=self.max_retries,
            retry_exceptions=False)
        progress = ray.remote(_ProgressBoard).options(num_cpus=0).remote()
        data_ref = ray.put(data)
        checkpoint_dir = None
        if self.checkpoint_dir is not None:
            checkpoint_dir = str(Path(self.checkpoint_dir).resolve())
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        pending = {}
        for i, work in enumerate(works):
            path = (os.path.join(checkpoint_dir, f"chunk-{chunk_key(work)}.safetensors")
                    if checkpoint_dir else None)
            pending[task.remote(work, data_ref, i, progress, path, self.cpus_per_chunk)] = (i, path)
        seen = [0] * len(works)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for i, done in enumerate(ray.get(progress.read.remote())):
                if done > seen[i]:                  # a retried chunk starts again: count once
                    advance(done - seen[i])
                    seen[i] = done
            for ref in ready:
                i, path = pending.pop(ref)
                try:
                    trained, info = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise DistrepError(f"chunk {i + 1} of {len(works)} failed on the Ray cluster "
                                       f"after {self.max_retries} retries: {_last_line(e)}") from None
                total = sum(int(trained.state[f"{v}/epochs_done"].sum())
                            - int(works[i].state[f"{v}/epochs_done"].sum()) for v in trained.variants)
                finished(trained, info)
                if total > seen[i]:
                    advance(total - seen[i])
                    seen[i] = total
                if path is not None:
                    Path(path).unlink(missing_ok=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise DistrepError(RAY_MISSING) from None
    return ray


def _usable_here(device: str) -> bool:
    from distrep.provenance import resolve_device
    try:
        resolve_device(device)
    except DistrepError:
        return False
    return True


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """Refuse (one line) a ``host:port`` where nothing accepts a connection."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=seconds):
            pass
    except ValueError:
        raise DistrepError(f"--ray-address {address!r} is not host:port, 'auto' or ray://...") from None
    except OSError as e:
        raise DistrepError(f"cannot join the Ray cluster at {address!r}: nothing answers there "
                           f"({e.strerror or e}); start one with `ray start --head`, or leave "
                           f"--ray-address out to start a local one") from None


class _ProgressBoard:
    """A Ray actor: the run-epochs each chunk has trained so far (the latest report wins)."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def report(self, index: int, run_epochs: int) -> None:
        self.done[index] = run_epochs

    def read(self) -> list[int]:
        return [self.done.get(i, 0) for i in range(max(self.done, default=-1) + 1)]


def _train_on_worker(work, data, index: int, board, checkpoint: str | None, threads: int):
    """A Ray task: train one chunk on this worker (resuming from ``checkpoint`` if a previous
    attempt left one there) and return ``(trained work, run.json record)``."""
    import torch
    from distrep.provenance import describe_device, resolve_device
    from distrep.sweep import load_chunk, save_chunk, train_chunk

    torch.set_num_threads(max(1, int(threads)))
    if checkpoint is not None and os.path.exists(checkpoint):
        work = load_chunk(checkpoint, work)
    device = resolve_device(work.config.device)
    trained_now = [0]
    last_report = [0.0]

    def advance(n: int) -> None:
        trained_now[0] += n
        now = time.monotonic()
        if now - last_report[0] > 0.5:
            board.report.remote(index, trained_now[0])
            last_report[0] = now

    def save(partial) -> None:
        if checkpoint is not None:
            save_chunk(checkpoint, partial)

    began = time.perf_counter()
    trained = train_chunk(work, data, device, advance=advance, save=save)
    return trained, chunk_info(trained, time.perf_counter() - began, describe_device(device), _node())


def _node() -> str:
    import ray
    return f"{socket.gethostname()} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"


def _device_on_worker(requested: str, threads: int):
    """A Ray task: ``(facts, node)``, :func:`distrep.provenance.device_facts` of ``requested``
    on this worker with a chunk's threads, or ``(why not, node)``, the reason one line."""
    import torch
    from distrep.provenance import device_facts
    torch.set_num_threads(max(1, int(threads)))
    try:
        return device_facts(requested), _node()
    except DistrepError as e:
        return str(e), _node()


def _time_on_worker(work, data, threads: int) -> float:
    """A Ray task: :func:`distrep.sweep.time_chunk` of ``work`` on this worker."""
    import torch
    from distrep.provenance import resolve_device
    from distrep.sweep import time_chunk
    torch.set_num_threads(max(1, int(threads)))
    return time_chunk(work, data, resolve_device(work.config.device))


def make_executor(name: str, address: str | None = None, cpus_per_chunk: int = 1,
                  gpus_per_chunk: float | None = None, checkpoint_dir: Path | None = None):
    """The executor named on the command line; options of the other executor are refused."""
    if name == "local":
        given = [flag for flag, value in (("--ray-address", address),
                                          ("--checkpoint-dir", checkpoint_dir),
                                          ("--gpus-per-chunk", gpus_per_chunk)) if value is not None]
        if given:
            raise DistrepError(f"{', '.join(given)} only applies to --executor ray")
        return LocalExecutor()
    if name == "ray":
        _import_ray()                     # checked now, before any data is loaded
        return RayExecutor(address, cpus_per_chunk, gpus_per_chunk, checkpoint_dir)
    raise DistrepError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")


