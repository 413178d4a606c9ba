"""The experiment report: ``report.md``, a self-contained ``report.html`` and ``table.tex``,
built from the files in an experiment directory alone (``distrep report DIR``)."""

from __future__ import annotations

import base64
import html
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from distrep import stats
from distrep.errors import DistrepError
from distrep.models import create_model
from distrep.claims import BEYOND_CLAIMS, CLAIMS, claims_for, verdicts
from distrep.paper import CLAMP_DROPOFF, DISCREPANCIES, RUNS, match, run_protocol
from distrep.plots import (_log_y, figure_label, legend_width, line_style, model_legend, plot_clamping,
                           plot_first_layer, plot_hyperplanes, plot_per_run, plot_prototypes, save_figure)
from distrep.storage import atomic_write_bytes, read_arrays, read_json, read_tensors
from distrep.sweep import model_dir, results_dir

FIGURES = {"curves": "figures/test_error_curves.png", "final": "figures/final_accuracy.png",
           "pairs": "figures/pairs.png", "clamping": "figures/clamping.png"}


METRIC_ARRAYS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_epochs",
                 "final_test_acc", "diverged_epoch")


def load_experiment(directory: Path) -> dict:
    """Config, run state and per-model arrays of an experiment directory; a missing, damaged or
    ill-formed file is a one-line :class:`DistrepError` naming it. A finished experiment is read
    from its result files; one whose training stopped before the end (killed, out of time) from
    its checkpoint, with ``reached`` the epoch every run has passed (its reading is an interim
    one: :func:`write_report` needs ``at_epoch`` for it)."""
    directory = Path(directory)
    for needed in ("config.json", "run.json"):
        if not (directory / needed).exists():
            raise DistrepError(f"{directory / needed} is missing: is this an experiment directory?")
    config, run = read_json(directory / "config.json"), read_json(directory / "run.json")
    try:
        models = [m["name"] for m in config["models"]]
        for key in ("paired", "epochs", "runs", "train_subset", "dataset", "preprocess", "width",
                    "offsetl2_form", "lr", "precision", "eval_every"):
            config["config"][key]
        config["design"], config["versions"].items(), config["device"]
        if run.get("finished"):
            float(run["wall_time_s"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DistrepError(f"{directory / 'config.json'} or run.json is not a distrep experiment "
                           f"record (missing or bad {e})") from None
    specs = {m["name"]: m["spec"] for m in config["models"]}
    epochs = int(config["config"]["epochs"])
    if not run.get("finished"):
        metrics, reached, wall = checkpoint_metrics(directory, models, config["config"])
        return {"config": config, "run": {**run, "wall_time_s": wall}, "models": models, "metrics": metrics,
                "specs": specs, "reached": reached}
    if not (directory / "summary.csv").exists():
        raise DistrepError(f"{directory / 'summary.csv'} is missing; rerun the experiment's "
                           f"command to rebuild it from the checkpoint")
    metrics = {}
    for m in models:
        path = results_dir(directory, m) / "metrics.npz"
        metrics[m] = read_arrays(path)
        absent = [key for key in METRIC_ARRAYS if key not in metrics[m]]
        if absent:
            raise DistrepError(f"{path} lacks {', '.join(absent)}: not the file distrep wrote")
    return {"config": config, "run": run, "models": models, "metrics": metrics, "specs": specs,
            "reached": epochs}


def checkpoint_metrics(directory: Path, models: list[str], cfg: dict) -> tuple[dict, int, float]:
    """Per-model arrays (as in ``metrics.npz``) of an unfinished experiment, read from its
    checkpoint, the epoch every run has reached and the training's wall time so far (s).
    Curves past a run's epoch are NaN."""
    from distrep.sweep import FINAL_KEYS, METRIC_KEYS, read_checkpoint
    from distrep.train import evaluation_epochs
    path = directory / "checkpoint.safetensors"
    if not path.exists():
        raise DistrepError(f"{directory} holds no finished experiment and no checkpoint: "
                           f"training has not started there")
    state = read_checkpoint(path)
    try:
        reached = int(state["epochs_done"].min())
        metrics = {}
        for v, m in enumerate(models):
            metrics[m] = {key: state[f"{v}/{key}"].numpy() for key in METRIC_KEYS + FINAL_KEYS}
            metrics[m].update(test_epochs=evaluation_epochs(int(cfg["epochs"]), int(cfg["eval_every"])),
                              diverged_epoch=state["diverged_epoch"][v].numpy())
    except (KeyError, IndexError) as e:
        raise DistrepError(f"{path} does not hold this experiment's state ({e})") from None
    return metrics, reached, float(state["wall_time_s"])


# --------------------------------------------------------------------------- figures

def plot_curves(metrics: dict[str, dict], ax=None, until: int | None = None):
    """Test error (%) against epoch per model (up to epoch ``until``): mean over runs, band of
    ± one std."""
    ax = ax or plt.figure().add_subplot()
    for i, (name, m) in enumerate(metrics.items()):
        keep = m["test_epochs"] <= (until or m["test_epochs"].max())
        err = 100 * (1 - m["test_acc"][:, keep])              # [runs, k], NaN where diverged
        with warnings.catch_warnings():                        # an all-NaN column is expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mu, sd = np.nanmean(err, 0), np.nanstd(err, 0)
        line, = ax.plot(m["test_epochs"][keep], mu, line_style(i), label=figure_label(name))
        ax.fill_between(m["test_epochs"][keep], np.clip(mu - sd, 1e-2, None), mu + sd,
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test error (%)", title="test error, mean ± std over runs")
    _log_y(ax)
    model_legend(ax, len(metrics))
    return ax


def plot_final(metrics: dict[str, dict], ax=None, epoch: int | None = None):
    """Test accuracy of every run that had not diverged (points), final or at ``epoch``, with
    each model's box plot."""
    when = "final" if epoch is None else f"epoch {epoch:,}"
    return plot_per_run({name: accuracy_at(m, epoch) for name, m in metrics.items()},
                        f"test accuracy, {when} (%)", f"test accuracy per run, {when}", ax)


def plot_pairs(pairs: list[dict], models: list[str], paired: bool):
    """Heat map of every pair's effect size, row minus column (d_z if ``paired``, else Cohen's
    d), * where the (paired, else Welch) test is significant after Holm's correction."""
    k = len(models)
    index = {m: i for i, m in enumerate(models)}
    effect, star = np.full((k, k), np.nan), np.zeros((k, k), bool)
    key, test = ("dz", "paired") if paired else ("d", "welch")
    for r in pairs:
        i, j = index[r["a"]], index[r["b"]]
        e = r.get(key, np.nan)
        effect[i, j], effect[j, i] = e, -e if np.isfinite(e) else e
        star[i, j] = star[j, i] = r.get(f"{test}_holm", np.nan) < 0.05
    # room for the rotated model names below and the names on the left, at ~0.06 in a character
    labels = [figure_label(m) for m in models]
    room = 0.06 * max(len(m) for m in labels)
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * k + room, 1.4 + 0.5 * k + 0.75 * room),
                           layout="constrained")
    finite = np.abs(effect[np.isfinite(effect)])
    limit = min(float(finite.max()), 10.0) if finite.size else 1.0
    image = ax.imshow(np.clip(effect, -limit, limit), cmap="RdBu_r", vmin=-limit, vmax=limit)
    for i in range(k):
        for j in range(k):
            if np.isfinite(effect[i, j]):
                dark = abs(effect[i, j]) > 0.6 * limit
                ax.text(j, i, f"{effect[i, j]:.1f}" + ("*" if star[i, j] else ""), ha="center",
                        va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    fig.colorbar(image, ax=ax, label=("d_z" if paired else "Cohen's d") + " (row − column)")
    ax.set_title("effect size of every pair (* significant, Holm)", fontsize=9)
    return fig


# --------------------------------------------------------------------------- tables

def accuracy_at(m: dict, epoch: int | None = None) -> np.ndarray:
    """Test accuracy (%) per run ``[runs]`` at ``epoch`` (None: of the final parameters), NaN
    for a run that had diverged by then: its "accuracy" is that of a constant prediction and
    belongs in no mean, spread or test. A test pass must exist at ``epoch``."""
    gone = (m["diverged_epoch"] > 0) & (m["diverged_epoch"] <= (epoch or np.inf))
    return np.where(gone, np.nan, recorded_accuracy(m, epoch))


def recorded_accuracy(m: dict, epoch: int | None = None) -> np.ndarray:
    """Test accuracy (%) per run as recorded at ``epoch`` (None: final), diverged runs included."""
    if epoch is None:
        return 100 * m["final_test_acc"]
    k = np.flatnonzero(m["test_epochs"] == epoch)
    if len(k) == 0:
        raise DistrepError(f"no test pass at epoch {epoch}; tested at "
                           f"{_epoch_list(m['test_epochs'])}")
    return 100 * m["test_acc"][:, k[0]]


def final_accuracy(m: dict) -> np.ndarray:
    return accuracy_at(m, None)


def _epoch_list(epochs: np.ndarray) -> str:
    e = [int(x) for x in epochs]
    return ", ".join(map(str, e)) if len(e) <= 6 else f"{e[0]}, {e[1]}, …, {e[-1]} ({len(e)} epochs)"


def summary_rows(exp: dict, epoch: int | None = None) -> list[dict]:
    """Per model: statistics over the runs that finished (by ``epoch``), how many diverged,
    (labelled apart) the mean and std over all runs, and the published number put beside it
    (:func:`distrep.paper.match`), with a Welch test against it where it is comparable."""
    cfg = exp["config"]["config"]
    out = []
    for name in exp["models"]:
        m = exp["metrics"][name]
        acc = accuracy_at(m, epoch)
        s = stats.summarize(acc[~np.isnan(acc)])
        every = recorded_accuracy(m, epoch)
        found = match(run_protocol(exp["specs"][name], cfg, epoch))
        versus = None
        if found is not None and found.comparable:
            p = found.number
            versus = stats.welch_from_stats(s["mean"], s["std"], s["n"], p.mean,
                                            p.std * np.sqrt(RUNS / (RUNS - 1)), RUNS)
        out.append({"model": name, **s, "diverged": int(np.isnan(acc).sum()), "runs": len(acc),
                    "all_mean": stats.mean(every), "all_std": stats.std(every),
                    "published": found, "versus": versus})
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "—" if np.isnan(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def main_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "mean", "std", "std (pop.)", "95% CI", "n", "min", "max", "diverged",
            "all runs, diverged included: mean ± std", "published (as printed)", "Δ mean",
            "Welch t vs published (p)", "comparable?"]
    body = []
    for r in rows:
        found = r["published"]
        if found is None:
            published, delta, test, why = "—", "—", "—", "no published number"
        else:
            p = found.number
            published = f"{p.mean:.2f} ± {p.std:.2f} ({p.table}, {p.label})"
            if found.comparable:
                v = r["versus"]
                delta, test, why = f"{r['mean'] - p.mean:+.2f}", f"{v.t:.2f} ({_p(v.p)})", "yes"
            else:
                delta, test, why = "—", "—", "no: " + "; ".join(found.reasons)
        body.append([r["model"], _fmt(r["mean"]), _fmt(r["std"]), _fmt(r["std_pop"]),
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", str(r["n"]), _fmt(r["min"]),
                     _fmt(r["max"]), str(r["diverged"]),
                     f"{_fmt(r['all_mean'])} ± {_fmt(r['all_std'])}" if r["diverged"] else "(same)",
                     published, delta, test, why])
    return head, body


MAIN_NOTE = ("Statistics over the runs that finished; a diverged run's accuracy (a constant "
             "prediction's) is left out and shown only in the all-runs column. A published "
             "number is compared (Δ, and Welch's t against its mean and std, taken as the "
             "population std of 20 runs the author's code printed) only where the protocol that "
             "produced it matches this run's in every field that changes results (model with "
             "its output bias, epochs, dataset, preprocessing, lr, width, training images, "
             "OffsetL2 form); otherwise the column says what differs. Which protocol produced "
             "each published number, and the evidence, is in the section on discrepancies.")


def comparison_values(exp: dict, epoch: int | None = None) -> dict[str, np.ndarray]:
    return {n: accuracy_at(exp["metrics"][n], epoch) for n in exp["models"]}


def comparison_table(exp: dict, epoch: int | None = None) -> tuple[list[str], list[list[str]]]:
    paired = is_paired(exp)
    values = comparison_values(exp, epoch)
    head = ["A", "B", "Δ mean", "bootstrap 95% CI", "Student t (df)", "p", "p Holm", "Welch t (df)",
            "p", "p Holm", "Cohen's d"]
    if paired:
        head += ["paired t (df)", "p", "p Holm", "d_z"]
    head += ["Wilcoxon p" if paired else "Mann-Whitney p", "p Holm", "P(A > B)"]
    body = []
    for r in stats.pairwise(values, paired):
        st, we, ci = r["student"], r["welch"], r["bootstrap"]
        row = [r["a"], r["b"], _signed(r["diff"]), f"[{_signed(ci[0])}, {_signed(ci[1])}]",
               f"{st.t:.2f} ({st.df:.0f})", _p(st.p), _p(r["student_holm"]),
               f"{we.t:.2f} ({we.df:.1f})", _p(we.p), _p(r["welch_holm"]), _fmt(r["d"])]
        if paired:
            pt = r["paired"]
            row += [f"{pt.t:.2f} ({pt.df:.0f})", _p(pt.p), _p(r["paired_holm"]), _fmt(r["dz"])]
        row += [_p(r["rank"].p), _p(r["rank_holm"]), _fmt(r["p_improve"])]
        body.append(row)
    return head, body


def _signed(x: float) -> str:
    return "—" if np.isnan(x) else f"{x:+.2f}"


def is_paired(exp: dict) -> bool:
    """Whether run i of every model started from the same first-layer weights (config field)."""
    return bool(exp["config"]["config"]["paired"])


def claims_section(exp: dict, epoch: int | None = None) -> "Section":
    """The claims the experiment's preset tests (:func:`distrep.claims.claims_for`), one row
    each: the claim, what the paper printed, what these runs show (at ``epoch``, default the
    final parameters), the verdict; titled by which claims they are."""
    beyond = claims_for(exp["config"].get("preset")) is BEYOND_CLAIMS
    head = ["the claim" if beyond else "the paper's claim", "the paper printed", "these runs", "verdict"]
    body = [[v.claim.text, v.claim.printed, v.ours, v.verdict + (f" ({v.why})" if v.why else "")]
            for v in verdicts(comparison_values(exp, epoch), is_paired(exp),
                              BEYOND_CLAIMS if beyond else CLAIMS)]
    return Section("The paper's two claims, beyond the paper" if beyond else "The paper's claims",
                   BEYOND_NOTE if beyond else CLAIMS_NOTE, (head, body))


CLAIMS_NOTE = ("Each claim of the paper's results, tested on this experiment's runs at the reading "
               "named in the title: the paired t-test where the design is paired (else Welch's), "
               "the effect size, a rank test (Wilcoxon signed-rank / Mann-Whitney U) and a "
               "bootstrap 95 % interval of the difference. A claim of no difference 'holds' when "
               "the t-test finds none at the 5 % level (which is not proof of equivalence); a "
               "claimed difference holds when it is significant and in the claimed direction. "
               "The paper's statistics come from its own runs (Table 1: 50,000 epochs by the "
               "evidence), compared here only in kind.")


BEYOND_NOTE = ("The paper's two claims put to its own models and to the prior-art distance heads on "
               "this dataset. Distance-style: the class is the output that is small before the "
               "final Neg (ReLU2-Neg, Abs2-Neg, ReLU-L2-Neg, Abs-L2-Neg); each is compared with its "
               "twin without the Neg, and the claim holds when no twin is significantly below. "
               "Explicit distance heads (OffsetL2, RBF, Mahalanobis, GMLVQ) are compared with every "
               "baseline (Table 1's models and the cosine classifier): the claim holds for a pair "
               "when the head is significantly better and its std smaller. Diverged runs are left "
               "out of the tests and counted in the accuracy table. Tests: the paired t-test "
               "where the design is paired (else Welch's) at the 5 % level, beside a rank test "
               "and a bootstrap 95 % interval; 'not significantly below' is not proof of "
               "equivalence.")


def epochs_table(exp: dict, until: int | None = None) -> tuple[list[str], list[list[str]]] | None:
    """Mean ± std test accuracy at 1k, 2k, 5k, 10k, 20k and 50k epochs (those tested, up to
    ``until``, and ``until`` itself): how far each model still moves."""
    tested = set(int(e) for e in exp["metrics"][exp["models"][0]]["test_epochs"])
    marks = [e for e in (1000, 2000, 5000, 10000, 20000, 50000) if e in tested and e <= (until or e)]
    marks += [until] if until is not None and until not in marks else []
    if len(marks) < 2:
        return None
    head = ["model"] + [f"epoch {e:,}" for e in marks]
    body = [[n] + [_pm(accuracy_at(exp["metrics"][n], e), 2) for e in marks] for n in exp["models"]]
    return head, body


def discrepancies_table() -> tuple[list[str], list[list[str]]]:
    head = ["what", "the paper says", "its code or other tables show", "distrep by default", "evidence"]
    return head, [[d.topic, d.paper, d.record, d.distrep, d.evidence] for d in DISCREPANCIES]


def latex_table(rows: list[dict]) -> str:
    lines = [r"\begin{tabular}{lrrrr}", r"\toprule",
             r"Model & Mean (\%) & Std & 95\% CI & $n$ \\", r"\midrule"]
    for r in rows:
        lines.append(f"{r['model']} & {_fmt(r['mean'])} & {_fmt(r['std'])} & "
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] & {r['n']} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def protocol_lines(exp: dict) -> list[str]:
    from distrep.experiment import recorded_data
    c, cfg = exp["config"], exp["config"]["config"]
    n = recorded_data(c)["n_train"]
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
    comparable = [r["model"] for r in summary_rows(exp) if r["published"] and r["published"].comparable]
    lines.append("published numbers compared: " + (", ".join(comparable) if comparable else
                 "none (no published number was produced by this protocol)"))
    return lines


def _pm(x: np.ndarray, digits: int = 1, scale: float = 1.0) -> str:
    """mean ± sample std over runs (NaNs left out); a dash when nothing is left."""
    x = scale * np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return "—"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.{digits}f}"


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
            cells = [_pm(arrays[f"{key}/{c}"], scale=100 / units) for c in ("never", "below_1%", "below_5%")]
            body.append([model, split, layer.replace("layer", "layer "), str(units), *cells])
    return head, body


DEAD_NOTE = ("A unit of a rectifying layer (ReLU or Abs, hidden or output) is active on an input "
             "when its output is non-zero. Both 'rarely active' definitions are shown: < 1 % of "
             "inputs (the author's code) and < 5 % (the paper). Layer numbers index the model's "
             "layer list (layer 1: the hidden activation; layer 3: an output activation).")


def reading(rank_abs: float, classes: int) -> str:
    """Which representation the target's place along the unit suggests."""
    if rank_abs <= 2:
        return "distance (own class nearest 0)"
    if rank_abs >= classes - 1:
        return "intensity (own class farthest from 0)"
    return "neither"


def hyperplane_table(found: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "own class's rank by mean |z| (1 = nearest 0)", "rank by mean z (1 = largest)",
            "own mean |z| / others' mean |z|", "reading"]
    body = []
    for model, h in found.items():
        C = h["class_abs_mean"].shape[2]
        own = np.arange(h["class_abs_mean"].shape[1])
        own_abs = h["class_abs_mean"][:, own, own % C]                           # [R, U]
        others = (h["class_abs_mean"].sum(2) - own_abs) / (C - 1)
        ratio = (own_abs / np.where(others > 0, others, np.nan)).mean(1)
        body.append([model, _pm(h["target_rank_abs"].mean(1), 2), _pm(h["target_rank_signed"].mean(1), 2),
                     _pm(ratio, 2), reading(h["target_rank_abs"].mean(), C)])
    return head, body


HYPERPLANE_NOTE = ("z is an output unit's pre-activation (before any activation or negation after "
                   "the output layer), on the test set. For unit j, its own class is class j. "
                   "Ranks are over the classes' mean values, averaged over units, then mean ± std "
                   "over runs. 'reading' calls a mean |z| rank of at most 2 a distance reading and "
                   "one of at least C − 1 an intensity reading. Figures: run 0 of each model.")


def clamping_table(found: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "unclamped (%)", "floor: half-drop p", "ceiling: half-drop p",
            "one unit, floor 100 %: largest drop (points)", "one unit, ceiling 0 %: largest drop (points)"]
    body = []
    for model, c in found.items():
        drops = [_pm(100 * (c["unit_unclamped"] - c[f"unit_{kind}"][:, :, i].min(1)), 1)
                 for kind, i in (("floor", -1), ("ceiling", 0))]
        body.append([model, _pm(c["unclamped"], 2, 100), _pm(c["floor_half"], 1),
                     _pm(c["ceiling_half"], 1), *drops])
    return head, body


def author_table(found: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], list[list[str]]]:
    """The author's readings beside the numbers in the author's notes and the paper."""
    head = ["model", "unclamped train acc. (%)", "range [min, max]", "floor drop-off p", "notes",
            "ceiling drop-off p", "notes", "equilibrium point (%): mean ± std, median",
            "units without one (%)", "classes mostly below it, per unit", "dead units by layer (never / < 1 %)"]
    body = []
    for model, a in found.items():
        dead = []
        for key in sorted(k for k in a if k.startswith("dead/") and k.endswith("/units")):
            layer = key.split("/")[1]
            units = a[key][0]
            dead.append(f"{layer.replace('layer', 'L')}: {_pm(a[f'dead/{layer}/never'], 0)} / "
                        f"{_pm(a[f'dead/{layer}/below_1%'], 0)} of {units}")
        cells = ["—"] * 9
        if "clamping/floor" in a:
            r = a["clamping/range"]
            cells[:6] = [_pm(a["clamping/unclamped"], 2, 100), f"[{r[:, 0].mean():.3g}, {r[:, 1].mean():.3g}]",
                         _fmt(float(a["clamping/floor_dropoff"]), 0), _fmt(CLAMP_DROPOFF["floor"].get(model), 0),
                         _fmt(float(a["clamping/ceiling_dropoff"]), 0), _fmt(CLAMP_DROPOFF["ceiling"].get(model), 0)]
        if "equilibrium/percentage" in a:
            eq = a["equilibrium/percentage"].ravel()
            mostly = (a["boundaries"][..., 0] >= 0.5).sum(-1).ravel()             # [R * H]
            cells[6:] = [f"{eq.mean():.1f} ± {eq.std():.1f}, {np.median(eq):.1f}",
                         _fmt(100 * (1 - a["equilibrium/met"].mean()), 1),
                         f"{mostly.mean():.1f} ± {mostly.std():.1f} of {a['boundaries'].shape[2]}"]
        body.append([model, *cells, "; ".join(dead)])
    return head, body


