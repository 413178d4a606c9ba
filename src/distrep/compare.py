"""Runs of several experiments side by side: ``distrep compare DIR [DIR ...]``.

An experiment's report compares its models under one protocol. A study of widths, learning
rates, epochs, datasets or preprocessing runs one experiment per setting; this puts every model
of every one of them in one table, named by the settings in which its experiment differs from
the others (``ReLU (width 64)``), and tests every pair.

Two groups of runs are compared run by run (paired t-test, Cohen's d_z, Wilcoxon signed-rank)
where run i of both starts from the same first-layer weights: both experiments are paired
designs, with the same seeds, dataset and first layer (kind, width and bias; a layer's initial
weights depend on nothing else, :func:`distrep.models.init_parameters`). Otherwise they are
independent samples (Welch's t-test, Cohen's d, Mann-Whitney U). Each pair also gets a
bootstrap interval of its difference and the probability that a run of one beats a run of the
other (over matched runs where paired), and the p-values are Holm-adjusted over all pairs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np

from distrep import stats
from distrep.claims import one_pair
from distrep.errors import DistrepError
from distrep.models import LayerSpec, display_name, parse

# The settings that name a model's runs when experiments differ in them (the config's keys).
SETTINGS = ("dataset", "preprocess", "train_subset", "width", "lr", "epochs", "precision",
            "offsetl2_form", "runs", "base_seed", "paired")


@dataclass(frozen=True)
class Group:
    """One model's runs in one experiment."""

    label: str                 # the model's name, with its experiment's distinguishing settings
    directory: Path
    accuracy: np.ndarray       # final test accuracy (%) per run, NaN where it diverged
    seeds: tuple[int, ...]
    first_layer: LayerSpec
    dataset: str
    paired_design: bool
    finished: bool = True      # False: an experiment still training (or stopped), read at an epoch


def pairs_run_by_run(a: Group, b: Group) -> bool:
    """Whether run i of ``a`` and of ``b`` start from the same first-layer weights."""
    return (a.paired_design and b.paired_design and a.seeds == b.seeds
            and a.dataset == b.dataset and a.first_layer == b.first_layer)


def _setting(key: str, value) -> str:
    if key == "paired":
        return "paired" if value else "unpaired"
    return f"{key.replace('_', ' ')} {'all' if value is None else value}"


def read_groups(directories, models: list[str] | None = None,
                at_epoch: int | None = None) -> list[Group]:
    """Every model (or those of ``models``, by name or spec) of the experiments in
    ``directories``, as :class:`Group` s labelled by the settings their experiment does not share
    with all the others, with the test accuracy of their final parameters, or at epoch
    ``at_epoch`` (a test pass every experiment made; an unfinished one is read there:
    :func:`distrep.experiment.run_accuracies`). A model none of them holds, or a directory
    given twice, is refused."""
    from distrep.experiment import run_accuracies
    directories = [Path(d) for d in directories]
    if len({d.resolve() for d in directories}) < len(directories):
        raise DistrepError("an experiment directory is named twice")
    command = "distrep compare " + " ".join(shlex.quote(str(d)) for d in directories)
    found = [(d, *run_accuracies(d, at_epoch, command)) for d in directories]
    varying = [key for key in SETTINGS if len({repr(f.get(key)) for _, f, _ in found}) > 1]
    wanted = None if models is None else [display_name(m) for m in models]
    if wanted is not None:
        absent = [m for m in wanted if not any(m in held for _, _, held in found)]
        if absent:
            raise DistrepError(f"no experiment here holds {', '.join(absent)}")
    groups = []
    for directory, fields, held in found:
        tags = ", ".join(_setting(key, fields.get(key)) for key in varying)
        for name, model in held.items():
            if wanted is not None and name not in wanted:
                continue
            # the first layer's kind, width and bias: its input size is the dataset's, compared
            # apart (so that no data files are needed)
            first = next(s for s in parse(model["spec"], fields["width"]) if s.affine)
            groups.append(Group(f"{name} ({tags})" if tags else name, directory, model["accuracy"],
                                model["seeds"], first, fields["dataset"], bool(fields["paired"]),
                                fields["finished"]))
    labels = [g.label for g in groups]
    # the same model under the same settings in two experiments: tell them apart by directory
    return [replace(g, label=f"{g.label} [{g.directory}]") if labels.count(g.label) > 1 else g
            for g in groups]


