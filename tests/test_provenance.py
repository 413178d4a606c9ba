"""What produced each published number, and comparing like for like: provenance matching,
reading a run at another epoch, the presets' plans, the time estimate, and the paper's claims."""

import json
import re
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from distrep import claims, paper
from distrep.paper import Protocol, match
from distrep.reproduce import PRESETS
from distrep.storage import read_arrays
from tests.test_cli import assert_one_line_error, distrep


# --------------------------------------------------------------------------- provenance

def test_table1_numbers_are_compared_only_with_50000_epoch_runs():
    found = match(Protocol("ReLU", 50000))
    assert found.comparable and found.number.table == "Table 1" and found.number.mean == 96.62
    assert found.number.stated.epochs == 5000 and found.number.produced.epochs == 50000
    at_stated = match(Protocol("ReLU", 5000))
    assert not at_stated.comparable
    # beside the 5,000-epoch reading: the published 5,000-epoch number, Table 2's, labelled
    assert at_stated.number.table == "Table 2" and at_stated.number.label == "ReLU_Bias"
    assert at_stated.reasons == ("model ReLU here, ReLU-Bias there",)


def _runs_of(model: str, epochs: int, final: list[float], diverged_epoch: list[int]) -> dict:
    """An experiment as report.load_experiment returns it: one model, full MNIST, raw
    pixels, the paper's lr and width; test passes at epochs 10, 20, ... up to ``epochs``."""
    tested = np.arange(10, epochs + 1, 10)
    m = {"final_test_acc": np.array(final), "diverged_epoch": np.array(diverged_epoch),
         "test_epochs": tested, "test_acc": np.tile(np.array(final)[:, None], (1, len(tested)))}
    cfg = {"paired": True, "epochs": epochs, "dataset": "mnist", "preprocess": "raw", "lr": 1e-3,
           "width": 128, "train_subset": None, "offsetl2_form": "coded"}
    return {"models": [model], "metrics": {model: m}, "config": {"config": cfg}, "specs": {model: model}}


def test_a_comparable_run_is_tested_against_the_published_sample_std():
    """ReLU at 50,000 epochs against Table 1's 96.62 ± 0.17, a population std of 20 runs (the
    author's code printed ddof 0): Welch's t from the sample std 0.17 sqrt(20/19); Δ is ours
    minus the paper's. At 5,000 epochs the same runs are not compared, and the table says why."""
    from distrep import stats
    from distrep.report import main_table, summary_rows
    runs = [0.9650, 0.9660, 0.9670, 0.9655]
    row = summary_rows(_runs_of("ReLU", 50000, runs, [0, 0, 0, 0]))[0]
    expected = stats.welch_from_stats(96.5875, row["std"], 4, 96.62, 0.17 * np.sqrt(20 / 19), 20)
    assert row["mean"] == pytest.approx(96.5875)
    assert row["versus"].t == pytest.approx(expected.t) and row["versus"].df == pytest.approx(expected.df)
    cells = lambda row: dict(zip(main_table([row])[0], main_table([row])[1][0]))   # noqa: E731
    assert cells(row)["Δ mean"] == "-0.03" and cells(row)["comparable?"] == "yes"
    row = summary_rows(_runs_of("ReLU", 5000, runs, [0, 0, 0, 0]))[0]
    assert row["versus"] is None and cells(row)["Δ mean"] == "—"
    assert cells(row)["comparable?"] == "no: model ReLU here, ReLU-Bias there"


def test_a_run_read_at_an_epoch_counts_as_diverged_from_the_epoch_it_diverged():
    """A run that diverged at epoch 20 is in the statistics read at epoch 10, out of them from
    epoch 20 on (and at the end), its accuracy shown only among all runs."""
    from distrep.report import summary_rows
    exp = _runs_of("ReLU", 40, [0.95, 0.10, 0.96], [0, 20, 0])
    assert [summary_rows(exp, e)[0]["n"] for e in (10, 20, 30, None)] == [3, 2, 2, 2]
    early, late = summary_rows(exp, 10)[0], summary_rows(exp, 20)[0]
    assert early["mean"] == pytest.approx(67.0) and late["mean"] == pytest.approx(95.5)
    assert late["diverged"] == 1 and late["all_mean"] == pytest.approx(67.0)