AUTHOR_NOTE = ("The author's scripts' own procedures, on the training data, so that the numbers "
               "in the author's notes and the paper can be compared like for like (only this "
               "table carries them). Clamping (analyze_layer_perturbation.py): one level for the "
               "whole hidden layer, p % of the way from the global minimum to the global maximum "
               "over every ReLU and Abs output and, for Abs models, the final output (its hook "
               "also catches the root Model_Abs* module), p = 0…100; the drop-off point is the "
               "first p at which the mean curve over runs has lost half its unclamped accuracy, "
               "as the notes read it off. Equilibrium points (analyze_node_perturbation.py): per "
               "hidden unit, the bisection for the level at which clamping that unit alone from "
               "below and from above gives the same accuracy (within 0.1 points); a unit whose "
               "search fails is set to 0 %, as in the script; mean and std pooled over units and "
               "runs, as the script pools them. Dead units (analyze_dead_nodes.py): |a| > 1e-6 "
               "on no input / on fewer than 1 % of inputs, per Linear, ReLU, Abs and Neg output "
               "(layer index in the model's layer list). The paper reports for ReLU2's output "
               "layer 33 % never active and 53.5 % active on < 5 % of inputs (an earlier note: "
               "22 %, < 1 %). Class shares (analyze_feature_boundaries.py): for each hidden unit, "
               "the share of each class's training examples at or below its equilibrium point; "
               "the column counts the classes with at least half their examples below (1: the "
               "unit singles out one class, as a distance to a prototype would; C/2: a plain "
               "split). Arrays: analysis/<model>/author.npz.")


