"""`distrep compare`: runs of several experiments side by side, each model named by the settings
its experiment does not share, every pair tested (run by run only where the runs start alike)."""

import re
import shutil

import numpy as np
import pytest

from distrep import stats
from distrep.compare import pairs_run_by_run, read_groups
from distrep.errors import DistrepError
from distrep.experiment import final_accuracies
from tests.test_cli import assert_one_line_error, distrep

SMALL = ["--runs", 3, "--epochs", 4, "--train-subset", 300, "--quiet"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, mnist):
    """A width study: ReLU and Abs at width 16 and 24, and ReLU at width 16 with another lr."""
    root = tmp_path_factory.mktemp("study")
    for name, extra in [("w16", ["--models", "ReLU,Abs", "--width", 16]),
                        ("w24", ["--models", "ReLU,Abs", "--width", 24]),
                        ("lr", ["--models", "ReLU", "--width", 16, "--lr", 0.002])]:
        r = distrep("sweep", *extra, *SMALL, "--out", root / name)
        assert r.returncode == 0, r.stderr
    return root


def rows(markdown: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


def test_models_are_named_by_what_differs_and_paired_only_where_runs_start_alike(study):
    r = distrep("compare", study / "w16", study / "w24", "--out", study / "cmp.md")
    assert r.returncode == 0, r.stderr
    assert (study / "cmp.md").read_text() == r.stdout
    from PIL import Image
    assert "![test accuracy per run](cmp.png)" in r.stdout and Image.open(study / "cmp.png").size[0] > 500
    assert "cmp.png" not in distrep("compare", study / "w16", study / "w24").stdout   # no file: no figure
    summary = rows(r.stdout, "model")
    assert [row[0] for row in summary] == ["ReLU (width 16)", "Abs (width 16)", "ReLU (width 24)",
                                           "Abs (width 24)"]
    accuracy = {f"{m} (width {w})": final_accuracies(study / f"w{w}")[1][m]["accuracy"]
                for w in (16, 24) for m in ("ReLU", "Abs")}
    for row in summary:
        s = stats.summarize(accuracy[row[0]])
        assert row[3] == f"{s['mean']:.2f} ± {s['std']:.2f}" and row[2] == "3 of 3"
    pairs = rows(r.stdout, "a")
    assert len(pairs) == 6 and "2 of 6 pairs are compared run by run" in r.stdout
    ps = []
    for a, b, _, test, p, holm, effect, _, improve in pairs:
        same_width = a.split("(")[1] == b.split("(")[1]
        expected = (stats.paired_t if same_width else stats.welch_t)(accuracy[a], accuracy[b])
        assert test.startswith("paired" if same_width else "Welch")
        assert float(improve) == pytest.approx(stats.probability_of_improvement(
            accuracy[a], accuracy[b], same_width), abs=0.005)
        assert effect.startswith("d_z" if same_width else "d =")
        assert float(p) == pytest.approx(expected.p, rel=0.01, abs=5e-4)   # as printed
        ps.append(expected.p)
    holm = stats.holm(ps)
    assert [float(row[5]) for row in pairs] == pytest.approx(list(holm), rel=0.01, abs=5e-4)


def test_settings_are_named_only_where_they_differ(study, tmp_path):
    text = distrep("compare", study / "w16", study / "lr", "--models", "relu").stdout
    assert [row[0] for row in rows(text, "model")] == ["ReLU (lr 0.001)", "ReLU (lr 0.002)"]
    # same seeds, dataset and first layer: another lr still starts each run from the same weights
    assert rows(text, "a")[0][3].startswith("paired t(2)")
    three = [row[0] for row in rows(distrep("compare", study / "w16", study / "w24", study / "lr",
                                            "--models", "ReLU").stdout, "model")]
    assert three == ["ReLU (width 16, lr 0.001)", "ReLU (width 24, lr 0.001)", "ReLU (width 16, lr 0.002)"]
    shutil.copytree(study / "w16", tmp_path / "again")
    same = [row[0] for row in rows(distrep("compare", study / "w16", tmp_path / "again").stdout, "model")]
    assert same == [f"ReLU [{study / 'w16'}]", f"Abs [{study / 'w16'}]", f"ReLU [{tmp_path / 'again'}]",
                    f"Abs [{tmp_path / 'again'}]"]


def test_pairing_needs_paired_designs_the_same_seeds_and_the_same_first_layer(study):
    groups = {g.label: g for g in read_groups([study / "w16", study / "w24"])}
    relu16, abs16, relu24 = (groups[k] for k in ("ReLU (width 16)", "Abs (width 16)", "ReLU (width 24)"))
    assert pairs_run_by_run(relu16, abs16) and not pairs_run_by_run(relu16, relu24)
    from dataclasses import replace
    assert not pairs_run_by_run(relu16, replace(abs16, seeds=(1, 2, 3)))
    assert not pairs_run_by_run(relu16, replace(abs16, paired_design=False))
    assert not pairs_run_by_run(relu16, replace(abs16, dataset="fashion-mnist"))


def test_bad_requests_are_one_line_errors(study, tmp_path):
    assert_one_line_error(distrep("compare", study / "w16", study / "w16"), "named twice")
    assert_one_line_error(distrep("compare", study / "w16", "--models", "ReLU2"),
                          "no experiment here holds ReLU2")
    assert_one_line_error(distrep("compare", study / "w16", tmp_path / "none"),
                          "holds no finished experiment (no such directory)")
    with pytest.raises(DistrepError, match=re.escape("unknown model 'nonsense'")):
        read_groups([study / "w16"], ["nonsense"])
    assert not (tmp_path / "none").exists()


def test_out_names_a_file(study, tmp_path):
    assert_one_line_error(distrep("compare", study / "w16", "--out", tmp_path),
                          f"--out {tmp_path} is a directory; name the file to write")


def test_a_diverged_run_is_left_out_and_a_short_summary_refused(study, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(study / "w16", exp)
    lines = (exp / "summary.csv").read_text().splitlines()
    header, rows_ = lines[0].split(","), [line.split(",") for line in lines[1:]]
    rows_[0][header.index("diverged")] = "True"               # ReLU's run 0 diverged
    (exp / "summary.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows_)]) + "\n")
    _, models = final_accuracies(exp)
    assert np.isnan(models["ReLU"]["accuracy"][0]) and not np.isnan(models["ReLU"]["accuracy"][1:]).any()
    text = distrep("compare", exp, "--models", "ReLU,Abs").stdout
    assert rows(text, "model")[0][2] == "2 of 3"
    assert rows(text, "a")[0][3].startswith("paired t(1)")     # the pair with the NaN drops out
    (exp / "summary.csv").write_text("\n".join(lines[:-1]) + "\n")     # Abs's last run lost
    assert_one_line_error(distrep("compare", exp), "summary.csv holds 2 runs of Abs, not 3")


def test_what_one_run_cannot_say_is_a_dash(study, tmp_path):
    r = distrep("sweep", "--models", "ReLU", "--runs", 1, "--epochs", 2, "--train-subset", 300,
                "--quiet", "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    text = distrep("compare", tmp_path / "one", study / "w16", "--models", "ReLU").stdout
    assert "nan" not in text
    summary, pair = rows(text, "model")[0], rows(text, "a")[0]
    assert summary[3].endswith("± —") and summary[4] == "—"
    assert pair[3] == "—" and pair[4] == "—" and "[" not in pair[2]


def test_at_an_epoch_two_lengths_of_one_protocol_read_alike(tmp_path):
    """A longer run read at the shorter one's last epoch is that run (same seeds, same steps):
    compare --at-epoch reads each run's test pass there, and names the experiment without one."""
    for name, epochs in [("short", 4), ("long", 8)]:
        r = distrep("sweep", "--models", "ReLU", "--runs", 3, "--epochs", epochs, "--eval-every", 2,
                    "--train-subset", 300, "--quiet", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    text = distrep("compare", tmp_path / "short", tmp_path / "long", "--at-epoch", 4).stdout
    assert text.startswith("# Test accuracy at epoch 4 (%)")
    short, long = rows(text, "model")
    assert (short[0], long[0]) == ("ReLU (epochs 4)", "ReLU (epochs 8)") and short[3:] == long[3:]
    assert rows(text, "a")[0][2:4] == ["+0.00", "—"]          # no difference in any pair of runs
    final = rows(distrep("compare", tmp_path / "short", tmp_path / "long").stdout, "model")
    assert final[1][3] != long[3]                                   # epoch 8 is another reading
    assert_one_line_error(distrep("compare", tmp_path / "short", tmp_path / "long", "--at-epoch", 6),
                          f"--at-epoch 6 is outside {tmp_path / 'short'}'s 1..4 epochs")
    assert_one_line_error(distrep("compare", tmp_path / "short", tmp_path / "long", "--at-epoch", 3),
                          f"{tmp_path / 'short'}: no test pass at epoch 3; tested at 2, 4")


def test_an_experiment_still_training_is_compared_at_an_epoch_its_runs_reached(tmp_path, monkeypatch):
    """An experiment stopped at epoch 4 of 8 (read, as one still training is, from its
    checkpoint) compares at epoch 4 exactly as its finished twin does; read at the end, or past
    epoch 4, it is refused in one line naming the command that reads it."""
    from distrep import sweep as sweep_module
    from distrep.cli import main
    from distrep.progress import progress as real_progress
    args = ["sweep", "--models", "ReLU,Abs", "--runs", "3", "--epochs", "8", "--eval-every", "2",
            "--train-subset", "300", "--quiet", "--checkpoint-every", "0"]
    done, stopped = tmp_path / "done", tmp_path / "stopped"
    assert main([*args, "--out", str(done)]) == 0

    class StopAfter4:                       # the progress bar sees every epoch of every run
        def __init__(self, bar):
            self.bar, self.done = bar, 0

        def update(self, n):
            self.done += n
            if self.done > 4 * 6:           # 2 models x 3 runs in one chunk
                raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.bar, name)

    monkeypatch.setattr(sweep_module, "progress", lambda *a, **k: StopAfter4(real_progress(*a, **k)))
    assert main([*args, "--out", str(stopped)]) == 130
    text = distrep("compare", done, stopped, "--at-epoch", 4).stdout
    assert (f"Unfinished (still training, or stopped), read from its checkpoint, where every run "
            f"has reached epoch 4: {stopped}.") in text
    table = {row[0]: row[2:] for row in rows(text, "model")}
    for model in ("ReLU", "Abs"):
        assert table[f"{model} [{done}]"] == table[f"{model} [{stopped}]"]
    pairs = {(row[0], row[1]): row[2:4] for row in rows(text, "a")}
    assert pairs[(f"ReLU [{done}]", f"ReLU [{stopped}]")] == ["+0.00", "—"]     # every pair of runs alike
    assert_one_line_error(distrep("compare", done, stopped),
                          f"{stopped}: training stopped at epoch 4 of 8 (rerun its command to "
                          f"resume); `distrep compare {done} {stopped} --at-epoch 4` reads it where it is")
    assert_one_line_error(distrep("compare", done, stopped, "--at-epoch", 6),
                          f"--at-epoch 6: {stopped}'s training stopped at epoch 4 of 8")
    assert_one_line_error(distrep("compare", done, stopped, "--at-epoch", 3),
                          f"{done}: no test pass at epoch 3; tested at 2, 4, 6, 8")