def test_every_field_that_changes_results_must_match():
    assert match(Protocol("ReLU2-Neg-Bias", 5000)).comparable
    assert match(Protocol("ReLU2-Neg-Bias", 5000)).number.label == "ReLU2_Neg", "as printed"
    for protocol, reason in [
            (Protocol("ReLU-Bias", 5000, preprocess="standardized"), "preprocess standardized here, raw there"),
            (Protocol("ReLU-Bias", 5000, train_subset=2000), "training images 2,000 here, 60,000 there"),
            (Protocol("ReLU-Bias", 5000, lr=0.01), "lr 0.01 here, 0.001 there"),
            (Protocol("ReLU-Bias", 5000, width=256), "width 256 here, 128 there"),
            (Protocol("ReLU-Bias", 5000, dataset="fashion-mnist"), "dataset fashion-mnist here, mnist there"),
            (Protocol("ReLU-L2", 50000, offsetl2_form="paper"), "OffsetL2 form paper here, coded there")]:
        found = match(protocol)
        assert not found.comparable and reason in found.reasons, (protocol, found.reasons)
    assert match(Protocol("ReLU-L2", 50000, offsetl2_form="coded")).comparable
    # the OffsetL2 form does not matter for a model without OffsetL2
    assert match(Protocol("ReLU", 50000, offsetl2_form="paper")).comparable
    assert match(Protocol("linear-tanh-linear", 5000)) is None


def test_every_published_number_carries_its_provenance():
    assert len(paper.PUBLISHED) == 6 + 6 + 10
    for p in paper.PUBLISHED:
        assert p.evidence and p.stated.preprocess == "standardized" and p.produced.preprocess == "raw"
    t3 = [p for p in paper.PUBLISHED if p.table == "Table 3" and "_Bias" in p.label]
    assert all("+bias" not in paper.canonical_spec(p.produced.model) for p in t3)


def test_the_t_values_table_1_implies_are_stated_as_its_numbers_give_them():
    """Where the paper's printed t contradicts its own Table 1, distrep states the t that the
    table's means and stds give (20 runs each; the stds as printed): the figures in the
    discrepancy and the claim must be that arithmetic's."""
    t1 = {p.label: p for p in paper.PUBLISHED if p.table == "Table 1"}

    def implied(a, b):
        return (t1[a].mean - t1[b].mean) / np.sqrt((t1[a].std ** 2 + t1[b].std ** 2) / paper.RUNS)
    row = next(d for d in paper.DISCREPANCIES if d.topic == "printed test statistics")
    claim = next(c for c in claims.CLAIMS if c.pairs == (("ReLU", "Abs"),))
    assert f"t ≈ {implied('ReLU2-Neg', 'ReLU'):.2f} for ReLU2-Neg vs ReLU" in row.record
    assert f"t ≈ {implied('ReLU', 'Abs'):.1f} for ReLU vs Abs" in row.record
    assert f"imply t ≈ {implied('ReLU', 'Abs'):.1f}" in claim.printed and "t(38) = 1.14" in claim.printed


# --------------------------------------------------------------------------- reading at an epoch

