"""The command line, through click's CliRunner: what users type and what they see."""

import os

import click
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error

import annify
from annify.cli import main
from annify.spec import SpecError, load_spec

TINY = ["cifar_resnet_n3_c8", "--in-chans", "1", "--input-size", "1,8,8", "--num-classes", "5"]


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_inspect_prints_a_row_for_every_tap_point(run):
    result = run("inspect", *TINY)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = ["kind", "block", "node", "module", "layout", "channels", "size", "flops", "fraction"]
    assert lines[0].split() == header
    model = annify.create_model("cifar_resnet_n3_c8", in_chans=1)
    taps = annify.tap_points(annify.trace(model, (1, 8, 8), train_graph=False), trunk=True)
    rows = lines[1:-1]
    assert len(rows) == len(taps) == 16
    for row, tap in zip(rows, taps, strict=True):
        kind, index, node, module, layout, channels, size = row.split()[:7]
        assert (kind, node, module, layout, int(channels)) == (
            tap.kind,
            tap.node,
            tap.module,
            tap.layout,
            tap.channels,
        )
        assert index == (str(tap.index) if tap.index else "-")
        assert size == "x".join(map(str, tap.spatial))
    kinds = [r.split()[0] for r in rows]
    assert kinds.count("block") == 9 and kinds.count("trunk") == 7  # the 9 units; stem, pre-activations, norm
    assert [r.split()[1] for r in rows if r.startswith("block")] == [str(i) for i in range(1, 10)]
    fractions = [float(r.split()[-1]) for r in rows]
    assert fractions == sorted(fractions) and fractions[-1] <= 1
    assert lines[-1].split()[0] == "(whole" and lines[-1].endswith("1.000")


def test_convert_writes_a_spec_that_loads(run, tmp_path):
    result = run("convert", "resnet26", "--every", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    target = tmp_path / "resann26.yaml"
    assert os.listdir(tmp_path) == ["resann26.yaml"]  # and no temporary file left behind
    assert target.read_text().startswith(f"# annify train {target}\n")
    spec = annify.load_spec(target)
    assert [h.node for h in spec.heads] == ["layer1.1.act3", "layer2.1.act3", "layer3.1.act3", "model"]
    # the cost table: a header, one row per output, the skipped operators, where it wrote
    lines = result.output.splitlines()
    assert lines[0].split() == ["output", "node", "flops", "fraction", "single-exit", "params"]
    assert [line.split()[:2] for line in lines[1:5]] == [
        ["1", "layer1.1.act3"],
        ["2", "layer2.1.act3"],
        ["3", "layer3.1.act3"],
        ["4", "model"],
    ]
    assert lines[4].split()[-3:-1] == ["1.000", "2.36G"]
    assert lines[5].startswith("fvcore does not count: aten::add")
    assert lines[-1] == f"wrote {target}"


def test_convert_to_a_yaml_path(run, tmp_path):
    target = tmp_path / "specs" / "mine.yaml"
    result = run("convert", *TINY, "--every", "4", "--out", str(target))
    assert result.exit_code == 0, result.output
    spec = annify.load_spec(target)
    assert spec.name == "cifar_resann_n3_c8"
    assert spec.input_size == (1, 8, 8) and spec.num_classes == 5 and spec.model_kwargs == {"in_chans": 1}


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_with_an_example(run, name):
    result = run(name, "--help")
    assert result.exit_code == 0
    examples = [line.strip() for line in result.output.splitlines() if line.strip().startswith("Example:")]
    assert examples and examples[0].startswith("Example: annify ")


def test_every_registered_command_is_listed_in_help(run):
    from annify.cli import STAGE_COMMANDS

    text = run("--help").output
    listed = {line.split()[0] for line in text.split("Commands:\n", 1)[1].splitlines() if line.strip()}
    registered = {"inspect", "convert", "demo", *(name for name, _, _ in STAGE_COMMANDS)}
    assert listed == registered == set(main.commands)


def test_a_command_whose_module_fails_to_import_is_an_error_naming_it(monkeypatch):
    import sys

    from annify.cli import STAGE_COMMANDS, add_commands

    monkeypatch.setitem(sys.modules, "annify.cli_eann", None)  # importing it raises ImportError
    with pytest.raises(
        ImportError, match=r"command 'eann' \(annify\.cli_eann\.eann\): .*None in sys.modules"
    ):
        add_commands(click.Group(), STAGE_COMMANDS)
    with pytest.raises(ImportError, match="command 'gone' .*No module named 'annify._no_such_module'"):
        add_commands(click.Group(), [("gone", "annify._no_such_module", "gone")])


def test_annify_help_fails_naming_a_command_that_cannot_load():
    import subprocess
    import sys

    code = "import sys; sys.modules['annify.cli_eann'] = None\nfrom annify.cli import main\nmain(['--help'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Commands:" not in result.stdout
    assert "annify cannot register its command 'eann' (annify.cli_eann.eann)" in result.stderr


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_takes_threads(name):
    threads = next((p for p in main.commands[name].params if p.name == "threads"), None)
    assert threads is not None and threads.default == 1


def test_threads_sets_torch_threads_for_the_command(run, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert run("inspect", *TINY, "--threads", "3").exit_code == 0
    assert run("inspect", *TINY).exit_code == 0
    assert seen == [3, 1]
    bad = run("inspect", *TINY, "--threads", "0")
    assert (
        bad.exit_code == 2 and "Invalid value for '--threads'" in bad.output and "Traceback" not in bad.output
    )


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_keeps_freed_cpu_memory_by_default(name):
    option = next((p for p in main.commands[name].params if p.name == "cpu_memory"), None)
    assert option is not None and option.default == "keep"


def test_cpu_memory_keep_sets_up_the_allocator_and_release_leaves_it(run, monkeypatch):
    from annify import cpu

    calls = []
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: calls.append("keep"))
    assert run("inspect", *TINY).exit_code == 0
    assert calls == ["keep"]
    assert run("inspect", *TINY, "--cpu-memory", "release").exit_code == 0
    assert calls == ["keep"]
    bad = run("inspect", *TINY, "--cpu-memory", "cache")
    assert (
        bad.exit_code == 2
        and "Invalid value for '--cpu-memory'" in bad.output
        and "Traceback" not in bad.output
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["resnet5O", "--every", "2"], ["unknown model 'resnet5O'", "did you mean resnet50"]),
        ([*TINY, "--at", "stages.9.add"], ["node 'stages.9.add'", "annify inspect cifar_resnet_n3_c8"]),
        ([*TINY, "--every", "0"], ["--every and --start must be positive"]),
        ([*TINY, "--heads", "999"], ["--heads must be between 1 and 14", "got 999"]),
        ([*TINY, "--every", "2", "--heads", "3"], ["choose one placement"]),
        ([*TINY, "--every", "2", "--head-type", "mlp"], ["unknown head type 'mlp'"]),
    ],
    ids=["unknown-model", "node-not-found", "every-0", "heads-999", "two-placements", "head-type"],
)
def test_convert_mistakes_are_one_line_errors_and_write_nothing(run, tmp_path, args, fragments):
    out = tmp_path / "out"
    result = run("convert", *args, "--out", str(out))
    assert_one_line_error(result, *fragments)
    assert not out.exists() or os.listdir(out) == []


