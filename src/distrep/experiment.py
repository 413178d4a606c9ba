"""Output directories: the one flow that ``sweep`` and ``reproduce`` share, and the guards that
``train`` uses too.

An experiment directory goes through::

    check --out (a writable directory) -> lock it -> check what it holds -> (--force: remove
    what distrep wrote there) -> check the checkpoint -> write config.json -> train or resume
    -> results -> run.json

What it guarantees:

- **Nothing is written before every check has passed**, so a refused command leaves the
  directory as it was.
- **One process at a time.** An advisory lock (``flock`` on ``.distrep.lock``) is held for the
  life of the command; a second command on the same directory gets a one-line error naming the
  holder's pid. The operating system releases the lock when its holder dies, so a killed run
  never blocks the next one.
- **distrep deletes only its own files.** ``--force`` removes the names distrep writes and
  nothing else; a directory holding anything else (another tool's ``config.json`` included) is
  refused, with or without ``--force``.
- **Every session is recorded** in ``run.json``: device, software versions, run-epochs trained
  and wall time; resuming on another device or with other versions prints a warning.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from distrep.errors import DistrepError
from distrep.provenance import describe_device, resolve_device, software_versions
from distrep.stopping import deferred_stop
from distrep.storage import read_json, write_json

CONFIG_FILE, CHECKPOINT_FILE, RUN_FILE, SUMMARY_FILE = (
    "config.json", "checkpoint.safetensors", "run.json", "summary.csv")
LOCK_FILE = ".distrep.lock"
# Everything distrep writes into an experiment directory (the only names --force removes).
EXPERIMENT_ENTRIES = (CONFIG_FILE, SUMMARY_FILE, RUN_FILE, CHECKPOINT_FILE, "report.md",
                      "report.html", "table.tex", "figures", "models", "analysis")
# ... and into a run directory of `distrep train`.
RUN_ENTRIES = (CONFIG_FILE, "metrics.npz", "model.safetensors", "curves.png", "result.json")


# --------------------------------------------------------------------------- guards

def check_writable(out: Path) -> Path:
    """Create ``out`` if needed and make sure files can be written in it (before any training)."""
    if str(out).strip() == "":
        raise DistrepError("--out is empty; name a directory")
    if out.exists() and not out.is_dir():
        raise DistrepError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DistrepError(f"cannot write to {out}: {e.strerror or e}") from None
    return out


_held: set[Path] = set()       # directories this process has locked (a lock nests)


@contextmanager
def experiment_lock(out: Path) -> Iterator[None]:
    """Check that ``out`` is a writable directory, then hold an exclusive advisory lock on it
    for the block; refuse if another process holds it (its pid is named). Nested uses in one
    process share the outer lock."""
    created = not Path(out).exists()
    out = check_writable(out).resolve()
    if out in _held:
        yield
        return
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DistrepError(f"cannot lock {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DistrepError(f"cannot lock {out}: {e.strerror or e}") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DistrepError(f"{out} is in use by another distrep process (pid {holder}); wait "
                               f"for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.add(out)
        try:
            yield
        except BaseException:
            if created and not entries(out):   # a failed command leaves no empty directory
                path.unlink(missing_ok=True)
                out.rmdir()
            raise
        finally:
            _held.discard(out)
    finally:
        os.close(fd)                      # closing releases the lock


def entries(out: Path) -> list[str]:
    """What ``out`` holds, less the lock and the temporary files of interrupted atomic writes."""
    if not out.is_dir():
        return []
    return sorted(e.name for e in out.iterdir()
                  if e.name != LOCK_FILE and not (e.name.startswith(".") and e.name.endswith(".tmp")))


def directory_kind(out: Path) -> str | None:
    """What ``out/config.json`` says the directory is: "experiment" (sweep or reproduce), "run"
    (train), "foreign" (someone else's config.json), "unreadable", or None (none there)."""
    path = out / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = read_json(path)
    except DistrepError:
        return "unreadable"
    if isinstance(config, dict) and "result_fields" in config and "models" in config:
        return "experiment"
    if isinstance(config, dict) and "model" in config and "config" in config:
        return "run"
    return "foreign"


_EPOCH_REPORT = re.compile(r"(report-epoch-\d+\.(md|html)|table-epoch-\d+\.tex)")


def is_own(name: str, own: tuple[str, ...]) -> bool:
    """Whether distrep writes an entry called ``name`` in a directory of this kind."""
    return name in own or (own is EXPERIMENT_ENTRIES and bool(_EPOCH_REPORT.fullmatch(name)))


def refuse_foreign(out: Path, own: tuple[str, ...], kind: str) -> None:
    """Refuse ``out`` if it holds anything distrep did not write (for this kind of directory)."""
    found = directory_kind(out)
    other = {"experiment": "an experiment (distrep sweep/reproduce)", "run": "a single run (distrep train)"}
    if found in other and found != kind:
        raise DistrepError(f"{out} holds {other[found]}; use another --out")
    foreign = [name for name in entries(out) if not is_own(name, own)]
    if found == "foreign":
        foreign.insert(0, f"{CONFIG_FILE} (not distrep's)")
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise DistrepError(f"{out} holds files distrep did not write ({shown}); use an empty or "
                           f"new --out (distrep never deletes what it did not write)")


def remove_own(out: Path, own: tuple[str, ...]) -> None:
    """Delete the entries named in ``own`` (distrep's files) from ``out``; nothing else."""
    import shutil
    for name in [n for n in entries(out) if is_own(n, own)]:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# --------------------------------------------------------------------------- experiments

def config_differences(saved: dict, ours: dict) -> list[str]:
    """``field: saved there, ours here`` for every result field that differs."""
    return [f"{key}: {saved.get(key)!r} there, {ours.get(key)!r} here"
            for key in sorted(set(saved) | set(ours)) if saved.get(key) != ours.get(key)]


def check_experiment(out: Path, config, force: bool, log: Callable[[str], None]):
    """Check what ``out`` holds against ``config``; with ``force`` clear a different or damaged
    experiment. Returns the config to run (the saved model order where only the order differs)
    and the run record (``run.json``, empty when there is none or it was cleared). Writes
    nothing unless ``force`` clears."""
    refuse_foreign(out, EXPERIMENT_ENTRIES, "experiment")
    problem = None
    if not (out / CONFIG_FILE).exists() and entries(out):
        problem = f"its {CONFIG_FILE} is missing"
    elif (out / CONFIG_FILE).exists():
        if directory_kind(out) == "unreadable":
            problem = f"its {CONFIG_FILE} is unreadable"
        else:
            saved = read_json(out / CONFIG_FILE).get("result_fields")
            ours = config.result_fields
            if (isinstance(saved, dict) and isinstance(saved.get("models"), list)
                    and sorted(saved["models"]) == sorted(ours["models"]) and saved["models"] != ours["models"]
                    and {**saved, "models": None} == {**ours, "models": None}):
                by_spec = dict(zip(ours["models"], config.models))
                config = replace(config, models=[by_spec[s] for s in saved["models"]])
                log(f"{out}: the same models in the saved order ({', '.join(config.models)})")
            else:
                diff = config_differences(saved if isinstance(saved, dict) else {}, ours)
                if diff:
                    problem = f"it holds an experiment with a different config ({'; '.join(diff)})"
    state = {}
    if problem is None:
        try:
            state = run_state(out)
        except DistrepError:
            problem = f"its {RUN_FILE} is damaged"
    if problem is None and (out / CHECKPOINT_FILE).exists() and not state.get("finished"):
        from distrep.sweep import config_key, read_checkpoint
        try:
            read_checkpoint(out / CHECKPOINT_FILE, config_key(config))
        except DistrepError as e:
            problem = str(e).split(";")[0]
    if problem is None:
        return config, state
    if not force:
        raise DistrepError(f"{out}: {problem}; use another --out, or --force to replace it")
    log(f"{out}: {problem}; --force: removing distrep's files there and starting over")
    remove_own(out, EXPERIMENT_ENTRIES)
    return config, {}


def run_state(out: Path) -> dict:
    """``run.json`` (empty if absent); refused with a one-line error if it is damaged."""
    path = out / RUN_FILE
    if not path.exists():
        return {}
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("sessions", []), list):
        raise DistrepError(f"{path} is not a distrep run record; {_RECOVER}")
    return state


