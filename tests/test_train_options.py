"""`lungbench train` options are made from the recipes' config fields (lungbench.core.options,
lungbench.commands._options): every declared field is an option whose --help shows its full
and --quick defaults, and the options give back the config they describe."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

import pytest

from lungbench.commands._options import (
    add_config_options,
    config_from_args,
    help_text,
    shown_options,
    shown_value,
)
from lungbench.commands.train import EXPERIMENT_MODULES
from lungbench.core.options import flat_values, nested, option, positive_int, replaced

# Every option each recipe had when they were written by hand: none may go missing.
FLAGS = {
    "chestxray": (
        "--store --n --image-size --labels --model --methods --freeze --weights --dropout "
        "--epochs --batch --batch-size --lr --patience --folds --val-fraction --class-weights "
        "--save-models --pretrain-epochs --device --telemetry-interval --workers --seed "
        "--cost-only --cost-models --cost-samples --cost-epochs --gpu-memory-gb --quick --out "
        "--run-id --resume"
    ),
    "nodule2d": (
        "--store --n --image-size --augmentation --model --method --weights --epochs "
        "--batch --batch-size --lr --lr-iters --schedule --tta --device --workers --seed "
        "--telemetry-interval --quick --out --run-id --resume --no-precise-bn"
    ),
    "lidc-pretrain": (
        "--store --synth-n --val-fraction --filters --depth --resume --data-seed --quick "
        "--epochs --batch --lr --optimizer --schedule --patience --amp --device --workers "
        "--seed --telemetry-interval --out --run-id --no-progress --dist-timeout --target"
    ),
    "lungx-cv": (
        "--store --synth-n --folds --val-fraction --write-folds --pretrained --lidc-store "
        "--finetune-lr --data-seed --quick --epochs --batch --lr --optimizer --schedule "
        "--patience --amp --device --workers --seed --telemetry-interval --out --run-id "
        "--no-progress --resume"
    ),
    "mosmed": (
        "--variants --store --synth-n --grid --filters --dense --padding --val-fraction "
        "--data-seed --quick --epochs --batch --lr --optimizer --schedule --patience --amp "
        "--device --workers --seed --telemetry-interval --out --run-id --no-progress --resume"
    ),
}


def _recipe(module_name: str):
    """(command module, config class, FULL, QUICK, parser) of one `lungbench train` recipe."""
    command = importlib.import_module(module_name)
    recipe = importlib.import_module(module_name.replace(".commands.train.", ".experiments."))
    parser = argparse.ArgumentParser(prog=f"lungbench train {command.NAME}")
    command.add_arguments(parser)
    cls = type(command.make_config(parser.parse_args([])))
    return command, cls, recipe.FULL, recipe.QUICK, parser


def _value(cfg, name):
    """The field `name` of the config or of its nested TrainConfig."""
    return getattr(cfg, name) if hasattr(cfg, name) else getattr(cfg.train, name)


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)  # argparse wraps help lines anywhere, hyphens included


@pytest.mark.parametrize("module_name", EXPERIMENT_MODULES)
def test_every_declared_option_is_in_help_with_its_defaults(module_name):
    command, cls, full, quick, parser = _recipe(module_name)
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == set(FLAGS[command.NAME].split())
    helped = _squeezed(parser.format_help())
    shown = list(shown_options(cls))
    assert shown, cls
    fulls, quicks = flat_values(full), flat_values(quick)
    assert any(quicks[item.name] != fulls[item.name] for item in shown)
    for item in shown:
        spec, value, quick_value = item.option, fulls[item.name], quicks[item.name]
        assert spec.flag_of(item.name) in flags, item.name
        differs = quick_value != value
        text = help_text(spec, value, quick_value if differs else dataclasses.MISSING)
        assert _squeezed(text) in helped, (item.name, text)
        said = spec.default_text or shown_value(value)
        assert _squeezed(f"(default:{said}") in _squeezed(text), item.name
        if differs and not spec.default_text:  # --quick's value, said where it differs only
            assert _squeezed(f"--quick:{shown_value(quick_value)}") in _squeezed(text)


@pytest.mark.parametrize("module_name", EXPERIMENT_MODULES)
@pytest.mark.parametrize("mode", ["full", "quick"])
def test_no_options_give_the_full_or_quick_config(module_name, mode):
    command, cls, full, quick, parser = _recipe(module_name)
    assert isinstance(full, cls) and isinstance(quick, cls)
    argv = ["--quick"] if mode == "quick" else []
    cfg = command.make_config(parser.parse_args(argv))
    assert cfg == (quick if mode == "quick" else full)


def _argv(cls, cfg, full) -> list[str]:
    """The options that say `cfg`'s values on the command line (without --quick)."""
    argv = []
    fulls = flat_values(full)
    for item in shown_options(cls):
        spec, value = item.option, _value(cfg, item.name)
        flag = spec.flag_of(item.name)
        if value in (None, ()) or spec.convert is not None:
            continue  # the default already (None, ()), or said in another form (tested apart)
        if isinstance(value, bool):
            if value != fulls[item.name]:
                argv.append(flag)
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