@pytest.fixture(scope="module")
def table1_60(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("t1") / "D"
    r = distrep("reproduce", "table1", "--runs", 2, "--epochs", 60, "--eval-every", 10,
                "--train-subset", 500, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def _table(report: str, title: str) -> dict[str, list[str]]:
    section = report.split(f"## {title}")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in rows[0]]
    return {r[0].strip(): dict(zip(head, (c.strip() for c in r))) for r in rows[1:]}


def test_report_at_an_epoch_reads_the_saved_curves(table1_60):
    r = distrep("report", table1_60, "--at-epoch", 30)
    assert r.returncode == 0, r.stderr
    report = (table1_60 / "report-epoch-30.md").read_text()
    assert report.startswith("# distrep experiment: table1, read at epoch 30")
    rows = _table(report, "Test accuracy (%), epoch 30")
    for model, row in rows.items():
        m = read_arrays(table1_60 / "models" / model / "metrics.npz")
        k = list(m["test_epochs"]).index(30)
        assert float(row["mean"]) == pytest.approx(100 * m["test_acc"][:, k].mean(), abs=0.006), model
        assert row["Δ mean"] == "—" and row["comparable?"].startswith("no: epochs 30 here, 50,000 there")
    assert (table1_60 / "figures" / "epoch-30" / "test_error_curves.png").exists()
    assert (table1_60 / "table-epoch-30.tex").exists() and (table1_60 / "report.md").exists()
    assert_one_line_error(distrep("report", table1_60, "--at-epoch", 35), "no test pass at epoch 35")
    assert_one_line_error(distrep("report", table1_60, "--at-epoch", 61), f"is outside {table1_60}'s 1..60")


def test_report_leads_with_the_claims_and_folds_the_wall_of_pairs(table1_60):
    report = (table1_60 / "report.md").read_text()
    titles = re.findall(r"^## (.+)$", report, re.M)
    assert titles[0].startswith("The paper's claims") and titles[1].startswith("Test accuracy")
    claims_rows = _table(report, titles[0])
    assert claims_rows["ReLU2 fails far below ReLU"]["verdict"] == "holds"
    assert claims_rows["With OffsetL2, Neg makes no difference"]["verdict"].startswith("not comparable")
    assert "Wilcoxon" in report and "bootstrap 95% CI" in report
    assert "Where the paper, its tables and its code disagree" in report
    html = (table1_60 / "report.html").read_text()
    assert "<details><summary><h2>All pairwise comparisons (15 pairs)" in html
    assert (table1_60 / "figures" / "pairs.png").exists()


# --------------------------------------------------------------------------- presets and estimate

@pytest.mark.parametrize("preset", ["table1", "table2", "table3", "quick", "all"])
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, preset, mnist):
    out = tmp_path / "never"
    r = distrep("reproduce", preset, "--dry-run", "--out", out, "--runs", 1, "--train-subset", 100)
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    assert "estimated time on this device" in r.stdout and "run-epochs" in r.stdout
    if preset == "table3":
        models = r.stdout.split("models: ")[1].splitlines()[0].split(", ")
        assert len(models) == 10 and "50000 epochs" in r.stdout
    if preset == "all":
        assert r.stdout.count("estimated time") == 2


def test_estimate_times_the_first_chunk_and_scales_to_what_is_left(monkeypatch, mnist):
    """A step that takes 20 ms and a test pass that takes 50 ms, for a chunk of 4 runs testing
    every 5 epochs: (0.02 + 0.05 / 5) / 4 s per run-epoch, times 4 runs x 100 epochs. The first
    step and the first test pass take a second (a GPU compiling its kernels): not counted (a cold
    test pass in every fifth epoch would read 22 s)."""
    from distrep import sweep as S

    class Slow(S.Trainer):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.stepped = self.tested = False

        def step(self, *args, **kw):
            time.sleep(0.02 if self.stepped else 1.0)
            self.stepped = True

        def evaluate(self, *args, **kw):
            time.sleep(0.05 if self.tested else 1.0)
            self.tested = True
    monkeypatch.setattr(S, "Trainer", Slow)
    config = S.SweepConfig(models=["ReLU", "Abs"], runs=2, epochs=100, eval_every=5, train_subset=100)
    sweep = S.Sweep(config, mnist, progress=False)
    expected = (0.02 + 0.05 / 5) / 4 * 4 * 100
    assert sweep.estimate_seconds() == pytest.approx(expected, rel=0.25)
    sweep.state["epochs_done"][:] = 50                      # half done: half left
    assert sweep.estimate_seconds() == pytest.approx(expected / 2, rel=0.25)