CLAMP_NOTE = ("distrep's own reading: every hidden unit is clamped to a floor max(a, L_p) or a "
              "ceiling min(a, L_p) with L_p p % of the way from the unit's own minimum to its "
              "maximum on the test set (p = 0…100). The half-drop p is where test accuracy first "
              "falls to half its unclamped value, coming from the side where the clamp does "
              "nothing (p = 0 for a floor, p = 100 for a ceiling), interpolated; — where it never "
              "does. This is not the author's procedure, so the paper's drop-off points are not "
              "shown here but beside the author's reading below. The last two columns clamp one unit "
              "at a time (on the first test examples) and report the largest accuracy loss any "
              "single unit causes.")


def prototype_table(found: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "rank of mu_c seen from class c's mean (1 = nearest)", "mu_c nearest (%)",
            "mu_c farthest (%)", "rank of class j seen from mu_j (layer's metric)", "(Euclidean)"]
    body = []
    for model, p in found.items():
        seen = p["own_prototype_rank"]
        C = p["weighted_distance"].shape[1]
        body.append([model, _pm(seen.mean(1), 2), _pm((seen == 1).mean(1), 1, 100),
                     _pm((seen == C).mean(1), 1, 100), _pm(p["own_rank"].mean(1), 2),
                     _pm(p["own_rank_euclidean"].mean(1), 2)])
    return head, body


