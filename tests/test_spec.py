"""Specs: YAML round trips, every problem reported at once, safe loading, shipped specs."""

import re
from pathlib import Path

import pytest
import torch
import yaml

import annify
from annify._files import atomic_write
from annify.spec import HeadSpec, Spec, SpecError, dump, load_spec, parse

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("specs/*.yaml"))  # zoo/ is annify convert's output, never shipped


def full_spec() -> Spec:
    """A spec with every field set away from its default."""
    return Spec(
        name="tiny_ann",
        model="cifar_resnet_n3_c8",
        heads=[
            HeadSpec(
                node="stages.0.1.add",
                type="bn_relu_pool_linear",
                block=2,
                flops=157264,
                fraction=0.2417,
                flops_single=157264,
                params=2549,
            ),
            HeadSpec(node="stages.*.add"),  # a glob-like string must survive quoting
            HeadSpec(node="model", block=9, flops=650640, fraction=1.0),
        ],
        input_size=(1, 8, 8),
        num_classes=5,
        model_kwargs={"in_chans": 1, "drop_path_rate": 0.1},
        head_type="bn_relu_pool_linear",
        placement={"at": ["*.add", "stages.0.0.add"]},
        train={"epochs": 3, "lr": 0.05, "milestones": [0.5, 0.75], "weights": "adaloss"},
        cost_convention="fvcore FLOPs: one fused multiply-add = 1 FLOP",
    )


def test_dump_parse_round_trip_of_every_field():
    spec = full_spec()
    assert parse(yaml.safe_load(dump(spec, "annify train tiny.yaml"))) == spec


def test_dump_parse_round_trip_of_a_converted_spec(tiny):
    _, spec, _ = tiny
    assert parse(yaml.safe_load(dump(spec))) == spec


def test_dump_comments_the_header_and_every_key():
    text = dump(full_spec(), "annify train zoo/tiny_ann.yaml\nsecond line")
    lines = text.splitlines()
    assert lines[:2] == ["# annify train zoo/tiny_ann.yaml", "# second line"]
    keys = [i for i, line in enumerate(lines) if line and not line.startswith((" ", "#"))]
    assert len(keys) == 10
    for i in keys:
        assert lines[i - 1].startswith("# "), lines[i]


def test_load_spec_reads_what_atomic_write_wrote(tmp_path):
    spec = full_spec()
    path = tmp_path / "tiny_ann.yaml"
    atomic_write(path, dump(spec))
    assert load_spec(path) == spec
    assert load_spec(str(path)) == spec


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: resnet50\nheads:\n  - {node: layer1.0.act3\n  - {node: model}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: malformed YAML at line 5, column 5"):
        load_spec(path)


def test_every_problem_is_reported_in_one_message():
    data = {
        "modle": "resnet50",
        "input_size": [3, 224],
        "num_classes": 0,
        "placement": 3,
        "heads": [{"node": "layer1.0.act3", "colour": "red"}, {"nodes": "x"}, {"node": "model"}],
    }
    with pytest.raises(SpecError) as info:
        parse(data, "my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml: ")
    for problem in (
        "unknown key 'modle'",
        "'model' is required",
        "'input_size' must be [C, H, W] with positive integers, got [3, 224]",
        "'num_classes' must be a positive integer, got 0",
        "'placement' must be a mapping",
        "heads[0]: unknown key 'colour'",
        "heads[1]: needs a 'node'",
    ):
        assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"model": "resnet50"}, "'heads' is required"),
        ({"model": "resnet50", "heads": []}, "'heads' must be a non-empty list"),
        ({"model": 50, "heads": [{"node": "model"}]}, "'model' must be a timm model name"),
        ({"model": "resnet50", "heads": [{"node": "model"}], "input_size": [3, 0, 224]}, "'input_size'"),
        ({"model": "resnet50", "heads": [{"node": "model"}], "input_size": "3,224,224"}, "'input_size'"),
        ({"model": "resnet50", "heads": [{"node": "model"}], "train": [1]}, "'train' must be a mapping"),
        (
            {"model": "resnet50", "heads": [{"node": "a"}, {"node": "a"}, {"node": "model"}]},
            "'a' appears twice",
        ),
        ([{"model": "resnet50"}], "expected a mapping"),
        (None, "expected a mapping"),
    ],
)
def test_each_problem_is_refused(data, problem):
    with pytest.raises(SpecError, match=problem.replace("[", r"\[")):
        parse(data)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(SpecError, match="does not exist; write one with `annify convert MODEL --out DIR`"):
        load_spec(tmp_path / "nope.yaml")


def test_python_tags_are_refused(tmp_path):
    """yaml.safe_load only: a spec can never name Python to run."""
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.getcwd []\nheads: [{node: model}]\n")
    with pytest.raises(SpecError, match="python/object/apply:os.getcwd"):
        load_spec(path)


def test_project_ships_specs():
    assert SHIPPED, "specs/ is empty: the project must ship specs"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_spec_loads(path):
    assert path.read_text().startswith("# annify "), "the header says the command that uses the spec"
    spec = load_spec(path)
    assert parse(yaml.safe_load(dump(spec))) == spec
    assert spec.heads[-1].node == "model"
    flops = [h.flops for h in spec.heads]
    if all(f is not None for f in flops):
        assert flops == sorted(flops)
        assert spec.heads[-1].fraction == 1.0


def _quick_to_build(paths: list[Path], budget: float = 2.5e9) -> set[Path]:
    """Building traces at the spec's full input size, so the default run builds only the cheapest
    spec of each model family (cifar_resnet_n7_c16 -> cifar, resnet50 -> resnet) that records at
    most ``budget`` FLOPs, and any spec it cannot read; ``-m slow`` builds them all."""
    best: dict[str, tuple[int, Path]] = {}
    unreadable = set()
    for p in paths:
        try:
            spec = load_spec(p)
        except SpecError:
            unreadable.add(p)  # test_shipped_spec_loads says why
            continue
        cost, family = spec.heads[-1].flops or 0, re.sub(r"[\d_].*", "", spec.model)
        if family not in best or cost < best[family][0]:
            best[family] = (cost, p)
    return {p for cost, p in best.values() if cost <= budget} | unreadable


_QUICK = _quick_to_build(SHIPPED)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=() if p in _QUICK else pytest.mark.slow) for p in SHIPPED],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_spec_builds(path):
    spec = load_spec(path)
    net = annify.build(spec)
    assert net.taps == spec.taps
    assert net.num_outputs == len(spec.heads)
    x = torch.zeros(1, *spec.input_size)
    with torch.no_grad():
        (first,) = net.forward_until(x, 1)
    assert first.shape == (1, spec.num_classes)