def test_a_lent_device_is_checked_planned_and_recorded_as_the_workers_see_it(tmp_path, mnist):
    """A Ray driver on a head node without the workers' GPUs borrows a worker's answer for the
    device (provenance.lent_device): with it, on this CPU-only machine, `cuda` passes the checks,
    the engine is chosen and the memory planned for that GPU (its shared memory deciding the
    width the fused step takes), and config.json records the worker's GPU; without it, `cuda` is
    refused here as before."""
    import torch
    from distrep.errors import DistrepError
    from distrep.provenance import DeviceFacts, describe_device, lent_device, resolve_device
    from distrep.sweep import Sweep, SweepConfig, describe_sweep
    h200 = DeviceFacts("cuda", "cuda", "NVIDIA H200 (CUDA 12.8)", None, 232_448)
    config = SweepConfig(models=["ReLU", "linear-relu-rbf"], runs=2, epochs=3, train_subset=100,
                         device="cuda", precision="bf16", engine="auto")
    with pytest.raises(DistrepError, match="sees no CUDA GPU"):
        config.validate()
    with lent_device(h200):
        with pytest.raises(DistrepError, match=r"bf16 is a precision .* autograd path \(linear-relu-rbf\)"):
            config.validate()                       # the checks run, with the worker's answers
        config = replace(config, models=["ReLU", "ReLU-L2"]).validate()
        assert resolve_device("cuda") == torch.device("cuda") and describe_device(torch.device("cpu")) != h200.description
        recorded = describe_sweep(config, resolve_device("cuda"))
        assert recorded["device"] == "NVIDIA H200 (CUDA 12.8)"
        assert [m["engine_path"] for m in recorded["models"]] == ["fused", "fused"]
        fused_plan = Sweep(config, mnist, progress=False).memory_plan()
        wide = replace(config, width=256, precision="fp32")
        assert [m["engine_path"] for m in describe_sweep(wide, torch.device("cuda"))["models"]] == ["fused", "fused"]
    with lent_device(replace(h200, shared_memory=101_376)):     # 256 units need 117,248 bytes
        assert [m["engine_path"] for m in describe_sweep(wide, torch.device("cuda"))["models"]] == [
            "hand-written", "hand-written"]
    no_triton = replace(h200, fused_unavailable="the fused engine needs Triton (pip install triton)",
                        shared_memory=None)
    with lent_device(no_triton):
        assert [m["engine_path"] for m in describe_sweep(config, torch.device("cuda"))["models"]] == [
            "hand-written", "hand-written"]
        with pytest.raises(DistrepError, match="3xtf32 is a precision of the fused step .* ReLU \\(hand-written\\)"):
            replace(config, precision="3xtf32").validate()
        assert Sweep(replace(config, precision="fp32"), mnist, progress=False).memory_plan() != fused_plan
    with pytest.raises(DistrepError, match="sees no CUDA GPU"):       # lent within, not after
        resolve_device("cuda")


def test_presets_follow_the_producing_protocols():
    assert PRESETS["table1"]["epochs"] == 50000 and PRESETS["table2"]["epochs"] == 5000
    assert PRESETS["table3"]["offsetl2_form"] == "coded"
    for preset in ("table1", "table3"):
        assert match(Protocol("ReLU", PRESETS[preset]["epochs"])).comparable


# --------------------------------------------------------------------------- claims

def test_claim_verdicts():
    rng = np.random.default_rng(0)
    base = 96 + 0.2 * rng.standard_normal(6)
    values = {"ReLU": base, "Abs": base + 0.01 * rng.standard_normal(6), "ReLU2": base - 40,
              "ReLU2-Neg": base - 1.0 + 0.05 * rng.standard_normal(6)}
    found = {v.claim.text: v for v in claims.verdicts(values, paired=True)}
    assert found["ReLU and Abs perform alike"].verdict == "holds"
    assert found["ReLU2 fails far below ReLU"].verdict == "holds"
    assert found["ReLU2-Neg recovers from ReLU2"].verdict == "holds"
    assert found["ReLU2-Neg recovers to ReLU ('statistically comparable')"].verdict == "does not hold"
    assert found["Abs2 performs like Abs"].verdict == "not comparable"
    assert "Abs2" in found["Abs2 performs like Abs"].why
    with_nan = dict(values, ReLU2=np.full(6, np.nan))
    found = {v.claim.text: v for v in claims.verdicts(with_nan, paired=True)}
    assert found["ReLU2 fails far below ReLU"].verdict == "not comparable"


