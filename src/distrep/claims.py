"""The paper's claims, one line each, tested on an experiment's runs.

Each claim names a relation between two models (or two groups), the statistic the paper printed
for it, and how to read it: ``equal`` (no difference), ``less`` / ``greater`` (a difference in
that direction), ``at least`` (a not significantly below b). :func:`verdicts` tests each pair with the paired t-test where the design is
paired (else Welch's), beside the rank test (Wilcoxon signed-rank / Mann-Whitney U) and a
bootstrap interval of the difference, and says whether the claim holds on these runs, does not,
or cannot be judged here (and why).

"No significant difference" is not evidence of equivalence; a verdict of ``holds`` for an
``equal`` claim says only that these runs show no difference at the 5 % level.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrep import stats
from distrep.errors import DistrepError

ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    text: str                          # as a one-line statement
    pairs: tuple[tuple[str, str], ...]  # (a, b): the claim is about a relative to b
    relation: str                      # "equal", "less" (a < b), "greater" (a > b), "at least" (a >= b)
    printed: str                       # the paper's own statistic, or its words
    spread: bool = False               # also claims a has a smaller std than b


TABLE1 = ("Abs", "ReLU", "Abs2", "Abs2-Neg", "ReLU2", "ReLU2-Neg")
OFFSETL2 = ("ReLU-L2", "ReLU-L2-Neg", "Abs-L2", "Abs-L2-Neg")

CLAIMS: tuple[Claim, ...] = (
    Claim("ReLU and Abs perform alike", (("ReLU", "Abs"),), "equal",
          "t(38) = 1.14, p = 0.26, d = 0.37: Table 1's own means and stds imply t ≈ 12.1"),
    Claim("ReLU2 fails far below ReLU", (("ReLU2", "ReLU"),), "less",
          "t(38) = -17.33, p < 0.001, d = 5.56"),
    Claim("Abs2 performs like Abs", (("Abs2", "Abs"),), "equal",
          "t(38) = 1.4967, p = 0.1427, d = 0.47"),
    Claim("ReLU2-Neg recovers from ReLU2", (("ReLU2-Neg", "ReLU2"),), "greater",
          "t(38) = -17.33, p < 0.001, d = 5.48"),
    Claim("ReLU2-Neg recovers to ReLU ('statistically comparable')", (("ReLU2-Neg", "ReLU"),),
          "equal", "t(38) = -12.78, p < 0.001, d = 4.04: the printed test contradicts the words"),
    Claim("Abs2-Neg falls below Abs", (("Abs2-Neg", "Abs"),), "less",
          "t(38) = -8.81, p < 0.001, d = 2.79"),
    Claim("Abs2-Neg falls below Abs2", (("Abs2-Neg", "Abs2"),), "less",
          "t(38) = 8.97, p < 0.001, d = 2.84"),
    Claim("OffsetL2 models beat every baseline, with less spread",
          tuple((a, b) for a in OFFSETL2 for b in TABLE1), "greater",
          "'significantly outperformed baselines', std <= 0.14 (no test printed)", spread=True),
    Claim("With OffsetL2, Neg makes no difference", (("ReLU-L2-Neg", "ReLU-L2"), ("Abs-L2-Neg", "Abs-L2")),
          "equal", "'the performance gap between normal and negated variants disappeared' (no test printed)"),
    Claim("The output bias makes little difference", tuple((f"{m}-Bias", m) for m in TABLE1), "equal",
          "'minimal impact' (Table 1 vs Table 2, which differ in epochs too; no test printed)"),
)


# The study beyond the paper (`distrep reproduce beyond`): its two claims put to the paper's
# models and the prior-art heads, on each dataset. Distance-style = the class is the output
# that is SMALL before the final neg (near a prototype or hyperplane); its intensity-style twin
# is the same model without the neg. Explicit distance heads: OffsetL2 and the prior-art
# distance layers; baselines: Table 1's models and the cosine classifier.
DISTANCE_TWINS = (("ReLU2-Neg", "ReLU2"), ("Abs2-Neg", "Abs2"), ("ReLU-L2-Neg", "ReLU-L2"),
                  ("Abs-L2-Neg", "Abs-L2"))
DISTANCE_HEADS = {"OffsetL2": OFFSETL2, "RBF": ("ReLU-RBF-Neg",),
                  "Mahalanobis": ("ReLU-Mahalanobis-Neg",), "GMLVQ": ("ReLU-GMLVQ-Neg",)}
BASELINES = TABLE1 + ("ReLU-Cosine",)
_SPREAD = "'significantly outperformed baselines', std <= 0.14 (said of OffsetL2 only)"

BEYOND_CLAIMS: tuple[Claim, ...] = (
    Claim("Distance-style outputs train as well as or better than their intensity-style twins",
          DISTANCE_TWINS, "at least", "ReLU2-Neg >> ReLU2, but Abs2-Neg < Abs2 (Table 1)"),
    Claim("Explicit distance heads beat every baseline, with less spread",
          tuple((a, b) for heads in DISTANCE_HEADS.values() for a in heads for b in BASELINES),
          "greater", _SPREAD, spread=True),
    *(Claim(f"{family} beats every baseline, with less spread",
            tuple((a, b) for a in heads for b in BASELINES), "greater",
            _SPREAD if family == "OffsetL2" else "not in the paper (related work only)", spread=True)
      for family, heads in DISTANCE_HEADS.items()),
)


def claims_for(preset: str | None) -> tuple[Claim, ...]:
    """The claims an experiment of ``preset`` tests: the study's for the beyond presets, else
    the paper's."""
    return BEYOND_CLAIMS if preset and preset.startswith("beyond") else CLAIMS


