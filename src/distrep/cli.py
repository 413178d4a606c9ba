"""The ``distrep`` command. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from distrep import data as data_mod
from distrep.errors import DistrepError
from distrep.engine import CUDA_PRECISIONS, ENGINES, PRECISIONS, computes, engine_path
from distrep.executors import EXECUTORS
from distrep.layers import OFFSETL2_FORMS
from distrep.models import describe, display_name, parameter_count, parse
from distrep.stopping import Stopped


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) so scripts can read them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def quote(path) -> str:
    """A path as it must be typed in a shell (quoted where it holds spaces and the like)."""
    return shlex.quote(str(path))


def out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return Path(text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distrep", description="Distance vs intensity representations "
                     "(Oursland, 2025): data, models, training.")
    from distrep import __version__
    parser.add_argument("--version", action="version", version=f"distrep {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="fetch and verify datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_commands.add_parser("fetch", help="put a verified dataset in the cache")
    fetch.add_argument("name", help=f"one of: {', '.join(data_mod.DATASETS)}")
    fetch.add_argument("--from", dest="from_dir", metavar="DIR",
                       help="read idx or idx.gz files from DIR (torchvision's layout works)")
    verify = data_commands.add_parser("verify", help="check the cached copy of a dataset")
    verify.add_argument("name")
    data_commands.add_parser("path", help="print the cache directory")

    models = commands.add_parser("models", help="list the model registry")
    models.add_argument("--width", type=positive_int, default=128)

    train = commands.add_parser("train", help="train one model with the reference trainer")
    train.add_argument("--model", required=True, help="a paper name or a spec (see `distrep models`)")
    train.add_argument("--out", required=True, type=out_dir, help="run directory to write")
    train.add_argument("--seed", type=non_negative_int, default=0)
    add_protocol_arguments(train, defaults=True, eval_every=1)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--force", action="store_true",
                       help="overwrite a finished run made with a different config")
    sweep = commands.add_parser("sweep", help="train R runs of several models together (batched engine)")
    sweep.add_argument("--models", required=True, type=comma_list,
                       help="comma-separated paper names or specs, e.g. ReLU,ReLU2-Neg")
    sweep.add_argument("--out", required=True, type=out_dir, help="experiment directory")
    sweep.add_argument("--runs", type=positive_int, default=20)
    add_protocol_arguments(sweep, defaults=True, eval_every=10)
    add_engine_arguments(sweep, defaults=True)
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("--force", action="store_true",
                       help="discard results in --out made with a different config")
    repro = commands.add_parser("reproduce", help="run one of the paper's experiments and report it")
    repro.add_argument("preset", help="table1, table2, table3, all, quick; beyond, beyond-quick "
                       "(the paper's models and the prior-art heads on MNIST and Fashion-MNIST)")
    repro.add_argument("--out", type=out_dir, default=None, help="experiment directory (default runs/PRESET)")
    repro.add_argument("--models", type=comma_list, default=None)
    repro.add_argument("--runs", type=positive_int, default=None)
    add_protocol_arguments(repro, defaults=False)
    add_engine_arguments(repro, defaults=False)
    repro.add_argument("--quiet", action="store_true", help="no progress bar")
    repro.add_argument("--dry-run", action="store_true",
                       help="print the plan (models, runs, epochs, run-epochs, estimated time) and exit")
    repro.add_argument("--force", action="store_true",
                       help="replace an experiment in --out made with a different config")

    report = commands.add_parser("report", help="regenerate an experiment's report from its files")
    report.add_argument("directory", type=Path)
    report.add_argument("--at-epoch", type=positive_int, default=None, metavar="N",
                        help="every table and test from the state at epoch N (a test pass must "
                             "exist there): report-epoch-N.md/.html")

    claims = commands.add_parser(
        "claims", help="the paper's claims tested on the runs of several experiments")
    claims.add_argument("directories", type=Path, nargs="+", metavar="directory",
                        help="experiments under one protocol, each with its own models (e.g. "
                             "Table 1's and Table 3's OffsetL2 models, trained apart)")
    claims.add_argument("--at-epoch", type=positive_int, default=None, metavar="N",
                        help="on the test accuracy at epoch N (a test pass every experiment made, "
                             "and every run reached), not of the final parameters")

    compare = commands.add_parser(
        "compare", help="the runs of several experiments side by side (a width, lr or dataset "
                        "study), every pair tested; unfinished ones at an epoch they reached")
    compare.add_argument("directories", type=Path, nargs="+", metavar="directory")
    compare.add_argument("--models", type=comma_list, default=None,
                         help="only these models (names or specs, comma-separated)")
    compare.add_argument("--at-epoch", type=positive_int, default=None, metavar="N",
                         help="the test accuracy at epoch N (a test pass every experiment made, "
                              "and every run reached: so an experiment still training can be "
                              "read), not of the final parameters")
    compare.add_argument("--out", type=Path, default=None, metavar="FILE",
                         help="also write the comparison (Markdown) to FILE, with its figure "
                              "of the runs beside it (FILE with .png)")

    analyze = commands.add_parser("analyze", help="geometric analyses of an experiment's runs")
    analyze.add_argument("directory", type=Path)

    bench = commands.add_parser("bench", help="measure the engine against an author-style loop")
    bench.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    bench.add_argument("--runs", type=positive_int, default=20, help="runs per variant")
    bench.add_argument("--epochs", type=positive_int, default=2, help="timed epochs per chunk")
    bench.add_argument("--repeats", type=positive_int, default=1, metavar="K",
                       help="time every engine case K times, each between its own peak and loop "
                            "measurements, and report the median with the range (a noisy host)")
    bench.add_argument("--processes", type=positive_int, default=1, metavar="K",
                       help="CPU: also time every case as K processes of one thread each, side "
                            "by side, each training its share of the runs (as --executor ray "
                            "--cpus-per-chunk 1 trains a sweep's chunks on one machine)")
    bench.add_argument("--max-memory", type=memory_size, default="8G", metavar="SIZE",
                       help="memory budget of a case (with --processes: of all K together)")
    bench.add_argument("--train-subset", type=positive_int, default=None, metavar="N")
    bench.add_argument("--no-bf16", action="store_true", help="skip the bf16 measurement")
    bench.add_argument("--precisions", default=None, metavar="P[,P]",
                       help="time only these precisions (fp32, bf16, tf32, 3xtf32; default: "
                            "all the device has)")
    bench.add_argument("--no-speed", action="store_true",
                       help="skip the timings (with --accuracy: only the accuracy comparison)")
    bench.add_argument("--engine", default="auto", metavar="E[,E]",
                       help="engine paths to time: auto (the path the engine takes: fused on "
                            "CUDA, hand-written on the CPU), hand-written, fused, compiled, "
                            "autograd; comma-separated (default auto)")
    bench.add_argument("--accuracy", action="store_true",
                       help="also train Table 1's and Table 3's models in fp32 and in bf16 (and "
                            "TF32 and 3xTF32 on CUDA) from the same seeds and test each precision's "
                            "equivalence with fp32, run by run")
    bench.add_argument("--accuracy-out", type=Path, default=None, metavar="DIR",
                       help="write the accuracy comparison to DIR/accuracy.md and accuracy.json")
    bench.add_argument("--accuracy-runs", type=positive_int, default=5, metavar="R")
    bench.add_argument("--accuracy-epochs", type=positive_int, default=300, metavar="E")
    bench.add_argument("--accuracy-subset", type=positive_int, default=10000, metavar="N",
                       help="training images for the accuracy comparison (60000: all)")
    bench.add_argument("--compare-accuracy", nargs=2, default=None,
                       metavar=("REFERENCE[:P]", "OTHER[:P]"),
                       help="instead of training: compare the runs of two accuracy.json files "
                            "from the same seeds (P: the precision to read from each, fp32 by "
                            "default), OTHER - REFERENCE run by run, with the --accuracy verdicts; "
                            "fp32 against fp32 from two devices or versions is the floor any "
                            "change of rounding sets")
    return parser


def add_protocol_arguments(parser, defaults: bool, eval_every: int | None = None) -> None:
    """The training-protocol options that train, sweep and reproduce share. Without
    ``defaults`` every option defaults to None (reproduce: None means "the preset's value")."""
    d = (lambda value: value) if defaults else (lambda value: None)
    parser.add_argument("--epochs", type=positive_int, default=d(5000))
    parser.add_argument("--lr", type=positive_float, default=d(1e-3))
    parser.add_argument("--width", type=positive_int, default=d(128))
    parser.add_argument("--dataset", default=d("mnist"),
                        help=f"{', '.join(data_mod.DATASETS)}, or a directory of your own idx "
                             f"files (a path with a '/', e.g. ./kmnist)")
    parser.add_argument("--preprocess", choices=data_mod.PREPROCESS_MODES, default=d("raw"))
    parser.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                        help="train on the first N training examples")
    parser.add_argument("--eval-every", type=positive_int, default=d(eval_every), metavar="K",
                        help="measure test accuracy every K epochs (and at the last)")
    parser.add_argument("--offsetl2-form", choices=OFFSETL2_FORMS, default=d("paper"))
    parser.add_argument("--device", default=d("cpu"), help="cpu, cuda[:N] or auto")


def add_engine_arguments(parser, defaults: bool) -> None:
    """The batched engine's options that sweep and reproduce share."""
    d = (lambda value: value) if defaults else (lambda value: None)
    parser.add_argument("--precision", choices=PRECISIONS, default=d("fp32"),
                        help="fp32 (exact, default); bf16 first-layer products (CPU/GPU); tf32 (GPU); "
                             "3xtf32 (GPU, fused step: fp32 data, each product as three TF32 "
                             "products of exact halves)")
    parser.add_argument("--engine", choices=ENGINES, default=d("auto"),
                        help="auto (default): on CUDA the fused step where it covers the model, "
                             "else the hand-written step where it covers the model, else "
                             "autograd; compiled: the autograd step fused by torch.compile "
                             "(any model; CUDA graphs on a GPU; bf16 keeps activations in bf16); "
                             "fused: the paper's two-layer models in one Triton kernel per step "
                             "around the first layer's products (CUDA)")
    parser.add_argument("--base-seed", type=non_negative_int, default=d(0))
    parser.add_argument("--unpaired", action="store_true",
                        help="give every model its own seeds (default: run i of every model "
                             "starts from the same first-layer weights)")
    parser.add_argument("--max-memory", type=memory_size, default=d("8G"), metavar="SIZE",
                        help="memory budget for one chunk of runs, e.g. 8G or 512M (default 8G)")
    parser.add_argument("--checkpoint-every", type=non_negative_float, default=d(300.0), metavar="SECONDS",
                        help="write the checkpoint at most this often (0: after every epoch)")
    parser.add_argument("--max-runs-per-chunk", type=positive_int, default=None, metavar="N",
                        help="at most N runs in one chunk (more, smaller chunks: units of work "
                             "to spread over a Ray cluster)")
    cluster = parser.add_argument_group("executor (where the chunks train)")
    cluster.add_argument("--executor", choices=EXECUTORS, default="local",
                         help="local: this process, chunk after chunk (default); ray: each chunk "
                              "a Ray task (pip install 'distrep[ray]')")
    cluster.add_argument("--ray-address", default=None, metavar="ADDRESS",
                         help="join the Ray cluster at ADDRESS ('auto': the one this machine "
                              "belongs to); default: start a local Ray instance")
    cluster.add_argument("--cpus-per-chunk", type=positive_int, default=1, metavar="N",
                         help="CPUs a Ray chunk asks for and trains with (default 1)")
    cluster.add_argument("--gpus-per-chunk", type=non_negative_float, default=None, metavar="N",
                         help="GPUs a Ray chunk asks for (default: 1 with --device cuda, and with "
                              "--device auto on a cluster with GPUs; else 0)")
    cluster.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                         help="a directory every Ray node sees: a retried chunk resumes from its "
                              "own checkpoint there")


def comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of models")
    return items


def memory_size(text: str) -> int:
    """'8G', '8GiB', '512M', '1.5g' or plain bytes -> bytes (binary units)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 8G or 512M, got {text!r}") from None
    if not math.isfinite(value) or value > 1 << 60:
        raise argparse.ArgumentTypeError(f"expected a size like 8G or 512M, got {text!r} (too large)")
    if not value >= 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is {value:g} bytes; give at least 1M, "
                                         f"e.g. 8G or 512M (a number alone counts bytes)")
    return int(value)


def cmd_data(args) -> None:
    if args.data_command == "path":
        print(data_mod.cache_root())
        return
    spec = data_mod.get_spec(args.name)
    if args.data_command == "verify":
        data_mod.read_cached(spec)
        print(f"{spec.name}: all {len(spec.files)} files in {data_mod.cache_dir(spec)} verified")
        return
    target = data_mod.fetch(spec, from_dir=args.from_dir, log=lambda m: print(m, file=sys.stderr))
    print(f"{spec.name}: verified in {target}")


def cmd_models(args) -> None:
    from distrep.engine import engine_path
    from distrep.models import NAMES, parse
    names = list(NAMES)
    width = max(len(name) for name in names)
    print(f"{'name':<{width}}  {'spec':<32}  {'params':>7}  {'engine path':<12}  layers")
    for name in names:
        print(f"{name:<{width}}  {NAMES[name]:<32}  {parameter_count(name, args.width):>7}  "
              f"{engine_path(parse(name, args.width)):<12}  {describe(name, args.width)}")
    print("\nAny spec of layers joined by '-' works too, e.g. linear-relu-linear-relu-linear or "
          "linear-abs-gmlvq-neg (see distrep.models). The engine trains models of linear, offsetl2 "
          "and activation layers on its hand-written path, any other (the heads rbf, mahalanobis, "
          "gmlvq, cosine, or a layer you register) on its autograd path; --engine compiled "
          "trains any of them with one torch.compile'd step. The engine path shown is the CPU's: "
          "on CUDA the paper's two-layer models take the fused step (a Triton kernel).")


def cmd_train(args) -> None:
    from distrep.experiment import RUN_ENTRIES, config_differences, experiment_lock, refuse_foreign
    from distrep.train import TrainConfig, existing_config, save_run, train

    config = TrainConfig(model=args.model, epochs=args.epochs, lr=args.lr, seed=args.seed,
                         width=args.width, dataset=args.dataset, preprocess=args.preprocess,
                         train_subset=args.train_subset, eval_every=args.eval_every,
                         offsetl2_form=args.offsetl2_form, device=args.device).validate()
    with experiment_lock(args.out):
        refuse_foreign(args.out, RUN_ENTRIES, "run")
        previous = existing_config(args.out)
        if previous is not None and not args.force:
            ours = config.result_fields
            differ = config_differences({k: previous.get(k) for k in ours}, ours)
            if not differ:
                print(f"{args.out} already holds this finished run; nothing to do")
                return
            raise DistrepError(f"{args.out} holds a finished run with a different config "
                               f"({'; '.join(differ)}); use another --out or --force")
        data = data_mod.load_dataset(config.dataset, config.preprocess)
        result = train(config, data, progress=not args.quiet)
        save_run(result, args.out)
    status = f" (diverged at epoch {result.diverged_epoch})" if result.diverged else ""
    print(f"{args.model}: test accuracy {100 * result.final['test_acc']:.2f}%, train loss "
          f"{result.final['train_loss']:.4f} after {config.epochs} epochs{status} -> {args.out}")


def cmd_sweep(args) -> None:
    from distrep.experiment import run_experiment
    from distrep.report import final_accuracy
    from distrep.storage import read_arrays
    from distrep.sweep import SweepConfig, results_dir

    executor = executor_from(args)
    out: Path = args.out
    with executor.session(args.device):       # Ray: the device as its workers see it
        config = SweepConfig(
            models=args.models, runs=args.runs, epochs=args.epochs, lr=args.lr, width=args.width,
            dataset=args.dataset, preprocess=args.preprocess, train_subset=args.train_subset,
            eval_every=args.eval_every, offsetl2_form=args.offsetl2_form, precision=args.precision,
            base_seed=args.base_seed, paired=not args.unpaired, device=args.device,
            max_memory=args.max_memory, checkpoint_every=args.checkpoint_every,
            max_runs_per_chunk=args.max_runs_per_chunk, engine=args.engine).validate()
        config, _, _ = run_experiment(out, config, args.force, progress=not args.quiet,
                                      executor=executor)
    for name in config.models:
        m = read_arrays(results_dir(out, display_name(name)) / "metrics.npz")
        acc = final_accuracy(m)
        ok = acc[~np.isnan(acc)]
        spread = f"{ok.std(ddof=1):.2f}" if len(ok) > 1 else "-"
        mean = f"{ok.mean():6.2f}" if len(ok) else "     -"
        print(f"{display_name(name):<16} test accuracy {mean} +/- {spread} %  ({len(ok)} of "
              f"{len(acc)} runs finished, {len(acc) - len(ok)} diverged)")
    print(f"results in {out} (`distrep report {quote(out)}` writes its report, "
          f"`distrep analyze {quote(out)}` adds the analyses)")


def cmd_reproduce(args) -> None:
    from distrep.experiment import experiment_lock
    from distrep.reproduce import GROUPS, PRESET_NAMES, requested_device, reproduce, resolve_preset

    if args.preset not in PRESET_NAMES:
        raise DistrepError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    overrides = {name: getattr(args, name) for name in (
        "models", "runs", "epochs", "lr", "width", "dataset", "preprocess", "offsetl2_form",
        "train_subset", "eval_every", "precision", "device", "base_seed", "max_memory",
        "checkpoint_every", "max_runs_per_chunk", "engine")}
    overrides["paired"] = False if args.unpaired else None
    if overrides["dataset"] is not None:
        data_mod.get_spec(overrides["dataset"])
    out = args.out or Path("runs") / args.preset
    members = GROUPS.get(args.preset, {"": args.preset})     # {subdirectory: preset}
    if args.dataset is not None and len({resolve_preset(p, {}).dataset for p in members.values()}) > 1:
        raise DistrepError(f"--dataset: {args.preset} runs on {' and '.join(members)} by design; "
                           f"name one of its presets ({', '.join(members.values())}) to change it")
    executor = executor_from(args)
    with executor.session(requested_device(overrides)):     # Ray: the device as its workers see it
        if args.dry_run:
            from distrep.reproduce import dry_run
            for preset in members.values():
                dry_run(preset, overrides, executor=executor)
            return
        # every dataset of a group present (or fetched) before its first member trains
        for dataset in dict.fromkeys(resolve_preset(p, overrides).dataset for p in members.values()):
            data_mod.fetch(dataset)
        for label, preset in members.items():
            target = out / label
            reproduce(preset, target, overrides, force=args.force, progress=not args.quiet,
                      executor=executor)
            print(f"{preset}: report in {target / 'report.html'} and {target / 'report.md'}")
    if args.preset in GROUPS:
        from distrep.report import write_group_report
        with experiment_lock(out):
            paths = write_group_report(out, args.preset, {label: out / label for label in members})
        print(f"{args.preset}: report over {', '.join(members)} in {paths['html']} and {paths['md']}")


def executor_from(args):
    from distrep.executors import make_executor
    return make_executor(args.executor, args.ray_address, args.cpus_per_chunk,
                         args.gpus_per_chunk, args.checkpoint_dir)


def cmd_report(args) -> None:
    from distrep.experiment import experiment_lock, require_experiment
    from distrep.report import write_report
    require_experiment(args.directory)       # an unfinished one is read at an epoch it reached
    with experiment_lock(args.directory):
        paths = write_report(args.directory, at_epoch=args.at_epoch)
    print(f"report in {paths['html']} and {paths['md']}")


def cmd_claims(args) -> None:
    from distrep.claims import pooled_values, verdicts
    from distrep.report import CLAIMS_NOTE, _md_table
    values, paired = pooled_values(args.directories, args.at_epoch)
    body = [[v.claim.text, v.claim.printed, v.ours, v.verdict + (f" ({v.why})" if v.why else "")]
            for v in verdicts(values, paired)]
    reading = ("final test accuracy" if args.at_epoch is None
               else f"test accuracy at epoch {args.at_epoch:,}")
    print(f"# The paper's claims on the {reading} of {', '.join(values)} "
          f"({'paired' if paired else 'unpaired'} runs of {', '.join(map(str, args.directories))})"
          f"\n\n{CLAIMS_NOTE}\n")
    print(_md_table(["the paper's claim", "the paper printed", "these runs", "verdict"], body))


def cmd_compare(args) -> None:
    from distrep.compare import read_groups, render, save_figure
    from distrep.storage import atomic_write_bytes
    if args.out is not None and args.out.is_dir():
        raise DistrepError(f"--out {args.out} is a directory; name the file to write")
    groups = read_groups(args.directories, args.models, args.at_epoch)
    if args.out is None:
        print(render(groups, at_epoch=args.at_epoch), end="")
        return
    figure = args.out.with_suffix(".png")       # beside the Markdown, which shows it
    save_figure(groups, figure, args.at_epoch)
    text = render(groups, figure.name, args.at_epoch)
    atomic_write_bytes(args.out, text.encode())
    print(text, end="")


def cmd_analyze(args) -> None:
    from distrep.analysis import analyze
    from distrep.experiment import experiment_lock, require_finished
    from distrep.report import load_experiment, write_report
    require_finished(args.directory)
    with experiment_lock(args.directory):
        load_experiment(args.directory)   # the report it ends with must be readable: say so
        analyze(args.directory, log=lambda m: print(m, file=sys.stderr))   # before the analyses
        paths = write_report(args.directory)
    print(f"analyses in {args.directory / 'analysis'}; report in {paths['html']}")


def cmd_bench(args) -> None:
    from distrep.bench import accuracy_check, run_bench
    from distrep.experiment import check_writable
    from distrep.models import TABLE1, TABLE3
    from distrep.provenance import resolve_device
    from distrep.sweep import SweepConfig
    if args.compare_accuracy is not None:
        return compare_accuracy(*args.compare_accuracy)
    # every option is checked before the first timing, not after minutes of them
    cuda = resolve_device(args.device).type == "cuda"
    n_train = data_mod.MNIST.train_images.shape[0]
    for name, value in (("--train-subset", args.train_subset), ("--accuracy-subset", args.accuracy_subset)):
        if value is not None and value > n_train:
            raise DistrepError(f"{name} {value} is more than the {n_train} MNIST training images")
    if cuda and args.processes > 1:
        raise DistrepError("--processes is for the CPU: a GPU trains its runs in one process")
    engines = tuple(e.strip() for e in args.engine.split(",") if e.strip())
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise DistrepError(f"--engine: unknown engine {', '.join(bad) or '(none)'}; choose from "
                           f"{', '.join(ENGINES)}")
    fused = cuda and computes(engine_path(parse(TABLE1[0]), engines[-1], "cuda"), "3xtf32")
    judged = ((() if args.no_bf16 else ("bf16",)) + (("tf32",) if cuda else ())
              + (("3xtf32",) if fused else ()))
    if args.accuracy:
        for precision in ("fp32", *judged):
            SweepConfig(models=list(TABLE1 + TABLE3), runs=args.accuracy_runs, epochs=args.accuracy_epochs,
                        precision=precision, device=args.device, engine=engines[-1]).validate()
        if args.accuracy_out is not None:
            check_writable(args.accuracy_out)
    chosen = None
    if args.precisions is not None:
        chosen = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
        here = ("fp32", "bf16") + (CUDA_PRECISIONS if cuda else ())
        wrong = [p for p in chosen if p not in here]
        if wrong or not chosen:
            raise DistrepError(f"--precisions: {', '.join(wrong) or '(none)'} cannot be timed here; "
                               f"choose from {', '.join(here)}"
                               + ("" if cuda else " (tf32 and 3xtf32 need CUDA)"))
    if not args.no_speed:
        for engine in engines:
            SweepConfig(models=list(TABLE1 + TABLE3), device=args.device, engine=engine).validate()
        run_bench(args.device, args.runs, args.epochs, args.max_memory, args.train_subset,
                  bf16=not args.no_bf16, engines=engines, precisions=chosen, repeats=args.repeats,
                  processes=args.processes)
    if args.accuracy:
        accuracy_check(args.device, judged, args.accuracy_runs, args.accuracy_epochs,
                       args.accuracy_subset, engine_name=engines[-1], out_dir=args.accuracy_out)


def compare_accuracy(reference: str, other: str) -> None:
    """``bench --compare-accuracy REFERENCE[:P] OTHER[:P]``: one line per model shared."""
    from distrep.bench import compare_records, describe_row

    def record(spec: str) -> tuple[Path, str]:
        path, _, precision = spec.rpartition(":")
        return (Path(path), precision) if path and precision in PRECISIONS else (Path(spec), "fp32")

    (a, pa), (b, pb) = record(reference), record(other)
    for row in compare_records(a, pa, b, pb):
        print(describe_row(row, f"{pb} of {b}", f"{pa} of {a}"))


def _usable_streams() -> None:
    """Output that cannot fail on its own: a closed stream goes to /dev/null, and characters
    the stream's encoding lacks (±, → under PYTHONIOENCODING=ascii) are escaped, not fatal."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or getattr(stream, "closed", False):
            setattr(sys, name, open(os.devnull, "w"))
        elif hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def main(argv: list[str] | None = None) -> int:
    _usable_streams()
    args = build_parser().parse_args(argv)
    try:
        {"data": cmd_data, "models": cmd_models, "train": cmd_train, "sweep": cmd_sweep,
         "reproduce": cmd_reproduce, "report": cmd_report, "claims": cmd_claims,
         "compare": cmd_compare, "analyze": cmd_analyze, "bench": cmd_bench}[args.command](args)
    except DistrepError as e:
        print(f"distrep: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:        # a sweep checkpointed and stopped on SIGINT or SIGTERM
        print(f"distrep: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("distrep: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `distrep models | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:     # a disk full or a file vanished under us: one line, not a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"distrep: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except MemoryError:
        print("distrep: error: out of memory; use fewer runs, a smaller width or a smaller "
              "--max-memory", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
