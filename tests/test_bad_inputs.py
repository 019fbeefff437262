"""Issue 20: every bad or unusual input a user tried gets one line naming the problem and the fix, or the
right result; never a hang, a silent change of the data, or a lost file."""

import json

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, tiny_spec

from annify.cli import main
from annify.spec import SpecError, load_spec

TINY_ARGS = ("cifar_resnet_n3_c8", "--input-size", "1,8,8", "--num-classes", "5")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- hangs: what an input can make annify allocate or expand is bounded -----------------------------


def test_flops_period_of_a_few_flops_is_refused_before_any_list_is_made(tmp_path):
    # 2 FLOPs of a 1e5-FLOP network used to build a list of every multiple (resnet18: 11 GB in 35 s)
    result = invoke("convert", *TINY_ARGS, "--flops-period", "2", "--out", tmp_path)
    assert_one_line_error(result, "--flops-period 2 asks for", "tap points", "such as 0.25")
    assert not list(tmp_path.glob("*.yaml"))


def test_yaml_alias_bomb_in_a_spec_is_refused_at_once(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10**9 nodes
    spec = tmp_path / "bomb.yaml"
    spec.write_text(tiny_spec().replace("train: {batch_size: 128}", "placement:\n  " + "\n  ".join(levels)))
    with pytest.raises(SpecError, match="line 11 uses the YAML alias \\*a0; a spec is plain data"):
        load_spec(spec)
    assert_one_line_error(invoke("train", spec, "--out", tmp_path / "r"), "uses the YAML alias")


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path):
    spec = tmp_path / "twice.yaml"
    spec.write_text(tiny_spec() + "heads:\n  - {node: model}\n")  # the second heads: used to win silently
    with pytest.raises(SpecError, match="key 'heads' appears twice \\(lines 5 and 10\\); keep one"):
        load_spec(spec)
    spec.write_text(tiny_spec().replace("{node: model}", "{node: model, node: stages.0.0.add}"))
    with pytest.raises(SpecError, match="key 'node' appears twice on line 8"):
        load_spec(spec)


# --- silent wrong results -------------------------------------------------------------------------


def test_every_with_a_start_past_the_last_block_is_refused(tmp_path):
    # used to write a spec with only the classifier
    result = invoke("convert", *TINY_ARGS, "--every", "2", "--start", "100", "--out", tmp_path)
    assert_one_line_error(result, "--every 2 --start 100 places no head", "9 blocks", "blocks 1 to 8")
    assert not list(tmp_path.glob("*.yaml"))