@pytest.mark.parametrize("module_name", EXPERIMENT_MODULES)
def test_options_round_trip_the_quick_config(module_name):
    """The --quick config, spelt out option by option without --quick, comes back the same:
    the user's values win over the full defaults, parsed into the config's types."""
    _, cls, full, quick, parser = _recipe(module_name)
    quick_cfg = config_from_args(parser.parse_args(["--quick"]), cls, full, quick)
    argv = _argv(cls, quick_cfg, full)
    spelt = config_from_args(parser.parse_args(argv), cls, full, quick)
    if "quick" in {f.name for f in dataclasses.fields(cls)}:
        spelt = dataclasses.replace(spelt, quick=True)  # said by --quick only
    assert spelt == quick_cfg, argv


def test_options_in_other_forms_convert_into_the_config():
    from lungbench.commands.train import chestxray, mosmed

    parser = argparse.ArgumentParser()
    chestxray.add_arguments(parser)
    argv = ["--quick", "--class-weights", "per-label", "--weights", "a=x.pt", "--weights", "b=y"]
    cfg = chestxray.make_config(parser.parse_args(argv))
    assert cfg.per_label_weights is True and cfg.weights == (("a", "x.pt"), ("b", "y"))
    assert cfg.generated and cfg.train.progress is False  # FULL's fixed values stay
    parser = argparse.ArgumentParser()
    mosmed.add_arguments(parser)
    args = parser.parse_args(["--variants", "residual", "baseline", "residual", "--no-progress"])
    cfg = mosmed.make_config(args)
    assert cfg.variants == ("residual", "baseline") and cfg.train.progress is False


@dataclasses.dataclass(frozen=True)
class _Inner:
    size: int = option(2, type=positive_int, help="inner size")
    verbose: bool = option(True, flag="--no-verbose", help="quiet")
    hidden: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
    n: int = option(type=positive_int, group="data", help="items")
    names: tuple[str, ...] = option(("a",), nargs="+", help="names")
    inner: _Inner = nested(_Inner, group="inner", show={"size": {"flag": "--sz"}, "verbose": {}})


def test_generator_on_a_small_config():
    full = _Outer(n=5, inner=_Inner(hidden=1))
    quick = replaced(full, {"n": 1})
    parser = argparse.ArgumentParser()
    add_config_options(parser, _Outer, full, quick, quick_help="small")
    text = parser.format_help()
    assert "items (default: 5; --quick: 1)" in text and "--sz SIZE" in text
    assert "names (default: a)" in text  # --quick keeps it: not said
    assert "quiet (default: on)" in text and "--hidden" not in text
    cfg = config_from_args(parser.parse_args([]), _Outer, full, quick)
    assert cfg == full
    argv = ["--quick", "--names", "x", "y", "--sz", "7", "--no-verbose"]
    cfg = config_from_args(parser.parse_args(argv), _Outer, full, quick)
    assert cfg == _Outer(n=1, names=("x", "y"), inner=_Inner(size=7, verbose=False, hidden=1))
    with pytest.raises(SystemExit):
        parser.parse_args(["--sz", "0"])  # the field's parser: an integer >= 1


def test_without_full_and_quick_the_field_defaults_stand():
    """A config whose fields all have defaults needs neither FULL nor QUICK; a FULL alone
    changes the defaults said and given."""
    parser = argparse.ArgumentParser()
    add_config_options(parser, _Inner, quick_help=None)
    assert "inner size (default: 2)" in parser.format_help()
    assert "--quick" not in parser.format_help()
    assert config_from_args(parser.parse_args([]), _Inner) == _Inner()
    assert config_from_args(parser.parse_args(["--size", "3"]), _Inner) == _Inner(size=3)
    parser = argparse.ArgumentParser()
    add_config_options(parser, _Inner, _Inner(size=4, hidden=2), None, quick_help=None)
    assert "inner size (default: 4)" in parser.format_help()
    args = parser.parse_args(["--no-verbose"])
    assert config_from_args(args, _Inner, _Inner(size=4, hidden=2)) == _Inner(4, False, 2)


def test_changes_must_name_fields_and_names_must_be_unambiguous():
    with pytest.raises(TypeError, match="no field"):
        replaced(_Outer(n=1, inner=_Inner()), {"n": 2, "nn": 2})
    with pytest.raises(TypeError, match="must be one"):  # FULL/QUICK are configs, not dicts
        add_config_options(argparse.ArgumentParser(), _Outer, {"n": 1}, quick_help="")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Clash:
        size: int = option(1, help="outer size")
        inner: _Inner = nested(_Inner, show={})

    with pytest.raises(TypeError, match="share"):
        add_config_options(argparse.ArgumentParser(), Clash, quick_help="")


@pytest.mark.parametrize(
    "module_name", [m for m in EXPERIMENT_MODULES if m.endswith(("chestxray", "nodule2d"))]
)
def test_batch_is_one_spelling_and_the_old_one_is_a_hidden_warned_alias(module_name, caplog):
    command, cls, full, quick, parser = _recipe(module_name)
    assert "--batch-size" not in parser.format_help() and "--batch " in parser.format_help()
    assert command.make_config(parser.parse_args(["--batch", "4"])).train.batch_size == 4
    with caplog.at_level("WARNING"):
        cfg = command.make_config(parser.parse_args(["--batch-size", "6"]))
    assert cfg.train.batch_size == 6
    assert "--batch-size is now --batch" in caplog.text