PROTOTYPE_NOTE = ("For OffsetL2 output layers: the distance from each class's mean hidden vector "
                  "m_c (training set) to each prototype mu_j, in the layer's own metric "
                  "sqrt(sum_i w_ji (m_ci - mu_ji)^2) (w = alpha^2, or alpha in the coded form). "
                  "Seen from a class's mean, its own prototype should be the nearest when a Neg "
                  "follows the layer (the logit is minus the distance) and the farthest without "
                  "one. Seen from a prototype, distances to different classes' means mix the "
                  "classes' spreads (the last two columns). Figures: metric weights of run 0, and "
                  "each distance relative to its class's mean distance to all prototypes (blue "
                  "diagonal: prototypes nearest their own class; red: farthest).")

FIRST_LAYER_NOTE = ("What training wrote into run 0's first layer: its weights minus their initial "
                    "values (rebuilt from the run's seed), one image per hidden unit (red > 0 > "
                    "blue, each unit scaled to its largest change). The trained weights themselves "
                    "are these plus the random initialisation, which dominates them in short runs; "
                    "they are in models/<name>/params.safetensors.")


@dataclass
class Section:
    title: str
    note: str = ""
    table: tuple | None = None
    images: list[tuple[str, str]] = field(default_factory=list)     # (alt text, relative path)
    folded: bool = False                                            # folded away in the HTML


