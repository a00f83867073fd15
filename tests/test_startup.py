"""Start-up: `lungbench --version` and `--help` import no heavy library, and each command
imports what it uses and no more.

The budget is held by listing what a fresh interpreter has loaded (sys.modules), never by
timing it: torch alone takes 1-2 s to import and MONAI 3.5 s, so an unwanted import shows up
here on any machine, busy or quiet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from lungbench import cli
from lungbench.commands import LazySubParsers
from lungbench.commands.train import EXPERIMENTS

# Each of these takes from 0.1 s (tqdm) to 3.5 s (MONAI) to import.
HEAVY = ("torch", "monai", "matplotlib", "pandas", "numpy", "scipy", "sklearn", "h5py", "tqdm")


def _loaded_after(code: str) -> set[str]:
    """The top-level packages of HEAVY that a fresh interpreter has loaded after `code`."""
    probe = (
        "import io, json, sys, contextlib\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_heavy_library():
    assert _loaded_after("import lungbench.cli") == set()


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"]])
def test_version_and_help_load_no_heavy_library(argv):
    code = f"from lungbench.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _loaded_after(code) == set()


def test_bench_and_predict_load_plots_and_scipy_only_when_used():
    """matplotlib (0.7 s) is imported when a sweep's plots are drawn and scipy.stats (1 s)
    when an interval is computed: `bench --help`, a refused option and a DDP rank that
    never draws do not pay for them."""
    code = (
        "import lungbench.experiments.speedup, lungbench.predict.calibration\n"
        "import lungbench.commands.bench, lungbench.commands.predict"
    )
    assert _loaded_after(code).isdisjoint({"matplotlib", "scipy"})


def test_report_and_compare_need_no_torch_or_monai():
    """`lungbench report` and `lungbench compare` read files: no tensor is made."""
    code = (
        "from lungbench.cli import build_parser\n"
        "build_parser().parse_args(['report', 'RUN'])\n"
        "build_parser().parse_args(['compare', 'A', 'B'])\n"
        "import lungbench.report.html, lungbench.report.compare, lungbench.report.runview"
    )
    assert _loaded_after(code).isdisjoint({"torch", "monai"})


def test_the_model_registry_loads_monai_only_for_a_monai_network():
    code = (
        "from lungbench.models import create_model, list_models\n"
        "assert 'resnet18' in list_models()\n"
        "create_model('dualpath3d')"
    )
    assert "monai" not in _loaded_after(code)


def _commands(parser: argparse.ArgumentParser) -> LazySubParsers:
    (action,) = [a for a in parser._actions if isinstance(a, LazySubParsers)]
    return action


def _listed(action: argparse._SubParsersAction) -> dict[str, str]:
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_the_lazy_tables_say_what_the_modules_say():
    """The name and one-line help shown before a module is imported are the module's own."""
    top = _commands(cli.build_parser())
    assert _listed(top) == {name: summary for name, (_, summary) in cli.COMMANDS.items()}
    for name, (module, summary) in cli.COMMANDS.items():
        scratch = argparse._SubParsersAction(
            option_strings=[], prog="lungbench", parser_class=cli.OneLineParser
        )
        __import__(module, fromlist=["register"]).register(scratch)
        assert _listed(scratch) == {name: summary}, module
    for name, (module, summary) in EXPERIMENTS.items():
        command = __import__(module, fromlist=["NAME"])
        assert (name, summary) == (command.NAME, command.HELP), module


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_command_help_is_the_full_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    full = _commands(cli.build_parser()).load(name).format_help()
    assert capsys.readouterr().out == full
    assert full.startswith(f"usage: lungbench {name} ")


def test_every_command_and_experiment_parser_loads():
    parser = cli.build_parser()
    top = _commands(parser)
    top.load_all()
    assert set(top.choices) == set(cli.COMMANDS)
    train = _commands(top.choices["train"])
    assert set(train.choices) == set(EXPERIMENTS)
    assert all(p.get_default("func") for p in train.choices.values())
    assert all(
        top.choices[n].get_default("func") for n in cli.COMMANDS if n not in ("train", "data")
    )


def test_an_unknown_option_is_named_by_its_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "mosmed", "--no-such-option"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("see `lungbench train mosmed --help`)"), err
    assert "--no-such-option" in err and "\n" not in err


def test_an_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["no-such-command"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(repr(name) in err for name in cli.COMMANDS)
