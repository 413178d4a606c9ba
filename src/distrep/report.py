"""The experiment report: ``report.md``, a self-contained ``report.html`` and ``table.tex``,
built from the files in an experiment directory alone (``distrep report DIR``)."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from distrep import stats
from distrep.paper import TABLE_EPOCHS, paper_value
from distrep.plots import _log_y, save_figure
from distrep.storage import atomic_write_bytes, read_arrays, read_json

FIGURES = {"curves": "figures/test_error_curves.png", "final": "figures/final_accuracy.png"}


def load_experiment(directory: Path) -> dict:
    """Config, run state and per-model arrays of a finished experiment directory."""
    directory = Path(directory)
    for needed in ("config.json", "summary.csv", "run.json"):
        if not (directory / needed).exists():
            raise FileNotFoundError(f"{directory / needed} is missing: is the experiment finished?")
    config = read_json(directory / "config.json")
    with open(directory / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    models = [m["name"] for m in config["models"]]
    metrics = {m: read_arrays(directory / "models" / m / "metrics.npz") for m in models}
    return {"config": config, "run": read_json(directory / "run.json"), "rows": rows,
            "models": models, "metrics": metrics}


# --------------------------------------------------------------------------- figures

def plot_curves(metrics: dict[str, dict], ax=None):
    """Test error (%) against epoch per model: mean over runs, band of ± one std."""
    ax = ax or plt.figure().add_subplot()
    for name, m in metrics.items():
        err = 100 * (1 - m["test_acc"])                       # [runs, k]
        mu, sd = np.nanmean(err, 0), np.nanstd(err, 0)
        line, = ax.plot(m["test_epochs"], mu, label=name)
        ax.fill_between(m["test_epochs"], np.clip(mu - sd, 1e-2, None), mu + sd,
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test error (%)", title="test error, mean ± std over runs")
    _log_y(ax)
    ax.legend(fontsize=8, ncol=2)
    return ax


def plot_final(metrics: dict[str, dict], ax=None):
    """Final test accuracy of every run (points) with each model's box plot."""
    ax = ax or plt.figure().add_subplot()
    names = list(metrics)
    values = [100 * metrics[n]["final_test_acc"] for n in names]
    ax.boxplot(values, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)                             # fixed jitter: same picture each time
    for i, v in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=12, alpha=0.7, zorder=3)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set(ylabel="final test accuracy (%)", title="final test accuracy per run")
    ax.grid(True, axis="y", alpha=0.3)
    return ax


# --------------------------------------------------------------------------- tables

def summary_rows(exp: dict) -> list[dict]:
    out = []
    for name in exp["models"]:
        m = exp["metrics"][name]
        s = stats.summarize(100 * m["final_test_acc"])
        paper = paper_value(name)
        out.append({"model": name, **s, "diverged": int((m["diverged_epoch"] > 0).sum()),
                    "paper": paper})
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "—" if np.isnan(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def main_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "mean", "std", "std (pop.)", "95% CI", "n", "min", "max", "diverged",
            "paper mean ± std", "Δ mean"]
    body = []
    for r in rows:
        paper = r["paper"]
        body.append([r["model"], _fmt(r["mean"]), _fmt(r["std"]), _fmt(r["std_pop"]),
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", str(r["n"]), _fmt(r["min"]),
                     _fmt(r["max"]), str(r["diverged"]),
                     f"{paper[1]:.2f} ± {paper[2]:.2f} ({paper[0]})" if paper else "—",
                     f"{r['mean'] - paper[1]:+.2f}" if paper else "—"])
    return head, body


def comparison_table(exp: dict) -> tuple[list[str], list[list[str]]]:
    paired = "paired" in exp["config"]["design"]
    values = {n: 100 * exp["metrics"][n]["final_test_acc"] for n in exp["models"]}
    head = ["A", "B", "Δ mean", "Student t (df)", "p", "p Holm", "Welch t (df)", "p", "p Holm",
            "Cohen's d"]
    if paired:
        head += ["paired t (df)", "p", "p Holm", "d_z"]
    body = []
    for r in stats.pairwise(values, paired):
        st, we = r["student"], r["welch"]
        row = [r["a"], r["b"], f"{r['diff']:+.2f}", f"{st.t:.2f} ({st.df:.0f})", _p(st.p),
               _p(r["student_holm"]), f"{we.t:.2f} ({we.df:.1f})", _p(we.p), _p(r["welch_holm"]),
               _fmt(r["d"])]
        if paired:
            pt = r["paired"]
            row += [f"{pt.t:.2f} ({pt.df:.0f})", _p(pt.p), _p(r["paired_holm"]), _fmt(r["dz"])]
        body.append(row)
    return head, body


def latex_table(rows: list[dict]) -> str:
    lines = [r"\begin{tabular}{lrrrr}", r"\toprule",
             r"Model & Mean (\%) & Std & 95\% CI & $n$ \\", r"\midrule"]
    for r in rows:
        lines.append(f"{r['model']} & {r['mean']:.2f} & {r['std']:.2f} & "
                     f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] & {r['n']} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def protocol_lines(exp: dict) -> list[str]:
    c, cfg = exp["config"], exp["config"]["config"]
    n = cfg["train_subset"] or 60000
    lines = [
        f"dataset: {cfg['dataset']}, {n} training images, full test set",
        f"preprocessing: {cfg['preprocess']}" + (" (pixel values 0–255, as the author's code trained)"
                                                  if cfg["preprocess"] == "raw" else
                                                  " (training-set mean and std, as the paper's text says)"),
        f"OffsetL2 form: {cfg['offsetl2_form']}",
        f"optimizer: full-batch SGD, lr {cfg['lr']}, {cfg['epochs']} epochs, width {cfg['width']}",
        f"runs per model: {cfg['runs']}; seeds: " + "; ".join(
            f"{m['name']} {m['seeds'][0]}…{m['seeds'][-1]}" for m in c["models"]),
        f"design: {c['design']}",
        f"precision: {cfg['precision']}; device: {c['device']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in c["versions"].items()),
        f"wall time: {exp['run']['wall_time_s']:.0f} s",
        "test accuracy is measured on the final parameters; std is the sample value (ddof 1), "
        "'std (pop.)' the population value the author's code printed",
    ]
    epochs = {TABLE_EPOCHS[r["paper"][0]] for r in summary_rows(exp) if r["paper"]}
    if epochs and (epochs != {cfg["epochs"]} or n != 60000 or cfg["runs"] != 20):
        lines.append("this protocol differs from the paper's (20 runs, 60,000 images, "
                     f"{'/'.join(str(e) for e in sorted(epochs))} epochs): compare the paper's "
                     "numbers with care")
    return lines