def analysis_sections(directory: Path, exp: dict) -> list[Section]:
    """Report sections (and their figures) for whatever ``distrep analyze`` saved."""
    from distrep.analysis import load_analyses
    found = {analysis: {m: by_model[m] for m in exp["models"] if m in by_model}   # the experiment's order
             for analysis, by_model in load_analyses(directory, exp["models"]).items()}
    if not found:
        return []
    from distrep.experiment import recorded_data
    data = recorded_data(exp["config"])
    classes = data["classes"]
    sections = []
    if "dead_units" in found:
        sections.append(Section("Dead and rarely active units", DEAD_NOTE, dead_unit_table(found["dead_units"])))
    if "hyperplanes" in found:
        images = []
        for model, h in found["hyperplanes"].items():
            path = f"figures/hyperplanes_{model_dir(model)}.png"
            fig = plot_hyperplanes(h["hist"][0], h["edges"][0], classes, figure_label(model))
            save_figure(fig, directory / path, dpi=72)
            images.append((f"{model}: class distributions along the output units", path))
        sections.append(Section("Class distributions along the output hyperplanes", HYPERPLANE_NOTE,
                                hyperplane_table(found["hyperplanes"]), images))
    if "clamping" in found:
        save_figure(plot_clamping(found["clamping"]), directory / FIGURES["clamping"], dpi=100)
        sections.append(Section("Activation clamping", CLAMP_NOTE, clamping_table(found["clamping"]),
                                [("clamping curves", FIGURES["clamping"])]))
    if "prototypes" in found:
        images = []
        for model, p in found["prototypes"].items():
            path = f"figures/prototypes_{model_dir(model)}.png"
            fig = plot_prototypes(p["weight"][0], p["weighted_distance"].mean(0), classes, figure_label(model))
            save_figure(fig, directory / path, dpi=90)
            images.append((f"{model}: metric weights and prototype distances", path))
        sections.append(Section("OffsetL2 prototypes", PROTOTYPE_NOTE, prototype_table(found["prototypes"]),
                                images))
    if "author" in found:
        sections.append(Section("The author's readings (training data)", AUTHOR_NOTE,
                                author_table(found["author"])))
    images = []
    cfg = exp["config"]["config"]
    for entry in exp["config"]["models"]:
        model = entry["name"]
        weight = read_tensors(results_dir(directory, model) / "params.safetensors").get("0.weight")
        if weight is None or np.prod(data["image_shape"]) != weight.shape[2]:
            continue
        initial = create_model(entry["spec"], cfg["width"], in_features=weight.shape[2],
                               num_classes=len(classes), offsetl2_form=cfg["offsetl2_form"],
                               seed=entry["seeds"][0])[0].weight.detach()
        path = f"figures/first_layer_{model_dir(model)}.png"
        fig = plot_first_layer((weight[0] - initial).numpy(),
                               f"{figure_label(model)}: first-layer weights, change from initialisation, run 0",
                               tuple(data["image_shape"]))
        save_figure(fig, directory / path, dpi=80)
        images.append((f"{model}: first-layer weights", path))
    if images:
        sections.append(Section("First-layer weights", FIRST_LAYER_NOTE, None, images))
    return sections


