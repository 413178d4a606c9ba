"""The Ray executor on a local Ray cluster (2 CPUs): the same files as the local executor, bit
for bit on the CPU; a worker killed mid-chunk is retried; a driver killed and rerun resumes
without training finished chunks again; and nothing of Ray is left running afterwards.

Ray is in the test extra (`pip install -e '.[test]'`), so these tests run wherever the suite
does; they are not skipped without it."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import ray  # noqa: F401  (in the test extra: a missing Ray fails here, loudly)

from distrep.storage import read_arrays, read_tensors
from tests.test_cli import assert_one_line_error, distrep

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line, or whose parent's, names ``marker`` (Ray's workers
    rename themselves, their raylet parent keeps the session path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        if marker in cmd or marker in parent:
            found.append(int(entry.name))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head node with 2 CPUs and one GPU it does not have (a resource Ray schedules by,
    for a worker that then sees no CUDA GPU) in a temporary directory of its own; every process
    of it is gone after the module (checked)."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")      # short: Ray's socket paths are limited
    port = _free_port()
    # a loopback-only test cluster: no token authentication, for it and the drivers that join it
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=1",
                    "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        for pid in _pids_under(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while _pids_under(temp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _pids_under(temp), "Ray processes left behind"


def _same_results(a: Path, b: Path) -> None:
    assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()
    for model in sorted(p.name for p in (a / "models").iterdir()):
        ma, mb = (read_arrays(d / "models" / model / "metrics.npz") for d in (a, b))
        assert set(ma) == set(mb)
        for key in ma:
            np.testing.assert_array_equal(ma[key], mb[key], err_msg=f"{model} {key}")
        pa, pb = (read_tensors(d / "models" / model / "params.safetensors") for d in (a, b))
        assert all(pa[k].equal(pb[k]) for k in pa), model


SMALL = ("reproduce", "table1", "--runs", 2, "--epochs", 30, "--train-subset", 500, "--quiet")


def _ray_processes() -> set[int]:
    return set(_pids_under("ray/core/src/ray")) | set(_pids_under("ray::"))


def test_ray_gives_the_local_results_bit_for_bit(tmp_path, mnist):
    """The issue's command, with a local Ray instance started and shut down by distrep."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert distrep(*SMALL, "--out", local).returncode == 0
    before = _ray_processes()
    r = distrep(*SMALL, "--out", remote, "--executor", "ray", "--max-runs-per-chunk", 4)
    assert r.returncode == 0, r.stderr
    _wait_for(lambda: not _ray_processes() - before, 30, "Ray's processes to end", None)
    _same_results(local, remote)
    assert (local / "report.md").exists() and (remote / "report.md").exists()
    session = json.loads((remote / "run.json").read_text())["sessions"][-1]
    assert session["executor"] == "ray" and len(session["chunks"]) == 3     # 12 runs, 4 a chunk
    assert sorted(tuple(u) for c in session["chunks"] for u in c["runs"]) == sorted(
        (m, r) for m in ("Abs", "ReLU", "Abs2", "Abs2-Neg", "ReLU2", "ReLU2-Neg") for r in (0, 1))
    assert all("Ray node" in c["node"] and c["device"] and c["seconds"] > 0 for c in session["chunks"])
    local_session = json.loads((local / "run.json").read_text())["sessions"][-1]
    assert local_session["executor"] == "local" and len(local_session["chunks"]) == 1
    # the device as a worker saw it (one thread a chunk), not the driver's (2 here), and the
    # time estimated on a worker
    config = json.loads((remote / "config.json").read_text())
    assert config["device"] == session["device"] == session["chunks"][0]["device"]
    assert config["device"].endswith(", 1 threads") and local_session["device"].endswith(", 2 threads")
    assert "estimated time on a ray worker, one chunk after another" in r.stderr
    # the same command again, the cluster gone: a finished experiment needs none (as before)
    r = distrep(*SMALL, "--out", remote, "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert r.returncode == 0 and "already finished; regenerating the report" in r.stderr, r.stderr


# Four chunks of one run, each long enough (a few seconds on one thread) to be killed midway.
LONGER = ("sweep", "--models", "ReLU,Abs", "--runs", 2, "--epochs", 300, "--train-subset", 2000,
          "--max-runs-per-chunk", 1, "--quiet")


@pytest.fixture(scope="module")
def local_longer(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("local") / "D"
    r = distrep(*LONGER, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def _driver(out: Path, address: str, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "distrep.cli", *map(str, LONGER), "--out", str(out),
            "--executor", "ray", "--ray-address", address, *map(str, extra)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(condition, seconds: float, what: str, driver: subprocess.Popen | None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the driver ended before {what}: {driver.communicate()[1]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _training_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::_train_on_worker"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("checkpoints", [False, True], ids=["retried-from-the-start", "resumed-from-its-checkpoint"])
def test_a_worker_killed_mid_chunk_is_retried_and_the_results_are_identical(
        tmp_path, cluster, local_longer, checkpoints):
    out = tmp_path / "D"
    extra = ("--checkpoint-dir", tmp_path / "shared", "--checkpoint-every", 0) if checkpoints else ()
    driver = _driver(out, cluster, *extra)
    victim = _wait_for(_training_workers, 120, "a worker training a chunk", driver)[0]
    if checkpoints:      # let it write its own checkpoint first, so that the retry resumes from it
        _wait_for(lambda: list((tmp_path / "shared").glob("chunk-*.safetensors")), 60,
                  "a chunk checkpoint", driver)
    else:
        time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    _same_results(local_longer, out)
    if checkpoints:
        assert not list((tmp_path / "shared").glob("chunk-*")), "a merged chunk's checkpoint is removed"


def test_the_driver_killed_and_rerun_trains_no_finished_chunk_again(tmp_path, cluster, local_longer):
    out = tmp_path / "D"
    driver = _driver(out, cluster)

    def chunks_done():
        try:
            return json.loads((out / "run.json").read_text())["sessions"][-1].get("chunks")
        except (OSError, ValueError, KeyError, IndexError):
            return None
    first = _wait_for(chunks_done, 180, "a finished chunk", driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / "summary.csv").exists(), "killed before the end"
    rerun = _driver(out, cluster)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming from the checkpoint" in err
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["ended"].startswith("interrupted")
    before = {tuple(u) for c in sessions[0]["chunks"] for u in c["runs"]}
    again = {tuple(u) for c in sessions[1]["chunks"] for u in c["runs"]}
    assert len(before) >= len(first[0]["runs"]) and not before & again
    assert len(before | again) == 4
    _same_results(local_longer, out)


def test_ray_options_are_checked(tmp_path, mnist, cluster):
    assert_one_line_error(distrep(*SMALL, "--out", tmp_path / "a", "--ray-address", cluster),
                          "--ray-address only applies to --executor ray")
    r = distrep(*SMALL, "--out", tmp_path / "b", "--executor", "ray", "--ray-address", cluster,
                "--cpus-per-chunk", 3)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("distrep: error: a chunk asks for 3 CPU(s) but the "
                                                "Ray cluster has 2; lower --cpus-per-chunk or add nodes")
    for device in ("cpu", "cuda"):     # usable here (training joins, and says why not) or not
        r = distrep(*SMALL, "--out", tmp_path / "c", "--executor", "ray", "--ray-address",
                    "127.0.0.1:1", "--device", device)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "cannot join the Ray cluster at '127.0.0.1:1': nothing answers there" in r.stderr


def test_the_device_is_checked_on_a_worker_not_on_the_driver(tmp_path, mnist, cluster):
    """A head node without the workers' GPUs drives them: `--device cuda` is resolved and checked
    by a worker with a chunk's resources (here one whose GPU is only declared, so it refuses it,
    naming itself), not refused by the driver for the GPU it lacks; nothing is written."""
    for command in (("sweep", "--models", "ReLU", "--runs", 1, "--epochs", 2),
                    ("reproduce", "quick", "--dry-run", "--runs", 1)):
        r = distrep(*command, "--train-subset", 100, "--device", "cuda", "--executor", "ray",
                    "--ray-address", cluster, "--out", tmp_path / "never")
        assert r.returncode == 2 and "Traceback" not in r.stderr       # Ray logs its joining first
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("distrep: error: --device cuda on a Ray worker with a chunk's "
                               "resources (1 CPU, 1 GPU; ") and "(Ray node " in last, last
        assert last.endswith("device cuda requested but this PyTorch build sees no CUDA GPU"), last
        assert not (tmp_path / "never").exists()
    from distrep.errors import DistrepError
    from distrep.executors import RayExecutor
    from distrep.experiment import run_experiment
    from distrep.sweep import SweepConfig
    config = SweepConfig(models=["ReLU"], runs=1, epochs=2, train_subset=100, device="cuda")
    with pytest.raises(DistrepError, match="--device cuda on a Ray worker .* sees no CUDA GPU"):
        run_experiment(tmp_path / "never", config, executor=RayExecutor(cluster))   # the Python API too
    assert not (tmp_path / "never").exists()
    r = distrep("reproduce", "quick", "--dry-run", "--runs", 1, "--train-subset", 100, "--executor",
                "ray", "--ray-address", cluster, "--cpus-per-chunk", 2)
    assert r.returncode == 0, r.stderr
    assert ("on 100 mnist training images (raw pixels), lr 0.001, width 128, OffsetL2 form paper, "
            "fp32 on cpu" in r.stdout and "estimated time on a ray worker" in r.stdout)


def test_a_chunk_asks_for_a_gpu_for_cuda_and_for_auto_on_a_gpu_cluster():
    """`auto` means CUDA where there is one: on a cluster with GPUs a chunk asks for one (else
    Ray hides them from its task, which would then train on the CPU)."""
    from distrep.executors import RayExecutor

    class Cluster:
        def __init__(self, **resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources
    gpu, cpu = Cluster(CPU=8, GPU=2), Cluster(CPU=8)
    for device, on_gpus, on_cpus in (("cuda", 1, None), ("cuda:0", 1, None), ("auto", 1, 0), ("cpu", 0, 0)):
        assert RayExecutor()._resources(gpu, device) == {"num_cpus": 1, "num_gpus": on_gpus}
        if on_cpus is not None:
            assert RayExecutor()._resources(cpu, device) == {"num_cpus": 1, "num_gpus": on_cpus}
    assert RayExecutor(gpus_per_chunk=0.5, cpus_per_chunk=4)._resources(gpu, "auto") == {
        "num_cpus": 4, "num_gpus": 0.5}


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    from distrep.errors import DistrepError
    from distrep.executors import make_executor
    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    with pytest.raises(DistrepError, match=r"pip install 'distrep\[ray\]'"):
        make_executor("ray")
    assert make_executor("local").name == "local"          # the default never needs Ray


def test_a_ray_address_is_checked_before_ray_waits_on_it():
    """Ray itself retries an address where nothing answers for minutes: distrep refuses one
    that is not host:port, or where nothing listens, in one line at once; and the local
    executor refuses Ray's options by name."""
    from distrep.errors import DistrepError
    from distrep.executors import _check_reachable, make_executor
    for address in ("localhost", "head-node:port"):
        with pytest.raises(DistrepError, match=f"--ray-address '{address}' is not host:port"):
            _check_reachable(address)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        _check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")        # something answers
        _check_reachable(f":{listening.getsockname()[1]}")                  # no host: this one
    with pytest.raises(DistrepError, match="--checkpoint-dir, --gpus-per-chunk only applies to --executor ray"):
        make_executor("local", checkpoint_dir=Path("shared"), gpus_per_chunk=1)
    with pytest.raises(DistrepError, match="--gpus-per-chunk only applies"):
        make_executor("local", gpus_per_chunk=0)                     # given, though 0
    with pytest.raises(DistrepError, match="unknown executor 'slurm'; choose one of: local, ray"):
        make_executor("slurm")
