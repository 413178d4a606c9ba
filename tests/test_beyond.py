"""The study beyond the paper: its claims, its presets and the report over both datasets."""

import os
from pathlib import Path

import numpy as np
import pytest

from distrep.claims import BEYOND_CLAIMS, BASELINES, DISTANCE_HEADS, DISTANCE_TWINS, verdicts
from distrep.reproduce import BEYOND_MODELS, GROUPS, resolve_preset
from tests.test_cli import assert_one_line_error, distrep

needs_fashion = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                   reason="Debian's dataset-fashion-mnist is not installed")


def _runs(mean: float, std: float, seed: int, n: int = 10) -> np.ndarray:
    return mean + std * np.random.default_rng(seed).standard_normal(n)


def _study(twin_gap: float, head_spread: float) -> dict[str, np.ndarray]:
    """Accuracies of every model in the study: distance twins ``twin_gap`` points above their
    intensity twins, heads 2 points above the best baseline with std ``head_spread``."""
    values = {m: _runs(90.0, 0.5, i) for i, m in enumerate(BASELINES)}
    for k, (distance, intensity) in enumerate(DISTANCE_TWINS):
        values.setdefault(intensity, _runs(90.0, 0.5, 100 + k))
        values[distance] = values[intensity] + twin_gap + 0.05 * np.random.default_rng(k).standard_normal(10)
    for k, head in enumerate(h for heads in DISTANCE_HEADS.values() for h in heads):
        values[head] = _runs(93.0, head_spread, 200 + k)
    return values


def test_the_study_claims_read_as_stated():
    by_text = lambda vs: {v.claim.text: v.verdict for v in vs}          # noqa: E731
    good = by_text(verdicts(_study(twin_gap=0.0, head_spread=0.1), True, BEYOND_CLAIMS))
    assert set(good.values()) == {"holds"}, good
    # a distance twin significantly below its intensity twin breaks the first claim only
    low = by_text(verdicts(_study(twin_gap=-1.0, head_spread=0.1), True, BEYOND_CLAIMS))
    assert low[BEYOND_CLAIMS[0].text] == "does not hold"
    assert low[BEYOND_CLAIMS[1].text] == "holds"
    # better on average but with more spread than the baselines: 'less spread' fails
    wide = by_text(verdicts(_study(twin_gap=0.5, head_spread=1.0), True, BEYOND_CLAIMS))
    assert wide[BEYOND_CLAIMS[0].text] == "holds"
    assert all(wide[c.text] == "does not hold" for c in BEYOND_CLAIMS[1:])


def test_beyond_presets_cover_the_paper_models_and_heads_on_both_datasets():
    for group in ("beyond", "beyond-quick"):
        configs = [resolve_preset(p, {}) for p in GROUPS[group].values()]
        assert [c.dataset for c in configs] == ["mnist", "fashion-mnist"]
        assert all(c.models == BEYOND_MODELS and c.paired for c in configs)
    assert {"ReLU-RBF-Neg", "ReLU-Mahalanobis-Neg", "ReLU-GMLVQ-Neg", "ReLU-Cosine",
            "ReLU2-Neg", "Abs-L2-Neg"} <= set(BEYOND_MODELS)


def test_a_group_refuses_one_dataset_for_all(tmp_path):
    r = distrep("reproduce", "beyond-quick", "--dataset", "mnist", "--out", tmp_path / "x")
    assert_one_line_error(r, "--dataset", "beyond-quick-mnist")
    assert not (tmp_path / "x").exists()


def test_a_missing_dataset_stops_the_group_before_it_trains(tmp_path, mnist):
    """MNIST in the cache, Fashion-MNIST absent and nothing to fetch it from: one line naming
    it and the command that fetches it, before the MNIST member trains."""
    import shutil
    from distrep.data import MNIST, cache_dir
    shutil.copytree(cache_dir(MNIST), tmp_path / "cache" / "mnist")
    env = {"DISTREP_DATA": str(tmp_path / "cache"), "DISTREP_OFFLINE": "1"}
    r = distrep("reproduce", "beyond-quick", "--out", tmp_path / "x", "--epochs", 2, env=env)
    assert_one_line_error(r, "dataset fashion-mnist is not in the cache", "distrep data fetch fashion-mnist")
    assert not (tmp_path / "x").exists()


@needs_fashion
def test_beyond_quick_reports_both_datasets(tmp_path, mnist):
    out = tmp_path / "study"
    r = distrep("reproduce", "beyond-quick", "--out", out, "--runs", 2, "--epochs", 4,
                "--train-subset", 200, "--eval-every", 2, "--quiet")
    assert r.returncode == 0, r.stderr
    for dataset in ("mnist", "fashion-mnist"):
        member = (out / dataset / "report.md").read_text()
        assert f"dataset: {dataset}," in member
        assert "The paper's two claims, beyond the paper" in member
    report = (out / "report.md").read_text()
    table = report.split("## Test accuracy (%), final")[1].split("\n## ")[0]
    assert "| model | mnist | fashion-mnist |" in table
    for model in BEYOND_MODELS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {model} |"))
        assert row.count("±") + row.count("diverged") >= 2, row
    for dataset in ("mnist", "fashion-mnist"):
        section = report.split(f"## {dataset}: The paper's two claims")[1].split("\n## ")[0]
        for claim in BEYOND_CLAIMS:
            row = next(line for line in section.splitlines() if line.startswith(f"| {claim.text} |"))
            assert row.rstrip(" |").split("| ")[-1].split(" (")[0] in ("holds", "does not hold",
                                                                       "not comparable"), row
    assert (out / "report.html").exists() and (out / "figures/final_accuracy.png").exists()


@needs_fashion
def test_gpu_data_packs_both_datasets_for_a_machine_without_a_network(tmp_path, mnist):
    """scripts/gpu-data.sh DIR: each dataset's four idx files gzipped under DIR/<name>, what the
    GPU scripts read with `distrep data fetch --from` (verified there: the same bytes as the
    cache)."""
    import gzip
    import subprocess
    import sys
    from distrep.data import FASHION_MNIST, MNIST, cache_dir
    script = Path(__file__).parent.parent / "scripts" / "gpu-data.sh"
    env = {**os.environ, "DISTREP": str(Path(sys.executable).with_name("distrep"))}
    r = subprocess.run(["bash", str(script), str(tmp_path / "d")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and "ready:" in r.stdout, r.stderr
    for spec in (MNIST, FASHION_MNIST):
        packed = sorted((tmp_path / "d" / spec.name).iterdir())
        assert [p.name for p in packed] == sorted(f.name + ".gz" for f in cache_dir(spec).iterdir())
        for p in packed:
            assert gzip.decompress(p.read_bytes()) == (cache_dir(spec) / p.name.removesuffix(".gz")).read_bytes()