def test_claim_verdicts_by_hand():
    """Runs built so that each statistic is known: the claim's direction, the 5 % level, the
    paired test where the design is paired (Welch's otherwise), a diverged run dropping its
    pair, and "less spread" as strictly less."""
    verdict = lambda values, paired=True: {v.claim.text: v for v in claims.verdicts(values, paired)}  # noqa: E731
    base = np.array([94.0, 95.0, 96.0, 97.0, 98.0, 99.0])           # spread 1.87 across runs
    # significant, but the wrong way round for "less" and for "greater"
    found = verdict({"ReLU": base, "ReLU2": base + 1.0 + np.array([0, .1, 0, .1, 0, .1]),
                     "ReLU2-Neg": base})
    assert found["ReLU2 fails far below ReLU"].verdict == "does not hold"
    assert found["ReLU2-Neg recovers from ReLU2"].verdict == "does not hold"
    # a paired difference with p ~ 0.37 (t(5) = 1, d_z ~ 0.41): not significant at 5 %
    d = np.array([0.1, -0.1, 0.2, -0.2, 0.3, 0.0])
    d = d - d.mean() + d.std(ddof=1) / np.sqrt(6)                  # mean = s_d / sqrt(n): t = 1
    found = verdict({"ReLU": base + d, "Abs": base})
    assert found["ReLU and Abs perform alike"].verdict == "holds"
    assert "paired t(5) = 1.00" in found["ReLU and Abs perform alike"].ours
    # a shift of 0.3 in every pair: the paired test sees it (p < 0.001), Welch's does not (p ~ 0.8)
    shifted = {"ReLU": base + 0.3 + np.array([0, .01, 0, .01, 0, .01]), "Abs": base}
    assert verdict(shifted)["ReLU and Abs perform alike"].verdict == "does not hold"
    assert verdict(shifted, paired=False)["ReLU and Abs perform alike"].verdict == "holds"
    # a diverged run (NaN) drops its pair: 5 pairs, t(4)
    gone = dict(shifted, Abs=np.where(np.arange(6) == 0, np.nan, base))
    assert "paired t(4)" in verdict(gone)["ReLU and Abs perform alike"].ours
    # better in every pair by 5 points with the same spread (1.87): not "with less spread"
    found = verdict({"ReLU-L2": base + 5.0, "ReLU": base})
    assert found["OffsetL2 models beat every baseline, with less spread"].verdict == "does not hold"
    assert "ReLU-L2 vs ReLU" in found["OffsetL2 models beat every baseline, with less spread"].why


def test_claims_are_tested_across_experiments_made_under_one_protocol(tmp_path, mnist):
    """`distrep claims A B`: Table 1's models trained in one experiment and the OffsetL2 models
    in another (paired, one protocol) are tested together, as one experiment holding all of
    them would be; experiments that differ in a field that changes results, a model in two of
    them, and a damaged summary are refused in one line."""
    from distrep.report import comparison_values, load_experiment

    def sweep(out, models, epochs=20):
        r = distrep("sweep", "--models", models, "--runs", 3, "--epochs", epochs,
                    "--train-subset", 100, "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        return out
    a = sweep(tmp_path / "A", "ReLU,Abs,ReLU2")
    b = sweep(tmp_path / "B", "ReLU-L2,ReLU-L2-Neg")
    values, paired = claims.pooled_values([a, b])
    separately = {**comparison_values(load_experiment(a)), **comparison_values(load_experiment(b))}
    assert paired and values.keys() == separately.keys()
    for name in values:
        np.testing.assert_allclose(values[name], separately[name], rtol=1e-6)
    r = distrep("claims", a, b)
    assert r.returncode == 0, r.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in r.stdout.splitlines() if line.startswith("| ")}
    for v in claims.verdicts(separately, True):
        row = rows[v.claim.text]
        assert v.verdict in row and v.ours in row
    assert "not comparable" not in rows["OffsetL2 models beat every baseline, with less spread"]
    # at an epoch: the claims on the test passes there, as each experiment's own reading
    r = distrep("claims", a, b, "--at-epoch", 10)
    assert r.returncode == 0 and r.stdout.startswith("# The paper's claims on the test accuracy at epoch 10 of")
    at_10 = {**comparison_values(load_experiment(a), 10), **comparison_values(load_experiment(b), 10)}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in r.stdout.splitlines() if line.startswith("| ")}
    for v in claims.verdicts(at_10, True):
        assert v.verdict in rows[v.claim.text] and v.ours in rows[v.claim.text]
    assert any(v.ours != w.ours for v, w in zip(claims.verdicts(at_10, True), claims.verdicts(separately, True)))
    assert_one_line_error(distrep("claims", a, b, "--at-epoch", 15), f"{a}: no test pass at epoch 15")
    assert_one_line_error(distrep("claims", a, sweep(tmp_path / "C", "Abs2", epochs=21)),
                          "differ in epochs (21 against 20)")
    assert_one_line_error(distrep("claims", a, a), "ReLU is in more than one")
    # every field of the protocol is compared, the dataset first; the design is read, not assumed
    for field, value, says in (("dataset", "fashion-mnist", "differ in dataset"),
                               ("paired", False, "differ in paired")):
        other = tmp_path / f"other-{field}"
        shutil.copytree(b, other)
        config = json.loads((other / "config.json").read_text())
        config["config"][field] = value
        (other / "config.json").write_text(json.dumps(config))
        assert_one_line_error(distrep("claims", a, other), says)
    assert claims.pooled_values([tmp_path / "other-paired"])[1] is False
    (b / "summary.csv").write_text("model,run\nReLU-L2,0\n")
    assert_one_line_error(distrep("claims", a, b), "does not hold the files distrep wrote", "diverged")
    assert_one_line_error(distrep("claims", tmp_path / "none"), "no finished experiment")


