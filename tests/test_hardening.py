"""Each defect found in review and by an adversarial probe of the command line, as a test that
failed before its fix. Numbers refer to the items of the hardening issue; items 1 and 2 (engine
gradients of activation chains, divergence in OffsetL2) are in test_engine.py."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distrep import data as data_mod
from distrep.errors import DistrepError
from distrep.experiment import (EXPERIMENT_ENTRIES, LOCK_FILE, RUN_ENTRIES, entries, experiment_lock,
                                 is_own, remove_own)
from distrep.report import comparison_table, summary_rows
from distrep.storage import atomic_write_bytes, read_arrays, read_json, write_json
from tests.conftest import make_synthetic
from tests.test_cli import assert_one_line_error, distrep, distrep_process

SMALL = ["--runs", 2, "--epochs", 3, "--train-subset", 100, "--eval-every", 1, "--quiet"]


@pytest.fixture
def finished(tmp_path, mnist):
    """A finished two-model sweep directory."""
    out = tmp_path / "exp"
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def assert_error_line(result, *fragments):
    """Exit status 2, no traceback, and the error in one line at the end (after any progress
    lines the command printed before it met the problem)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distrep: error: ") and all(f in last for f in fragments), last


def unfinish(out: Path) -> None:
    """Make a finished directory look like one whose training was killed."""
    run = read_json(out / "run.json")
    write_json(out / "run.json", {"finished": False, "sessions": run["sessions"]})


# --------------------------------------------------------------------------- statistics (3, 4)

def _experiment(paired: bool, diverged_epoch):
    acc = np.array([0.90, 0.92, 0.11])
    metrics = {"A": {"final_test_acc": acc, "diverged_epoch": np.array(diverged_epoch)},
               "B": {"final_test_acc": acc - 0.01, "diverged_epoch": np.zeros(3, int)}}
    design = "paired: ..." if paired else "unpaired: every model has its own seeds"
    cfg = {"paired": paired, "epochs": 10, "dataset": "mnist", "preprocess": "raw", "lr": 1e-3,
           "width": 128, "train_subset": None, "offsetl2_form": "paper"}
    return {"models": ["A", "B"], "metrics": metrics, "config": {"design": design, "config": cfg},
            "specs": {"A": "linear-relu-linear", "B": "linear-abs-linear"}}


def test_3_diverged_runs_stay_out_of_the_statistics():
    rows = summary_rows(_experiment(True, [0, 0, 7]))
    a = rows[0]
    assert a["n"] == 2 and a["diverged"] == 1 and a["runs"] == 3
    assert a["mean"] == pytest.approx(91.0) and a["min"] == pytest.approx(90.0)
    assert a["all_mean"] == pytest.approx(100 * (0.90 + 0.92 + 0.11) / 3), "all runs, labelled apart"
    head, body = comparison_table(_experiment(True, [0, 0, 7]))
    row = dict(zip(head, body[0]))
    assert row["Student t (df)"].endswith("(3)"), "2 + 3 runs: df 3"
    assert row["paired t (df)"].endswith("(1)"), "the diverged run's pair drops out: 2 pairs"
    assert row["P(A > B)"] == "1.00", "A's two finished runs each beat their twin"
    head, body = comparison_table(_experiment(False, [0, 0, 7]))
    assert dict(zip(head, body[0]))["P(A > B)"] == "0.83", "90 and 92 against 89, 91 and 10: 5 of 6"


def test_4_unpaired_experiments_get_no_paired_test():
    head, _ = comparison_table(_experiment(False, [0, 0, 0]))
    assert "paired t (df)" not in head and "d_z" not in head
    head, _ = comparison_table(_experiment(True, [0, 0, 0]))
    assert "paired t (df)" in head