# --------------------------------------------------------------------------- writers

def _md_table(head, body) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(row) + " |" for row in body)])


_NUMERIC = re.compile(r"[-+−]?[\d.,]+(e[-+]?\d+)?( ± [\d.,]+)?|—|\[.*\]|[-+]?\d.*\(.*\)|\(same\)")


def _html_table(head, body) -> str:
    """A table whose numbers are right-aligned and words left-aligned."""
    def cell(c: str) -> str:
        kind = ' class="num"' if _NUMERIC.fullmatch(c) else ""
        return f"<td{kind}>{html.escape(c)}</td>"
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>"


STATED_NOTE = ("The same runs read at 5,000 epochs, the number the paper's text states for "
               "Tables 1 and 2 (full-batch SGD is deterministic: a longer run passes through "
               "this state). Beside it the published number nearest this protocol, compared "
               "only where it matches.")
ALONG_NOTE = ("Mean ± std over the runs that had not diverged, at the epochs tested among 1k, 2k, "
              "5k, 10k, 20k and 50k: how far each model still moves.")
PAIRS_NOTE = ("Every pair of models: the effect size of row minus column (d_z over matched runs "
              "in the paired design, else Cohen's d), with * where the difference is significant "
              "after Holm's correction (paired t-test, else Welch's).")
DISCREPANCY_NOTE = ("Each place where the paper's text, its tables and its published code "
                    "disagree, what distrep does by default, and the evidence.")
