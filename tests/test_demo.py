"""The main job (README's first command) on the embedded digits, shortened to one epoch."""

import json

import torch
from click.testing import CliRunner

from annify.cli import main


def test_demo_trains_both_schemes_and_compares_them(tmp_path):
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "comparison.txt").read_text().splitlines()
    assert "adaloss test err %" in lines[0] and "const test err %" in lines[0]
    assert len(lines) == 1 + 9  # cifar_resnet_n3_c8: a head after each of 9 units, the last is the classifier
    for scheme in ("adaloss", "const"):
        rows = json.loads((tmp_path / scheme / "anytime.json").read_text())
        assert len(rows) == 9
        errors = [r["test_error"] for r in rows]
        assert all(0.0 <= e <= 1.0 for e in errors)
        shown = [float(line.split()[3 if scheme == "adaloss" else 4]) for line in lines[1:]]
        assert shown == [round(100 * e, 2) for e in errors]
    assert (tmp_path / "anytime.png").stat().st_size > 0
    assert (tmp_path / "cifar_resann_n3_c8.yaml").is_file()
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