def test_18_every_run_diverged_still_reports(tmp_path, mnist):
    out = tmp_path / "boom"
    r = distrep("sweep", "--models", "ReLU", *SMALL, "--lr", "1e30", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "0 of 2 runs finished, 2 diverged" in r.stdout
    r = distrep("report", out)
    assert r.returncode == 0, r.stderr
    table = (out / "report.md").read_text().split("## Test accuracy (%)")[1].split("##")[0]
    assert "| ReLU | — |" in table


# --------------------------------------------------------------------------- directories (5-7, 11-14)

def test_5_14_a_second_process_is_refused_while_the_first_holds_the_directory(tmp_path, mnist):
    out = tmp_path / "busy"
    with experiment_lock(out):
        # another process: the lock is this process's, and nested uses in one process are allowed
        r = distrep_process("sweep", "--models", "ReLU", *SMALL, "--out", out)
        assert_one_line_error(r, "in use by another distrep process", f"pid {os.getpid()}")
        r = distrep_process("sweep", "--models", "Abs", *SMALL, "--out", out)   # another config: the same
        assert_one_line_error(r, "in use by another distrep process")
    assert not (out / "config.json").exists(), "the refused runs wrote nothing"
    # a stale lock file (its holder was killed: the OS released the lock) does not block
    (out / ".distrep.lock").write_text("999999\n")
    r = distrep("sweep", "--models", "ReLU", *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr


def test_5_the_lock_and_the_directory_it_guards(tmp_path):
    """The lock file names only its holder (a stale, longer pid is overwritten, not left as a
    tail); a failed command removes the directory only if it created it (empty), never one the
    user made; an interrupted atomic write's temporary file is not a foreign entry."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / LOCK_FILE).write_text("123456789\n")
    with pytest.raises(RuntimeError):
        with experiment_lock(mine):
            assert (mine / LOCK_FILE).read_text() == f"{os.getpid()}\n"
            raise RuntimeError
    assert mine.is_dir(), "a directory the user made stays"
    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with experiment_lock(new):
            raise RuntimeError
    assert not new.exists(), "a directory the failed command made goes"
    (mine / ".config.json.abc123.tmp").write_text("{")
    assert entries(mine) == []


def test_11_force_keeps_what_a_link_points_to_and_epoch_reports_belong_to_experiments(tmp_path):
    """--force unlinks a link distrep's name leads to, not the directory it points at; an epoch
    report is distrep's in an experiment directory and no one else's, and only by its exact name."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_text("png")
    out = tmp_path / "exp"
    out.mkdir()
    (out / "figures").symlink_to(elsewhere, target_is_directory=True)
    (out / "report-epoch-30.md").write_text("#")
    remove_own(out, EXPERIMENT_ENTRIES)
    assert not (out / "figures").exists() and (elsewhere / "keep.png").read_text() == "png"
    assert not (out / "report-epoch-30.md").exists()
    assert is_own("table-epoch-5000.tex", EXPERIMENT_ENTRIES) and is_own("report-epoch-7.html", EXPERIMENT_ENTRIES)
    assert not is_own("report-epoch-30.md", RUN_ENTRIES)
    for name in ("report-epoch-30.md.bak", "report-epoch-final.md", "report-epoch-.md"):
        assert not is_own(name, EXPERIMENT_ENTRIES), name


def test_6_a_refused_sweep_writes_nothing_and_force_recovers(finished):
    (finished / "config.json").unlink()                 # the config is gone, the checkpoint is not
    before = sorted(p.name for p in finished.iterdir())
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL[:3], 4, *SMALL[4:], "--out", finished)
    assert_one_line_error(r, "config.json is missing", "--force")
    assert sorted(p.name for p in finished.iterdir()) == before
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL[:3], 4, *SMALL[4:], "--out", finished, "--force")
    assert r.returncode == 0, r.stderr
    assert read_json(finished / "config.json")["config"]["epochs"] == 4


