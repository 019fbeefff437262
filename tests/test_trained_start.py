"""Starting from a trained network: --init sources, the original measured beside the outputs, heads only
(bit-exact last output), two phases, the original as teacher, BatchNorm recalibration, trained-start defaults."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import spec_file, tiny_spec
from safetensors.torch import save_file

from annify import trained_start, weighting
from annify.cli import main
from annify.config import INIT_DEFAULTS, resolve_settings
from annify.convert import load, plain_model
from annify.data import build_datasets, make_batches
from annify.errors import TrainError
from annify.evaluate import evaluate
from annify.spec import SpecError
from annify.train import recalibrate_bn, train, weighted_update

TINY = tiny_spec("{batch_size: 128, lr: 0.05}")
FAST = {"epochs": 1, "bn_recalibrate": 256}  # a trained start's recipe, made short


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    return spec_file(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def base(spec_path, tmp_path_factory):
    """A plain network: trained 5 epochs on its last output alone (--weights opt), as a user's would be."""
    out = tmp_path_factory.mktemp("runs") / "base"
    return train(spec_path, out=out, epochs=5, weights="opt", log=lambda _: None)


def _splits(spec):
    datasets = build_datasets("digits", input_size=spec.input_size, augment=False)
    return make_batches({s: datasets[s] for s in ("val", "test")}, 256, device=torch.device("cpu"))