TESTS_NOTE = ("Every pair of models is compared on final test accuracy (%) with Student's "
              "unpaired t-test (pooled variance; the test the author's code ran), Welch's "
              "unpaired t-test, and, for the paired design, the paired t-test over matched runs "
              "(run i of both models started from the same first-layer weights). Holm's "
              "correction is applied across all pairs, separately for each test. Cohen's d uses "
              "the pooled std; d_z is the mean paired difference over its std. The rank test is "
              "Wilcoxon's signed-rank test on matched runs (paired design) or the Mann-Whitney U "
              "test, for distributions far from normal; P(A > B) is the chance that a run of A "
              "beats one of B, ties counting half (over matched runs where paired, else over "
              "every pair of runs): a mean hides it where a model's runs split into a good and "
              "a failed group. The bootstrap interval resamples runs "
              "(in pairs where paired), 4,999 times, seed 0. Diverged runs "
              "take part in no statistic (their pairs drop out of the paired test); the main "
              "table gives the all-runs mean separately.")


STATED_EPOCHS = 5000       # the epochs the paper's text states for Tables 1 and 2


def check_reading(exp: dict, directory: Path, at_epoch: int | None, command: str) -> None:
    """Refuse (one line) reading the experiment ``exp`` (:func:`load_experiment`) at
    ``at_epoch`` (None: its final parameters) where its runs have not been: an unfinished one
    (training stopped, or still going) reads only at a tested epoch every run has reached, which
    the message names with ``command`` (the command that reads it there, without the option)."""
    epochs, reached = int(exp["config"]["config"]["epochs"]), exp["reached"]
    tested = exp["metrics"][exp["models"][0]]["test_epochs"]
    if reached < epochs:
        last = tested[tested <= reached]
        hint = (f"`{command} --at-epoch {int(last[-1])}` reads it where it is"
                if len(last) else "no test pass has happened yet")
        if at_epoch is None:
            raise DistrepError(f"{directory}: training stopped at epoch {reached:,} of {epochs:,} "
                               f"(rerun its command to resume); {hint}")
        if at_epoch > reached:
            raise DistrepError(f"--at-epoch {at_epoch}: {directory}'s training stopped at epoch "
                               f"{reached:,} of {epochs:,}; {hint}")
    if at_epoch is not None:
        if not 1 <= at_epoch <= epochs:
            raise DistrepError(f"--at-epoch {at_epoch} is outside {directory}'s 1..{epochs} epochs")
        try:
            accuracy_at(exp["metrics"][exp["models"][0]], at_epoch)      # an untested epoch
        except DistrepError as e:
            raise DistrepError(f"{directory}: {e}") from None


def write_report(directory, at_epoch: int | None = None) -> dict[str, Path]:
    """Write figures, ``report.md``, ``report.html`` and ``table.tex`` into ``directory``; with
    ``at_epoch``, the same from the saved state at that epoch (a test pass must exist there)
    as ``report-epoch-N.*`` and ``table-epoch-N.tex``, figures under ``figures/epoch-N/``."""
    directory = Path(directory)
    exp = load_experiment(directory)
    epochs, reached = int(exp["config"]["config"]["epochs"]), exp["reached"]
    check_reading(exp, directory, at_epoch, f"distrep report {shlex.quote(str(directory))}")
    tested = exp["metrics"][exp["models"][0]]["test_epochs"]
    suffix = "" if at_epoch is None else f"-epoch-{at_epoch}"
    figures = {k: v if at_epoch is None else v.replace("figures/", f"figures/epoch-{at_epoch}/")
               for k, v in FIGURES.items()}
    fig, ax = plt.subplots(figsize=(8 + legend_width(len(exp["models"])), 5), layout="constrained")
    plot_curves(exp["metrics"], ax, until=at_epoch)
    save_figure(fig, directory / figures["curves"])
    save_figure(plot_final(exp["metrics"], epoch=at_epoch).figure, directory / figures["final"])
    pairs = stats.pairwise(comparison_values(exp, at_epoch), is_paired(exp))
    if pairs:                                       # one model: no pair to compare or picture
        save_figure(plot_pairs(pairs, exp["models"], is_paired(exp)), directory / figures["pairs"])

    reading = "final" if at_epoch is None or at_epoch == epochs else f"epoch {at_epoch:,}"
    rows = summary_rows(exp, at_epoch)
    latex = latex_table(rows)
    title = f"distrep experiment: {exp['config'].get('preset', 'sweep')}" + (
        f", read at epoch {at_epoch:,}" if at_epoch is not None else "") + (
        f" (unfinished: training stopped at epoch {reached:,} of {epochs:,})" if reached < epochs else "")
    claims = claims_section(exp, at_epoch)
    claims.title += f" ({reading} test accuracy)"
    sections = [
        claims,
        Section(f"Test accuracy (%), {reading}", MAIN_NOTE, main_table(rows)),
    ]
    if at_epoch is None and epochs > STATED_EPOCHS and STATED_EPOCHS in tested:
        sections.append(Section(f"Test accuracy (%) at epoch {STATED_EPOCHS:,}, the epochs the paper "
                                "states", STATED_NOTE, main_table(summary_rows(exp, STATED_EPOCHS))))
    if (at_epoch is None or reached < epochs) and (table := epochs_table(exp, until=at_epoch)) is not None:
        sections.append(Section("Test accuracy along training (%)", ALONG_NOTE, table))
    if pairs:
        sections += [
            Section("Pairwise comparisons at a glance", PAIRS_NOTE,
                    images=[("effect sizes of every pair", figures["pairs"])]),
            Section(f"All pairwise comparisons ({len(pairs)} pairs)", TESTS_NOTE,
                    comparison_table(exp, at_epoch), folded=True),
        ]
    sections += [
        Section("Learning curves", images=[("test error curves", figures["curves"])]),
        Section("Accuracy per run", images=[("accuracy per run", figures["final"])]),
        *(analysis_sections(directory, exp) if at_epoch is None else []),
        Section("Where the paper, its tables and its code disagree", DISCREPANCY_NOTE,
                discrepancies_table(), folded=True),
    ]
    paths = write_pages(directory, suffix, title, sections, protocol_lines(exp), latex)
    paths["tex"] = directory / f"table{suffix}.tex"
    atomic_write_bytes(paths["tex"], latex.encode())
    return paths


