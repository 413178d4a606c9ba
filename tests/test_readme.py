"""The README stays true: every command line it shows parses with the CLI it documents (options,
choices, presets, model names), every option it names inline exists, and its Python snippets run
as written, in order, in a fresh process."""

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distrep.cli import build_parser
from distrep.models import parse as parse_model
from distrep.reproduce import PRESET_NAMES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Placeholders the README uses for values, and what stands in for them here
PLACEHOLDERS = {"N": "2", "K": "2", "A,B,...": "ReLU,Abs", "$SLURM_ARRAY_TASK_ID": "0"}


def fenced(language: str) -> list[tuple[int, str]]:
    """(line number, text) of each ```language block of the README."""
    blocks, start, lines = [], None, []
    for number, line in enumerate(README.splitlines(), 1):
        if start is None and line.strip() == f"```{language}":
            start, lines = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines)))
            start = None
        elif start is not None:
            lines.append(line)
    return blocks


def command_lines() -> list[tuple[int, str]]:
    """Every ``distrep ...`` line of the README's bash blocks, continuations joined, comments
    dropped."""
    found = []
    for start, block in fenced("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for offset, line in enumerate(text.splitlines()):
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("distrep "):
                found.append((start + offset, line))
    return found


def concrete(line: str) -> list[str]:
    """The arguments of a README command line as a user would type one instance of it: optional
    parts ``[--x a|b]`` taken with their first alternative, ``...`` dropped, placeholders filled."""
    for name, value in PLACEHOLDERS.items():
        if name.startswith("$"):
            line = line.replace(name, value)
    tokens = []
    for token in shlex.split(line.replace("[", " ").replace("]", " "))[1:]:
        if token == "...":
            continue
        tokens.append(PLACEHOLDERS.get(token, token.split("|")[0]))
    return tokens


def test_the_readme_shows_commands_of_every_kind():
    commands = {concrete(line)[0] for _, line in command_lines()}
    assert {"reproduce", "report", "claims", "train", "sweep"} <= commands


@pytest.mark.parametrize("number,line", command_lines(), ids=lambda v: str(v)[:40])
def test_readme_command_parses(number, line):
    """The CLI takes the line; its preset and model names exist."""
    tokens = concrete(line)
    try:
        args = build_parser().parse_args(tokens)
    except SystemExit:
        pytest.fail(f"README line {number}: `{line}` does not parse")
    if args.command == "reproduce":
        assert args.preset in PRESET_NAMES, f"README line {number}: unknown preset {args.preset}"
    for name in getattr(args, "models", None) or [getattr(args, "model", None)]:
        if name is not None:
            parse_model(name)            # raises on an unknown name or spec


def test_the_command_line_check_catches_a_wrong_option():
    """What the parse test relies on: an option the CLI lacks, or a bad choice, is refused."""
    for line in ("distrep sweep --models ReLU --out o --learning-rate 0.1",
                 "distrep reproduce table1 [--precision fp16]"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(concrete(line))


def subcommand_options() -> dict[str, set[str]]:
    """Each subcommand's option strings (``data``'s actions under ``data``)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    options = {}
    for name, sub in commands.items():
        names = {s for a in sub._actions for s in a.option_strings}
        for action in sub._actions:
            if action.dest == "data_command":
                for inner in action.choices.values():
                    names |= {s for a in inner._actions for s in a.option_strings}
        options[name] = names
    return options


def test_every_inline_option_exists():
    """An inline `distrep COMMAND ... --option ...` in the README or docs/engine.md (the living
    docs; the dated result folders keep the commands they ran) names options COMMAND has (an
    inline span may be a fragment, so only its options are checked)."""
    options = subcommand_options()
    spans = re.findall(r"`(distrep [^`]+)`", README + (ROOT / "docs" / "engine.md").read_text())
    assert len(spans) > 20
    for span in spans:
        words = span.split()
        command = words[1]
        assert command in options, f"`{span}`: no command {command!r}"
        for word in words[2:]:
            flag = word.split("=")[0]
            if flag.startswith("--"):
                assert flag in options[command], f"`{span}`: {command} has no option {flag}"


def test_readme_python_snippets_run(mnist, tmp_path):
    """The README's Python blocks, in order, in one fresh process, with the few names they take
    as given (``h``; two models of one spec for the analyses; the experiments read back) made,
    and the sweep the custom layer's comment promises run for real on a few examples."""
    blocks = [text for _, text in fenced("python")]
    assert len(blocks) >= 5
    given = {   # what a block uses without defining it, by the first line that needs it
        "y = layer(h)": "h = torch.randn(7, 128)\n",
        "runs = StackedRuns": "model_a, model_b = create_model('ReLU', seed=0), create_model('ReLU', seed=1)\n"
                              "x_test, y_test = x_test[:500], y_test[:500]\n",
        "nets = trained_models": textwrap.dedent("""
            import distrep.cli
            small = ["--epochs", "2", "--train-subset", "50", "--quiet"]
            assert distrep.cli.main(["sweep", "--models", "ReLU2-Neg", "--runs", "2", *small,
                                     "--out", "runs/quick"]) == 0
            assert distrep.cli.main(["train", "--model", "ReLU2-Neg", *small, "--out", "runs/one"]) == 0
            """),
    }
    checks = {  # what a block promises, checked right after it
        "nets = trained_models": "assert len(nets) == 2 and one.spec == nets[0].spec\n",
    }
    program = ["import torch", "from distrep.models import create_model"]
    for block in blocks:
        for marker, setup in given.items():
            if marker in block:
                program.append(setup)
        program.append(block)
        program += [check for marker, check in checks.items() if marker in block]
        if "register_layer(" in block:
            program.append(textwrap.dedent(f"""
                import distrep.cli
                assert distrep.cli.main(["sweep", "--models", "linear-relu-cauchy-neg,ReLU",
                                         "--runs", "1", "--epochs", "2", "--train-subset", "50",
                                         "--out", {str(tmp_path / 'cauchy')!r}, "--quiet"]) == 0
                """))
    program.append("assert torch.isfinite(y).all() and y.shape == (7, 10)")
    program.append("print('snippets ran')")
    result = subprocess.run([sys.executable, "-c", "\n".join(program)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "snippets ran" in result.stdout
    assert (tmp_path / "cauchy" / "summary.csv").exists()


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", markdown, flags=re.M)}


def links(markdown: str) -> list[str]:
    """The targets of the Markdown links and images that stay in the repository."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", markdown) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("document", ["README.md", "docs/engine.md"])
def test_every_link_resolves(document):
    """Every relative link of the living docs names a file or folder of the repository, and every
    #anchor a heading of the page it points to."""
    text = (ROOT / document).read_text()
    assert len(links(text)) > 5
    for target in links(text):
        path, _, anchor = target.partition("#")
        page = (ROOT / document).parent / path if path else ROOT / document
        assert page.exists(), f"{document}: link to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(page.read_text()), f"{document}: no heading for {target}"


def test_slugs_are_githubs():
    assert slug("Reproducing the paper: `distrep reproduce`") == "reproducing-the-paper-distrep-reproduce"
    assert slug("Where a GPU step's time goes") == "where-a-gpu-steps-time-goes"
    assert slug("The CPU step, its speed from run to run, and what limits it") == \
        "the-cpu-step-its-speed-from-run-to-run-and-what-limits-it"