class _AsOutputs(torch.nn.Module):
    """A plain model as a one-output network, so ``evaluate`` measures it the same way."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return [self.model(x)]


# --- sources ---------------------------------------------------------------------------------------


def test_init_sources_give_the_same_trunk(base, spec_path, tmp_path):
    run = base.out
    folder = run / "checkpoints" / "last"
    st = tmp_path / "w.safetensors"
    save_file(load_file_dict(folder / "model.safetensors"), str(st))
    timm_names = tmp_path / "timm.pth"  # a timm model's own state dict (no heads), pickled by torch.save
    torch.save(plain_model(base.net).state_dict(), timm_names)
    states = [trained_start.init_state(str(s), base.spec) for s in (run, folder, st, timm_names)]
    trunk = base.net.trunk_state_dict()
    for state in states:
        got = {k: v for k, v in state.items() if not k.startswith("heads.")}
        assert got.keys() == trunk.keys()
        assert all(torch.equal(got[k], trunk[k].cpu()) for k in trunk)


def load_file_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_init_from_a_run_left_mid_swap(base, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base.out, run)
    (run / "checkpoints" / "last").rename(run / "checkpoints" / ".old-last")  # a kill between the renames
    state = trained_start.init_state(str(run), base.spec)
    assert torch.equal(state["fc.weight"], base.net.state_dict()["fc.weight"].cpu())


def test_init_errors_name_the_source_and_the_fix(base, tmp_path):
    with pytest.raises(TrainError, match="no such file or folder; pass 'timm', a run folder"):
        trained_start.init_state(str(tmp_path / "nothing"), base.spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no model.safetensors in it"):
        trained_start.init_state(str(tmp_path / "empty"), base.spec)
    with pytest.raises(TrainError, match="timm has no pretrained weights for cifar_resnet_n3_c8"):
        trained_start.init_state("timm", base.spec)


# --- heads only, the original row ------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_only(base, spec_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "heads"
    lines = []
    result = train(
        spec_path, out=out, init=str(base.out), freeze_trunk=True, teacher="last", distill=0.0,
        log=lines.append, **FAST,
    )  # fmt: skip
    return result, lines


def test_heads_only_leaves_the_last_output_bit_exact(base, heads_only):
    result, _ = heads_only
    original = plain_model(base.net).eval()
    net = result.net.eval()
    x = torch.randn(16, *result.spec.input_size)
    with torch.no_grad():
        assert torch.equal(net(x)[-1], original(x))
        assert not torch.equal(
            net(x)[0], load(base.spec, base.out / "checkpoints/last")(x)[0]
        )  # heads trained


def test_the_original_row_equals_the_plain_networks_own_evaluation(base, heads_only):
    result, lines = heads_only
    splits = _splits(result.spec)
    plain = _AsOutputs(plain_model(base.net))
    own = {s: evaluate(plain, splits[s]).errors[0] for s in ("val", "test")}
    assert result.original["val_error"] == own["val"] and result.original["test_error"] == own["test"]
    assert result.original["test_error"] < 0.5  # a trained network, not chance (90 %)
    rows = json.loads((result.out / "anytime.json").read_text())
    assert rows[-1] == result.original and rows[-1]["output"] == "original"
    assert rows[-2]["output"] == 3 and rows[-2]["test_error"] == own["test"]  # heads only: the same errors
    assert any(line.startswith("original network (") for line in lines)
    assert json.loads((result.out / "original.json").read_text())["source"] == str(base.out)


def test_resumed_run_keeps_the_original_row(base, spec_path, tmp_path):
    out = tmp_path / "r"
    kw = dict(init=str(base.out), freeze_trunk=True, teacher="last", distill=0.0, bn_recalibrate=256)
    first = train(spec_path, out=out, epochs=2, stop_after=1, log=lambda _: None, **kw)
    again = train(spec_path, out=out, epochs=2, resume=True, log=lambda _: None, **kw)
    assert first.original == again.original is not None


# --- two phases, the teacher, what AdaLoss balances -------------------------------------------------


def test_two_phase_trains_heads_alone_then_everything_with_a_fresh_schedule(base, spec_path, tmp_path):
    kw = dict(init=str(base.out), epochs=4, head_epochs=2, lr=0.01, head_lr=0.1, teacher="last", distill=0.0)
    kw["bn_recalibrate"] = 256
    phase1 = train(spec_path, out=tmp_path / "a", stop_after=2, log=lambda _: None, **kw)
    trunk0, trunk1 = base.net.trunk_state_dict(), phase1.net.trunk_state_dict()
    assert all(torch.equal(trunk0[k], trunk1[k]) for k in trunk0)  # weights and BN statistics
    done = train(spec_path, out=tmp_path / "a", resume=True, log=lambda _: None, **kw)
    trunk2 = done.net.trunk_state_dict()
    assert not torch.equal(trunk2["fc.weight"], trunk0["fc.weight"])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # metrics show the trunk group's lr: 0.01 then /10 in each phase (milestones 1/2, 3/4 of 2 epochs)
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.001, 0.01, 0.001])


def test_teacher_objective_matches_the_formula_by_hand():
    torch.manual_seed(0)
    outs = [torch.randn(5, 4) for _ in range(3)]
    teacher = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    gamma, t = 0.3, 2.0
    obj, ce = weighting.objectives(outs, y, gamma, t, teacher)
    for i, o in enumerate(outs):  # every output, the last too
        p_t = torch.softmax(teacher.double() / t, 1)
        log_p_s = torch.log_softmax(o.double() / t, 1)
        kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
        ce_i = -torch.log_softmax(o.double(), 1)[range(5), y].mean()
        assert ce[i].item() == pytest.approx(ce_i.item(), rel=1e-6)
        assert obj[i].item() == pytest.approx(((1 - gamma) * ce_i + gamma * t * t * kl).item(), rel=1e-5)
    no_teacher, _ = weighting.objectives(outs, y, gamma, t)
    assert no_teacher[-1].item() == pytest.approx(ce[-1].item())  # from the last output: it keeps its CE


def test_adaloss_observes_the_cross_entropies_not_the_distilled_objective():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.0)
    scheme = weighting.get("adaloss", 3)
    objective = w * torch.tensor([5.0, 6.0, 7.0])
    ce = torch.tensor([1.0, 2.0, 4.0])
    weighted_update(objective, scheme, opt, [], observed=ce)
    assert torch.equal(scheme.ema, ce)
    # weights follow the CE: min/l = [1, 1/2, 1/4], then (1 - 0.05) * r + 0.05
    assert scheme.weights.tolist() == pytest.approx([1.0, 0.525, 0.2875])


def test_teacher_run_keeps_its_teacher_frozen_and_trains(base, spec_path, tmp_path):
    result = train(
        spec_path, out=tmp_path / "kd", init=str(base.out), teacher="original", distill=0.5, lr=0.01,
        head_lr=0.1, head_epochs=0, log=lambda _: None, **FAST,
    )  # fmt: skip
    assert result.original is not None
    assert not torch.equal(
        result.net.trunk_state_dict()["fc.weight"], base.net.trunk_state_dict()["fc.weight"]
    )
    assert all(map(math.isfinite, [r["test_error"] for r in result.table]))


def test_no_teacher_when_the_source_has_another_class_count(spec_path, tmp_path):
    """timm's 1000-class head on a 10-class data set is skipped: no original to report or distil from."""
    from annify.sources import create_model

    file = tmp_path / "seven.safetensors"
    save_file(create_model("cifar_resnet_n3_c8", num_classes=7).state_dict(), str(file))
    lines = []
    result = train(spec_path, out=tmp_path / "r", init=str(file), log=lines.append, **FAST)
    assert result.original is None and not (tmp_path / "r" / "original.json").exists()
    assert (
        "note: no original network on this data (its classifier was skipped), so nothing to distil from"
        in lines
    )
    assert "teacher: original" in (tmp_path / "r" / "config.yaml").read_text()  # asked for, and said why not


