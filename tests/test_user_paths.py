"""Defects found by trying annify as a new user would: each bad input gets one line naming the fix."""

import json

import click
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, tiny_spec
from PIL import Image

from annify.cli import main
from annify.spec import SpecError, load_spec
from annify.train import resolve_settings, train
from annify.weighting import get

# spec_path and run (a one-epoch run of it): tests/conftest.py


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- train settings -------------------------------------------------------------------------------


def test_hparam_that_is_not_a_number(spec_path, tmp_path):
    result = invoke("train", spec_path, "--hparam", "gamma=abc", "--epochs", "1", "--out", tmp_path / "r")
    assert_one_line_error(result, "hyperparameter gamma of adaloss must be a number, got 'abc'")
    with pytest.raises(ValueError, match="period of adaloss must be an integer"):
        get("adaloss", 3, period=1.5)


def test_seed_out_of_range(spec_path, tmp_path):
    result = invoke("train", spec_path, "--seed", str(2**70), "--epochs", "1", "--out", tmp_path / "r")
    assert_one_line_error(result, "seed must be an integer from 0 to 2**63 - 1")


def test_unknown_optimizer_named_with_its_key():
    with pytest.raises(SpecError, match="opt: unknown optimizer 'sgdd'"):
        resolve_settings({"opt": "sgdd"}, {})


def test_head_out_of_range_names_the_number_typed(spec_path, tmp_path):
    result = invoke(
        "train", spec_path, "--weights", "opt", "--head", "99", "--epochs", "1", "--out", tmp_path / "r"
    )
    assert_one_line_error(result, "head 99 is out of range: tiny has 3 outputs (1 to 3", alone=False)


def test_out_on_a_file(spec_path, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke("train", spec_path, "--epochs", "1", "--out", tmp_path / "afile" / "run")
    assert_one_line_error(result, "is a file, not a folder; choose another --out", alone=False)


def test_binary_spec(tmp_path):
    bad = tmp_path / "weights.yaml"
    bad.write_bytes(bytes(range(128, 256)))
    with pytest.raises(SpecError, match="is not a text file"):
        load_spec(bad)
    assert_one_line_error(invoke("train", bad, "--out", tmp_path / "r"), "weights.yaml is not a text file")


@pytest.mark.parametrize(("value", "message"), [("0", "must be a positive integer, got 0"),
                                               ("1", "is 1 but 'input_size' has 3 channels")])  # fmt: skip
def test_model_kwargs_in_chans(tmp_path, value, message):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        tiny_spec().replace(
            "model: cifar_resnet_n3_c8", f"model: cifar_resnet_n3_c8\nmodel_kwargs: {{in_chans: {value}}}"
        )
    )
    with pytest.raises(SpecError, match="model_kwargs.in_chans"):
        load_spec(spec)
    assert_one_line_error(invoke("train", spec, "--out", tmp_path / "r"), message)


# --- predict --------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--budget-flops", "--deadline-ms"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_predict_limits_must_be_finite_positive(run, tmp_path, option, value):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = invoke(
        "predict", run / "config.yaml", image, "--checkpoint", run / "checkpoints/last", option, value
    )
    assert result.exit_code == 2 and "must be a finite positive number" in result.output
    assert "Traceback" not in result.output


def test_predict_decompression_bomb(run, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    image = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(image)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300×300 is then over twice the limit
    result = invoke("predict", run / "config.yaml", image, "--checkpoint", run / "checkpoints/last")
    assert_one_line_error(result, "too many pixels for PIL's decompression-bomb limit; downscale it first")


def test_predict_corrupt_data_json(spec_path, tmp_path):
    out = tmp_path / "run"
    train(spec_path, out=out, epochs=1, log=lambda _: None)
    (out / "data.json").write_text("{bad")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = invoke("predict", out / "config.yaml", image, "--checkpoint", out / "checkpoints/last")
    assert_one_line_error(result, "data.json is corrupt: it should be JSON with the run's 'mean' and 'std'")


# --- data and eval --------------------------------------------------------------------------------


def _folder(root, classes_by_split):
    for split, classes in classes_by_split.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / c / f"{i}.png")