def test_7_every_session_is_recorded_and_a_changed_setup_is_warned(finished):
    run = read_json(finished / "run.json")
    assert len(run["sessions"]) == 1 and run["sessions"][0]["run_epochs"] == 2 * 2 * 3
    first = dict(run["sessions"][0], device="NVIDIA H200 (CUDA 13.0)")
    first["versions"] = dict(first["versions"], torch="2.11.0")
    for key in ("run_epochs", "wall_time_s", "ended"):
        first.pop(key)                                  # as a killed session leaves it
    assert len(first["chunks"]) == 1 and len(first["chunks"][0]["runs"]) == 4
    first["chunks"] = []             # killed after the checkpoint was saved, before run.json
    write_json(finished / "run.json", {"finished": False, "sessions": [first]})
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert r.returncode == 0, r.stderr
    assert "warning: resuming with a different setup" in r.stderr
    assert "device NVIDIA H200 (CUDA 13.0) ->" in r.stderr and "torch 2.11.0 ->" in r.stderr
    sessions = read_json(finished / "run.json")["sessions"]
    assert len(sessions) == 2 and sessions[0]["ended"].startswith("interrupted")
    assert sessions[0]["run_epochs"] == 12 and sessions[1]["run_epochs"] == 0
    assert sorted(map(tuple, sessions[0]["chunks"][0]["runs"])) == [("Abs", 0), ("Abs", 1), ("ReLU", 0), ("ReLU", 1)]
    assert sessions[0]["chunks"][0]["recorded"] == "from the checkpoint after the kill"
    assert sessions[1]["device"].startswith("CPU")


def test_11_force_never_deletes_what_distrep_did_not_write(tmp_path, mnist):
    out = tmp_path / "thesis"
    (out / "src").mkdir(parents=True)
    (out / "config.json").write_text('{"name": "my-app"}')
    (out / "src" / "main.py").write_text("print('hi')\n")
    (out / "thesis.tex").write_text("\\documentclass{article}\n")
    for force in ([], ["--force"]):
        r = distrep("sweep", "--models", "ReLU", *SMALL, "--out", out, *force)
        assert_one_line_error(r, "files distrep did not write", "config.json (not distrep's)")
    assert (out / "src" / "main.py").exists() and (out / "thesis.tex").exists()
    assert read_json(out / "config.json") == {"name": "my-app"}
    assert_one_line_error(distrep("sweep", "--models", "ReLU", "--out", ""), "--out", "empty")


def test_11_force_removes_only_distreps_own_files(finished):
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL[:3], 4, *SMALL[4:], "--out", finished, "--force")
    assert r.returncode == 0, r.stderr
    assert read_json(finished / "config.json")["config"]["epochs"] == 4
    (finished / "notes.txt").write_text("mine")
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished, "--force")
    assert_one_line_error(r, "files distrep did not write (notes.txt)")
    assert (finished / "notes.txt").read_text() == "mine"


