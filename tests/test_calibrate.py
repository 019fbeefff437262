"""Exit thresholds with a guarantee: p-values against direct formulas, the guarantee over 1,000 random
splits of seeded synthetic logits, the nothing-valid case, labels-free calibration, and the commands."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_line_error, tiny_spec
from PIL import Image

from annify.calibrate import (
    calibrate,
    default_grid,
    fixed_sequence,
    hoeffding_bentkus_p_value,
    loss_matrix,
    read_thresholds,
    select,
)
from annify.cli import main


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed term by term (independent of scipy)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_hoeffding_bentkus_p_value_matches_the_formula_computed_by_hand():
    n, eps = 100, 0.05
    # R̂ = 0.01: Hoeffding exp(-n·h1(0.01, 0.05)) = 0.0843 against Bentkus e·P(Bin <= 1) = 0.1008
    h1 = 0.01 * math.log(0.01 / eps) + 0.99 * math.log(0.99 / (1 - eps))
    hoeffding, bentkus = math.exp(-n * h1), math.e * binom_cdf(1, n, eps)
    assert hoeffding == pytest.approx(0.08428, abs=1e-4) and bentkus == pytest.approx(0.10080, abs=1e-4)
    assert float(hoeffding_bentkus_p_value(0.01, n, eps)) == pytest.approx(hoeffding, rel=1e-9)
    # R̂ = 0: h1(0, ε) = ln(1/(1-ε)), so Hoeffding is (1-ε)^n, below e·(1-ε)^n
    assert float(hoeffding_bentkus_p_value(0.0, n, eps)) == pytest.approx(0.95**100, rel=1e-9)
    # R̂ = 0.03 with n = 1000: Bentkus is the smaller term here
    n, r = 1000, 0.03
    h1 = r * math.log(r / eps) + (1 - r) * math.log((1 - r) / (1 - eps))
    want = min(math.exp(-n * h1), math.e * binom_cdf(30, n, eps))
    assert want == math.e * binom_cdf(30, n, eps)
    assert float(hoeffding_bentkus_p_value(r, n, eps)) == pytest.approx(want, rel=1e-9)
    # at or above ε nothing can be rejected, and p-values are vectorised over R̂
    p = hoeffding_bentkus_p_value(np.array([0.05, 0.2]), 100, eps)
    assert p.tolist() == [pytest.approx(min(1.0, math.e * binom_cdf(5, 100, eps))), 1.0]


def test_fixed_sequence_rejects_until_the_first_failure():
    assert fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.1) == 2  # the last p-value is never reached
    assert fixed_sequence([0.2, 0.01], 0.1) == 0
    assert fixed_sequence([0.01, 0.1], 0.1) == 2


def test_loss_matrix_exits_at_the_first_confident_output():
    # 2 samples, 3 outputs, 2 classes; logits chosen so max softmax is known
    big = 10.0  # softmax of (10, 0) ≈ 0.99995
    logits = [
        torch.tensor([[big, 0.0], [0.0, 0.1]]),  # sample 0: class 0 confident; sample 1: class 1, ~0.52
        torch.tensor([[0.0, big], [0.0, big]]),  # class 1 confident for both
        torch.tensor([[0.0, big], [big, 0.0]]),  # last: sample 0 -> 1, sample 1 -> 0
    ]
    losses, exits = loss_matrix(logits, None, "consistency", grid=np.array([2.0, 0.9, 0.5]))
    assert exits.tolist() == [[2, 2], [0, 1], [0, 0]]
    assert losses.tolist() == [[0, 0], [1, 1], [1, 1]]
    labels = torch.tensor([1, 1])  # the last output is right on sample 0 only
    losses, _ = loss_matrix(logits, labels, "accuracy-gap", grid=np.array([2.0, 0.9, 0.5]))
    assert losses.tolist() == [[0, 0], [1, 0], [1, 0]]


def synthetic(n=5000, classes=10, seed=0):
    """Seeded logits of a 4-output network: per-sample difficulty, later outputs more accurate."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    ease = torch.rand(n, generator=g) * 3
    onehot = torch.nn.functional.one_hot(y, classes)
    outs = [torch.randn(n, classes, generator=g) + a * ease[:, None] * onehot for a in (0.8, 1.3, 1.8, 2.6)]
    return outs, y


@pytest.mark.parametrize("risk", ["consistency", "accuracy-gap"])
def test_ltt_risk_exceeds_epsilon_at_most_delta_of_the_time_over_1000_random_splits(risk):
    outs, y = synthetic()
    losses, _ = loss_matrix(outs, y, risk)
    eps, delta, n_cal, trials = 0.05, 0.1, 500, 1000
    rng = np.random.default_rng(0)
    violations, naive_violations, chosen = 0, 0, []
    for _ in range(trials):
        order = rng.permutation(losses.shape[1])
        cal, test = losses[:, order[:n_cal]], losses[:, order[n_cal:]]
        index, bound = select(cal, "ltt", eps, delta)
        assert index is not None and bound <= delta
        chosen.append(index)
        violations += test[index].mean() > eps
        naive = np.flatnonzero(cal.mean(axis=1) <= eps)[-1]  # no correction: R̂ <= ε is not a guarantee
        naive_violations += test[naive].mean() > eps
    limit = delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    assert violations / trials <= limit
    assert naive_violations / trials > limit  # the check has power: a broken selection fails it
    assert np.median(chosen) > 10  # and the guarantee is not met by never exiting early