def test_inspect_mistakes_are_one_line_errors(run):
    assert_one_line_error(run("inspect", "resnet5O"), "unknown model 'resnet5O'")


def test_bad_input_size_is_a_usage_error(run, tmp_path):
    result = run(
        "convert", "cifar_resnet_n3_c8", "--every", "2", "--input-size", "3,x", "--out", str(tmp_path)
    )
    assert result.exit_code == 2
    assert "Error: Invalid value: expected C,H,W such as 3,224,224, got '3,x'" in result.output
    assert "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_output_under_a_regular_file_is_refused(run, tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder\n")
    result = run("convert", *TINY, "--every", "2", "--out", str(plain / "specs"))
    assert_one_line_error(result, "cannot create output folder", "choose another --out")
    assert os.listdir(tmp_path) == ["plain.txt"]
    assert plain.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_output_folder_is_refused(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run("convert", *TINY, "--every", "2", "--out", str(locked))
        assert_one_line_error(result, "is not writable", "choose another --out")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


SPEC_COMMANDS = sorted(n for n, c in main.commands.items() if c.params and c.params[0].name == "spec")


def _invoke_with_spec(run, name: str, spec: str):
    """Run command ``name`` on ``spec``, with a placeholder for every other required parameter."""
    args = [name, spec]
    for param in main.commands[name].params[1:]:
        if param.required:
            args += ["placeholder"] if isinstance(param, click.Argument) else [param.opts[0], "placeholder"]
    return run(*args)


def _files(folder) -> set[str]:
    """Files under ``folder`` (an output folder made before the spec is read may stay, empty)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("name", SPEC_COMMANDS)
def test_malformed_spec_is_a_one_line_error_naming_the_line(run, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # commands with default output folders write nothing here either
    (tmp_path / "bad.yaml").write_text("model: resnet26\nheads:\n  - node: model\n    block: [4\n")
    result = _invoke_with_spec(run, name, "bad.yaml")
    assert_one_line_error(result, "malformed YAML at line 5")
    assert _files(tmp_path) == {"bad.yaml"}


@pytest.mark.parametrize("name", SPEC_COMMANDS)
def test_missing_spec_is_a_one_line_error(run, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = _invoke_with_spec(run, name, "missing.yaml")
    assert_one_line_error(result, "'missing.yaml' does not exist")
    assert _files(tmp_path) == set()


def test_malformed_spec_is_a_spec_error_with_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: resnet26\nheads:\n  - node: model\n    block: [4\n")
    with pytest.raises(SpecError, match="malformed YAML at line 5"):
        annify.load(path)


def test_missing_spec_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        annify.load(tmp_path / "missing.yaml")


def test_convert_places_heads_from_a_hand_written_spec(tmp_path):
    hand = tmp_path / "hand.yaml"
    hand.write_text(
        "# heads after the second and fifth units\n"
        "model: cifar_resnet_n3_c8\nmodel_kwargs: {in_chans: 1}\ninput_size: [1, 8, 8]\nnum_classes: 10\n"
        "heads:\n  - node: stages.0.1.add\n  - node: stages.1.1.add\n  - node: model\n"
    )
    result = CliRunner().invoke(main, ["convert", str(hand), "--out", str(tmp_path / "zoo")])
    assert result.exit_code == 0, result.output
    spec = load_spec(tmp_path / "zoo" / "cifar_resann_n3_c8.yaml")
    assert [h.node for h in spec.heads] == ["stages.0.1.add", "stages.1.1.add", "model"]
    assert [h.block for h in spec.heads] == [2, 5, 9]
    flops = [h.flops for h in spec.heads]
    assert flops == sorted(flops) and spec.heads[-1].fraction == 1.0
    again = CliRunner().invoke(main, ["convert", str(hand), "--every", "2", "--out", str(tmp_path / "zoo")])
    assert again.exit_code != 0 and "the spec already places its heads; drop --every" in again.output