@dataclass
class Verdict:
    claim: Claim
    verdict: str          # "holds", "does not hold", "not comparable"
    ours: str             # our statistic(s) on the claim's pairs, one line
    why: str = ""


def one_pair(a: np.ndarray, b: np.ndarray, paired: bool) -> dict:
    """Difference, t-test (paired or Welch), effect size, rank test, probability of improvement
    and bootstrap interval of accuracies ``a``, ``b`` ``[runs]`` (NaN: diverged, left out; pairs
    with a NaN drop out)."""
    if paired and len(a) == len(b):
        both = ~np.isnan(a) & ~np.isnan(b)
        a, b = a[both], b[both]
        t, effect, name = stats.paired_t(a, b), stats.cohens_dz(a, b), "d_z"
    else:
        paired = False
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        t, effect, name = stats.welch_t(a, b), stats.cohens_d(a, b), "d"
    diff = stats.mean(a) - stats.mean(b) if len(a) and len(b) else float("nan")
    return {"diff": diff, "t": t, "effect": effect, "effect_name": name,
            "rank": stats.rank_test(a, b, paired), "ci": stats.bootstrap_diff(a, b, paired),
            "p_improve": stats.probability_of_improvement(a, b, paired),
            "std_a": stats.std(a), "std_b": stats.std(b), "n": (len(a), len(b))}


def _holds(relation: str, r: dict) -> bool:
    p, diff = r["t"].p, r["diff"]
    if relation == "equal":
        return not p < ALPHA
    if relation == "at least":
        return not (p < ALPHA and diff < 0)
    significant = p < ALPHA
    return significant and (diff < 0 if relation == "less" else diff > 0)


def _describe(a: str, b: str, r: dict) -> str:
    t, rank, ci = r["t"], r["rank"], r["ci"]
    p = "—" if np.isnan(t.p) else (f"{t.p:.1e}" if t.p < 1e-3 else f"{t.p:.3f}")
    rp = "—" if np.isnan(rank.p) else (f"{rank.p:.1e}" if rank.p < 1e-3 else f"{rank.p:.3f}")
    return (f"{a} − {b}: {r['diff']:+.2f} points [{ci[0]:+.2f}, {ci[1]:+.2f}], "
            f"{'paired ' if r['effect_name'] == 'd_z' else 'Welch '}t({t.df:.0f}) = {t.t:.2f}, "
            f"p = {p}, {r['effect_name']} = {r['effect']:.2f}; {rank.test.split()[0]} p = {rp}")


