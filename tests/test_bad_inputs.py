"""Issue 20: every bad or unusual input a user tried gets one line naming the problem and the fix, or the
right result; never a hang, a silent change of the data, or a lost file."""

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

    from annify.data import build_datasets, image_transform, load_image

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

    from annify.data import load_image
    from annify.errors import InferenceError

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
    from annify.data import image_transform
    from annify.errors import InferenceError

    spec = _gray_spec(tmp_path)
    with pytest.raises(InferenceError, match="--mean has 3 values but the network takes 1-channel images"):
        image_transform(spec, [0.1, 0.5, 0.9], [0.25])
    image_transform(spec)  # the model's own 3-channel config is still averaged for gray inputs
    image_transform(spec, [0.5], [0.25])


@pytest.mark.parametrize(("mean", "std", "message"), [([0.5], [0.0], "--std must be positive numbers"),
                                                      ([float("nan")], [1.0], "--mean must be finite numbers, got nan")])  # fmt: skip
def test_a_zero_std_or_a_nan_mean_is_one_line(tmp_path, mean, std, message):
    from annify.data import image_transform
    from annify.errors import InferenceError

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