def write_pages(directory: Path, suffix: str, title: str, sections: list[Section],
                protocol: list[str], latex: str | None = None) -> dict[str, Path]:
    """``report{suffix}.md`` and ``report{suffix}.html`` (images inlined) in ``directory``:
    the sections, then the protocol and the LaTeX table (if any)."""
    md = [f"# {title}", ""]
    for sec in sections:
        md += [f"## {sec.title}", ""]
        md += [sec.note, ""] if sec.note else []
        md += [_md_table(*sec.table), ""] if sec.table else []
        md += [line for alt, path in sec.images for line in (f"![{alt}]({path})", "")]
    md += ["## Protocol", "", *(f"- {line}" for line in protocol), ""]
    if latex is not None:
        md += ["## LaTeX", "", "```latex", latex.rstrip(), "```", ""]

    def image(alt, path):
        data = base64.b64encode((directory / path).read_bytes()).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    def block(sec):
        inner = ((f"<p>{html.escape(sec.note)}</p>" if sec.note else "")
                 + (_html_table(*sec.table) if sec.table else "")
                 + "".join(image(alt, path) for alt, path in sec.images))
        if sec.folded:
            return (f"<details><summary><h2>{html.escape(sec.title)}</h2></summary>{inner}"
                    f"</details>\n")
        return f"<h2>{html.escape(sec.title)}</h2>{inner}\n"

    body = "".join(block(sec) for sec in sections)
    tail = "" if latex is None else f"<h2>LaTeX</h2><pre>{html.escape(latex)}</pre>\n"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; }}
thead {{ background: #f0f0f0; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
summary {{ cursor: pointer; }}
summary h2 {{ display: inline; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{body}<h2>Protocol</h2><ul>{"".join(f"<li>{html.escape(line)}</li>" for line in protocol)}</ul>
{tail}</body></html>
"""
    paths = {"md": directory / f"report{suffix}.md", "html": directory / f"report{suffix}.html"}
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    atomic_write_bytes(paths["html"], page.encode())
    return paths


# --------------------------------------------------------------------------- a group of experiments

GROUP_NOTE = ("Mean ± sample std of the final test accuracy over the runs that finished, with "
              "the number of diverged runs where there are any; each experiment's own report "
              "(linked below) has its tests, curves and analyses.")


def group_accuracy_table(exps: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One row per model, one column per experiment: mean ± std (k of n diverged)."""
    models = list(dict.fromkeys(m for exp in exps.values() for m in exp["models"]))
    head = ["model"] + list(exps)
    body = []
    for model in models:
        row = [model]
        for exp in exps.values():
            if model not in exp["metrics"]:
                row.append("—")
                continue
            acc = final_accuracy(exp["metrics"][model])
            lost = int(np.isnan(acc).sum())
            row.append(_pm(acc, 2) + (f" ({lost} of {len(acc)} diverged)" if lost else ""))
        body.append(row)
    return head, body


def write_group_report(directory, name: str, members: dict[str, Path]) -> dict[str, Path]:
    """``report.md`` / ``report.html`` in ``directory`` for a group of finished experiments
    ``{label: directory}`` (e.g. one per dataset): every model's accuracy side by side, each
    experiment's claims, their accuracy per run, and links to their own reports."""
    directory = Path(directory)
    exps = {label: load_experiment(path) for label, path in members.items()}
    fig, axes = plt.subplots(1, len(exps), figsize=(6.5 * len(exps), 5), layout="constrained",
                             squeeze=False)
    for ax, (label, exp) in zip(axes[0], exps.items()):
        plot_final(exp["metrics"], ax)
        ax.set_title(f"{label}: test accuracy per run")
    save_figure(fig, directory / "figures/final_accuracy.png")
    sections = [Section("Test accuracy (%), final", GROUP_NOTE, group_accuracy_table(exps))]
    for label, exp in exps.items():
        claims = claims_section(exp)
        claims.title = f"{label}: {claims.title}"
        sections.append(claims)
    sections.append(Section("Accuracy per run", images=[("accuracy per run", "figures/final_accuracy.png")]))
    protocol = []
    for label, path in members.items():
        rel = path.relative_to(directory) if path.is_relative_to(directory) else path
        cfg = exps[label]["config"]["config"]
        protocol.append(f"{label}: {rel}/report.md — {len(exps[label]['models'])} models x "
                        f"{cfg['runs']} runs x {cfg['epochs']} epochs on "
                        f"{cfg['train_subset'] or 'all'} {cfg['dataset']} training images "
                        f"({cfg['preprocess']} pixels), lr {cfg['lr']}, {cfg['precision']}")
    return write_pages(directory, "", f"distrep study: {name} ({', '.join(exps)})", sections, protocol)