def verdicts(values: dict[str, np.ndarray], paired: bool,
             claims: tuple[Claim, ...] = CLAIMS) -> list[Verdict]:
    """Every claim tested on accuracies ``values`` ({model: [runs]}, NaN for a diverged run)."""
    out = []
    for claim in claims:
        present = [(a, b) for a, b in claim.pairs if a in values and b in values]
        if not present:
            missing = sorted({m for pair in claim.pairs for m in pair} - set(values))
            out.append(Verdict(claim, "not comparable", "—",
                               f"not in this experiment: {', '.join(missing[:4])}"
                               + (" …" if len(missing) > 4 else "")))
            continue
        results = [(a, b, one_pair(values[a], values[b], paired)) for a, b in present]
        usable = [(a, b, r) for a, b, r in results if not np.isnan(r["t"].p)]
        if not usable:
            out.append(Verdict(claim, "not comparable", "—", "too few finished runs to test"))
            continue
        failed = [(a, b) for a, b, r in usable if not _holds(claim.relation, r)]
        if claim.spread:
            failed += [(a, b) for a, b, r in usable if not r["std_a"] < r["std_b"]
                       and (a, b) not in failed]
        if len(usable) == 1:
            ours = _describe(*usable[0])
        else:
            diffs = [r["diff"] for _, _, r in usable]
            ours = (f"{len(usable) - len(failed)} of {len(usable)} pairs as claimed; differences "
                    f"{min(diffs):+.2f} to {max(diffs):+.2f} points")
        why = ""
        if failed:
            why = "not as claimed: " + ", ".join(f"{a} vs {b}" for a, b in failed[:4]) + (
                " …" if len(failed) > 4 else "")
        if len(present) < len(claim.pairs):
            why = (why + "; " if why else "") + f"{len(present)} of {len(claim.pairs)} pairs in this experiment"
        out.append(Verdict(claim, "does not hold" if failed else "holds", ours, why))
    return out


# --------------------------------------------------------------------------- across experiments

# What must agree for runs of two experiments to be compared (each changes results or the
# pairing); they may differ in their models, in how often they tested, and in the OffsetL2 form
# where one of them has no OffsetL2 model.
POOLED_FIELDS = ("dataset", "preprocess", "train_subset", "epochs", "lr", "width", "precision",
                 "runs", "paired", "base_seed")


def pooled_values(directories, at_epoch: int | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """Final test accuracies (%) per run of finished experiments made under one protocol, read
    from their ``summary.csv``, or those at ``at_epoch`` (where an experiment still training is
    read too: :func:`distrep.experiment.run_accuracies`): ``({model: [runs]}, paired)``, NaN for
    a diverged run. For an experiment split in parts (Table 1's models in one, Table 3's OffsetL2
    models in another), whose paired runs start from the same first-layer weights. A directory
    that is not a finished experiment (or not read at an epoch it reached), a field of
    :data:`POOLED_FIELDS` (or the OffsetL2 form, between two experiments with OffsetL2 models)
    that differs, or a model in two of them is refused in one line
    (:class:`~distrep.errors.DistrepError`)."""
    from distrep.experiment import run_accuracies

    directories = [Path(d) for d in directories]
    command = "distrep claims " + " ".join(shlex.quote(str(d)) for d in directories)
    values, first, form = {}, None, None
    for directory in directories:
        fields, models = run_accuracies(directory, at_epoch, command)
        try:
            [fields[key] for key in POOLED_FIELDS + ("offsetl2_form",)]
        except (KeyError, TypeError) as e:
            raise DistrepError(f"{directory} does not hold the files distrep wrote (config.json: "
                               f"bad or missing {e})") from None
        first = first or (directory, fields)
        for key in POOLED_FIELDS:
            if fields[key] != first[1][key]:
                raise DistrepError(f"{directory} and {first[0]} differ in {key} ({fields[key]} "
                                   f"against {first[1][key]}): their runs are not comparable")
        if any("offsetl2" in model["spec"] for model in models.values()):
            if form is not None and fields["offsetl2_form"] != form[1]:
                raise DistrepError(f"{directory} and {form[0]} differ in offsetl2_form "
                                   f"({fields['offsetl2_form']} against {form[1]})")
            form = form or (directory, fields["offsetl2_form"])
        for name, model in models.items():
            if name in values:
                raise DistrepError(f"{name} is in more than one of these experiments: name each "
                                   f"model's runs once")
            if len(model["accuracy"]) != fields["runs"]:
                raise DistrepError(f"{directory / 'summary.csv'} holds {len(model['accuracy'])} "
                                   f"runs of {name}, not {fields['runs']}")
            values[name] = model["accuracy"]
    return values, bool(first[1]["paired"])
