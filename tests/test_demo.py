"""The main job (README's first command) on the embedded digits, shortened to one epoch."""

import json

import torch
from click.testing import CliRunner

from annify.cli import main
from annify.demo import demo_variants, eann_verdict, verdict
from annify.train import DEFAULTS, run_label


def test_demo_trains_every_variant_and_compares_them(tmp_path):
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    labels = list(demo_variants())
    assert labels[0] == run_label(DEFAULTS) and "const" in labels and "adaloss" in labels
    lines = (tmp_path / "comparison.txt").read_text().splitlines()
    assert all(f"{label} test err %" in lines[0] for label in labels)
    rows_shown = lines[1:10]  # cifar_resnet_n3_c8: a head after each of 9 units, the last is the classifier
    assert lines[10].split()[0] == "mean"
    for col, label in enumerate(labels):
        rows = json.loads((tmp_path / label / "anytime.json").read_text())
        assert len(rows) == 9
        errors = [r["test_error"] for r in rows]
        assert all(0.0 <= e <= 1.0 for e in errors)
        shown = [float(line.split()[3 + col]) for line in rows_shown]
        assert shown == [round(100 * e, 2) for e in errors]
    assert lines[-1].startswith(f"In words: over all 9 outputs the default ({labels[0]})")
    assert (tmp_path / "anytime.png").stat().st_size > 0
    assert (tmp_path / "cifar_resann_n3_c8.yaml").is_file()
    story = (tmp_path / "trained_start.txt").read_text().splitlines()  # the existing-network path first
    assert story[0].startswith("From a trained network (") and "original test err %" in story[1]
    original = json.loads((tmp_path / "anytime-from-plain" / "original.json").read_text())
    assert story[-2].split()[-2] == f"{100 * original['test_error']:.2f}"  # the last row: original, anytime
    assert story[-1].startswith("In words: kept the original network") or story[-1].startswith(
        "In words: lost"
    )
    assert story[-1] in result.output
    eann = json.loads((tmp_path / "eann" / "eann.json").read_text())
    assert [m["name"] for m in eann["members"]][:3] == [
        "cifar_resann_n2_c16",
        "cifar_resann_n4_c16",
        "cifar_resann_n8_c16",
    ]
    b = eann["depth_ratio"]["geometric_mean"]
    assert 1.8 < b < 2.3  # n = 2, 4, 8 units per stage: depth doubles
    assert eann["prop41"]["sup_C"] == 2 + 1 / (b - 1)
    assert len(eann["steps"]) == sum(len(m["flops"]) for m in eann["members"])
    assert "Proposition 4.1" in result.output.splitlines()[-2]  # the EANN sentence, then the files line

    again = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--epochs", "1"])  # README, twice
    assert again.exit_code == 0, again.output
    assert (tmp_path / "comparison.txt").read_text().splitlines() == lines


def _rows(errors):
    return [
        {"output": i + 1, "flops": 10 * (i + 1), "fraction": 0.1, "test_error": e}
        for i, e in enumerate(errors)
    ]


def test_verdict_says_what_the_numbers_show():
    tables = {
        "new": _rows([0.3, 0.2, 0.1]),
        "const": _rows([0.4, 0.2, 0.1]),
        "adaloss": _rows([0.2, 0.2, 0.05]),
    }
    text = verdict(tables, "new")
    assert "lower mean error than const (20.00% vs 23.33%; first 1 outputs 30.00% vs 40.00%" in text
    assert "higher mean error than adaloss (20.00% vs 15.00%" in text
    assert "Best anytime quality (mean test error over the outputs) in this run: adaloss." in text


def test_eann_verdict_explains_inflation_beyond_the_bound():
    steps = [
        {"member_name": "a", "output": 0, "flops": 10, "used": True},
        {"member_name": "a", "output": 1, "flops": 20, "used": True},
        {"member_name": "b", "output": 0, "flops": 100, "used": False},
    ]
    over = {"inflation": {"max": 5.0, "mean": 3.0}, "prop41": {"sup_C": 3.0}, "steps": steps}
    text = eann_verdict(over)
    assert "exceeds Proposition 4.1's bound (sup C 3.00)" in text and "a output 2, at 20%" in text
    within = {**over, "inflation": {"max": 2.5, "mean": 2.0}}
    assert "stays within Proposition 4.1's bound" in eann_verdict(within)