def test_12_train_refuses_an_experiment_directory(finished):
    config = (finished / "config.json").read_bytes()
    r = distrep("train", "--model", "ReLU", "--epochs", 2, "--train-subset", 50, "--quiet",
                "--out", finished)
    assert_one_line_error(r, "holds an experiment")
    assert (finished / "config.json").read_bytes() == config
    assert distrep("report", finished).returncode == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_13_a_damaged_checkpoint_is_refused_and_force_recovers(finished, damage):
    unfinish(finished)
    path = finished / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        for i in range(1, 5):
            data[-i * 97] ^= 0xFF                         # a few bytes of tensor data
    path.write_bytes(bytes(data[:len(data) // 2]) if damage == "truncate" else
                     b"" if damage == "empty" else bytes(data))
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert_one_line_error(r, "checkpoint", "damaged", "--force")
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished, "--force")
    assert r.returncode == 0, r.stderr
    assert read_json(finished / "run.json")["finished"]


def test_13_a_finished_experiment_does_not_need_its_checkpoint(finished):
    """Once finished, an experiment's results are its files (models/<name>/): the same command
    again rebuilds nothing, and neither reads a damaged checkpoint beside them nor needs one.
    (It once looked for the results one folder too high, so it always rebuilt them from the
    checkpoint, and failed without one.)"""
    summary = (finished / "summary.csv").read_bytes()
    (finished / "checkpoint.safetensors").write_bytes(b"damaged")
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert r.returncode == 0 and "rebuilding" not in r.stderr, r.stderr
    assert (finished / "checkpoint.safetensors").read_bytes() == b"damaged"
    (finished / "checkpoint.safetensors").unlink()
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert r.returncode == 0 and "rebuilding" not in r.stderr, r.stderr
    assert (finished / "summary.csv").read_bytes() == summary


def test_13_a_checkpoint_of_another_experiment_is_refused(finished, tmp_path):
    """An intact checkpoint made with another config (here another lr), copied over this
    experiment's, is refused: its recorded config is compared, not only its checksum; and the
    checksum covers each tensor's name, dtype and shape, not only its bytes."""
    from distrep.sweep import tensor_digest
    other = tmp_path / "other"
    assert distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--lr", "0.01", "--out", other).returncode == 0
    unfinish(finished)
    (finished / "checkpoint.safetensors").write_bytes((other / "checkpoint.safetensors").read_bytes())
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert_one_line_error(r, "checkpoint", "different config", "--force")
    t = torch.arange(6, dtype=torch.float32)
    digests = {tensor_digest(d) for d in ({"a": t}, {"b": t}, {"a": t.view(2, 3)}, {"a": t.view(torch.int32)})}
    assert len(digests) == 4


# --------------------------------------------------------------------------- files (8, 16, 17, 20)

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_8_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "x" / "result.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_8_a_write_that_fails_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    """A write that fails before its rename (here the disk is full at the flush) leaves the
    previous file as it was and takes its temporary file away with it."""
    path = write_json(tmp_path / "config.json", {"epochs": 5000})

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("distrep.storage.os.fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"epochs": 50000})
    assert read_json(path) == {"epochs": 5000}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_8_json_is_written_indented_with_sorted_keys(tmp_path):
    """Result JSON reads and diffs line by line: two-space indents, keys in order, a final newline."""
    path = write_json(tmp_path / "c.json", {"width": 128, "models": ["ReLU"], "lr": 0.001})
    assert path.read_text() == '{\n  "lr": 0.001,\n  "models": [\n    "ReLU"\n  ],\n  "width": 128\n}\n'


def test_20_an_array_file_that_needs_unpickling_is_refused(tmp_path):
    """read_arrays never unpickles: an .npz holding a Python object (which loading would run
    code for) is refused in one line like any file distrep did not write."""
    path = tmp_path / "metrics.npz"
    np.savez(path, test_acc=np.array([{"not": "an array"}], dtype=object))
    with pytest.raises(DistrepError, match="metrics.npz is damaged or not the file distrep wrote"):
        read_arrays(path)


def test_a_device_this_process_cannot_use_is_refused_in_one_line(tmp_path, monkeypatch):
    """A device name torch does not know, one distrep does not train on, CUDA where none is
    seen and a GPU past the ones seen (which CUDA itself reports only at its first call, after
    the data is loaded) are each refused by name, before anything is written."""
    from distrep.provenance import resolve_device
    r = distrep("sweep", "--models", "ReLU", "--device", "tpu", *SMALL, "--out", tmp_path / "a")
    assert_one_line_error(r, "unknown device 'tpu'")
    assert not (tmp_path / "a").exists()
    with pytest.raises(DistrepError, match="unsupported device 'meta'"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistrepError, match="sees no CUDA GPU"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda").index is None
    with pytest.raises(DistrepError, match="device cuda:2 requested but this process sees only cuda:0, cuda:1$"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("models", [10, 12, 30])
def test_figures_of_many_models_tell_every_line_apart_and_keep_the_legend_off_them(models):
    """Past matplotlib's ten colours a line repeats an earlier one's colour: it is dashed (then
    dotted) instead, and the legend moves beside the axes, where it covers no line (24 models'
    legend inside covered most of the plot); the figure widens for it."""
    import matplotlib.pyplot as plt

    from distrep.plots import legend_width, plot_clamping
    from distrep.report import plot_curves
    rng = np.random.default_rng(0)
    names = [f"linear-relu-linear{'-neg' * (i % 2)}-m{i}" for i in range(models)]
    metrics = {n: {"test_epochs": np.array([1, 2, 3]), "test_acc": rng.uniform(0.5, 0.9, (2, 3))}
               for n in names}
    clamping = {n: {"percents": np.array([0.0, 50.0]), "floor": rng.uniform(0, 1, (2, 2)),
                    "ceiling": rng.uniform(0, 1, (2, 2))} for n in names}
    fig, ax = plt.subplots(figsize=(8 + legend_width(models), 5), layout="constrained")
    plot_curves(metrics, ax)
    for axes in (ax, plot_clamping(clamping).axes[1]):
        lines = [line for line in axes.get_lines() if line.get_label() in names]
        assert [line.get_linestyle() for line in lines] == (["-"] * 10 + ["--"] * 10 + [":"] * 10)[:models]
        styled = {(line.get_color(), line.get_linestyle()) for line in lines}
        assert len(styled) == models, "two models drawn alike"
        axes.figure.canvas.draw()
        beside = axes.get_legend().get_window_extent().x0 >= axes.get_window_extent().x1
        assert beside == (models > 10)
    assert legend_width(10) == 0 and legend_width(12) == 3.5 and legend_width(30) == 7.0
    plt.close("all")


@pytest.mark.filterwarnings("error:constrained_layout not applied:UserWarning")
def test_16_a_very_long_spec_gets_a_safe_directory_and_figures_with_room_to_draw(tmp_path, mnist):
    """Its folder name is cut to a safe length, and its figures show it cut too: the whole
    name as a legend entry or tick label took the plots' room (matplotlib's 'axes sizes
    collapsed to zero', here an error) and left them unreadable."""
    from distrep.plots import figure_label
    spec = "linear" + "-identity" * 40 + "-relu-linear"
    assert len(spec) > 255
    out = tmp_path / "long"
    r = distrep("sweep", "--models", f"{spec},ReLU", *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr
    folders = sorted(f.name for f in (out / "models").iterdir())
    assert "ReLU" in folders and all(len(f) < 100 for f in folders)
    assert all((out / "models" / f / "metrics.npz").exists() for f in folders)
    assert distrep("report", out).returncode == 0
    assert distrep("analyze", out).returncode == 0
    run = tmp_path / "run"
    assert distrep("train", "--model", spec, "--epochs", 1, "--train-subset", 50, "--quiet",
                   "--out", run).returncode == 0
    # the whole name in a title widened a run's curves.png to 3,966 pixels around tiny plots
    for png in (run / "curves.png", out / "figures" / "test_error_curves.png", out / "figures" / "pairs.png",
                out / "figures" / "final_accuracy.png", out / "figures" / "clamping.png"):
        width = int.from_bytes(png.read_bytes()[16:20], "big")        # the PNG header's width
        assert width < 1600, (png.name, width)
    label = figure_label(spec)
    folder_hash = [f for f in folders if f != "ReLU"][0][-12:]        # the tag starts it
    assert label == f"linear-identity…ity-relu-linear ({folder_hash[:6]})" and len(label) == 40, label
    deeper = spec.replace("linear-", "linear-identity-", 1)             # differs only in the middle
    assert figure_label(deeper) != label and len(figure_label(deeper)) == 40
    assert figure_label("linear-relu-linear+bias-abs-neg") == "linear-relu-linear+bias-abs-neg"


def test_17_unwritable_outputs_are_refused_before_training(tmp_path, mnist):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for command in (["train", "--model", "ReLU"], ["sweep", "--models", "ReLU"]):
        start = time.perf_counter()
        r = distrep(*command, "--epochs", 100000, "--train-subset", 60000, "--out", afile)
        assert_one_line_error(r, "is a file, not a directory")
        assert time.perf_counter() - start < 30, "refused before training"
        assert_one_line_error(distrep(*command, "--out", "/proc/self"), "cannot write to /proc/self")
    r = distrep("data", "fetch", "mnist", env={"DISTREP_DATA": str(afile / "cache")})
    assert_one_line_error(r, "cannot write the data cache", "is not a writable directory", "DISTREP_DATA")
    r = distrep("data", "fetch", "mnist", env={"DISTREP_DATA": "/proc/self/distrep"})
    assert_error_line(r, "cannot write the data cache", "DISTREP_DATA")   # after trying a source


def test_20_damaged_result_files_give_one_line_errors(finished):
    metrics = finished / "models" / "ReLU" / "metrics.npz"
    good = metrics.read_bytes()
    for bad in (good[:len(good) // 2], b"garbage", b""):
        metrics.write_bytes(bad)
        assert_one_line_error(distrep("report", finished), str(metrics))
    metrics.write_bytes(good)
    config = finished / "config.json"
    good_config = config.read_bytes()
    for bad in (b"{not json", b"[]", b'{"models": 3, "result_fields": {}}'):
        config.write_bytes(bad)
        assert_one_line_error(distrep("report", finished), "config.json")
    config.write_bytes(good_config)
    run = finished / "run.json"
    run.write_bytes(b"\x00\x01")
    assert_one_line_error(distrep("report", finished), "run.json")
    run.write_text(json.dumps({"finished": True, "wall_time_s": 1.0}))
    params = finished / "models" / "Abs" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:100])
    assert_error_line(distrep("analyze", finished), "params.safetensors", "damaged")


def test_20_missing_results_are_rebuilt_from_the_checkpoint(finished):
    summary = (finished / "summary.csv").read_text()
    metrics = read_arrays(finished / "models" / "Abs" / "metrics.npz")
    (finished / "summary.csv").unlink()
    (finished / "models" / "Abs" / "metrics.npz").unlink()
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert r.returncode == 0 and "rebuilding" in r.stderr, r.stderr
    assert (finished / "summary.csv").read_text() == summary
    rebuilt = read_arrays(finished / "models" / "Abs" / "metrics.npz")
    assert all(np.array_equal(rebuilt[k], metrics[k], equal_nan=True) for k in metrics)
    (finished / "summary.csv").unlink()
    (finished / "checkpoint.safetensors").unlink()
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert_one_line_error(r, "summary.csv is missing", "no checkpoint")


def test_20_analyze_refuses_before_analysing_what_its_report_could_not_read(finished):
    """A finished experiment whose per-epoch arrays did not come back (e.g. only the parameters
    fitted what a GPU call returns): the one-line error comes before minutes of analyses, which
    would be thrown away as the report cannot be written."""
    (finished / "models" / "Abs" / "metrics.npz").unlink()
    assert_one_line_error(distrep("analyze", finished), "metrics.npz is missing")
    assert not (finished / "analysis").exists()


def test_a_directory_that_holds_no_experiment_is_refused_by_what_it_holds(tmp_path, mnist):
    """report, analyze, claims and compare read experiments: given anything else, the one-line error
    says what is there instead (a `distrep train` run among them, whose own config.json
    read as 'no distrep config.json')."""
    run = tmp_path / "run"
    assert distrep("train", "--model", "ReLU", "--epochs", 1, "--train-subset", 50, "--quiet",
                   "--out", run).returncode == 0
    (tmp_path / "file").write_text("")
    for name, config in (("empty", None), ("foreign", '{"lr": 0.1}'), ("unreadable", "{")):
        (tmp_path / name).mkdir()
        if config:
            (tmp_path / name / "config.json").write_text(config)
    for name, why in (("run", "it holds one run of `distrep train`"), ("file", "not a directory"),
                      ("absent", "no such directory"), ("empty", "no distrep config.json"),
                      ("foreign", "its config.json is not distrep's"),
                      ("unreadable", "its config.json is damaged")):
        for command in ("report", "analyze", "claims", "compare"):
            assert_one_line_error(distrep(command, tmp_path / name), f"{name} holds no finished experiment ({why}")
    assert_one_line_error(distrep("compare", run, "--at-epoch", 1), "claims and compare read what sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "foreign", "run", "unreadable"]


def test_20_damaged_analysis_file_gives_a_one_line_error(finished):
    assert distrep("analyze", finished).returncode == 0
    (finished / "analysis" / "ReLU" / "clamping.npz").write_bytes(b"PK\x03\x04broken")
    assert_one_line_error(distrep("report", finished), "clamping.npz")


# --------------------------------------------------------------------------- data (9, 10, 22)

def test_9_a_file_shorter_than_its_header_is_refused(tmp_path):
    spec, raw = make_synthetic(tmp_path / "src")
    (tmp_path / "src" / "train-images-idx3-ubyte").write_bytes(raw["train-images-idx3-ubyte"][:6])
    with pytest.raises(DistrepError, match="truncated"):
        data_mod.fetch(spec, from_dir=tmp_path / "src", root=tmp_path / "cache")
    with pytest.raises(DistrepError, match="shorter than its own header"):
        data_mod.read_idx(raw["train-images-idx3-ubyte"][:6])
    fake = tmp_path / "mnist"
    fake.mkdir()
    for f in data_mod.MNIST.files:
        (fake / f.name).write_bytes(f.magic + b"\x00\x00")
    r = distrep("data", "fetch", "mnist", "--from", fake, env={"DISTREP_DATA": str(tmp_path / "c")})
    assert_error_line(r, "cannot read mnist", "truncated", "shorter than its header")


def test_10_a_source_failing_verification_falls_through_to_the_next(tmp_path):
    spec, raw = make_synthetic(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, content in raw.items():
        (bad / name).write_bytes(content[:-1] + bytes([content[-1] ^ 1]))     # md5 mismatch
    sources = [data_mod.DirectorySource(bad, "corrupted copy"), data_mod.DirectorySource(tmp_path / "good", "mirror")]
    target = data_mod.fetch(spec, sources=sources, root=tmp_path / "cache")
    assert (target / "train-images-idx3-ubyte").read_bytes() == raw["train-images-idx3-ubyte"]
    with pytest.raises(DistrepError) as e:
        data_mod.fetch(spec, sources=sources[:1] * 2, root=tmp_path / "cache2")
    assert str(e.value).count("corrupted copy: ") == 2 and "md5 mismatch" in str(e.value)


def test_22_no_home_and_no_passwd_entry(monkeypatch, capsys):
    import pwd

    from distrep.cli import main

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    for name in ("HOME", "DISTREP_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert main(["data", "path"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot find a home directory" in err[0] and "DISTREP_DATA" in err[0]


def test_22_ascii_output_and_a_closed_stderr(tmp_path, mnist):
    r = distrep_process("models", env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "Traceback" not in r.stderr and "ReLU2-Neg" in r.stdout
    out = tmp_path / "closed"
    cmd = " ".join([sys.executable, "-m", "distrep.cli", "sweep", "--models", "ReLU", "--runs", "1",
                    "--epochs", "2", "--train-subset", "50", "--out", str(out), "2>&-"])
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "test accuracy" in r.stdout, r
    assert read_json(out / "run.json")["finished"]


# --------------------------------------------------------------------------- sizes and numbers (15, 19, 21)

@pytest.mark.parametrize("args, fragment", [
    (["sweep", "--models", "ReLU", "--epochs", "1" + "0" * 23], "GiB of memory"),
    (["sweep", "--models", "ReLU", "--runs", 10**12], "GiB of memory"),
    (["sweep", "--models", "ReLU", "--width", 10**9], "GiB of memory"),
    (["train", "--model", "ReLU", "--epochs", 10**12], "GiB of memory"),
    (["train", "--model", "ReLU", "--width", 10**9], "GiB of memory"),
    (["sweep", "--models", "ReLU", "--base-seed", 2**64 - 1], "do not fit in int64"),
    (["train", "--model", "ReLU", "--seed", 2**63], "seed must be an integer in 0.."),
    (["sweep", "--models", "ReLU", "--max-memory", "inf"], "too large"),
    (["sweep", "--models", "ReLU", "--max-memory", "1e400"], "too large"),
    (["sweep", "--models", "ReLU", "--max-memory", "0.5"], "'0.5' is 0.5 bytes"),
    (["sweep", "--models", "ReLU", "--lr", "1e308"], "not a normal fp32 number"),
    (["train", "--model", "ReLU", "--lr", "1e-320"], "not a normal fp32 number"),
    (["sweep", "--models", "ReLU", "--checkpoint-every", "-5"], "non-negative finite"),
    (["sweep", "--models", "ReLU", "--checkpoint-every", "nan"], "non-negative finite"),
    (["sweep", "--models", "ReLU", "--checkpoint-every", "inf"], "non-negative finite"),
])
def test_15_19_21_sizes_and_numbers_are_checked_first(tmp_path, args, fragment):
    start = time.perf_counter()
    assert_one_line_error(distrep(*args, "--out", tmp_path / "x"), fragment)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "x" / "config.json").exists()


def test_every_field_that_changes_a_result_is_compared_and_no_other(finished):
    """A sweep into a finished experiment with any result field changed is refused, naming the
    field; one that changes only the device, engine path, memory budget or checkpoint interval
    (rounding at most) reads the finished experiment."""
    base = ["sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished]
    for flag, says in ((["--lr", "0.01"], "lr: 0.001 there, 0.01 here"),
                       (["--width", "64"], "width: 128 there, 64 here"),
                       (["--train-subset", "99"], "train_subset: 100 there, 99 here"),
                       (["--eval-every", "2"], "eval_every: 1 there, 2 here"),
                       (["--preprocess", "standardized"], "preprocess: 'raw' there, 'standardized' here"),
                       (["--precision", "bf16"], "precision: 'fp32' there, 'bf16' here"),
                       (["--base-seed", "5"], "base_seed: 0 there, 5 here"),
                       (["--unpaired"], "paired: True there, False here")):
        assert_one_line_error(distrep(*base, *flag), "different config", says)
    for flag in (["--engine", "autograd"], ["--max-memory", "512M"], ["--checkpoint-every", "10"],
                 ["--max-runs-per-chunk", "1"], ["--device", "cpu"]):
        r = distrep(*base, *flag)
        assert r.returncode == 0, (flag, r.stderr)
    # a field the saved config lacks (an experiment made before the field existed) differs too
    config = read_json(finished / "config.json")
    del config["result_fields"]["eval_every"]
    write_json(finished / "config.json", config)
    assert_one_line_error(distrep(*base), "different config", "eval_every: None there, 1 here")


# --------------------------------------------------------------------------- messages (23)

def test_23_refusals_say_what_differs_and_model_order_does_not_matter(finished):
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL[:3], 4, *SMALL[4:], "--out", finished)
    assert_one_line_error(r, "different config", "epochs: 3 there, 4 here", "--force")
    r = distrep("sweep", "--models", "Abs,ReLU", *SMALL, "--out", finished)
    assert r.returncode == 0 and "saved order" in r.stderr, r.stderr
    (finished / "config.json").write_text("{oops")
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert_one_line_error(r, "config.json is unreadable")


def test_23_clear_messages(tmp_path, mnist):
    assert_one_line_error(distrep("sweep", "--models", "linear-relu-", "--out", tmp_path / "x"),
                          "empty layer in 'linear-relu-'", "trailing")
    r = distrep("--version")
    assert r.returncode == 0 and r.stdout.startswith("distrep ")
    spaced = tmp_path / "my runs" / "x"
    r = distrep("sweep", "--models", "ReLU", *SMALL, "--out", spaced)
    assert r.returncode == 0 and f"distrep report '{spaced}'" in r.stdout, r.stdout
    start = time.perf_counter()
    r = distrep("bench", "--device", "cpu", "--accuracy", "--accuracy-subset", 70000)
    assert_one_line_error(r, "--accuracy-subset 70000")
    assert "GEMM" not in r.stdout and time.perf_counter() - start < 30


def test_23_progress_off_a_terminal_is_a_few_plain_lines(tmp_path, mnist):
    r = distrep("sweep", "--models", "ReLU", "--runs", 2, "--epochs", 200, "--train-subset", 50,
                "--eval-every", 50, "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and 5 <= len(lines) <= 25, r.stderr
    assert lines[-1].endswith(")") and "100% (400 of 400 run-epochs" in lines[-1]


def test_20_a_damaged_run_record_is_refused_and_force_recovers(finished):
    (finished / "run.json").write_text('["not", "a", "record"]')
    r = distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished)
    assert_one_line_error(r, "run.json is damaged", "--force")
    assert distrep("sweep", "--models", "ReLU,Abs", *SMALL, "--out", finished, "--force").returncode == 0
    assert read_json(finished / "run.json")["finished"]
