"""Fixed-size models on any data: ``fit_input_size``'s rule, ``fit_to_data`` with it, and training and
the demo of models built for 224×224 (ViT, Swin) on the 8×8 digits. Tiny models: timm's ``test_vit``
and a one-block-per-stage Swin; the real vit_tiny and swin_tiny run under ``-m slow``."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import annify
from annify.cli import main
from annify.errors import ConvertError
from annify.evaluate import fit_to_data
from annify.sources import fit_input_size
from annify.spec import dump

SMALL_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def test_a_model_that_runs_at_the_data_size_keeps_it():
    size, kwargs, how = fit_input_size("test_resnet", (1, 8, 8), 10, {"in_chans": 1})
    assert size == (1, 8, 8) and kwargs == {"in_chans": 1}
    assert how == "runs at the data's size, 8×8"


def test_a_vit_is_built_at_the_smallest_size_its_patches_tile():
    # test_vit is built for 160×160 with 16×16 patches: 8×8 holds no patch, 16×16 holds one
    size, kwargs, how = fit_input_size("test_vit", (1, 8, 8), 10, {"in_chans": 1})
    assert size == (1, 16, 16) and kwargs == {"in_chans": 1, "img_size": 16}
    assert how == "built at 16×16 (img_size), the smallest it accepts; inputs resized from 8×8"
    # 28×28 (the MNIST family) is no multiple of 16: a strict ViT would drop the remainder; 32 keeps it all
    assert fit_input_size("test_vit", (1, 28, 28), 10, {"in_chans": 1})[0] == (1, 32, 32)


def test_a_swin_is_built_at_the_data_size():
    size, kwargs, how = fit_input_size("swin_tiny_patch4_window7_224", (3, 8, 8), 10, SMALL_SWIN)
    assert size == (3, 8, 8) and kwargs == {**SMALL_SWIN, "img_size": 8}
    assert how == "built at 8×8 (img_size), the data's size"


def test_a_model_without_img_size_gets_its_inputs_resized():
    # test_convnext downsamples 32× and takes no img_size: 8×8 and 16×16 are too small, 24 is no multiple
    size, kwargs, how = fit_input_size("test_convnext", (3, 8, 8), 10)
    assert size == (3, 32, 32) and kwargs == {}
    assert how == "inputs resized from 8×8 to 32×32, the smallest size it accepts"
    with pytest.raises(ConvertError, match="unknown model 'no_such_net'"):
        fit_input_size("no_such_net", (3, 8, 8), 10)


def test_fit_to_data_rebuilds_a_vit_spec_and_says_how():
    _, spec, _ = annify.convert("test_vit", heads=3)  # at its own 3×160×160
    fitted, note = fit_to_data(spec, "digits")
    assert fitted.input_size == (3, 16, 16) and fitted.model_kwargs == {"img_size": 16}
    assert fitted.num_classes == 10
    assert note.endswith("built at 16×16 (img_size), the smallest it accepts; inputs resized from 8×8")
    assert fit_to_data(fitted, "digits") == (fitted, None)  # refitting a fitted spec changes nothing


def _train_one_epoch(tmp_path, model: str, heads: int, subset: int, **kwargs):
    """Convert ``model``, train it one epoch on a digits subset through the CLI; (spec, run folder, result)."""
    torch.set_num_threads(1)
    _, spec, _ = annify.convert(model, heads=heads, model_kwargs=kwargs)
    path = tmp_path / "spec.yaml"
    path.write_text(dump(spec, "test"))
    out = tmp_path / "run"
    args = ["train", str(path), "--epochs", "1", "--train-subset", str(subset), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return spec, out, result


@pytest.mark.parametrize(
    ("model", "kwargs", "size", "how"),
    [
        ("test_vit", {}, [3, 16, 16], "built at 16×16 (img_size), the smallest it accepts"),
        ("swin_tiny_patch4_window7_224", SMALL_SWIN, [3, 8, 8], "built at 8×8 (img_size), the data's size"),
    ],
)
def test_train_a_fixed_size_model_on_digits(tmp_path, model, kwargs, size, how):
    spec, out, result = _train_one_epoch(tmp_path, model, 3, 50, **kwargs)
    assert how in result.output  # the run log says which rule applied
    config = annify.load_spec(out / "config.yaml")
    assert list(config.input_size) == size and config.model_kwargs["img_size"] == size[1]
    rows = json.loads((out / "anytime.json").read_text())
    assert len(rows) == 3
    # costs are those of the size actually run: the whole network's multiply-adds at that size, counted by
    # torch's own FlopCounterMode (2 FLOPs per multiply-add; no norms, which fvcore adds: within 10 %)
    net = annify.build(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, *size))
    assert rows[-1]["flops"] == pytest.approx(counter.get_total_flops() / 2, rel=0.1)
    assert rows[-1]["flops"] < spec.heads[-1].flops / 10  # far below the converted size's


def test_demo_takes_any_timm_model(tmp_path):
    torch.set_num_threads(1)
    args = ["demo", "--model", "test_vit", "--epochs", "1", "--train-subset", "40", "--no-eann"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "converted test_vit for digits (built at 16×16 (img_size)" in result.output
    spec = annify.load_spec(tmp_path / "test_vit_ann.yaml")
    assert (
        spec.input_size == (1, 16, 16) and len(spec.heads) == 6
    )  # 6 blocks, --every 1: 5 heads + classifier
    assert (tmp_path / "comparison.txt").is_file()
    bad = CliRunner().invoke(main, ["demo", "--model", "no_such_net", "--out", str(tmp_path / "x")])
    assert (
        bad.exit_code == 1 and "unknown model 'no_such_net'" in bad.output and "Traceback" not in bad.output
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "size"), [("vit_tiny_patch16_224", [3, 16, 16]), ("swin_tiny_patch4_window7_224", [3, 8, 8])]
)
def test_train_the_issue_models_on_digits(tmp_path, model, size):
    _, out, _ = _train_one_epoch(tmp_path, model, 4, 100)
    assert list(annify.load_spec(out / "config.yaml").input_size) == size