def test_crc_controls_the_expected_risk_over_1000_random_splits():
    outs, y = synthetic(seed=1)
    losses, _ = loss_matrix(outs, y, "accuracy-gap")
    eps, n_cal, trials = 0.05, 500, 1000
    rng = np.random.default_rng(1)
    risks = []
    for _ in range(trials):
        order = rng.permutation(losses.shape[1])
        index, bound = select(losses[:, order[:n_cal]], "crc", eps, 0.1)
        assert index is not None and bound <= eps
        risks.append(losses[index, order[n_cal:]].mean())
    risks = np.array(risks)
    assert risks.mean() <= eps + 3 * risks.std() / math.sqrt(trials)
    assert risks.mean() > eps / 4  # not vacuous: it exits early enough to spend some of ε


def test_crc_makes_the_loss_monotone_before_choosing():
    # one sample whose loss is 1 at the second threshold and 0 after: a non-monotone loss
    losses = np.array([[0.0], [1.0], [0.0], [0.0]])
    # raw losses would let the last threshold pass ((1·0 + 1)/2 = 0.5 <= 0.6); the monotone loss stops at 0
    assert select(losses, "crc", 0.6, 0.1) == (0, 0.5)


def test_nothing_valid_gives_the_full_network():
    outs, y = synthetic(n=100)
    flops = [10.0, 20.0, 30.0, 40.0]
    cal = calibrate(outs, flops, y, "accuracy-gap", "ltt", epsilon=0.001, delta=0.1, full_flops=37.0)
    # even zero errors in 100 samples give p = 0.999^100 = 0.905 > δ at the first threshold
    assert not cal.valid and cal.threshold is None
    assert cal.bound == pytest.approx(0.999**100, rel=1e-9)
    assert cal.thresholds == [math.inf, math.inf, math.inf, 0.0]
    assert cal.expected_flops == cal.full_flops == 37.0
    assert "the full network" in cal.guarantee


def test_consistency_calibrates_without_labels():
    outs, y = synthetic(n=2000)
    flops = [10.0, 20.0, 30.0, 40.0]
    free = calibrate(outs, flops, None, "consistency", "ltt", epsilon=0.05, delta=0.1)
    labelled = calibrate(outs, flops, y, "consistency", "ltt", epsilon=0.05, delta=0.1)
    assert free == labelled and free.valid
    assert free.thresholds == [free.threshold] * 3 + [0.0] and free.threshold in default_grid()
    assert 10.0 <= free.expected_flops < 40.0 and free.val_risk <= 0.05
    with pytest.raises(ValueError, match="accuracy-gap risk needs labels"):
        calibrate(outs, flops, None, "accuracy-gap")


# --- the commands, on a tiny run trained for two epochs -----------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    (folder / "tiny.yaml").write_text(tiny_spec())
    out = folder / "run"
    args = ["train", folder / "tiny.yaml", "--epochs", "2", "--weights", "const", "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    Image.new("L", (8, 8), color=128).save(folder / "digit.png")
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_calibrate_writes_thresholds_and_predict_and_export_use_them(run, tmp_path):
    result = invoke("calibrate", run, "--epsilon", "0.2", "--delta", "0.2")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"wrote {run / 'thresholds.json'}"
    record = json.loads((run / "thresholds.json").read_text())
    assert record["method"] == "ltt" and record["risk"] == "consistency"
    assert (record["epsilon"], record["delta"], record["n"]) == (0.2, 0.2, 270)  # digits' validation split
    assert record["test"]["n"] == 360 and 0 <= record["test"]["risk"] <= 1
    for key in ("bound", "expected_flops", "full_flops", "threshold", "weights_sha256"):
        assert key in record
    cal = read_thresholds(run)
    assert len(cal.thresholds) == 3 and cal.thresholds[-1] == 0.0

    image = run.parent / "digit.png"
    result = invoke("predict", run / "config.yaml", "--checkpoint", run, "--early-exit", "--json", image)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    table = json.loads((run / "anytime.json").read_text())
    assert row["flops"] in [r["flops"] for r in table] or not cal.valid
    result = invoke(
        "export", run / "config.yaml", "--checkpoint", run, "--format", "torchscript", "--no-check",
        "--out", tmp_path / "export",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["early_exit"]["thresholds"] == record["thresholds"]


def test_calibrate_with_nothing_valid_says_so_in_one_line(run):
    result = invoke("calibrate", run, "--risk", "accuracy-gap", "--epsilon", "0.001")
    assert result.exit_code == 0, result.output
    assert "no threshold keeps accuracy-gap risk <= 0.001 on 270 validation images" in result.output
    assert read_thresholds(run).thresholds == [math.inf, math.inf, 0.0]


def test_thresholds_of_other_weights_are_refused(run, tmp_path):
    from annify.early_exit import early_exit

    invoke("calibrate", run, "--epsilon", "0.2")
    stale = tmp_path / "thresholds.json"
    stale.write_text(
        (run / "thresholds.json").read_text().replace('"weights_sha256": "', '"weights_sha256": "0')
    )
    with pytest.raises(ValueError, match="calibrated for other weights"):
        read_thresholds(stale, run / "checkpoints" / "last" / "model.safetensors")
    assert_one_line_error(invoke("calibrate", run / "checkpoints"), "is not a run folder")
    bad = invoke("calibrate", run, "--epsilon", "1.5")
    assert bad.exit_code == 2 and "'--epsilon': must be between 0 and 1" in bad.output
    import annify

    net = annify.load(run / "config.yaml", run / "checkpoints" / "last")
    x = torch.randn(4, *net.spec.input_size)
    got = early_exit(net, x, run)  # a run folder's thresholds.json, read by the library
    want = early_exit(net, x, read_thresholds(run).thresholds)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
