"""`annify eann` as users type it: two tiny members trained for one epoch, reuse, one-line errors.

Torch runs on one thread (tests/conftest.py).
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import assert_one_line_error

from annify.cli import main
from annify.eann_run import run_eann
from annify.train import RunResult

SMALL, LARGE = "cifar_resnet_n3_c8", "cifar_resnet_n5_c16"  # 9 and 15 outputs with default placement
NAMES = ["cifar_resann_n3_c8", "cifar_resann_n5_c16"]


def invoke(*args):
    """``annify eann ARGS``."""
    return CliRunner().invoke(main, ["eann", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """OUT of `annify eann SMALL LARGE --epochs 1` (batch 16, so one epoch moves the errors apart)."""
    out = tmp_path_factory.mktemp("eann") / "run"
    result = invoke(SMALL, LARGE, "--epochs", 1, "--batch-size", 16, "--lr", 0.05, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def member_rows(out, name):
    return json.loads((out / "members" / name / "anytime.json").read_text())


def test_eann_trains_members_and_writes_schedule(trained):
    out, output = trained
    summary = json.loads((out / "eann.json").read_text())
    assert (out / "eann.png").read_bytes().startswith(b"\x89PNG")
    tables = [member_rows(out, name) for name in NAMES]
    assert [len(t) for t in tables] == [9, 15]
    steps = summary["steps"]
    assert [(s["member_name"], s["output"]) for s in steps] == [
        (name, k) for name, t in zip(NAMES, tables) for k in range(len(t))
    ]
    # the EANN's cost at a member's output: the earlier members' totals + the member's own cumulative cost
    offset = [0, tables[0][-1]["flops"]]
    expected = [offset[m] + r["flops"] for m, t in enumerate(tables) for r in t]
    assert [s["flops"] for s in steps] == expected
    # each step carries its own output's errors, from the member's anytime.json
    rows = [r for t in tables for r in t]
    assert [(s["val_error"], s["test_error"]) for s in steps] == [
        (r["val_error"], r["test_error"]) for r in rows
    ]
    # used: strictly better on validation than every output used before it
    best, used = float("inf"), []
    for r in rows:
        used.append(r["val_error"] < best)
        best = min(best, r["val_error"])
    assert [s["used"] for s in steps] == used
    assert True in used[1:] and False in used  # one epoch at batch 16 exercises both branches
    b = tables[1][-1]["flops"] / tables[0][-1]["flops"]
    assert summary["depth_ratio"]["geometric_mean"] == pytest.approx(b)
    assert summary["prop41"]["sup_C"] == pytest.approx(2 + 1 / (b - 1))
    assert summary["inflation"]["max"] >= summary["inflation"]["mean"] >= 1
    assert summary["inflation_uniform"]["budgets"] == 1000
    assert summary["data"] == "digits" and "stand-in" in summary["linear_networks"]
    assert [r["trained"] for r in summary["runs"]] == [True, True]
    # no --plain: the linear ensemble's networks are the ANNs' final outputs, costed without added heads
    config = yaml.safe_load((out / "members" / NAMES[0] / "config.yaml").read_text())
    plain_cost = config["heads"][-1]["flops_single"]
    assert summary["linear_ensemble"][0] == [plain_cost, tables[0][-1]["test_error"]]
    assert plain_cost < tables[0][-1]["flops"]
    # printed: the schedule table with one row per step, the inflation and the bounds
    assert f"member 2/2 {NAMES[1]}: training into {out / 'members' / NAMES[1]}" in output
    assert len([line for line in output.splitlines() if NAMES[1] in line and "training" not in line]) == 15
    assert "cost inflation C on test against the best single member: max" in output
    assert f"sup C = {2 + 1 / (b - 1):.2f}" in output
    assert output.strip().endswith(f"wrote {out / 'eann.json'} and {out / 'eann.png'}")


def refused_before_training(result, *fragments):
    """A one-line error, printed before any member trained (the first would log "training ...")."""
    assert_one_line_error(result, *fragments, alone=False)
    assert "training" not in result.output


@pytest.mark.parametrize("as_names", [False, True], ids=["run-folders", "model-names"])
def test_checkpoints_are_reused_without_training(trained, tmp_path, as_names):
    out, _ = trained
    folders = [out / "members" / name for name in NAMES]
    members = [SMALL, LARGE] if as_names else folders
    # a run folder means its checkpoints/last; a weights file is taken as given
    checkpoints = [
        "--checkpoints",
        folders[0],
        "--checkpoints",
        folders[1] / "checkpoints/last/model.safetensors",
    ]
    result = invoke(*members, *checkpoints, "--out", tmp_path / "reused")
    assert result.exit_code == 0, result.output
    assert "training" not in result.output and "evaluating" in result.output
    first = json.loads((out / "eann.json").read_text())
    again = json.loads((tmp_path / "reused" / "eann.json").read_text())
    assert again["steps"] == first["steps"]  # same weights, same schedule and errors
    assert again["members"] == first["members"]
    assert [r["trained"] for r in again["runs"]] == [False, False]
    assert again["linear_ensemble"] == first["linear_ensemble"]
    assert (tmp_path / "reused/members" / NAMES[1] / "anytime.json").is_file()
    assert (tmp_path / "reused/members" / NAMES[1] / "config.yaml").is_file()


def test_plain_networks_for_the_linear_ensemble(tmp_path):
    """--plain trains each architecture again with --weights opt; a stand-in trainer fills hand-made tables."""
    calls = []

    def fake_train(spec, *, out, weights, **kwargs):
        calls.append((spec.name, weights, Path(out)))
        member, is_plain = NAMES.index(spec.name), weights == "opt"
        heads = [replace(h, flops=1000 * (member + 1) * (k + 1), flops_single=900 * (member + 1) * (k + 1))
                 for k, h in enumerate(spec.heads)]  # fmt: skip
        spec = replace(spec, heads=heads)
        errors = [0.5 - 0.1 * member - 0.01 * k for k in range(len(heads))]
        if is_plain:
            errors[-1] -= 0.05  # the plain networks end 5 points better than the ANNs
        rows = [{"output": k + 1, "node": h.node, "flops": h.flops, "fraction": 0.0, "val_error": e,
                 "test_error": e + 0.01} for k, (h, e) in enumerate(zip(heads, errors))]  # fmt: skip
        return RunResult(Path(out), spec, None, 1, rows, 0.0, 0)

    out = tmp_path / "o"
    run_eann([SMALL, LARGE], out=out, plain=True, trainer=fake_train, log=lambda line: None)
    assert calls == [
        (NAMES[0], None, out / "members" / NAMES[0]), (NAMES[0], "opt", out / "plain" / NAMES[0]),
        (NAMES[1], None, out / "members" / NAMES[1]), (NAMES[1], "opt", out / "plain" / NAMES[1]),
    ]  # fmt: skip
    summary = json.loads((out / "eann.json").read_text())
    assert summary["linear_networks"].startswith("plain networks")
    assert summary["runs"][1]["plain"] == str(out / "plain" / NAMES[1])
    # plain costs 900 * 9 (9 outputs), then 2 * 900 * 15 on top; final test errors
    # 0.5 - 0.08 - 0.05 + 0.01 and 0.4 - 0.14 - 0.05 + 0.01
    (c0, e0), (c1, e1) = summary["linear_ensemble"]
    assert (c0, c1) == (8100, 8100 + 27000) and (e0, e1) == pytest.approx((0.38, 0.22))
    assert [s["flops"] for s in summary["steps"]][8:10] == [9000, 9000 + 2000]


def test_checkpoint_that_does_not_fit(trained, tmp_path):
    out, _ = trained
    swapped = [out / "members" / NAMES[1], out / "members" / NAMES[0]]  # each other's weights
    result = invoke(SMALL, LARGE, "--checkpoints", swapped[0], "--checkpoints", swapped[1], "--out", tmp_path)
    refused_before_training(result, "does not fit this spec", "of the wrong shape")


def test_members_of_different_class_counts(trained, tmp_path):
    out, _ = trained
    spec = yaml.safe_load((out / "members" / NAMES[1] / "config.yaml").read_text())
    spec["num_classes"] = 5
    other = tmp_path / "five.yaml"
    other.write_text(yaml.safe_dump(spec))
    folder = out / "members" / NAMES[0]
    result = invoke(folder, other, "--checkpoints", folder, "--checkpoints", folder, "--out", tmp_path / "o")
    refused_before_training(
        result,
        f"members {NAMES[0]} (10 classes, input 3×8×8) and {NAMES[1]} (5 classes",
        "differ in class count",
    )


def test_members_of_different_input_sizes(tmp_path):
    gray = tmp_path / "gray.yaml"  # one input channel: digits feeds it 1×8×8, the timm model 3×8×8
    gray.write_text(
        "name: gray\nmodel: cifar_resnet_n3_c8\nmodel_kwargs: {in_chans: 1}\ninput_size: [1, 8, 8]\n"
        "num_classes: 10\nheads:\n  - {node: stages.1.2.add}\n  - {node: model}\n"
    )
    result = invoke(gray, LARGE, "--out", tmp_path / "o")
    refused_before_training(result, "members gray (10 classes, input 1×8×8) and", "differ in input size")


def test_members_trained_for_other_data(trained, tmp_path):
    out, _ = trained
    fives = []
    for i, name in enumerate(NAMES[:2]):
        spec = yaml.safe_load((out / "members" / name / "config.yaml").read_text())
        spec["num_classes"] = 5
        fives.append(tmp_path / f"five{i}.yaml")
        fives[-1].write_text(yaml.safe_dump(spec))
    result = invoke(*fives, "--checkpoints", tmp_path, "--checkpoints", tmp_path, "--out", tmp_path / "o")
    refused_before_training(result, "the members predict 5 classes but digits has 10", "--data")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ([SMALL], ["an EANN needs at least 2 members, smallest first; got 1"]),
        ([SMALL, LARGE, "--checkpoints", "a.safetensors"], ["2 members but 1 checkpoints"]),
        ([SMALL, "cifar_resnet_n5_c61"], ["unknown model 'cifar_resnet_n5_c61'", "did you mean"]),
        ([SMALL, "missing.yaml"], ["spec file 'missing.yaml' does not exist"]),
    ],
)
def test_bad_input_is_one_line_error(args, fragments, tmp_path):
    refused_before_training(invoke(*args, "--out", tmp_path), *fragments)


def test_help_ends_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    assert any(line.startswith("Example: annify eann cifar_resnet_n7_c16") for line in lines)