def test_imagefolder_with_one_class(spec_path, tmp_path):
    _folder(tmp_path / "d", {"train": ["cat"], "val": ["cat"]})
    result = invoke("train", spec_path, "--data", f"imagefolder:{tmp_path / 'd'}", "--out", tmp_path / "r")
    assert_one_line_error(result, "has one class folder (cat); a classifier needs at least 2")


def test_imagefolder_val_class_missing_from_train(spec_path, tmp_path):
    _folder(tmp_path / "d", {"train": ["cat", "dog"], "val": ["cat", "dog", "emu"]})
    result = invoke("train", spec_path, "--data", f"imagefolder:{tmp_path / 'd'}", "--out", tmp_path / "r")
    assert_one_line_error(result, "has class folder 'emu' that train/ lacks")


def test_eval_on_data_with_another_class_count_names_the_data(run, tmp_path):
    _folder(tmp_path / "d", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    result = invoke("eval", run / "config.yaml", "--checkpoint", run / "checkpoints/last",
                    "--data", f"imagefolder:{tmp_path / 'd'}")  # fmt: skip
    assert_one_line_error(
        result, "has 2 classes but the network in", "predicts 10 (it was trained on digits)"
    )


def test_eann_members_of_decreasing_cost_are_refused_before_training(tmp_path):
    lines = []
    from annify.eann import run_eann
    from annify.errors import EANNError

    with pytest.raises(EANNError, match="member 2 .* costs no more than member 1 .*: reorder them"):
        run_eann(
            ["cifar_resnet_n4_c16", "cifar_resnet_n2_c16"], out=tmp_path / "e", epochs=0, log=lines.append
        )
    assert not any("training into" in line for line in lines)  # refused before any member trained
    assert not (tmp_path / "e").exists()


def test_run_folder_files_are_json(run):
    assert json.loads((run / "data.json").read_text())["source"] == "digits"


# --- the error boundary ---------------------------------------------------------------------------


def test_boundary_catches_annify_errors_and_os_errors_only(monkeypatch):
    import click

    from annify._cli_common import friendly
    from annify.errors import AnnifyError, DataError, UnknownNameError

    def raising(exc):
        @click.command()
        @friendly
        def cmd():
            raise exc

        return CliRunner().invoke(cmd, [])

    assert_one_line_error(raising(DataError("bad data — fix it\nmore")), "bad data — fix it")
    assert_one_line_error(raising(FileNotFoundError(2, "No such file or directory", "/x/y")),
                          "cannot use /x/y: No such file or directory; check the path")  # fmt: skip
    bug = raising(ZeroDivisionError("a bug"))
    assert bug.exit_code == 1 and isinstance(bug.exception, ZeroDivisionError)  # not turned into a line
    plain = raising(ValueError("a programming error"))
    assert isinstance(plain.exception, ValueError) and "Error: a programming error" not in plain.output
    monkeypatch.setenv("ANNIFY_DEBUG", "1")
    assert isinstance(raising(DataError("x")).exception, DataError)  # the traceback, for bug reports
    assert (
        str(UnknownNameError("unknown weight scheme 'x'; available: a"))
        == "unknown weight scheme 'x'; available: a"
    )
    assert issubclass(UnknownNameError, AnnifyError) and issubclass(UnknownNameError, KeyError)


def test_registries_raise_unknown_name_errors():
    from annify import heads
    from annify.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="available: adaloss"):
        get("adaloss_typo", 3)
    with pytest.raises(UnknownNameError, match="unknown head type 'x'"):
        heads.build("x", 4, 2, "NCHW")


# --- run folders ----------------------------------------------------------------------------------


