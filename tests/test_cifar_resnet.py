"""The paper's CIFAR ResNets: registration in timm, architecture, parameter count, FX traceability."""

import pytest
import timm
import torch
import torch.fx

import annify.models  # noqa: F401  (registers the models with timm)
from annify.models import CifarResNet, PreActBasicBlock, cifar_resnet

PAPER_NAMES = [f"cifar_resnet_n{n}_c{c}" for n in (7, 9, 13, 17, 25) for c in (16, 32)] + [
    "cifar_resnet_n9_c64",
    "cifar_resnet_n9_c128",
]
TINY_NAMES = ["cifar_resnet_n3_c8", "cifar_resnet_n5_c16"]


def test_all_names_listed_by_timm():
    listed = set(timm.list_models("cifar_resnet*"))
    assert set(PAPER_NAMES + TINY_NAMES) <= listed
    assert len(PAPER_NAMES) == 12


@pytest.mark.parametrize("name", TINY_NAMES + ["cifar_resnet_n7_c16"])
def test_create_model_with_overrides(name):
    model = timm.create_model(name, num_classes=7, in_chans=1)
    assert isinstance(model, CifarResNet)
    assert (model.num_classes, model.in_chans) == (7, 1)
    assert model.stem.in_channels == 1 and model.fc.out_features == 7
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["num_classes"] == 10


def test_default_create_uses_cifar_cfg():
    model = timm.create_model("cifar_resnet_n3_c8")
    assert (model.num_classes, model.in_chans) == (10, 3)
    assert model.pretrained_cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))


def test_resnet20_parameter_count():
    # Classic pre-activation ResNet-20 (n=3, c=16), 3 input channels, 10 classes; BN counts weight + bias.
    # stem      3*16*9                                                          =    432
    # stage 1   3 units * (BN16 32 + conv 16*16*9=2304 + BN16 32 + conv 2304)    = 14,016
    # stage 2   first: BN16 32 + 16*32*9=4608 + BN32 64 + 32*32*9=9216 + 1x1 16*32=512 = 14,432
    #           2 more * (64 + 9216 + 64 + 9216 = 18,560)                        = 37,120
    # stage 3   first: BN32 64 + 32*64*9=18,432 + BN64 128 + 64*64*9=36,864 + 1x1 32*64=2,048 = 57,536
    #           2 more * (128 + 36,864 + 128 + 36,864 = 73,984)                  = 147,968
    # final BN  64*2                                                            =    128
    # fc        64*10 + 10                                                      =    650
    # total     432 + 14,016 + 14,432 + 37,120 + 57,536 + 147,968 + 128 + 650  = 272,282
    model = cifar_resnet(3, 16)
    assert sum(p.numel() for p in model.parameters()) == 272_282


@pytest.mark.parametrize(("in_chans", "size", "final"), [(1, 8, 2), (3, 32, 8)])
def test_output_shapes(in_chans, size, final):
    model = timm.create_model("cifar_resnet_n3_c8", num_classes=10, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.forward_features(x).shape == (2, 32, final, final)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)


def test_feature_info():
    model = cifar_resnet(3, 8)
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4]
    assert [f["num_chs"] for f in model.feature_info] == [8, 16, 32]
    assert [f["module"] for f in model.feature_info] == ["stages.0", "stages.1", "stages.2"]
    assert model.num_features == 32


@pytest.mark.parametrize(("n", "c"), [(3, 8), (5, 16)])
def test_stage_structure(n, c):
    model = cifar_resnet(n, c)
    assert len(model.stages) == 3
    for i, stage in enumerate(model.stages):
        assert isinstance(stage, torch.nn.Sequential) and len(stage) == n
        assert all(isinstance(unit, PreActBasicBlock) for unit in stage)
        # Only the first unit of stages 2 and 3 downsamples, through a strided 1x1 projection.
        first = stage[0]
        if i == 0:
            assert first.downsample is None
        else:
            assert first.downsample.kernel_size == (1, 1) and first.downsample.stride == (2, 2)
        assert all(unit.downsample is None for unit in stage[1:])
        assert first.conv2.out_channels == c * 2**i


def test_fx_trace_equals_eager():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet_n3_c8", in_chans=1).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_reset_classifier():
    model = cifar_resnet(3, 8)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 32)


def test_grad_checkpointing_matches_plain_forward():
    torch.manual_seed(0)
    model = cifar_resnet(3, 8).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