def summary_table(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Per group: its experiment, runs finished of all, mean ± sample std, 95 % t-interval of
    the mean and range of the final test accuracy (%), over the runs that finished."""
    head = ["model", "experiment", "finished", "mean ± std", "95 % CI", "min – max"]
    body = []
    for g in groups:
        done = g.accuracy[~np.isnan(g.accuracy)]
        s = stats.summarize(done)
        ci = "—" if np.isnan(s["ci_low"]) else f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
        body.append([g.label, str(g.directory), f"{len(done)} of {len(g.accuracy)}",
                     f"{_f(s['mean'])} ± {_f(s['std'])}", ci, f"{_f(s['min'])} – {_f(s['max'])}"])
    return head, body


def _f(x: float, spec: str = ".2f") -> str:
    """``x`` formatted, or — where it is undefined (too few runs)."""
    return "—" if np.isnan(x) else format(x, spec)


def _p(p: float) -> str:
    return "—" if np.isnan(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def pairs_table(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Every pair (a, b): mean difference a − b in points with its bootstrap 95 % interval, the
    t-test (paired where :func:`pairs_run_by_run`, else Welch) with its p-value and the
    Holm-adjusted one over all pairs, the effect size (d_z or d), the rank test's p and the
    probability that a run of a beats one of b (:func:`distrep.stats.probability_of_improvement`)."""
    head = ["a", "b", "a − b [95 % bootstrap]", "test", "p", "p (Holm)", "effect", "rank test p",
            "P(a > b)"]
    results = [(a, b, one_pair(a.accuracy, b.accuracy, pairs_run_by_run(a, b)))
               for a, b in combinations(groups, 2)]
    adjusted = stats.holm([r["t"].p for _, _, r in results])
    body = []
    for (a, b, r), holm in zip(results, adjusted):
        t, ci = r["t"], r["ci"]
        kind = "paired" if r["effect_name"] == "d_z" else "Welch"
        test = "—" if np.isnan(t.t) else f"{kind} t({t.df:.0f}) = {t.t:.2f}"
        interval = "" if np.isnan(ci[0]) else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        body.append([a.label, b.label, f"{_f(r['diff'], '+.2f')}{interval}", test, _p(t.p),
                     _p(holm), f"{r['effect_name']} = {_f(r['effect'])}",
                     f"{r['rank'].test.split()[0]} {_p(r['rank'].p)}", _f(r["p_improve"])])
    return head, body


def _reading(at_epoch: int | None) -> str:
    return "final" if at_epoch is None else f"at epoch {at_epoch:,}"


def save_figure(groups: list[Group], path: str | Path, at_epoch: int | None = None) -> None:
    """Every group's runs as points over its box plot (:func:`distrep.plots.plot_per_run`)."""
    from distrep import plots
    ax = plots.plot_per_run({g.label: g.accuracy for g in groups},
                            f"test accuracy, {_reading(at_epoch)} (%)",
                            f"test accuracy per run, {_reading(at_epoch)}")
    plots.save_figure(ax.figure, path)


def render(groups: list[Group], figure: str | None = None, at_epoch: int | None = None) -> str:
    """The comparison as Markdown: how the runs were matched, the summary (and the ``figure``
    file, if given) and the pairs, of the final test accuracy or that at ``at_epoch``."""
    from distrep.report import _md_table
    directories = list(dict.fromkeys(str(g.directory) for g in groups))
    paired = sum(pairs_run_by_run(a, b) for a, b in combinations(groups, 2))
    total = len(groups) * (len(groups) - 1) // 2
    title = "Final test accuracy" if at_epoch is None else f"Test accuracy at epoch {at_epoch:,}"
    lines = [f"# {title} (%) of {len(groups)} models in {', '.join(directories)}", "",
             f"{paired} of {total} pairs are compared run by run (run i of both starts from the "
             f"same first-layer weights: paired designs with the same seeds, dataset and first "
             f"layer), the others as independent samples. Runs that diverged are left out (a "
             f"paired comparison leaves out their pairs). p (Holm): adjusted over the "
             f"{total} pair{'s' * (total != 1)}. P(a > b): the chance that a run of a beats one "
             f"of b, ties counting half (over matched runs where compared run by run)."]
    unfinished = list(dict.fromkeys(str(g.directory) for g in groups if not g.finished))
    if unfinished:
        lines[-1] += (f" Unfinished (still training, or stopped), read from "
                      f"{'their checkpoints' if len(unfinished) > 1 else 'its checkpoint'}, where "
                      f"every run has reached epoch {at_epoch:,}: {', '.join(unfinished)}.")
    lines += ["", _md_table(*summary_table(groups)), ""]
    if figure:
        lines += [f"![test accuracy per run]({figure})", ""]
    if total:
        lines += ["## Pairs", "", _md_table(*pairs_table(groups)), ""]
    return "\n".join(lines)