def test_readme_predict_and_export_after_train_with_the_unrefitted_spec(spec_path, run, tmp_path):
    """`annify train SPEC --out RUN` refits SPEC to the data; predict/export SPEC --checkpoint RUN work."""
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for checkpoint in (run, run / "checkpoints" / "last", run / "checkpoints" / "last" / "model.safetensors"):
        result = invoke("predict", spec_path, image, "--checkpoint", checkpoint, "--json")
        assert result.exit_code == 0, result.output
        assert "note: using the run's resolved spec" in result.output
    out = tmp_path / "export"
    result = invoke("export", spec_path, "--checkpoint", run, "--format", "torchscript", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    stats = json.loads((run / "data.json").read_text())
    assert (manifest["mean"], manifest["std"]) == (stats["mean"], stats["std"])
    assert manifest["input_size"] == [3, 8, 8]


def test_bare_weights_need_mean_and_std(run, tmp_path):
    import shutil

    weights = tmp_path / "w.safetensors"
    shutil.copy(run / "checkpoints" / "last" / "model.safetensors", weights)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    args = ("predict", run / "config.yaml", image, "--checkpoint", weights)
    assert_one_line_error(invoke(*args), "is not in a run folder", "pass --mean and --std")
    ok = invoke(*args, "--mean", "0.5", "--std", "0.25")
    assert ok.exit_code == 0, ok.output
    assert_one_line_error(invoke(*args, "--mean", "0.5"), "pass --mean and --std together")


def test_checkpoint_of_another_model_is_named(run, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(tiny_spec().replace("cifar_resnet_n3_c8", "cifar_resnet_n2_c16"))
    result = invoke("eval", other, "--checkpoint", run)
    assert_one_line_error(result, "is a checkpoint of cifar_resnet_n3_c8", "pass the run's own")


def test_export_never_mixes_two_networks(run, spec_path, tmp_path):
    out = tmp_path / "export"
    first = invoke("export", spec_path, "--checkpoint", run, "--format", "torchscript", "--out", out)
    assert first.exit_code == 0, first.output
    before = sorted(p.name for p in out.iterdir())
    (out / "tiny_out99.pt").write_bytes(b"")  # a stale file an earlier export listed
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append({"path": "tiny_out99.pt"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = invoke("export", spec_path, "--checkpoint", run, "--format", "torchscript", "--out", out)
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == before  # replaced whole: the stale file is gone
    manifest["name"] = "another"
    (out / "manifest.json").write_text(json.dumps(manifest))
    refused = invoke("export", spec_path, "--checkpoint", run, "--format", "torchscript", "--out", out)
    assert_one_line_error(
        refused, "holds the export of another network (another", "export into another --out", alone=False
    )


# --- convert and inspect --------------------------------------------------------------------------

TINY_ARGS = ("cifar_resnet_n3_c8", "--input-size", "1,8,8", "--num-classes", "5")


def test_convert_never_replaces_a_different_spec_without_force(tmp_path):
    out = tmp_path / "zoo"
    assert invoke("convert", *TINY_ARGS, "--every", "2", "--out", out).exit_code == 0
    target = out / "cifar_resann_n3_c8.yaml"
    first = target.read_text()
    again = invoke("convert", *TINY_ARGS, "--every", "2", "--out", out)  # the same spec: fine
    assert again.exit_code == 0, again.output
    other = invoke("convert", *TINY_ARGS, "--every", "3", "--out", out)
    assert_one_line_error(other, "already holds a different spec; pass --force", alone=False)
    assert target.read_text() == first
    forced = invoke("convert", *TINY_ARGS, "--every", "3", "--out", out, "--force")
    assert forced.exit_code == 0 and target.read_text() != first


def test_input_size_channels_become_in_chans(tmp_path):
    result = invoke("inspect", "cifar_resnet_n3_c8", "--input-size", "2,8,8")
    assert result.exit_code == 0, result.output  # built with in_chans=2
    clash = invoke(
        "convert", "cifar_resnet_n3_c8", "--input-size", "2,8,8", "--in-chans", "3", "--out", tmp_path
    )
    assert clash.exit_code == 2 and "--input-size has 2 channels but --in-chans is 3" in clash.output


def test_flops_period_nan(tmp_path):
    result = invoke("convert", *TINY_ARGS, "--flops-period", "nan", "--out", tmp_path)
    assert result.exit_code == 2 and "must be a finite positive number" in result.output


def test_shape_failure_names_model_node_and_hint(tmp_path):
    result = invoke(
        "convert", "vit_tiny_patch16_224", "--input-size", "3,32,32", "--heads", "2", "--out", tmp_path
    )
    assert_one_line_error(result, "VisionTransformer does not run at 3×32×32 at node 'patch_embed", "Hint:")


def test_train_section_is_checked_when_the_spec_loads(tmp_path, spec_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(tiny_spec("{opt: sgdd, epoch: 3, lr: -1}"))
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    text = str(err.value)
    assert "train: opt: unknown optimizer 'sgdd'" in text and "train: unknown key 'epoch'" in text
    assert "lr must be a non-negative number, got -1" in text  # every problem, each with its key
    with pytest.raises(SpecError, match="unknown setting 'epoch'"):
        train(spec_path, out=tmp_path / "r", epoch=3)


def test_train_config_is_the_one_list_of_settings():
    """The defaults are the paper's recipe (Hu et al. 2019: SGD, lr 0.1, momentum 0.9, weight decay 1e-4,
    /10 at 1/2 and 3/4 of 300 epochs) plus annify's own, written out here by hand; every `annify train`
    option that is a setting is one of them; a spec's section, then overrides, resolve over them."""
    from annify.cli import main
    from annify.config import DEFAULTS, TrainConfig

    recipe = {
        "data": "digits", "epochs": 300, "batch_size": 64, "opt": "sgd", "lr": 0.1, "momentum": 0.9,
        "weight_decay": 1e-4, "nesterov": False, "milestones": [0.5, 0.75], "decay_rate": 0.1,
        "weights": "adaloss", "weight_hparams": {}, "head": None, "seed": 0, "init": None,
        "freeze_trunk": False, "head_lr": None, "head_epochs": 0, "teacher": None, "bn_recalibrate": 2048,
        "head_local": None, "distill": 0.0, "distill_temperature": 1.0, "train_subset": None,
    }  # fmt: skip
    assert recipe == DEFAULTS
    # the defaults pass their own checks; resolving fills in only what None leaves to a rule (head-local
    # weighting: on for adaloss)
    assert TrainConfig.resolve({}, {}) == TrainConfig(**{**recipe, "head_local": True})
    how_it_runs = {"spec", "out", "resume", "loader", "compile_", "amp", "channels_last", "device", "workers"}
    how_it_runs |= {"threads", "cpu_memory", "module_ref"}  # the code that builds a module: spec
    options = {p.name for p in main.get_command(click.Context(main), "train").params} - how_it_runs
    assert options - {"hparam"} <= set(recipe), "a training setting outside TrainConfig"
    config = TrainConfig.resolve({"epochs": 5, "lr": 0.5}, {"lr": 0.01, "weights": None})
    assert (config.epochs, config.lr, config.weights, config.head_local) == (5, 0.01, "adaloss", True)


def test_demo_threads_zero_is_refused(tmp_path):
    result = invoke("demo", "--threads", "0", "--out", tmp_path / "d")
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output
    assert "Traceback" not in result.output


def test_a_train_problem_with_a_semicolon_stays_one_problem():
    from annify.config import train_section_problems

    problems = train_section_problems({"weight_hparams": {"gama": 0.1}})
    assert len(problems) == 1 and "no hyperparameter 'gama'; accepted: gamma" in problems[0]
