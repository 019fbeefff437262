"""What `--help` says is generated from the code that owns it: defaults from annify.config, choices
from the registries. Each test walks every command's options, so a new option is checked too."""

import importlib

import click
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error

from annify._cli_common import RegistryChoice
from annify.cli import main
from annify.config import DEFAULTS, INIT_DEFAULTS


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _options(keep) -> list[tuple[str, click.Parameter]]:
    return [(name, p) for name, c in sorted(main.commands.items()) for p in c.params if keep(c, p)]


def _no_default_of_its_own(command: click.Command, param: click.Parameter) -> bool:
    unset = getattr(click.core, "UNSET", None)  # click >= 8.3 marks "no default" with a sentinel, before None
    return param.get_default(click.Context(command), call=False) in (None, unset)


# Options without a default of their own: the run takes the setting from the spec, else annify.config.
# --data's help is the data registry's (annify.data), not checked here.
SETTINGS = _options(lambda c, p: p.name in DEFAULTS and _no_default_of_its_own(c, p) and p.name != "data")


@pytest.mark.parametrize(("command", "param"), SETTINGS, ids=[f"{c}--{p.name}" for c, p in SETTINGS])
def test_a_setting_option_shows_its_default_from_the_config(command, param):
    text = " ".join(param.get_help_record(click.Context(main.commands[command]))[1].split())
    assert "default: " in text
    value = DEFAULTS[param.name]
    if value is not None:  # what None means is said in words
        assert f"train.{param.name}, else {_shown(value)}" in text or f"default: {_shown(value)}" in text
    if param.name in INIT_DEFAULTS and any(p.name == "init" for p in main.commands[command].params):
        assert f"with --init {_shown(INIT_DEFAULTS[param.name])}" in text


def test_the_settings_checked_include_the_paper_recipe():
    checked = {(c, p.name) for c, p in SETTINGS}
    for command in ("train", "eann"):
        assert {(command, k) for k in ("epochs", "lr", "batch_size", "weights", "seed")} <= checked


# Every choice an option offers, and who owns the names.
OWNERS = {
    "loader": ("annify.data", "LOADERS"),
    "teacher": ("annify.config", "TEACHERS"),
    "risk": ("annify.calibrate", "RISKS"),
    "method": ("annify.calibrate", "METHODS"),
    "fmt": ("annify.export", "FORMATS"),  # and "all"
    "cpu_memory": ("annify._cli_common", "CPU_MEMORY"),
}
CHOICES = _options(lambda c, p: isinstance(p.type, click.Choice))


@pytest.mark.parametrize(("command", "param"), CHOICES, ids=[f"{c}--{p.name}" for c, p in CHOICES])
def test_a_choice_is_the_names_its_owner_holds(command, param):
    assert param.name in OWNERS, (
        f"{command} --{param.name}: take its choices from the registry that owns them"
    )
    module, attribute = OWNERS[param.name]
    names = tuple(getattr(importlib.import_module(module), attribute))
    assert tuple(param.type.choices) == (*names, "all") if param.name == "fmt" else names


def test_registry_choices_are_read_when_a_value_is_checked_not_before():
    read = []
    choice = RegistryChoice(lambda: read.append(1) or ("a", "b"))
    assert read == []  # defining the option reads nothing (torch-bound registries stay unloaded)
    assert choice.convert("b", None, None) == "b" and read == [1]
    with pytest.raises(click.BadParameter, match="'c' is not one of 'a', 'b'"):
        choice.convert("c", None, None)
    assert read == [1]  # read once


def test_an_unknown_loader_is_refused_with_the_registrys_names(tmp_path):
    from annify.data import LOADERS

    result = CliRunner().invoke(main, ["train", "specs/cifar_resann_n7_c16.yaml", "--loader", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of " + ", ".join(map(repr, LOADERS)) in result.output


def test_an_unknown_weight_scheme_is_refused_with_the_registrys_names(tmp_path):
    from annify.weighting import available

    args = ["train", "specs/cifar_resann_n7_c16.yaml", "--weights", "nope", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert_one_line_error(result, f"unknown weight scheme 'nope' (available: {', '.join(available())})")