def test_the_teacher_of_an_own_module_is_a_copy(tmp_path):
    from annify.convert import convert

    module = create_own()
    net, spec, _ = convert(module, heads=2, input_size=(3, 8, 8))
    teacher = trained_start.teacher_from(net, module)
    assert all(
        p.data_ptr() != q.data_ptr() for p, q in zip(teacher.parameters(), module.parameters(), strict=True)
    )
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher(x), net.eval()(x)[-1])


def create_own():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip


def test_adaloss_final_extra_by_hand():
    scheme = weighting.get("adaloss", 3, final_extra=0.5)
    scheme.update(torch.tensor([1.0, 2.0, 4.0]))
    # ratios [1, 1/2, 1/4]; the last + 0.5 = 0.75; / max 1 -> [1, .5, .75]; (1 - .05) r + .05
    assert scheme.weights.tolist() == pytest.approx([1.0, 0.525, 0.7625])
    scheme = weighting.get("adaloss", 2, final_extra=1.0)
    scheme.update(torch.tensor([1.0, 1.0]))  # ratios [1, 1] -> [1, 2] / 2 = [0.5, 1]
    assert scheme.weights.tolist() == pytest.approx([0.525, 1.0])
    with pytest.raises(SpecError, match="final_extra must be a non-negative number"):
        weighting.get("adaloss", 2, final_extra=-1)


# --- settings --------------------------------------------------------------------------------------


def test_a_trained_start_has_its_own_defaults_and_the_user_still_wins():
    cfg = resolve_settings({}, {"init": "runs/base"})
    assert {k: cfg[k] for k in INIT_DEFAULTS} == INIT_DEFAULTS
    assert resolve_settings({}, {})["lr"] == 0.1  # from scratch: the paper's
    assert resolve_settings({"lr": 0.2}, {"init": "x"})["lr"] == 0.2  # the spec's train: section
    assert resolve_settings({}, {"init": "x", "epochs": 3})["epochs"] == 3
    with pytest.raises(SpecError, match="teacher 'original' is the --init network: pass --init too"):
        resolve_settings({}, {"teacher": "original"})
    with pytest.raises(SpecError, match=r"head_epochs must be a number of epochs or a fraction in \[0, 1\)"):
        resolve_settings({}, {"init": "x", "head_epochs": 1.5})


# --- BatchNorm recalibration ----------------------------------------------------------------------


def test_recalibrate_bn_sets_the_plain_average_and_leaves_eval_layers_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    net[1].eval()  # a frozen layer
    before = net[1].running_mean.clone()
    batches = [(torch.randn(8, 3) * 2 + 1, None) for _ in range(4)]
    rng = torch.get_rng_state()
    recalibrate_bn(net, batches, images=24, device=torch.device("cpu"))  # 3 batches of 8
    seen = torch.cat([x for x, _ in batches[:3]])
    means = torch.stack([x.mean(0) for x, _ in batches[:3]]).mean(0)
    variances = torch.stack([x.var(0, unbiased=True) for x, _ in batches[:3]]).mean(0)
    assert torch.allclose(net[0].running_mean, means, atol=1e-6)
    assert torch.allclose(net[0].running_var, variances, atol=1e-5)
    assert torch.equal(net[1].running_mean, before)
    assert net[0].momentum == 0.1 and torch.equal(torch.get_rng_state(), rng)
    assert seen.shape[0] == 24


def test_a_short_run_learns(tmp_path, spec_path):
    """One epoch of digits (37 steps): the last output well below chance (90 %) in eval mode.

    Without recomputed BatchNorm statistics the running averages still describe the first steps'
    network (measured: 81 % error, against 48 % recomputed).
    """
    kw = dict(epochs=1, batch_size=32, log=lambda _: None)
    short = train(spec_path, out=tmp_path / "short", **kw)
    stale = train(spec_path, out=tmp_path / "stale", bn_recalibrate=0, **kw)
    assert short.table[-1]["test_error"] < 0.6
    assert short.table[-1]["test_error"] < stale.table[-1]["test_error"] - 0.1


# --- the command ------------------------------------------------------------------------------------


def test_cli_init_prints_the_original_beside_every_output(base, spec_path, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        main, ["train", str(spec_path), "--init", str(base.out), "--epochs", "2", "--bn-recalibrate", "256",
               "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "original  model (own classifier)" in res.output
    assert "the original network: its last output errs" in res.output
    cfg = (out / "config.yaml").read_text()  # the trained-start defaults, the spec's lr winning over them
    assert (
        "teacher: original" in cfg and "head_lr: 0.1" in cfg and "distill: 0.5" in cfg and "lr: 0.05" in cfg
    )
    assert (out / "anytime.png").is_file()
