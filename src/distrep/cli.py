"""The ``distrep`` command. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from distrep import data as data_mod
from distrep.errors import DistrepError
from distrep.layers import OFFSETL2_FORMS
from distrep.models import ALIASES, describe, parameter_count


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
    train.add_argument("--out", required=True, type=Path, help="run directory to write")
    train.add_argument("--epochs", type=positive_int, default=5000)
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--width", type=positive_int, default=128)
    train.add_argument("--dataset", default="mnist")
    train.add_argument("--preprocess", choices=data_mod.PREPROCESS_MODES, default="raw")
    train.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                       help="train on the first N training examples")
    train.add_argument("--eval-every", type=positive_int, default=1, metavar="K",
                       help="measure test accuracy every K epochs (and at the last)")
    train.add_argument("--offsetl2-form", choices=OFFSETL2_FORMS, default="paper")
    train.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--force", action="store_true",
                       help="overwrite a finished run made with a different config")
    return parser


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
    width = max(len(name) for name in ALIASES)
    print(f"{'name':<{width}}  {'spec':<32}  {'params':>7}  layers")
    for name, spec in ALIASES.items():
        print(f"{name:<{width}}  {spec:<32}  {parameter_count(name, args.width):>7}  "
              f"{describe(name, args.width)}")
    print("\nAny spec of layers joined by '-' works too, e.g. linear-relu-linear-relu-linear "
          "(see distrep.models).")


def cmd_train(args) -> None:
    from distrep.train import TrainConfig, existing_config, save_run, train

    config = TrainConfig(model=args.model, epochs=args.epochs, lr=args.lr, seed=args.seed,
                         width=args.width, dataset=args.dataset, preprocess=args.preprocess,
                         train_subset=args.train_subset, eval_every=args.eval_every,
                         offsetl2_form=args.offsetl2_form, device=args.device).validate()
    data_mod.get_spec(config.dataset)
    previous = existing_config(args.out)
    if previous is not None and not args.force:
        if previous == asdict(config):
            print(f"{args.out} already holds this finished run; nothing to do")
            return
        raise DistrepError(f"{args.out} holds a finished run with a different config; "
                           f"use another --out or --force")
    data = data_mod.load_dataset(config.dataset, config.preprocess)
    result = train(config, data, progress=not args.quiet)
    save_run(result, args.out)
    status = f" (diverged at epoch {result.diverged_epoch})" if result.diverged else ""
    print(f"{args.model}: test accuracy {100 * result.final['test_acc']:.2f}%, train loss "
          f"{result.final['train_loss']:.4f} after {config.epochs} epochs{status} -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"data": cmd_data, "models": cmd_models, "train": cmd_train}[args.command](args)
    except DistrepError as e:
        print(f"distrep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distrep: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `distrep models | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
