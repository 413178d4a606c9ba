"""The command line as a user meets it: exit status, stdout and stderr.

Most tests call the entry point the console script calls (``distrep.cli.main``) in this
process, which spares each of them a new interpreter importing torch (~3 s); the tests that
need a real process (signals, a closed stream, the interpreter's encoding) start one.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
import traceback
from unittest import mock

import pytest
import torch

from distrep import bench, fused
from distrep.cli import main
from distrep.models import ALIASES, TABLE1, TABLE3
from distrep.storage import read_arrays, read_json


def distrep(*args, env=None) -> subprocess.CompletedProcess:
    """``distrep ARGS`` run in this process, as ``(returncode, stdout, stderr)``. An exception
    that escapes ``main`` is what a user would see as a traceback: it is printed to the
    captured stderr with exit status 1, so the tests' "no traceback" checks still bite."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env or {}), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:          # argparse's usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:            # noqa: BLE001 - a crash is a result here
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["distrep", *argv], code, out.getvalue(), err.getvalue())


def distrep_process(*args, env=None) -> subprocess.CompletedProcess:
    """``distrep ARGS`` in a new interpreter, for what only a real process shows."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "distrep.cli", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_models_lists_every_alias():
    r = distrep("models")
    assert r.returncode == 0
    for name, spec in ALIASES.items():
        assert name in r.stdout and spec in r.stdout


def test_unknown_model_lists_the_valid_ones(tmp_path):
    r = distrep("train", "--model", "ReLU3", "--out", tmp_path / "x", "--epochs", 1)
    assert_one_line_error(r, "unknown model 'ReLU3'", "ReLU2-Neg", "Abs-L2-Neg")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--epochs", "0", "--epochs: must be a positive integer, got 0"),
    ("--epochs", "-5", "--epochs: must be a positive integer, got -5"),
    ("--epochs", "ten", "--epochs: expected a positive integer"),
    ("--lr", "0", "--lr: must be a positive finite number"),
    ("--lr", "-0.01", "--lr: must be a positive finite number"),
    ("--lr", "nan", "--lr: must be a positive finite number"),
    ("--lr", "inf", "--lr: must be a positive finite number"),
    ("--train-subset", "0", "--train-subset: must be a positive integer"),
    ("--seed", "-1", "--seed: must be a non-negative integer, got -1"),
    ("--seed", "0.5", "--seed: expected a non-negative integer, got '0.5'"),
    ("--out", " ", "--out: must name a directory, got an empty string"),
])
def test_bad_numbers_are_refused(tmp_path, flag, value, fragment):
    r = distrep("train", "--model", "ReLU", "--out", tmp_path / "x", flag, value)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "x").exists()


def test_memory_sizes_are_read_in_binary_units():
    import argparse

    from distrep.cli import memory_size
    for text, size in (("8G", 8 << 30), ("8GiB", 8 << 30), ("8gb", 8 << 30), ("512M", 512 << 20),
                       ("1.5g", 3 << 29), ("2T", 2 << 40), ("1024k", 1 << 20), ("1048576", 1 << 20)):
        assert memory_size(text) == size, text
    for text in ("1048575", "1023K", "G", "8 X", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(text)


def test_progress_off_a_terminal_prints_a_line_per_step_crossed_and_the_last():
    from distrep.progress import LineProgress

    def lines(total, step, updates, postfix=None):
        out = io.StringIO()
        bar = LineProgress(total, "training", "run-epochs", step=step, file=out)
        for n in updates:
            bar.update(n)
            if postfix:
                bar.set_postfix(**postfix)
        return out.getvalue().splitlines()

    # 22.5 % (a step), 85 % (past three at once: one line), 90 % (no step), 100 %
    said = lines(40, 20.0, (9, 25, 2, 4), postfix={"loss": 0.5})
    assert [line.split(" (")[0] for line in said] == ["training:  22%", "training:  85%", "training: 100%"]
    assert said[-1].startswith("training: 100% (40 of 40 run-epochs") and said[-1].endswith(", loss=0.5)")
    # the last line even where 100 % is no step (steps of 40 %: 85 % crossed 40 and 80)
    assert [line.split(" (")[0] for line in lines(20, 40.0, (17, 3))] == ["training:  85%", "training: 100%"]
    assert lines(0, 5.0, (0,))[0].startswith("training: 100% (0 of 0 run-epochs")   # no work: done


def test_model_lists_ignore_blanks_and_a_trailing_comma():
    import argparse

    from distrep.cli import comma_list
    assert comma_list(" ReLU, Abs2-Neg ,") == ["ReLU", "Abs2-Neg"]
    with pytest.raises(argparse.ArgumentTypeError, match="expected a comma-separated list"):
        comma_list(" , ")


def test_durations_read_in_the_unit_that_suits_them():
    from distrep.reproduce import format_duration
    assert [format_duration(s) for s in (5, 119.4, 120, 7199, 7200, 45000)] == \
        ["5 s", "119 s", "2 min", "120 min", "2.0 h", "12.5 h"]


def test_unknown_dataset(tmp_path):
    r = distrep("train", "--model", "ReLU", "--out", tmp_path / "x", "--dataset", "cifar10")
    assert_one_line_error(r, "unknown dataset 'cifar10'", "mnist")
    assert_one_line_error(distrep("data", "fetch", "imagenet"), "unknown dataset 'imagenet'")


def test_missing_data_with_no_source(tmp_path):
    env = {"DISTREP_DATA": str(tmp_path / "empty-cache"), "DISTREP_OFFLINE": "1"}
    r = distrep("train", "--model", "ReLU", "--out", tmp_path / "x", "--epochs", 1, env=env)
    assert_one_line_error(r, "dataset mnist is not in the cache", "DISTREP_OFFLINE",
                          "distrep data fetch mnist --from DIR")
    assert not (tmp_path / "x").exists()
    r = distrep("data", "fetch", "mnist", "--from", tmp_path / "nothing-here", env=env)
    assert_one_line_error(r, "cannot read mnist: --from", "nothing-here is not a directory")


def test_fetch_from_directory_and_verify(tmp_path, mnist):
    from distrep.data import cache_dir, MNIST
    # the real files, laid out as torchvision keeps them, fetched into a fresh cache
    src = tmp_path / "tv" / "MNIST" / "raw"
    src.mkdir(parents=True)
    for f in MNIST.files:
        (src / f.name).symlink_to(cache_dir(MNIST) / f.name)
    env = {"DISTREP_DATA": str(tmp_path / "cache"), "DISTREP_OFFLINE": "1"}
    r = distrep("data", "fetch", "mnist", "--from", tmp_path / "tv", env=env)
    assert r.returncode == 0, r.stderr
    assert distrep("data", "verify", "mnist", env=env).returncode == 0
    assert distrep("data", "path", env=env).stdout.strip() == str(tmp_path / "cache")


def test_train_writes_a_run_and_refuses_to_mix(tmp_path, mnist):
    out = tmp_path / "run"
    args = ["train", "--model", "ReLU2-Neg", "--epochs", 3, "--seed", 4, "--out", out,
            "--train-subset", 200, "--eval-every", 2, "--quiet"]
    r = distrep(*args)
    assert r.returncode == 0, r.stderr
    assert "ReLU2-Neg: test accuracy" in r.stdout
    assert read_json(out / "config.json")["config"]["seed"] == 4
    assert read_arrays(out / "metrics.npz")["test_epochs"].tolist() == [2, 3]
    again = distrep(*args)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    other = distrep(*[a if a != 4 else 5 for a in args])
    assert_one_line_error(other, "holds a finished run with a different config (seed: 4 there, 5 here)", "--force")
    # the device changes no more than rounding: the same run, as for a sweep
    assert "nothing to do" in distrep(*args, "--device", "auto").stdout
    assert read_json(out / "config.json")["config"]["seed"] == 4, "earlier result must survive"
    forced = distrep(*[a if a != 4 else 5 for a in args], "--force")
    assert forced.returncode == 0 and read_json(out / "config.json")["config"]["seed"] == 5


def test_progress_bar_is_shown_unless_quiet(tmp_path, mnist):
    r = distrep("train", "--model", "Abs", "--epochs", 2, "--out", tmp_path / "a",
                "--train-subset", 100)
    assert r.returncode == 0 and "Abs: 100% (2 of 2 epochs" in r.stderr   # plain lines off a terminal
    quiet = distrep("train", "--model", "Abs", "--epochs", 2, "--out", tmp_path / "b",
                    "--train-subset", 100, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def assert_same_experiment(resumed, straight, models) -> None:
    """Two experiment directories hold the same results bit for bit: summary.csv, and each
    model's metric arrays and parameters."""
    import numpy as np
    from safetensors.torch import load_file
    assert (resumed / "summary.csv").read_text() == (straight / "summary.csv").read_text()
    for model in models:
        a = read_arrays(resumed / "models" / model / "metrics.npz")
        b = read_arrays(straight / "models" / model / "metrics.npz")
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])
        pa = load_file(resumed / "models" / model / "params.safetensors")
        pb = load_file(straight / "models" / model / "params.safetensors")
        assert all(pa[k].equal(pb[k]) for k in pb)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_sweep_killed_by_a_signal_resumes_bit_identically(tmp_path, mnist, device):
    import signal
    import time

    from safetensors.torch import load_file

    epochs = 300 if device == "cpu" else 1500      # a GPU is faster: give the kill time to land
    args = ["sweep", "--models", "ReLU2-Neg,Abs-L2", "--runs", 2, "--epochs", epochs, "--device", device,
            "--train-subset", 200, "--eval-every", 25, "--quiet"]
    killed = tmp_path / "killed"
    # only the killed job checkpoints every epoch (the interval never changes a result)
    proc = subprocess.Popen([sys.executable, "-m", "distrep.cli", *map(str, args), "--checkpoint-every", "0",
                             "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launched = time.time()
    checkpoint, done, deadline = killed / "checkpoint.safetensors", 0, launched + 300
    while done < 100 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if checkpoint.exists():
            done = int(load_file(checkpoint)["epochs_done"].sum())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < done < 2 * 2 * epochs, f"the job should be killed part-way (done {done})"
    started = time.time()
    resumed = distrep(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint" in resumed.stderr
    timings = f"killed after {started - launched:.0f} s, resumed in {time.time() - started:.0f} s"
    started = time.time()
    straight = distrep(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    print(f"\nSIGKILL and resume on {device}: {timings}, straight in {time.time() - started:.0f} s")
    assert_same_experiment(killed, tmp_path / "straight", ("ReLU2-Neg", "Abs-L2"))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_at_the_end_of_the_epoch_and_the_sweep_resumes_bit_identically(
        tmp_path, mnist, signame):
    """SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C) while a sweep trains: it writes its
    checkpoint at the end of the epoch (none would exist otherwise: --checkpoint-every is an
    hour), says so in one line, exits 128 + the signal, and the same command resumes to the
    bits of an uninterrupted sweep."""
    import signal

    from safetensors.torch import load_file

    args = ["sweep", "--models", "ReLU2-Neg,Abs-L2", "--runs", 2, "--epochs", 400, "--train-subset", 200,
            "--eval-every", 25, "--checkpoint-every", 3600]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "distrep.cli", *map(str, args), "--out", str(stopped)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (line := proc.stderr.readline()).startswith("training:") and line:
        pass                                  # its first progress line: 5 % trained
    assert line, "the sweep should report its progress"
    proc.send_signal(getattr(signal, signame))
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + getattr(signal, signame), stderr
    last = stderr.strip().splitlines()[-1]
    assert f"distrep: stopped by {signame} at epoch" in last, stderr
    assert "rerun the same command to resume" in last and "Traceback" not in stderr
    done = load_file(stopped / "checkpoint.safetensors")["epochs_done"]
    assert 0 < int(done.min()) == int(done.max()) < 400, done
    assert not (stopped / "summary.csv").exists()
    resumed = distrep(*args, "--out", stopped)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint" in resumed.stderr
    straight = distrep(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert_same_experiment(stopped, tmp_path / "straight", ("ReLU2-Neg", "Abs-L2"))
    sessions = read_json(stopped / "run.json")["sessions"]
    assert sessions[0]["ended"].startswith("interrupted") and sessions[1]["ended"] == "finished"


def test_deferred_stop_holds_the_first_signal_and_not_the_second():
    import signal

    from distrep.stopping import Stopped, deferred_stop
    before = signal.getsignal(signal.SIGTERM)
    with deferred_stop() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM        # held, not acted on
        with pytest.raises(Stopped, match="stopped by SIGTERM at epoch 3"):
            stop.stop("at epoch 3")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)     # a second signal stops at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_stop_off_the_main_thread_leaves_the_signals_alone():
    """Only the main thread may set signal handlers (a sweep in a Ray worker's or a user's
    thread): there the request is never set and nothing is installed."""
    import signal
    import threading

    from distrep.stopping import deferred_stop
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def sweep_in_a_thread():
        try:
            with deferred_stop() as stop:
                seen.append((bool(stop), signal.getsignal(signal.SIGTERM) is before))
        except Exception as e:                    # signal.signal's ValueError off the main thread
            seen.append(e)
    worker = threading.Thread(target=sweep_in_a_thread)
    worker.start()
    worker.join()
    assert seen == [(False, True)]


def test_deferred_stop_leaves_a_handler_installed_outside_python_alone(monkeypatch):
    """A handler Python did not install reads as None and cannot be put back: leave it be."""
    from distrep import stopping
    installed = []
    monkeypatch.setattr(stopping.signal, "getsignal", lambda s: None)
    monkeypatch.setattr(stopping.signal, "signal", lambda s, h: installed.append(s))
    with stopping.deferred_stop() as stop:
        assert not stop
    assert installed == []


def test_sweep_refuses_to_mix_configs(tmp_path, mnist):
    args = ["sweep", "--models", "ReLU", "--runs", 1, "--epochs", 2, "--train-subset", 50,
            "--quiet", "--out", tmp_path / "x"]
    assert distrep(*args).returncode == 0
    other = distrep(*[a if a != 2 else 3 for a in args])
    assert_one_line_error(other, "holds an experiment with a different config", "--force")
    assert distrep(*[a if a != 2 else 3 for a in args], "--force").returncode == 0
    assert_one_line_error(distrep("sweep", "--models", "ReLU,Nope", "--out", tmp_path / "y"),
                          "unknown model 'Nope'")
    assert_one_line_error(distrep("sweep", "--models", "ReLU", "--max-memory", "lots",
                                  "--out", tmp_path / "y"), "expected a size like 8G")
    assert_one_line_error(distrep("sweep", "--models", "ReLU", "--precision", "3xtf32", "--out", tmp_path / "y"),
                          "3xtf32 is a precision of the fused step")
    assert not (tmp_path / "y").exists()


def test_bench_prints_every_figure(mnist, monkeypatch):
    monkeypatch.setitem(bench.PEAK_SIZE, "cpu", 1024)    # ten peak measurements: keep them short
    r = distrep("bench", "--device", "cpu", "--runs", 1, "--epochs", 1, "--train-subset", 300)
    assert r.returncode == 0, r.stderr
    for fragment in ("GEMM peak", "author-style loop, Table 1 (ReLU2", "author-style loop, Table 3 (ReLU-L2",
                     "Table 1 variants x 1 runs, fp32", "Table 3 variants", "bf16",
                     "x the author-style loop of Table 1 around it", "x the author-style loop of Table 3",
                     "of the fp32 GEMM peak measured around it", "peak memory"):
        assert fragment in r.stdout, fragment
    # the step reads only the pixels that vary over the 300 training images: both fractions
    constant = int((mnist.x_train[:300].amax(0) == 0).sum())
    from distrep.engine import reads_varying_features
    assert [p for p in ("hand-written", "autograd", "compiled", "fused") if reads_varying_features(p)] \
        == ["hand-written", "fused"]
    # 3xtf32 (CUDA, the fused step only) computes fp32's products: its fraction is of fp32's peak
    from distrep.engine import computes
    assert computes("fused", "3xtf32") and not computes("hand-written", "3xtf32")
    case = bench.summarize([{"s": 0.5, "gflops": 80.0, "peak_gflops": 50.0, "author_s": 1.0}])
    line = bench.describe_case(dict(case, replay="", setup_s=1.0), "Table 1", "3xtf32", "fused", 20, 1, 1)
    assert "= 160% of the fp32 GEMM peak measured around it (50)" in line and "output layer's" not in line
    # fp32 with its output layer's products in three TF32 passes (fused.HEAD_PRODUCTS) says so
    fp32 = bench.describe_case(dict(case, replay="", setup_s=1.0), "Table 1", "fp32", "fused", 20, 1, 1)
    monkeypatch.setitem(fused.HEAD_PRODUCTS, "fp32", "3xtf32")
    three = bench.describe_case(dict(case, replay="", setup_s=1.0), "Table 1", "fp32", "fused", 20, 1, 1)
    assert three == fp32.replace("engine (fused)", "engine (fused, a linear output layer's products 3xtf32)")
    assert_one_line_error(distrep("bench", "--device", "cpu", "--precisions", "fp32,3xtf32"),
                          "--precisions: 3xtf32 cannot be timed here")
    for precision in ("fp32", "bf16"):
        line = next(l for l in r.stdout.splitlines() if f"Table 1 variants x 1 runs, {precision}" in l)
        assert ("counting the model's arithmetic, " in line
                and f"counting what the step does (its first-layer products skip the {constant} "
                    "input features constant over the training images)" in line), line


def test_bench_repeats_each_case_and_reports_its_median_reading(mnist, monkeypatch):
    """`bench --repeats K` times each engine case K times, each between its own peak and loop
    measurements; the reading whose fraction of the peak is the median stands for the case
    (its time, peak and loop together, not a mix of readings), with every reading's range."""
    from distrep.bench import summarize
    readings = [{"s": 2.0, "gflops": 80.0, "peak_gflops": 100.0, "author_s": 3.0},   # 80 %, 1.5x
                {"s": 1.0, "gflops": 90.0, "peak_gflops": 200.0, "author_s": 4.0},   # 45 %, 4x
                {"s": 4.0, "gflops": 60.0, "peak_gflops": 100.0, "author_s": 2.0}]   # 60 %, 0.5x
    case = summarize(readings)
    assert (case["s"], case["peak_gflops"], case["author_s"]) == (4.0, 100.0, 2.0)
    assert case["fraction"] == 0.6 and case["speedup"] == 0.5
    assert case["fraction_range"] == (0.45, 0.8) and case["speedup_range"] == (0.5, 4.0)
    assert [r["fraction"] for r in case["repeats"]] == [0.8, 0.45, 0.6]
    assert summarize(readings[:2])["fraction"] == 0.45            # an even count: the lower middle
    assert "repeats" not in summarize(readings[:1])

    monkeypatch.setitem(bench.PEAK_SIZE, "cpu", 512)
    calls = []
    timed_engine = bench.engine
    monkeypatch.setattr(bench, "engine", lambda *a, **k: calls.append(a[0]) or timed_engine(*a, **k))
    r = distrep("bench", "--device", "cpu", "--runs", 1, "--epochs", 1, "--train-subset", 200,
                "--precisions", "fp32", "--repeats", 2)
    assert r.returncode == 0, r.stderr
    assert len(calls) == 4                                         # two tables, twice each
    assert r.stdout.count("the median of 2 repeats, each against its own peak and loop") == 2
    assert_one_line_error(distrep("bench", "--device", "cpu", "--repeats", 0), "--repeats")


def test_bench_times_a_process_per_core_side_by_side(mnist, monkeypatch):
    """`bench --processes K` (CPU) also times every case as K processes of one thread, each with
    its share of every variant's runs, whose timed steps start together after their warm-ups;
    the slowest bounds the time. A process that fails is a one-line error, not a hang."""
    from distrep.bench import engine_per_core, per_core_seconds, split_runs
    from distrep.errors import DistrepError
    assert split_runs(20, 3) == [7, 7, 6] and split_runs(5, 2) == [3, 2] and split_runs(1, 2) == [1]
    assert per_core_seconds([(3, 0.3), (2, 0.2)], 5) == pytest.approx(0.18)   # 0.9 s for 5 runs

    reading = engine_per_core(["ReLU", "Abs2"], 3, 200, "fp32", 1, 2 * 2**30, 2)
    assert [(p["runs"], p["threads"]) for p in reading["processes"]] == [(2, 1), (1, 1)]
    assert len({p["pid"] for p in reading["processes"]} | {os.getpid()}) == 3
    assert reading["s"] == per_core_seconds([(p["runs"], p["s"]) for p in reading["processes"]], 3)
    assert 0 <= reading["start_spread_s"] < 1.0        # the barrier: timed steps side by side
    with pytest.raises(DistrepError, match="a bench process failed: .*NoSuchModel"):
        engine_per_core(["NoSuchModel"], 2, 200, "fp32", 1, 2**30, 2)

    monkeypatch.setitem(bench.PEAK_SIZE, "cpu", 512)
    r = distrep("bench", "--device", "cpu", "--runs", 3, "--epochs", 1, "--train-subset", 200,
                "--precisions", "fp32", "--processes", 2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("2 processes of one thread side by side, 2/1 runs of each variant") == 2
    assert "the processes of one thread side by side at most" in r.stdout


def test_bench_projects_the_paper_as_produced():
    """Table 1 at the stated 5,000 and the producing 50,000 epochs, and the whole paper with
    every run once: 120 x 50,000 + 120 x 5,000 Table-1-like run-epochs, 80 x 50,000 OffsetL2."""
    from distrep.bench import projections
    lines = projections({"Table 1 fp32": {"s": 0.001}, "Table 3 fp32": {"s": 0.002}})
    assert "projected Table 1 (stated) (120 runs x 5000 epochs, fp32 hand-written): 10.0 min" in lines
    assert "projected Table 1 (as produced) (120 runs x 50000 epochs, fp32 hand-written): 1.7 h" in lines
    whole = (120 * 50000 + 120 * 5000) * 0.001 + 80 * 50000 * 0.002
    assert lines[-1] == (f"projected: the whole paper as produced (Tables 1-3, every run once: 10.6 "
                         f"million run-epochs, fp32, Table 1 hand-written, Table 3 hand-written): "
                         f"{whole / 3600:.1f} h")
    # with the compiled step measured too, the whole paper takes the faster step per table
    lines = projections({"Table 1 bf16": {"s": 0.001}, "Table 3 bf16": {"s": 0.002},
                         "Table 1 bf16 compiled": {"s": 0.0005}, "Table 3 bf16 compiled": {"s": 0.004}})
    assert "projected Table 1 (stated) (120 runs x 5000 epochs, bf16 compiled): 5.0 min" in lines
    whole = (120 * 50000 + 120 * 5000) * 0.0005 + 80 * 50000 * 0.002
    assert lines[-1] == (f"projected: the whole paper as produced (Tables 1-3, every run once: 10.6 "
                         f"million run-epochs, bf16, Table 1 compiled, Table 3 hand-written): "
                         f"{whole / 3600:.1f} h")
    # 3xtf32 (CUDA, fused) is projected as a precision of its own, after the others
    lines = projections({"Table 1 fp32 fused": {"s": 0.002}, "Table 3 fp32 fused": {"s": 0.002},
                         "Table 1 3xtf32 fused": {"s": 0.001}, "Table 3 3xtf32 fused": {"s": 0.001}})
    assert "projected Table 1 (stated) (120 runs x 5000 epochs, 3xtf32 fused): 10.0 min" in lines
    assert lines[-1] == ("projected: the whole paper as produced (Tables 1-3, every run once: 10.6 "
                         "million run-epochs, 3xtf32, Table 1 fused, Table 3 fused): 2.9 h")
    # and a process per core (bench --processes) is one more engine case to project from
    lines = projections({"Table 1 fp32": {"s": 0.001}, "Table 3 fp32": {"s": 0.002},
                         "Table 1 fp32 per-core": {"s": 0.0005}, "Table 3 fp32 per-core": {"s": 0.003}})
    assert ("projected Table 1 (stated) (120 runs x 5000 epochs, fp32 hand-written, a process per "
            "core): 5.0 min") in lines
    assert lines[-1].startswith("projected: the whole paper as produced (Tables 1-3, every run once: "
                                "10.6 million run-epochs, fp32, Table 1 hand-written, a process per "
                                "core, Table 3 hand-written):")


def test_two_accuracy_records_are_compared_run_by_run(tmp_path):
    """`bench --compare-accuracy A B[:P]`: the runs of two accuracy.json files paired by seed,
    OTHER - REFERENCE with the --accuracy verdicts (a diverged run left out of its pair, the
    chaotic models by their distributions); files that cannot pair are one-line errors."""
    import json
    nan = float("nan")
    reference = {"fp32": {"ReLU": [91.0, 92.0, 93.0, 94.0], "Abs2": [93.0, 95.7, 94.0, 94.1],
                          "ReLU2": [30.0, 20.0, 40.0, 35.0]},
                 "3xtf32": {"ReLU": [91.0, 92.0, 93.0, 94.0]}}
    other = {"fp32": {"ReLU": [91.01, 92.0, 92.99, 94.02], "Abs2": [93.0, 94.5, 94.02, nan],
                      "ReLU2": [20.0, 30.0, 35.0, 40.0], "Abs-L2": [88.0] * 4}}
    for name, runs in (("a", reference), ("b", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "accuracy.json").write_text(json.dumps({"runs": runs}))
    a, b = tmp_path / "a" / "accuracy.json", tmp_path / "b" / "accuracy.json"
    r = distrep("bench", "--compare-accuracy", a, f"{b}:fp32")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert set(lines) == {"ReLU", "Abs2", "ReLU2"}          # the models both files have
    assert f"fp32 of {b} - fp32 of {a}: +0.005 points" in lines["ReLU"]
    assert "equivalent within ±0.1" in lines["ReLU"]
    # Abs2's last run diverged in b: three pairs, one of them 1.2 points apart
    assert "-0.393 points" in lines["Abs2"] and "over 3 paired runs" in lines["Abs2"]
    assert "largest |difference| 1.20: inconclusive" in lines["Abs2"]
    assert "chaotic: runs do not pair; distributions show no difference (Welch p = 1.00)" in lines["ReLU2"]
    r = distrep("bench", "--compare-accuracy", f"{a}:3xtf32", b)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "+0.005 points" in r.stdout
    assert_one_line_error(distrep("bench", "--compare-accuracy", a, f"{b}:bf16"),
                          "no runs in bf16 (it has fp32)")
    assert_one_line_error(distrep("bench", "--compare-accuracy", a, tmp_path / "missing.json"),
                          "missing.json: not an accuracy.json")
    other["fp32"]["ReLU"] = [91.0, 92.0]
    b.write_text(json.dumps({"runs": other}))
    assert_one_line_error(distrep("bench", "--compare-accuracy", a, b),
                          "ReLU: 4 runs against 2; paired runs need the same seeds")
    b.write_text(json.dumps({"runs": {"fp32": {"Abs-L2": [88.0] * 4}}}))
    assert_one_line_error(distrep("bench", "--compare-accuracy", a, b), "share no model")


def test_reduced_precision_is_judged_run_by_run_against_fp32(tmp_path, mnist):
    """`bench --accuracy`: every Table 1 and Table 3 model in fp32 and bf16 from the same seeds,
    a paired interval and a verdict per model, every run's accuracy on file."""
    import json
    from distrep.bench import equivalence, interval
    assert interval([-0.01, 0.02]) == "[-0.010, +0.020]"
    assert interval([float("nan")] * 2) == "(no interval)"        # one pair, or runs that do not pair
    assert equivalence([0.01, -0.02, 0.0, 0.03])[1] == "equivalent within ±0.1"
    assert equivalence([0.5, 0.6, 0.55, 0.62])[1] == "different (beyond ±0.1)"
    assert equivalence([0.3, -0.3, 0.1, -0.05])[1].startswith("inconclusive")
    # [+0.04, +0.17]: shown different from 0, but neither within nor beyond the margin
    assert equivalence([0.05, 0.1, 0.15, 0.12])[1].startswith("inconclusive")
    r = distrep("bench", "--device", "cpu", "--no-speed",
                "--accuracy", "--accuracy-runs", 2, "--accuracy-epochs", 3, "--accuracy-subset", 200,
                "--accuracy-out", tmp_path / "acc")
    assert r.returncode == 0, r.stderr
    assert "GEMM peak" not in r.stdout                   # --no-speed: the comparison alone
    saved = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    assert set(saved["runs"]) == {"fp32", "bf16"}
    assert set(saved["runs"]["bf16"]) == set(TABLE1 + TABLE3)
    assert all(len(v) == 2 for v in saved["runs"]["fp32"].values())
    table = (tmp_path / "acc" / "accuracy.md").read_text()
    for model in TABLE1 + TABLE3:
        assert f"| bf16 | {model} |" in table
    assert "chaotic: runs do not pair" in table


def test_trained_models_read_back_give_the_recorded_accuracies(tmp_path, mnist):
    """experiment.trained_models rebuilds each run as a create_model net with its final
    parameters: evaluated on the test set preprocessed as the runs were, every run gives the
    test accuracy the experiment recorded for it (a wrong run order, width, form or input
    scaling would not)."""
    from distrep.data import load_dataset
    from distrep.errors import DistrepError
    from distrep.experiment import trained_models
    exp, run = tmp_path / "exp", tmp_path / "run"
    r = distrep("sweep", "--models", "ReLU,ReLU-L2-Neg", "--runs", 2, "--epochs", 4, "--width", 24,
                "--train-subset", 300, "--preprocess", "standardized", "--offsetl2-form", "coded",
                "--base-seed", 3, "--quiet", "--out", exp)
    assert r.returncode == 0, r.stderr
    r = distrep("train", "--model", "Abs2", "--epochs", 3, "--seed", 2, "--width", 20,
                "--train-subset", 200, "--quiet", "--out", run)
    assert r.returncode == 0, r.stderr
    data = load_dataset("mnist", "standardized")

    def accuracy(net, x, y):
        with torch.no_grad():
            return (net(x).argmax(1) == y).double().mean().item()
    for name, folder in [("ReLU", "ReLU"), ("relu-l2-neg", "ReLU-L2-Neg")]:
        nets = trained_models(exp, name)
        recorded = read_arrays(exp / "models" / folder / "metrics.npz")["final_test_acc"]
        assert len(nets) == 2 and nets[0][0].out_features == 24
        got = [accuracy(net, data.x_test, data.y_test) for net in nets]
        assert got == pytest.approx(recorded.tolist(), abs=1e-4)
    assert trained_models(exp, "ReLU-L2-Neg")[0][2].form == "coded"
    single = trained_models(run)
    assert len(single) == 1 and single[0].spec == "linear-abs-linear-abs"
    raw = load_dataset("mnist", "raw")
    assert accuracy(single[0], raw.x_test, raw.y_test) == pytest.approx(
        read_json(run / "result.json")["test_acc"], abs=1e-4)
    refusals = {"holds 2 models (ReLU, ReLU-L2-Neg); say which": (exp,),
                "holds no model 'Abs'; it holds ReLU, ReLU-L2-Neg": (exp, "Abs"),
                "holds no model 'ReLU'; it holds Abs2": (run, "ReLU"),
                "holds no finished experiment (no such directory)": (tmp_path / "none",)}
    for message, args in refusals.items():
        with pytest.raises(DistrepError, match=re.escape(message)):
            trained_models(*args)