def dead_unit_table(census: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], list[list[str]]]:
    """Percent of a layer's units never active / active on < 1 % / < 5 % of inputs, mean ± std
    over runs, per model, split and rectifying layer."""
    head = ["model", "data", "layer", "units", "never active (%)", "active < 1 % (%)",
            "active < 5 % (%)"]
    body = []
    for model, arrays in census.items():
        keys = sorted({k.rsplit("/", 1)[0] for k in arrays}, key=lambda k: (k.split("/")[0] != "train", k))
        for key in keys:
            split, layer = key.split("/")
            units = arrays[f"{key}/units"][0]
            cells = [f"{100 * arrays[f'{key}/{c}'].mean() / units:.1f} ± "
                     f"{100 * arrays[f'{key}/{c}'].std(ddof=1) / units if len(arrays[f'{key}/{c}']) > 1 else 0:.1f}"
                     for c in ("never", "below_1%", "below_5%")]
            body.append([model, split, layer.replace("layer", "layer "), str(units), *cells])
    return head, body


DEAD_NOTE = ("A unit of a rectifying layer (ReLU or Abs, hidden or output) is active on an input "
             "when its output is non-zero. Both 'rarely active' definitions are shown: < 1 % of "
             "inputs (the author's code) and < 5 % (the paper). Layer numbers index the model's "
             "layer list (layer 1: the hidden activation; layer 3: an output activation).")


# --------------------------------------------------------------------------- writers

def _md_table(head, body) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(row) + " |" for row in body)])


def _html_table(head, body) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>"


TESTS_NOTE = ("Every pair of models is compared on final test accuracy (%) with Student's "
              "unpaired t-test (pooled variance; the test the author's code ran), Welch's "
              "unpaired t-test, and, for the paired design, the paired t-test over matched runs "
              "(run i of both models started from the same first-layer weights). Holm's "
              "correction is applied across all pairs, separately for each test. Cohen's d uses "
              "the pooled std; d_z is the mean paired difference over its std.")


def write_report(directory) -> dict[str, Path]:
    """Write figures, ``report.md``, ``report.html`` and ``table.tex`` into ``directory``."""
    directory = Path(directory)
    exp = load_experiment(directory)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    plot_curves(exp["metrics"], ax)
    save_figure(fig, directory / FIGURES["curves"])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(exp["models"])), 4.5), layout="constrained")
    plot_final(exp["metrics"], ax)
    save_figure(fig, directory / FIGURES["final"])

    rows = summary_rows(exp)
    main, comparisons = main_table(rows), comparison_table(exp)
    latex = latex_table(rows)
    protocol = protocol_lines(exp)
    title = f"distrep experiment: {exp['config'].get('preset', 'sweep')}"
    from distrep.analysis import load_dead_units
    census = load_dead_units(directory)
    dead = dead_unit_table(census) if census else None

    md = "\n".join([
        f"# {title}", "", "## Test accuracy (%)", "", _md_table(*main), "",
        "## Pairwise comparisons", "", TESTS_NOTE, "", _md_table(*comparisons), "",
        "## Learning curves", "", f"![test error curves]({FIGURES['curves']})", "",
        "## Final accuracy per run", "", f"![final accuracy]({FIGURES['final']})", "",
        *(["## Dead and rarely active units", "", DEAD_NOTE, "", _md_table(*dead), ""] if dead else []),
        "## Protocol", "", *(f"- {line}" for line in protocol), "",
        "## LaTeX", "", "```latex", latex.rstrip(), "```", ""])

    def image(key):
        data = base64.b64encode((directory / FIGURES[key]).read_bytes()).decode()
        return f'<img alt="{key}" src="data:image/png;base64,{data}">'

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child, td:nth-child(2) {{ text-align: left; }}
thead {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Test accuracy (%)</h2>{_html_table(*main)}
<h2>Pairwise comparisons</h2><p>{html.escape(TESTS_NOTE)}</p>{_html_table(*comparisons)}
<h2>Learning curves</h2>{image("curves")}
<h2>Final accuracy per run</h2>{image("final")}
{f"<h2>Dead and rarely active units</h2><p>{html.escape(DEAD_NOTE)}</p>{_html_table(*dead)}" if dead else ""}
<h2>Protocol</h2><ul>{"".join(f"<li>{html.escape(line)}</li>" for line in protocol)}</ul>
<h2>LaTeX</h2><pre>{html.escape(latex)}</pre>
</body></html>
"""
    paths = {"md": directory / "report.md", "html": directory / "report.html",
             "tex": directory / "table.tex"}
    atomic_write_bytes(paths["md"], md.encode())
    atomic_write_bytes(paths["html"], page.encode())
    atomic_write_bytes(paths["tex"], latex.encode())
    return paths