_RECOVER = "rerun with --force to start over"


def require_experiment(out: Path) -> None:
    """Refuse (one line) a directory that holds no distrep experiment, saying what it holds."""
    out = Path(out)
    if not out.exists():
        why = "no such directory"
    elif not out.is_dir():
        why = "not a directory"
    elif (kind := directory_kind(out)) == "experiment":
        return
    else:
        why = {None: "no distrep config.json",
               "run": "it holds one run of `distrep train`, whose results are its result.json, "
                      "metrics.npz and curves.png; report, analyze, claims and compare read what "
                      "sweep and reproduce write",
               "foreign": "its config.json is not distrep's",
               "unreadable": "its config.json is damaged"}[kind]
    raise DistrepError(f"{out} holds no finished experiment ({why})")


def require_finished(out: Path) -> None:
    """Refuse (one line) a directory that holds no finished experiment."""
    require_experiment(out)
    if not run_state(Path(out)).get("finished"):
        raise DistrepError(f"{out} holds no finished experiment (training has not finished; "
                           f"rerun its command to resume)")


def results_missing(out: Path, config) -> list[str]:
    """The result files of a finished experiment that are not there."""
    from distrep.models import display_name
    from distrep.sweep import results_dir
    need = [out / SUMMARY_FILE]
    for m in config.models:
        folder = results_dir(out, display_name(m))
        need += [folder / "metrics.npz", folder / "params.safetensors"]
    return [str(p.relative_to(out)) for p in need if not p.exists()]


