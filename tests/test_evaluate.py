"""Evaluation: hand-computed errors and losses, tables, relative-to-OPT numbers, plots, fitting specs to data."""

import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from annify.evaluate import (
    Evaluation,
    anytime_table,
    evaluate,
    fit_to_data,
    format_table,
    nearest_outputs,
    plot_anytime,
    plot_weights,
    relative_to_opt,
    save_table,
)
from annify.spec import HeadSpec, Spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FixedOutputs(nn.Module):
    """Two outputs whose logits are the input's columns: output 1 reads x[:, :2], output 2 x[:, 2:]."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x):
        return [x[:, :2], x[:, 2:]]


def test_evaluate_hand_computed():
    # 3 samples, labels 0, 1, 1. Output 1 is right on samples 1 and 2; output 2 only on sample 3.
    x = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]  # two batches of unequal size
    net = FixedOutputs().train()
    net.bn.eval()
    result = evaluate(net, loader)
    assert result.count == 3
    assert result.errors == pytest.approx([1 / 3, 2 / 3])
    expected = [
        nn.functional.cross_entropy(x[:, :2], y).item(),
        nn.functional.cross_entropy(x[:, 2:], y).item(),
    ]
    assert_close(torch.tensor(result.losses), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert net.training and not net.bn.training  # every module's mode is put back


def test_evaluate_empty_loader():
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(FixedOutputs(), [])


def test_anytime_table_and_files(tmp_path):
    val = Evaluation([0.5, 0.25], [1.0, 0.5], 4)
    test = Evaluation([0.6, 0.2], [1.1, 0.4], 5)
    rows = anytime_table(["layer1", "model"], [100, 400], val, test)
    assert rows == [
        {"output": 1, "node": "layer1", "flops": 100, "fraction": 0.25, "val_error": 0.5, "test_error": 0.6},
        {"output": 2, "node": "model", "flops": 400, "fraction": 1.0, "val_error": 0.25, "test_error": 0.2},
    ]
    save_table(rows, tmp_path)
    assert json.loads((tmp_path / "anytime.json").read_text()) == rows
    with open(tmp_path / "anytime.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["node"] for r in read] == ["layer1", "model"] and float(read[1]["test_error"]) == 0.2
    text = format_table(rows).splitlines()
    assert len(text) == 3 and "model (own classifier)" in text[2] and "25.00" in text[2]


def test_relative_to_opt_paper_example():
    # Table 1's reading: OPT at 10% and AdaLoss at 10.273% is a 2.73% relative increase.
    assert relative_to_opt([0.10273, 0.2], [0.1, 0.2]) == pytest.approx([2.73, 0.0])
    assert relative_to_opt([0.0, 0.1], [0.0, 0.0]) == [0.0, math.inf]
    with pytest.raises(ValueError, match="OPT"):
        relative_to_opt([0.1], [0.1, 0.2])


def test_nearest_outputs():
    fractions = [0.1, 0.3, 0.45, 0.8, 1.0]
    assert nearest_outputs(fractions) == [1, 2, 3, 4]


def test_plots_are_pngs(tmp_path):
    plot_anytime(
        {"adaloss": [(1e6, 0.3), (2e6, 0.1)], "const": [(1e6, 0.25), (2e6, 0.12)]}, tmp_path / "a.png"
    )
    plot_weights([(1, [0.5, 1.0]), (2, [0.6, 1.0])], tmp_path / "w.png")
    for name in ("a.png", "w.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "w.png"]  # no temporary files left
    with pytest.raises(ValueError, match="at least one"):
        plot_weights([], tmp_path / "none.png")


def _spec(size, classes):
    heads = [HeadSpec("stages.0.2.add"), HeadSpec("model")]
    return Spec("tiny", "cifar_resnet_n3_c8", heads, input_size=size, num_classes=classes)


def test_fit_to_data_digits():
    fitted, note = fit_to_data(_spec((3, 224, 224), 1000), "digits")
    assert fitted.input_size == (3, 8, 8) and fitted.num_classes == 10
    assert note.startswith("note: digits has 10 classes at 3×8×8") and "1000 classes at 3×224×224" in note
    one_channel = _spec((1, 8, 8), 10)
    assert fit_to_data(one_channel, "digits") == (one_channel, None)


def test_format_rows_aligns_columns_and_keeps_text_left():
    from annify.report import format_rows

    text = format_rows([("output", "node", "flops"), (1, "layer1.0", "1.2M"), (10, "model", "4.11G")])
    assert text.splitlines() == [
        "output  node      flops",
        "     1  layer1.0   1.2M",
        "    10  model     4.11G",
    ]
    with pytest.raises(ValueError, match="same number of cells"):
        format_rows([("a", "b"), ("c",)])
