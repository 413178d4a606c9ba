"""`distrep reproduce` and `distrep report` end to end on a tiny protocol."""

import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from distrep.errors import DistrepError
from distrep.models import TABLE1, TABLE2, TABLE3
from distrep.reproduce import PRESETS, resolve_preset
from distrep.storage import read_arrays, read_json
from tests.test_cli import assert_one_line_error, distrep

TINY = ["--runs", 3, "--epochs", 6, "--train-subset", 200, "--eval-every", 3, "--quiet"]


@pytest.fixture(scope="module")
def table1_tiny(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("exp") / "t1"
    r = distrep("reproduce", "table1", "--out", out, *TINY)
    assert r.returncode == 0, r.stderr
    assert "estimated time on this device" in r.stderr
    return out


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_results_directory_and_report(table1_tiny):
    out = table1_tiny
    for name in ("config.json", "summary.csv", "run.json", "report.md", "report.html", "table.tex",
                 "figures/test_error_curves.png", "figures/final_accuracy.png"):
        assert (out / name).exists(), name
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("model,spec,run,seed,test_acc,train_acc,train_loss")
    assert len(rows) == 1 + 6 * 3
    report = (out / "report.md").read_text()
    table = report.split("## Test accuracy (%)")[1].split("##")[0]
    for model in TABLE1:
        line = next(l for l in table.splitlines() if l.startswith(f"| {model} |"))
        numbers = re.findall(r"-?\d+\.\d+", line)
        assert numbers and all(np.isfinite(float(x)) for x in numbers), line
    assert "paired t-test" in report and "Holm" in report and "\\begin{tabular}" in report
    assert "published numbers compared: none" in report and "comparable?" in report
    m = read_arrays(out / "models" / "ReLU2-Neg" / "metrics.npz")
    assert m["train_loss"].shape == (3, 6) and m["test_acc"].shape == (3, 2)
    parser = _Refs()
    parser.feed((out / "report.html").read_text())
    assert parser.refs, "the report shows its figures"
    for ref in parser.refs:
        assert ref.startswith("data:image/png;base64,") or (out / ref).exists(), ref


def test_report_regenerated_from_files_alone_is_identical(table1_tiny):
    before = {n: (table1_tiny / n).read_bytes() for n in ("report.md", "report.html", "table.tex")}
    (table1_tiny / "checkpoint.safetensors").rename(table1_tiny / "moved.safetensors")
    try:
        r = distrep("report", table1_tiny)
        assert r.returncode == 0, r.stderr
    finally:
        (table1_tiny / "moved.safetensors").rename(table1_tiny / "checkpoint.safetensors")
    for name, content in before.items():
        assert (table1_tiny / name).read_bytes() == content, name


def test_rerun_is_a_no_op_and_other_config_is_refused(table1_tiny):
    r = distrep("reproduce", "table1", "--out", table1_tiny, *TINY)
    assert r.returncode == 0 and "already finished" in r.stderr
    r = distrep("reproduce", "table1", "--out", table1_tiny, *TINY[:-1], "--lr", 0.002, "--quiet")
    assert_one_line_error(r, "holds an experiment with a different config", "--force")
    assert (table1_tiny / "report.md").exists(), "earlier results survive a refused run"


def test_bad_presets_and_overrides(tmp_path):
    assert_one_line_error(distrep("reproduce", "table9", "--out", tmp_path), "unknown preset 'table9'")
    assert_one_line_error(distrep("reproduce", "quick", "--models", "ReLU,Bogus", "--out", tmp_path),
                          "unknown model 'Bogus'")
    assert_one_line_error(distrep("reproduce", "quick", "--runs", 0, "--out", tmp_path),
                          "--runs: must be a positive integer")
    assert_one_line_error(distrep("reproduce", "quick", "--dataset", "svhn", "--out", tmp_path),
                          "unknown dataset 'svhn'")
    assert_one_line_error(distrep("report", tmp_path / "nothing"), "holds no finished experiment")
    with pytest.raises(DistrepError, match="unknown setting"):
        resolve_preset("quick", {"learning_rate": 0.1})
    assert resolve_preset("table3", {}).epochs == 50000 and resolve_preset("table1", {}).runs == 20
    assert resolve_preset("table1", {}).epochs == 50000, "Table 1's numbers came from 50,000 epochs"
    assert resolve_preset("table2", {}).epochs == 5000
    t3 = resolve_preset("table3", {})
    assert t3.models == list(TABLE1 + TABLE3) and t3.offsetl2_form == "coded"
    assert resolve_preset("table1", {"runs": 4}).runs == 4
    assert PRESETS["table1"]["models"] == list(TABLE1)


def test_killed_reproduction_resumes_to_the_same_results(tmp_path, mnist):
    args = ["reproduce", "quick", "--models", "ReLU2,Abs-L2-Neg", "--runs", 2, "--epochs", 400,
            "--train-subset", 200, "--eval-every", 50, "--checkpoint-every", 0, "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "distrep.cli", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not read_json(killed / "run.json")["finished"], "killed before it finished"
    r = distrep(*args, "--out", killed)
    assert r.returncode == 0 and "resuming from the checkpoint" in r.stderr, r.stderr
    straight = distrep(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0
    assert (killed / "summary.csv").read_text() == (tmp_path / "straight" / "summary.csv").read_text()
    table = lambda p: (p / "report.md").read_text().split("## Protocol")[0]
    assert table(killed) == table(tmp_path / "straight")


def test_all_trains_each_run_once(tmp_path, mnist):
    """`all` is table2 (the bias variants) and table3 (Table 1's six models and the four
    OffsetL2 models): Table 1's models are not trained a second time."""
    r = distrep("reproduce", "all", "--out", tmp_path, "--runs", 2, "--epochs", 2,
                "--train-subset", 100, "--eval-every", 1, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["figures", "table2", "table3"]
    for table, models in (("table2", TABLE2), ("table3", TABLE1 + TABLE3)):
        report = (tmp_path / table / "report.md").read_text()
        assert all(f"| {m} |" in report for m in models), table
    # and one report over both: every model once, in the column of the experiment that trained it
    group = (tmp_path / "report.md").read_text()
    assert "| model | table2 | table3 |" in group
    for m in TABLE1 + TABLE3 + TABLE2:
        row = next(line for line in group.splitlines() if line.startswith(f"| {m} |"))
        assert row.count("—") == 1, row


def test_analyze_adds_every_analysis_to_the_report(table1_tiny):
    r = distrep("analyze", table1_tiny)
    assert r.returncode == 0, r.stderr
    census = read_arrays(table1_tiny / "analysis" / "ReLU2" / "dead_units.npz")
    assert census["train/layer1/never"].shape == (3,) and "test/layer3/below_5%" in census
    report = (table1_tiny / "report.md").read_text()
    section = report.split("## Dead and rarely active units")[1].split("## Protocol")[0]
    for model in TABLE1:
        assert f"| {model} | train | layer 1 |" in section
    assert "| ReLU2 | test | layer 3 |" in section and "| Abs2 | train | layer 3 |" in section
    for title in ("Class distributions along the output hyperplanes", "Activation clamping",
                  "First-layer weights"):
        assert f"## {title}" in report, title
    clamping = report.split("## Activation clamping")[1].split("## ")[0]
    assert "| ReLU2-Neg |" in clamping and "| 11 |" not in clamping, "not the author's procedure"
    author = report.split("## The author's readings (training data)")[1].split("\n## ")[0]
    row = next(line for line in author.splitlines() if line.startswith("| ReLU2-Neg |"))
    assert "| 11 |" in row and "| 1 |" in row, "the notes' drop-off points beside the author's reading"
    assert read_arrays(table1_tiny / "analysis" / "Abs" / "author.npz")["clamping/range"][:, 0].min() < 0, \
        "an Abs model's range starts at its final outputs' negative minimum"
    for model in TABLE1:
        for figure in (f"figures/hyperplanes_{model}.png", f"figures/first_layer_{model}.png"):
            assert (table1_tiny / figure).exists() and f"]({figure})" in report
        curves = read_arrays(table1_tiny / "analysis" / model / "clamping.npz")
        assert curves["floor"].shape == (3, 101) and curves["unit_floor"].shape == (3, 128, 21)
    assert "OffsetL2 prototypes" not in report
    parser = _Refs()
    parser.feed((table1_tiny / "report.html").read_text())
    assert len(parser.refs) == 3 + 1 + 2 * len(TABLE1) and all(r.startswith("data:image/png") for r in parser.refs)
    assert_one_line_error(distrep("analyze", table1_tiny / "nope"), "no finished experiment")


def test_analyze_offsetl2_prototypes(tmp_path, mnist):
    out = tmp_path / "t3"
    r = distrep("reproduce", "table3", "--out", out, "--runs", 2, "--epochs", 3, "--train-subset", 200,
                "--models", "ReLU-L2,ReLU-L2-Neg,Abs-L2,Abs-L2-Neg", "--quiet")   # the baselines: elsewhere
    assert r.returncode == 0, r.stderr
    assert distrep("analyze", out).returncode == 0
    report = (out / "report.md").read_text()
    section = report.split("## OffsetL2 prototypes")[1].split("## ")[0]
    for model in ("ReLU-L2", "ReLU-L2-Neg", "Abs-L2", "Abs-L2-Neg"):
        assert f"| {model} |" in section and f"figures/prototypes_{model}.png" in section
        p = read_arrays(out / "analysis" / model / "prototypes.npz")
        assert p["weighted_distance"].shape == (2, 10, 10) and p["weight"].shape == (2, 10, 128)


def test_a_sweep_directory_can_be_reported_and_analysed(tmp_path, mnist):
    out = tmp_path / "mine"
    r = distrep("sweep", "--models", "linear-relu-linear+bias-abs-neg", "--runs", 2, "--epochs", 3,
                "--train-subset", 100, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    assert distrep("analyze", out).returncode == 0
    report = (out / "report.md").read_text()
    assert "# distrep experiment: sweep" in report and "## Activation clamping" in report
    # one model: no pair to compare, so neither the pairs' figure nor their sections
    assert "Pairwise comparisons" not in report and "All pairwise comparisons" not in report
    assert not (out / "figures" / "pairs.png").exists() and (out / "figures" / "test_error_curves.png").exists()
    assert (out / "analysis" / "linear-relu-linear+bias-abs-neg" / "hyperplanes.npz").exists()