def _session_warning(previous: dict, now: dict) -> str | None:
    changed = []
    if previous.get("device") != now["device"]:
        changed.append(f"device {previous.get('device')} -> {now['device']}")
    before = previous.get("versions") or {}
    changed += [f"{k} {before.get(k)} -> {v}" for k, v in now["versions"].items() if before.get(k) != v]
    if not changed:
        return None
    return ("warning: resuming with a different setup than the last session ("
            + "; ".join(changed) + "); results may differ in rounding from an uninterrupted run")


def run_experiment(out: Path, config, force: bool = False, progress: bool = True,
                   extra: dict | None = None, log: Callable[[str], None] | None = None,
                   before_training: Callable | None = None, executor=None):
    """Train (or resume, or only reload) ``config`` into ``out`` through the flow in the module
    docstring, with ``executor`` (default: this process; see :mod:`distrep.executors`).
    ``extra`` is added to config.json (e.g. the preset); ``before_training(config,
    data, sweep)`` is called when training is about to start or resume (to print a plan). Returns
    ``(config, results, trained)``: the config run, one VariantResult per model, and whether
    this call trained anything. All of it in the executor's session (for Ray: the device as
    its workers see it, :meth:`distrep.executors.RayExecutor.session`)."""
    from distrep.executors import LocalExecutor
    executor = executor or LocalExecutor()
    with executor.session(config.device):
        return _run_experiment(out, config, force, progress, extra, log, before_training, executor)