def test_an_interrupted_experiment_is_read_at_an_epoch_it_reached(tmp_path, monkeypatch, table1_60):
    """A 60-epoch table1 run stopped after epoch 30 (checkpoint written every epoch) reads at
    epoch 30 exactly as the finished run does, and refuses a reading past where it stopped."""
    from distrep import sweep as sweep_module
    from distrep.cli import main
    from distrep.progress import progress as real_progress

    class StopAfter30:                      # the progress bar sees every epoch of every run
        def __init__(self, bar):
            self.bar, self.done = bar, 0

        def update(self, n):
            self.done += n
            if self.done > 30 * 12:         # table1: 6 models x 2 runs in one chunk
                raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.bar, name)

    monkeypatch.setattr(sweep_module, "progress", lambda *a, **k: StopAfter30(real_progress(*a, **k)))
    out = tmp_path / "stopped"
    assert main(["reproduce", "table1", "--runs", "2", "--epochs", "60", "--eval-every", "10",
                 "--train-subset", "500", "--out", str(out), "--quiet", "--checkpoint-every", "0"]) == 130
    assert not (out / "summary.csv").exists()
    assert_one_line_error(distrep("report", out), "training stopped at epoch 30 of 60")
    assert_one_line_error(distrep("report", out, "--at-epoch", 40), "training stopped at epoch 30 of 60")
    assert_one_line_error(distrep("analyze", out), "training has not finished")
    r = distrep("report", out, "--at-epoch", 30)
    assert r.returncode == 0, r.stderr
    report = (out / "report-epoch-30.md").read_text()
    assert "(unfinished: training stopped at epoch 30 of 60)" in report.splitlines()[0]
    finished = distrep("report", table1_60, "--at-epoch", 30)
    assert finished.returncode == 0, finished.stderr
    title = "Test accuracy (%), epoch 30"
    assert _table(report, title) == _table((table1_60 / "report-epoch-30.md").read_text(), title)


def test_accuracy_along_training_stops_where_an_interim_reading_does():
    from distrep.report import epochs_table
    m = {"test_epochs": np.array([1000, 2000, 3000, 4000]), "diverged_epoch": np.zeros(2, int),
         "test_acc": np.array([[0.90, 0.92, 0.93, 0.95], [0.92, 0.94, 0.95, 0.97]])}
    head, body = epochs_table({"models": ["A"], "metrics": {"A": m}}, until=3000)
    assert head == ["model", "epoch 1,000", "epoch 2,000", "epoch 3,000"]
    assert body[0][3].startswith("94.00 ± 1.41")