def _image(kind: str):
    """(a PIL image of ``kind``, the 8-bit gray values annify must read from it)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    gray = np.round(ramp * 255).astype(np.uint8)
    if kind == "16-bit":  # PIL's convert('L') made every value above 255 white: 99% of this ramp
        return Image.fromarray(np.round(ramp * 65535).astype(np.uint16)), gray
    if kind == "float":  # values in [0, 1]: PIL's convert('L') made them black
        return Image.fromarray(ramp.astype(np.float32)), gray
    if kind == "palette":
        return Image.fromarray(gray).convert("P"), np.asarray(Image.fromarray(gray).convert("P").convert("L"))
    if kind == "alpha":  # half transparent: composited on white, not the hidden color (black) dropped in
        rgba = np.zeros((16, 16, 4), np.uint8)
        rgba[..., 3] = np.where(ramp < 0.5, 0, 255)
        return Image.fromarray(rgba, "RGBA"), np.where(ramp < 0.5, 255, 0).astype(np.uint8)
    rgb = Image.fromarray(gray).convert("RGB")  # CMYK
    return rgb.convert("CMYK"), np.asarray(rgb.convert("CMYK").convert("RGB").convert("L"))


@pytest.mark.parametrize("kind", ["16-bit", "float", "palette", "alpha", "CMYK"])
def test_images_are_read_the_same_right_way_in_predict_and_in_image_folder_training(tmp_path, kind):
    import numpy as np
    import torch
    from PIL import Image

    from annify.data import build_datasets
    from annify.images import image_transform, load_image

    im, expected = _image(kind)
    name = "x.tiff" if kind == "float" else "x.png"  # timm's folder reader takes png and jpg only
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            if kind == "float":
                Image.new("RGB", (16, 16)).save(tmp_path / split / c / "y.png")
            im.save(tmp_path / split / c / (name if kind != "CMYK" else "x.jpg"))
    path = tmp_path / "val" / "a" / name
    if kind == "CMYK":  # png holds no CMYK: a CMYK jpeg, whose lossy pixels are what PIL reads back
        path = tmp_path / "val" / "a" / "x.jpg"
        expected = np.asarray(Image.open(path).convert("RGB").convert("L"))
    else:
        val = build_datasets(f"imagefolder:{tmp_path}", input_size=(3, 16, 16), augment=False)["val"].dataset
        val.transform = None
        trained = np.asarray(val[0][0])  # what training reads, before resizing and normalising
        assert trained.shape == (16, 16, 3)
        if kind != "float":
            np.testing.assert_allclose(trained.astype(int), np.repeat(expected[..., None], 3, -1), atol=1)

    spec = load_spec_for_images(tmp_path)
    transform = image_transform(spec, [0.0], [1.0])
    expected_input = transform(Image.fromarray(expected).convert("RGB"))
    got = load_image(path, spec, transform=transform)
    assert torch.allclose(got, expected_input, atol=1.5 / 255), (got - expected_input).abs().max()


def load_spec_for_images(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec().replace("[3, 32, 32]", "[3, 16, 16]"))
    return load_spec(spec)


def test_an_image_of_no_known_range_is_refused_in_predict(tmp_path):
    import numpy as np
    from PIL import Image

    from annify.errors import InferenceError
    from annify.images import load_image

    Image.fromarray(np.full((8, 8), 1e6, np.float32)).save(tmp_path / "x.tiff")
    with pytest.raises(InferenceError, match="float pixels range from 1e\\+06 to 1e\\+06"):
        load_image(tmp_path / "x.tiff", load_spec_for_images(tmp_path))


def test_a_corrupt_image_in_an_image_folder_is_named(tmp_path):
    from PIL import Image

    from annify.data import build_datasets
    from annify.errors import DataError

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "x.jpg")
    good = (tmp_path / "train" / "a" / "x.jpg").read_bytes()
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(good[: len(good) // 3])  # truncated: used to be skipped
    train = build_datasets(f"imagefolder:{tmp_path}", input_size=(3, 8, 8), augment=False)["train"]
    with pytest.raises(DataError, match="cannot read image '.*train/a/x.jpg' .*; remove or replace the file"):
        train[0]


def _gray_spec(tmp_path):
    path = tmp_path / "gray.yaml"
    path.write_text(
        tiny_spec()
        .replace("[3, 32, 32]", "[1, 8, 8]")
        .replace("num_classes: 10", "num_classes: 10\nmodel_kwargs: {in_chans: 1}")
    )
    return load_spec(path)


def test_three_means_for_a_one_channel_network_are_refused_not_averaged(tmp_path):
    from annify.errors import InferenceError
    from annify.images import image_transform

    spec = _gray_spec(tmp_path)
    with pytest.raises(InferenceError, match="--mean has 3 values but the network takes 1-channel images"):
        image_transform(spec, [0.1, 0.5, 0.9], [0.25])
    image_transform(spec)  # the model's own 3-channel config is still averaged for gray inputs
    image_transform(spec, [0.5], [0.25])


@pytest.mark.parametrize(("mean", "std", "message"), [([0.5], [0.0], "--std must be positive numbers"),
                                                      ([float("nan")], [1.0], "--mean must be finite numbers, got nan")])  # fmt: skip
def test_a_zero_std_or_a_nan_mean_is_one_line(tmp_path, mean, std, message):
    from annify.errors import InferenceError
    from annify.images import image_transform

    with pytest.raises(InferenceError, match=message):
        image_transform(_gray_spec(tmp_path), mean, std)


def test_a_train_subset_smaller_than_the_class_count_is_refused():
    from annify.data import build_datasets
    from annify.errors import DataError

    with pytest.raises(DataError, match="train_subset=5 is fewer than the 10 classes of digits"):
        build_datasets("digits", train_subset=5)
    assert len(build_datasets("digits", train_subset=10)["train"]) == 10


def test_nan_early_exit_thresholds_are_refused(tiny_net, tiny_input):
    from annify.early_exit import early_exit
    from annify.errors import InferenceError

    with pytest.raises(InferenceError, match="hold nan; give each output a confidence in \\[0, 1\\]"):
        early_exit(tiny_net.eval(), tiny_input, [float("nan")] * tiny_net.num_outputs)


# --- nothing already written is lost --------------------------------------------------------------


# spec_path and run (a one-epoch run of it): tests/conftest.py


def test_eann_never_replaces_an_eann_already_in_out(tmp_path):
    (tmp_path / "eann.json").write_text("{}\n")
    result = invoke("eann", "cifar_resnet_n2_c16", "cifar_resnet_n4_c16", "--epochs", "0", "--out", tmp_path)
    assert_one_line_error(result, "already holds an EANN's results (eann.json)", "--resume", "--force")
    assert (tmp_path / "eann.json").read_text() == "{}\n"


def test_eann_member_given_twice_is_refused(tmp_path):
    result = invoke("eann", "cifar_resnet_n2_c16", "cifar_resnet_n2_c16", "--epochs", "0", "--out", tmp_path)
    assert_one_line_error(result, "member cifar_resnet_n2_c16 is given twice")


def test_demo_never_replaces_a_training_runs_results(run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = invoke("demo", "--epochs", "1", "--train-subset", "20", "--no-eann", "--out", out)
    assert_one_line_error(
        result, "holds results that are not a demo's (config.yaml", "anytime.png", "--force"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_second_process_training_into_a_held_run_folder_gets_one_line(spec_path, tmp_path):
    from annify import run_dir

    out = tmp_path / "r"
    held = run_dir.lock(out)  # as another `annify train --out r` holds it (flock: per open file)
    try:
        result = invoke("train", spec_path, "--epochs", "1", "--out", out)
        assert_one_line_error(
            result, f"{out} is in use by another annify process (pid ", "choose another --out"
        )
    finally:
        held.release()
    assert not out.exists()  # the folder the holder made for a run that wrote nothing is gone
    ok = invoke("train", spec_path, "--epochs", "1", "--out", out)
    assert ok.exit_code == 0, ok.output
    assert not (out / run_dir.LOCK).exists()


@pytest.mark.parametrize("fails", ["state.pt", "model.safetensors"])
def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(
    spec_path, tmp_path, monkeypatch, fails
):
    import safetensors
    import torch

    import annify.train as training
    from annify.errors import CheckpointError

    writes = {"n": 0, "ok": 1 if fails == "state.pt" else 2}  # epoch 1 writes weights to last and best
    real_saver, real_weights = training._saver, training._weights_writer

    def full_disk(real, error):
        def writer(*args):
            write = real(*args)

            def fail_second(path):
                writes["n"] += 1
                if writes["n"] > writes["ok"]:
                    raise error
                write(path)

            return fail_second

        return writer

    if fails == "state.pt":  # torch.save's zip writer on a full disk
        err = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470")
        monkeypatch.setattr(training, "_saver", full_disk(real_saver, err))
    else:
        err = safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")
        monkeypatch.setattr(training, "_weights_writer", full_disk(real_weights, err))
    out = tmp_path / "r"
    result = invoke("train", spec_path, "--epochs", "2", "--out", out)
    last = out / "checkpoints" / "last"
    assert_one_line_error(
        result, f"cannot write checkpoint {out / 'checkpoints' / 'last' / fails}",
        f"the last good checkpoint {last} is kept", "--resume", alone=False,
    )  # fmt: skip
    assert torch.load(last / "state.pt", weights_only=True)["epoch"] == 1
    assert not list((out / "checkpoints").glob(".tmp-*"))
    with pytest.raises(CheckpointError, match="no checkpoint was written yet"):
        writes["n"] = writes["ok"]
        training.train(spec_path, out=tmp_path / "fresh", epochs=1, log=lambda _: None)


# --- tracebacks become one line -------------------------------------------------------------------


def test_negative_workers_and_class_counts_are_refused_by_the_options(spec_path, tmp_path):
    for args in (("train", spec_path, "--workers", "-1", "--out", tmp_path / "r"),
                 ("convert", "cifar_resnet_n3_c8", "--num-classes", "-3", "--heads", "2", "--out", tmp_path)):  # fmt: skip
        result = invoke(*args)
        assert result.exit_code == 2, result.output  # click's usage error, before anything runs
        assert "Traceback" not in result.output and "is not in the range" in result.output
        assert not (tmp_path / "r").exists() and not list(tmp_path.glob("*.yaml"))


def test_predict_with_a_binary_labels_file_or_a_zero_std(run, spec_path, tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "labels.bin").write_bytes(bytes(range(128, 256)))
    args = ("predict", spec_path, tmp_path / "x.png", "--checkpoint", run)
    assert_one_line_error(invoke(*args, "--labels", tmp_path / "labels.bin"), "labels.bin is not a text file")
    bad_std = invoke(*args, "--mean", "0.5", "--std", "0")
    assert_one_line_error(bad_std, "--std must be positive numbers", alone=False)


def test_inspect_at_a_size_that_would_exhaust_memory_is_refused_at_once():
    result = invoke("inspect", "cifar_resnet_n3_c8", "--input-size", "3,100000,100000")
    assert_one_line_error(
        result, "input size 3×100000×100000 is 30,000,000,000 values", "smaller --input-size"
    )


# --- clear messages -------------------------------------------------------------------------------


def test_ctrl_c_in_train_says_how_to_resume_and_leaves_a_resumable_run(spec_path, tmp_path, monkeypatch):
    import annify.train as training

    real = training._train_epoch

    def interrupted(run_, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(run_, epoch)

    monkeypatch.setattr(training, "_train_epoch", interrupted)
    out = tmp_path / "r"
    result = invoke("train", spec_path, "--epochs", "2", "--out", out)
    assert result.exit_code == 1
    assert f"interrupted: {out} keeps its last checkpoint ({out / 'checkpoints' / 'last'}); continue it " in (
        result.output
    )
    assert "--resume" in result.output
    monkeypatch.setattr(training, "_train_epoch", real)
    resumed = training.train(spec_path, out=out, epochs=2, resume=True, log=lambda _: None)
    assert resumed.epochs_done == 2  # the lock went with the interrupted run


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_a_run_folder_without_a_checkpoint_says_so(run, spec_path, tmp_path, command):
    import shutil

    from PIL import Image

    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "last")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    extra = {"eval": (), "predict": (tmp_path / "x.png",), "export": ("--out", tmp_path / "e")}[command]
    result = invoke(command, spec_path, *extra, "--checkpoint", out)
    assert_one_line_error(result, f"run {out} has no checkpoint yet", "--resume", alone=False)


def test_eval_predict_and_load_take_the_checkpoint_a_kill_left_mid_swap(run, spec_path, tmp_path):
    import shutil

    import torch

    import annify

    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "checkpoints" / "last").rename(out / "checkpoints" / ".old-last")  # killed between the renames
    result = invoke("eval", spec_path, "--checkpoint", out)
    assert result.exit_code == 0, result.output
    net = annify.load(spec_path, out)
    expected = annify.load(run / "config.yaml", run / "checkpoints" / "last" / "model.safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(net.eval()(x), expected.eval()(x), strict=True))


def test_load_and_eval_take_a_run_folder_as_the_cli_does(run, spec_path):
    import annify

    net = annify.load(spec_path, run)  # the spec says 32×32; the run's resolved spec (8×8 digits) is used
    assert tuple(net.spec.input_size) == (3, 8, 8)
    result = invoke("eval", run)  # used to say "is a directory"
    assert result.exit_code == 0, result.output
    assert "val err" in result.output or "val" in result.output


def test_resume_into_another_network_names_the_tensor_and_both_shapes(run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    other = tmp_path / "other.yaml"
    other.write_text(tiny_spec().replace("stages.1.2.add", "stages.2.0.add"))  # 32 channels, not 16
    (out / "config.yaml").write_text(other.read_text())  # so only the weights disagree
    from annify.convert import ConvertError
    from annify.train import train

    with pytest.raises(ConvertError) as caught:
        train(other, out=out, epochs=1, resume=True, log=lambda _: None)
    message = str(caught.value)
    assert "0 missing" not in message and "(e.g. [])" not in message
    assert (
        "does not fit this spec: 5 of the wrong shape (e.g. heads.1.fc.weight: (10, 16) in the checkpoint, "
        "(10, 32) in the network)" in message
    )
    assert "pass that spec, or the run folder" in message


# --- paths that dead-ended ------------------------------------------------------------------------


class OwnNet(__import__("torch").nn.Module):
    """A user's own classifier for 3×8×8 digits: three conv units, then pool and a linear layer."""

    def __init__(self):
        from helpers import ConvBNReLU
        from torch import nn

        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.Sequential(ConvBNReLU(8), ConvBNReLU(8), ConvBNReLU(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def test_a_network_converted_from_your_own_module_trains_from_python_and_the_cli_says_how(tmp_path):
    import torch

    import annify
    from annify.spec import dump
    from annify.train import train

    torch.manual_seed(0)
    module = OwnNet()
    _, spec, _ = annify.convert(module, every=1, input_size=(3, 8, 8))
    assert spec.model == "module:OwnNet" and len(spec.heads) == 3
    path = tmp_path / "own.yaml"
    path.write_text(dump(spec))
    result = train(path, model=module, out=tmp_path / "r", epochs=3, stop_after=1, log=lambda _: None)
    assert result.epochs_done == 1 and len(result.table) == 3
    assert result.net.trunk_state_dict()["fc.weight"].data_ptr() == module.fc.weight.data_ptr()  # shared
    resumed = train(path, model=OwnNet(), out=tmp_path / "r", epochs=3, resume=True, log=lambda _: None)
    assert resumed.epochs_done == 3
    assert max(r["val_error"] for r in resumed.table) < 0.9  # it learned: 10 classes, chance is 0.9
    cli = invoke("train", path, "--epochs", "1", "--out", tmp_path / "cli")
    assert_one_line_error(
        cli, "module of your own (module:OwnNet)", "--module my_net.py:MyNet", "train.train(spec, model="
    )


OWN_NET_PY = """
import torch
from torch import nn

class OwnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                     for _ in range(3)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))
"""


def test_the_cli_trains_a_network_converted_from_your_own_module(tmp_path, monkeypatch):
    import importlib.util

    import annify
    from annify.spec import dump

    (tmp_path / "own_net.py").write_text(OWN_NET_PY)
    spec_ = importlib.util.spec_from_file_location("own_net", tmp_path / "own_net.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    _, spec, _ = annify.convert(mod.OwnNet(), heads=3, input_size=(3, 8, 8))
    (tmp_path / "own.yaml").write_text(dump(spec))
    monkeypatch.chdir(tmp_path)
    for ref in ("own_net.py:OwnNet", "own_net:OwnNet"):  # a file, or a module beside the command
        out = tmp_path / ref.replace(":", "_")
        result = invoke("train", "own.yaml", "--module", ref, "--epochs", "1", "--out", out)
        assert result.exit_code == 0, result.output
        assert len(json.loads((out / "anytime.json").read_text())) == len(spec.heads)
    bad = invoke(
        "train", "own.yaml", "--module", "own_net.py:Missing", "--epochs", "1", "--out", tmp_path / "x"
    )
    assert (
        bad.exit_code == 2
        and "own_net.py:Missing: AttributeError" in bad.output
        and "Traceback" not in bad.output
    )


def test_a_long_run_states_its_duration_after_its_first_steps(spec_path, tmp_path, monkeypatch):
    import annify.train as training

    monkeypatch.setattr(training, "ESTIMATE_AFTER_S", 0.0)
    monkeypatch.setattr(training, "LONG_JOB_S", 0.0)  # every run counts as long here
    monkeypatch.setattr(training, "CHECK_EVERY_S", 0.0)
    lines = []
    training.train(spec_path, out=tmp_path / "r", epochs=2, log=lines.append)
    estimates = [line for line in lines if line.startswith("estimate: about ")]
    assert len(estimates) == 1, lines  # once, from the first steps, before the first epoch line
    assert "for 2 epochs of" in estimates[0] and "--epochs N or --train-subset N" in estimates[0]
    assert lines.index(estimates[0]) < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2"))


def test_eann_states_the_epochs_it_will_train_before_training(tmp_path):
    from annify.eann_run import run_eann

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_eann(["cifar_resnet_n2_c16", "cifar_resnet_n4_c16"], out=tmp_path, log=lines.append, trainer=stop)
    assert lines[0].startswith("training 2 members for 300 epochs each on digits (the paper's recipe; pass ")
    assert "--epochs N for a shorter run" in lines[0]


def test_the_documented_early_exit_module_path_works(tiny_net, tiny_input):
    import annify

    assert annify.early_exit.fit_thresholds is not None  # README: annify.early_exit.early_exit(...)
    everyone_last = [2.0] * (tiny_net.num_outputs - 1) + [0.0]
    logits, exit_at, _ = annify.early_exit.early_exit(tiny_net.eval(), tiny_input, everyone_last)
    again, _, _ = annify.early_exit(tiny_net, tiny_input, everyone_last)  # the old spelling still works
    assert annify.train.train.__module__ == "annify.train" and callable(annify.train)  # same for train
    assert torch_equal(logits, again) and exit_at.tolist() == [tiny_net.num_outputs - 1] * len(tiny_input)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# --- a full disk is named where it is ---------------------------------------------------------------


def test_a_full_cache_disk_is_not_blamed_on_the_data_set(tmp_path, monkeypatch):
    import errno
    import shutil

    from test_data_memory import write_idx

    from annify.data import build_datasets
    from annify.errors import DataError

    write_idx(tmp_path / "fm", n_train=20, n_test=10)
    monkeypatch.setenv("ANNIFY_CACHE", str(tmp_path / "cache"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    with pytest.raises(
        DataError, match="cannot unpack .* into annify's cache .*No space left on device.*ANNIFY_CACHE"
    ):
        build_datasets(f"fashion-mnist:{tmp_path / 'fm'}")


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"),
     RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0")],
)  # fmt: skip
def test_export_on_a_full_disk_names_the_folder(run, spec_path, tmp_path, monkeypatch, error):
    import torch

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch.jit, "save", full)
    out = tmp_path / "export"
    result = invoke("export", spec_path, "--checkpoint", run, "--format", "torchscript", "--out", out)
    assert_one_line_error(
        result, f"cannot write the export into {out} (", "free disk space there", alone=False
    )
    assert not list(out.iterdir())  # the staging folder went too


def test_an_error_raised_in_a_data_loader_worker_keeps_its_own_line():
    from torch._utils import ExceptionWrapper

    from annify._cli_common import _one_line
    from annify.errors import DataError

    try:
        raise DataError("imagefolder: cannot read image 'a/x.jpg' (truncated); remove or replace the file")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what torch sends back
    with pytest.raises(DataError) as caught:
        wrapped.reraise()
    assert str(caught.value).startswith("Caught DataError in DataLoader worker process 0")
    assert _one_line(caught.value) == (
        "imagefolder: cannot read image 'a/x.jpg' (truncated); remove or replace the file"
    )


def test_a_full_disk_while_appending_the_metrics_keeps_the_last_good_checkpoint(
    spec_path, tmp_path, monkeypatch
):
    import builtins
    import errno

    real_open, calls = builtins.open, {"n": 0}

    def full_on_second_append(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_on_second_append)
    out = tmp_path / "r"
    result = invoke("train", spec_path, "--epochs", "2", "--out", out)
    assert_one_line_error(
        result, f"cannot write {out / 'metrics.jsonl'} (No space left on device)",
        f"the last good checkpoint {out / 'checkpoints' / 'last'} is kept", alone=False,
    )  # fmt: skip


def test_a_full_disk_while_writing_a_spec_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    import os

    from annify._files import atomic_write

    target = tmp_path / "tiny.yaml"
    target.write_text("old\n")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as caught:
        atomic_write(target, "new\n")
    assert caught.value.filename == str(target) and target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.yaml"]  # no temporary file left
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    from annify._cli_common import _one_line

    assert _one_line(caught.value) == f"cannot use {target}: No space left on device; free disk space there"
