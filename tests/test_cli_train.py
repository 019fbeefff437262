"""`annify train` and `annify eval` as users type them: the run folder, the table, one-line errors."""

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, tiny_spec

from annify.cli import main
from annify.spec import load_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = tiny_spec()
OTHER = TINY.replace("  - {node: stages.1.2.add}\n", "")  # same model, one head fewer


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("specs")
    (folder / "tiny.yaml").write_text(TINY)
    (folder / "other.yaml").write_text(OTHER)
    return folder


@pytest.fixture(scope="module")
def run(specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    args = ["train", str(specs / "tiny.yaml"), "--epochs", "2", "--weights", "const", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_writes_run_folder(run):
    out, output = run
    assert "note: digits has 10 classes at 3×8×8" in output
    assert f"wrote {out} (2 epochs" in output
    record = json.loads((out / "data.json").read_text())  # what `annify predict` normalises with
    assert record["source"] == "digits" and len(record["mean"]) == len(record["std"]) == 1
    table = json.loads((out / "anytime.json").read_text())
    assert [r["output"] for r in table] == [1, 2, 3]
    assert [r["node"] for r in table] == ["stages.0.2.add", "stages.1.2.add", "model"]
    for r in table:
        assert r.keys() == {"output", "node", "flops", "fraction", "val_error", "test_error"}
        assert 0 <= r["val_error"] <= 1 and 0 <= r["test_error"] <= 1
    assert [r["fraction"] for r in table][-1] == 1.0 and table[0]["flops"] < table[1]["flops"] < table[2][
        "flops"
    ]
    assert len((out / "anytime.csv").read_text().splitlines()) == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["weights"] == [1.0, 1.0, 1.0] for m in metrics)
    for png in ("anytime.png", "weights.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    config = load_spec(out / "config.yaml")  # the resolved spec, loadable as a spec
    assert (
        config.input_size == (3, 8, 8) and config.train["epochs"] == 2 and config.train["weights"] == "const"
    )
    assert config.heads[-1].flops == table[-1]["flops"]
    assert {p.name for p in (out / "checkpoints" / "last").iterdir()} == {"model.safetensors", "state.pt"}
    # the printed table: a header and one row per output
    rows = [line for line in output.splitlines() if line.strip().split(" ")[0] in {"1", "2", "3"}]
    assert len(rows) == 3 and "model (own classifier)" in rows[-1]


def test_eval_prints_table(run):
    out, _ = run
    result = invoke("eval", out / "config.yaml", "--checkpoint", out / "checkpoints" / "last")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["output", "node", "flops", "fraction", "val", "err", "%", "test", "err", "%"]
    assert len(lines) == 4
    table = json.loads((out / "anytime.json").read_text())
    for line, row in zip(lines[1:], table, strict=True):
        cells = line.split()
        assert cells[0] == str(row["output"])
        assert cells[-2:] == [f"{100 * row['val_error']:.2f}", f"{100 * row['test_error']:.2f}"]


def test_corrupt_checkpoint_is_one_line(run, specs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    weights = out / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = invoke("eval", out / "config.yaml", "--checkpoint", out / "checkpoints" / "last")
    assert_one_line_error(result, "is not a readable safetensors file", alone=False)
    result = invoke(
        "train", specs / "tiny.yaml", "--epochs", "2", "--weights", "const", "--out", out, "--resume"
    )
    assert_one_line_error(result, "is not a readable safetensors file", alone=False)
    shutil.copy(run[0] / "checkpoints" / "last" / "model.safetensors", weights)
    state = out / "checkpoints" / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    result = invoke(
        "train", specs / "tiny.yaml", "--epochs", "2", "--weights", "const", "--out", out, "--resume"
    )
    assert_one_line_error(result, "state.pt is unreadable", alone=False)


def test_mismatched_checkpoint_is_one_line(run, specs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    bare = tmp_path / "bare.safetensors"  # outside its run, the weights meet the other spec as given
    shutil.copy(out / "checkpoints" / "last" / "model.safetensors", bare)
    result = invoke("eval", specs / "other.yaml", "--checkpoint", bare)
    assert_one_line_error(result, "does not fit this spec", "unexpected", alone=False)
    result = invoke(
        "train", specs / "other.yaml", "--epochs", "2", "--weights", "const", "--out", out, "--resume"
    )
    assert_one_line_error(result, "does not fit this spec", alone=False)


def test_divergence_is_one_line(specs, tmp_path):
    result = invoke("train", specs / "tiny.yaml", "--epochs", "1", "--lr", "1e30", "--out", tmp_path / "nan")
    assert_one_line_error(
        result, "loss of output", "at epoch 1 step", "no checkpoint was written yet", alone=False
    )


def test_option_errors_are_one_line(specs, tmp_path):
    result = invoke(
        "train", specs / "tiny.yaml", "--weights", "const", "--head", "2", "--out", tmp_path / "x"
    )
    assert_one_line_error(result, "head is for --weights opt", alone=False)
    result = invoke(
        "train", specs / "tiny.yaml", "--weights", "adaloss", "--hparam", "gama=0.1", "--out", tmp_path
    )
    assert_one_line_error(result, "has no hyperparameter 'gama'", alone=False)
    result = invoke("train", specs / "tiny.yaml", "--hparam", "gamma", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_ends_with_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    last_paragraph = result.output.split("Options:")[0].strip().split("\n\n")[-1]
    assert last_paragraph.strip().startswith("Example: annify ")