def _run_experiment(out, config, force, progress, extra, log, before_training, executor):
    from distrep.data import load_dataset
    from distrep.sweep import Sweep, describe_sweep, save_results

    log = log or (lambda m: print(m, file=sys.stderr))
    config = config.validate()
    with experiment_lock(out):
        config, state = check_experiment(out, config, force, log)
        device = resolve_device(config.device)
        if state.get("finished") and not results_missing(out, config):
            return config, None, False           # nothing to train or rebuild: no data needed
        data = load_dataset(config.dataset, config.preprocess)
        if state.get("finished"):
            missing = results_missing(out, config)
            if not (out / CHECKPOINT_FILE).exists():
                raise DistrepError(f"{out}: {missing[0]} is missing and there is no checkpoint to "
                                   f"rebuild it from; {_RECOVER}")
            log(f"{out}: rebuilding {', '.join(missing)} from the checkpoint")
            sweep = Sweep(config, data, checkpoint=out / CHECKPOINT_FILE, progress=False)
            if int(sweep.state["epochs_done"].min()) < config.epochs:
                raise DistrepError(f"{out}: the checkpoint does not hold the finished runs; {_RECOVER}")
            results = sweep.results()
            save_results(results, config, out)
            return config, results, False
        sweep = Sweep(config, data, checkpoint=out / CHECKPOINT_FILE, progress=progress)
        if before_training is not None:
            before_training(config, data, sweep)
        done = int(sweep.state["epochs_done"].sum())
        if done:
            total = config.runs * config.epochs * len(config.models)
            log(f"resuming from the checkpoint: {done} of {total} run-epochs done")
        sessions = list(state.get("sessions", []))
        wall = float(sweep.state["wall_time_s"])
        if sessions and "run_epochs" not in sessions[-1]:      # the last session was killed
            last = sessions[-1]
            last["run_epochs"] = done - last.get("run_epochs_before", 0)
            last["wall_time_s"] = wall - last.get("wall_time_s_before", 0.0)
            last["ended"] = "interrupted (trained work read back from the checkpoint)"
            # a chunk merged into the checkpoint just before the kill, with run.json not yet
            # rewritten: its runs are recorded here, from the checkpoint
            recorded = {tuple(u) for s in sessions for c in s.get("chunks", []) for u in c["runs"]}
            unrecorded = [[name, r] for v, name in enumerate(sweep.names) for r in range(config.runs)
                          if int(sweep.state["epochs_done"][v, r]) == config.epochs
                          and (name, r) not in recorded]
            if unrecorded:
                last.setdefault("chunks", []).append(
                    {"runs": unrecorded, "recorded": "from the checkpoint after the kill"})
        session = {"device": describe_device(device), "versions": software_versions(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_epochs_before": done,
                   "wall_time_s_before": wall}
        if sessions and (warning := _session_warning(sessions[-1], session)):
            log(warning)
        sessions.append(session)
        executor_name = executor.name
        # from here a signal is deferred to the end of an epoch, which checkpoints (local
        # training; a test can wait for run.json and signal)
        with deferred_stop() if executor_name == "local" else nullcontext() as stop:
            write_json(out / CONFIG_FILE, {**describe_sweep(config, device),
                                           "data": data.subset(config.train_subset).describe(),
                                           **(extra or {})})
            write_json(out / RUN_FILE, {"finished": False, "sessions": sessions})
            session["executor"] = executor_name
            session["chunks"] = []

            def chunk_done(info: dict) -> None:      # run.json says where every chunk trained, as it goes
                session["chunks"].append(info)
                write_json(out / RUN_FILE, {"finished": False, "sessions": sessions})

            results = sweep.run(executor, on_chunk=chunk_done, stop=stop)
        save_results(results, config, out)
        total_wall = float(sweep.state["wall_time_s"])
        session.update(run_epochs=int(sweep.state["epochs_done"].sum()) - done,
                       wall_time_s=total_wall - wall, ended="finished")
        write_json(out / RUN_FILE, {"finished": True, "wall_time_s": total_wall, "sessions": sessions})
        return config, results, True


# --------------------------------------------------------------------------- reading back

def trained_models(directory: str | os.PathLike, model: str | None = None) -> list:
    """The trained runs of one model of a finished experiment (``sweep``, ``reproduce``), or the
    model of a finished ``distrep train`` run, as :func:`~distrep.models.create_model` nets on
    the CPU holding their final parameters: run i is ``seeds[i]`` of ``config.json``. They take
    inputs preprocessed as the runs were (``load_dataset(dataset, preprocess)`` of its config).

    ``model``: the model's paper name or spec, needed when the experiment has several. Anything
    else (not finished, no such model, a foreign directory) is a one-line :class:`DistrepError`.
    """
    from distrep.models import create_model, display_name
    from distrep.storage import read_tensors
    from distrep.sweep import results_dir
    from distrep.train import existing_config
    directory = Path(directory)
    single = directory.is_dir() and directory_kind(directory) == "run"
    if single and existing_config(directory) is None:
        raise DistrepError(f"{directory} holds an unfinished run of `distrep train`; rerun its "
                           f"command to finish it")
    if not single:
        require_finished(directory)
    config = read_json(directory / CONFIG_FILE)
    cfg = config["config"]
    specs = ({display_name(cfg["model"]): cfg["model"]} if single
             else {m["name"]: m["spec"] for m in config["models"]})
    if model is None and len(specs) > 1:
        raise DistrepError(f"{directory} holds {len(specs)} models ({', '.join(specs)}); say which")
    name = next(iter(specs)) if model is None else display_name(model)
    if name not in specs:
        raise DistrepError(f"{directory} holds no model {model!r}; it holds {', '.join(specs)}")
    if single:
        state = {k: v[None] for k, v in read_tensors(directory / "model.safetensors").items()}
    else:
        state = read_tensors(results_dir(directory, name) / "params.safetensors")
    data = recorded_data(config)
    nets = []
    for run in range(next(iter(state.values())).shape[0]):
        net = create_model(specs[name], cfg["width"], in_features=data["n_features"],
                           num_classes=len(data["classes"]), offsetl2_form=cfg["offsetl2_form"])
        net.load_state_dict({k: v[run] for k, v in state.items()})
        nets.append(net.eval())
    return nets


def recorded_data(config: dict) -> dict:
    """What a result's ``config.json`` says of its data (``n_train``, the training images used;
    ``n_features``, ``classes``, the class names, and ``image_shape``), so that reading a result
    back needs no data files; for a result written before distrep recorded it, the same from
    the dataset's own spec."""
    data = config.get("data") or {}
    if "classes" in data and "image_shape" in data:
        return data
    from distrep.data import get_spec
    cfg = config["config"]
    spec = get_spec(cfg["dataset"])
    available = spec.train_images.shape[0]
    return {"n_train": min(cfg.get("train_subset") or available, available),
            "n_features": spec.num_features, "classes": list(spec.classes),
            "image_shape": list(spec.image_shape)}


def final_accuracies(directory: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """What a finished experiment's ``config.json`` and ``summary.csv`` say of its runs:
    ``(config fields, {model: {"spec", "seeds", "accuracy"}})``, ``accuracy`` the final test
    accuracy in % per run (``[runs]``, NaN for a run that diverged), in the config's model
    order. A directory that is not a finished experiment, or whose files are not those distrep
    wrote, is a one-line :class:`DistrepError`."""
    import numpy as np
    directory = Path(directory)
    require_finished(directory)
    try:
        config = read_json(directory / CONFIG_FILE)
        fields = config["config"]
        [fields[key] for key in ("dataset", "width", "paired", "runs", "offsetl2_form")]
        with open(directory / SUMMARY_FILE, newline="") as f:
            rows = list(csv.DictReader(f))
        models = {m["name"]: {"spec": m["spec"], "seeds": tuple(m["seeds"]), "accuracy": np.array(
                      [100 * float(r["test_acc"]) if r["diverged"] == "False" else np.nan
                       for r in rows if r["model"] == m["name"]])}
                  for m in config["models"]}
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise DistrepError(f"{directory} does not hold the files distrep wrote (config.json "
                           f"or summary.csv: bad or missing {e})") from None
    for name, model in models.items():
        if len(model["accuracy"]) != len(model["seeds"]):
            raise DistrepError(f"{directory / SUMMARY_FILE} holds {len(model['accuracy'])} runs "
                               f"of {name}, not {len(model['seeds'])}")
    return fields, models


def run_accuracies(directory: str | os.PathLike, at_epoch: int | None = None,
                   command: str = "distrep ...") -> tuple[dict, dict[str, dict]]:
    """An experiment's config fields and ``{model: {"spec", "seeds", "accuracy"}}``, accuracy
    the test accuracy (%) per run of its final parameters (:func:`final_accuracies`) or at
    ``at_epoch``, NaN for a run diverged by then (:func:`distrep.report.accuracy_at`). At an
    epoch, an experiment still training (or stopped) is read from its checkpoint, where every
    run has reached it; unfinished and read at the end, or at an epoch without a test pass, it
    is refused in one line naming it (and the epoch at which ``command`` would read it).
    ``fields["finished"]`` says which it was."""
    from distrep.report import accuracy_at, check_reading, load_experiment
    directory = Path(directory)
    require_experiment(directory)
    finished = run_state(directory).get("finished")
    if at_epoch is None and finished:
        fields, held = final_accuracies(directory)
        return {**fields, "finished": True}, held
    exp = load_experiment(directory)
    check_reading(exp, directory, at_epoch, command)
    if finished:
        fields, held = final_accuracies(directory)      # (and its files checked)
    else:
        fields = exp["config"]["config"]
        held = {m["name"]: {"spec": m["spec"], "seeds": tuple(m["seeds"])}
                for m in exp["config"]["models"]}
    for name in held:
        held[name]["accuracy"] = accuracy_at(exp["metrics"][name], at_epoch)
    return {**fields, "finished": bool(finished)}, held
