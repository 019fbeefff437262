"""Models from every source: torchvision's registry, timm's hf-hub names, and a module of the user's own."""

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from helpers import assert_one_line_error
from torch import nn

import annify
from annify import ConvertError, SpecError
from annify.cli import main
from annify.sources import model_source
from annify.spec import parse


def _without_heads(net: annify.AnytimeNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.startswith(net.exits_prefix)}


# (name, input size): vit_b_16 checks its image size, so it runs at its own 224; swin_t at 224 too
TORCHVISION = [
    ("resnet18", (3, 64, 64)),
    ("mobilenet_v3_small", (3, 64, 64)),
    ("vit_b_16", (3, 224, 224)),
    ("swin_t", (3, 224, 224)),
]


@pytest.mark.parametrize(("name", "size"), TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_torchvision_last_output_equals_the_original_exactly(name, size):
    net, spec, _ = annify.convert(f"torchvision:{name}", every=4, input_size=size)
    assert spec.model == f"torchvision:{name}" and spec.num_classes == 1000
    twin = torchvision.models.get_model(name, weights=None).eval()
    twin.load_state_dict(_without_heads(net), strict=True)  # torchvision's own keys, unrenamed
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = net.eval()(x)
        assert torch.equal(outs[-1], twin(x))
    assert len(outs) == len(spec.heads) >= 2
    assert all(o.shape == (1, 1000) for o in outs)


class _Unit(nn.Module):
    """relu(x + conv3x3(x) + conv1x1(x)): a residual connection and two branches."""

    def __init__(self, c: int):
        super().__init__()
        self.wide = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.narrow = nn.Conv2d(c, c, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.wide(x) + self.narrow(x))


class Mine(nn.Module):
    """A user's network: no timm, no torchvision; its forward takes a number and a flag besides x."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.units = nn.Sequential(_Unit(8), _Unit(8), _Unit(8), _Unit(8))
        self.fc = nn.Linear(8, classes)

    def forward(self, x, scale: float = 2.0, pool: bool = True):
        x = self.units(self.stem(x) * scale)
        return self.fc(x.mean((2, 3)) if pool else x.amax((2, 3)))


SIZE = (3, 16, 16)


def _mine() -> Mine:
    torch.manual_seed(0)
    model = Mine().eval()
    for unit in model.units:  # BatchNorm statistics that are not the identity
        bn = unit.wide[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))


def test_own_module_last_output_equals_its_own_exactly(x):
    model = _mine()
    with torch.no_grad():
        expected = model(x)  # before converting: the network shares the module's parameters
    net, spec, costs = annify.convert(model, heads=3, input_size=SIZE)
    with torch.no_grad():
        outs = net.eval()(x)
    assert torch.equal(outs[-1], expected)
    assert [o.shape for o in outs] == [(2, 4)] * 3
    assert spec.model == "module:Mine" and spec.name == "Mine_ann"
    assert spec.num_classes == 4  # read off the module's output
    assert spec.model_kwargs == {} and spec.input_size == SIZE
    assert spec.placement == {"heads": 3} and len(costs.flops) == 3
    assert set(dict(net.named_parameters())) >= set(dict(model.named_parameters()))  # the module's own names


def test_load_rebuilds_a_spec_of_a_module_from_the_module_passed(x, tmp_path):
    net, spec, _ = annify.convert(_mine(), every=1, input_size=SIZE)
    path = tmp_path / "mine.yaml"
    path.write_text(annify.dump(spec))
    assert "model: module:Mine" in path.read_text()
    again = annify.load(path, model=_mine())  # another instance holding the same weights
    assert again.taps == net.taps == ["units.0.act", "units.1.act", "units.2.act"]
    assert again.spec == spec
    again.load_state_dict(net.state_dict(), strict=True)  # the heads too
    with torch.no_grad():
        for a, b in zip(again.eval()(x), net.eval()(x), strict=True):
            assert torch.equal(a, b)
    assert annify.build(spec, model=_mine()).taps == net.taps


def test_a_spec_of_a_module_without_the_module_is_a_one_line_error(tmp_path):
    _, spec, _ = annify.convert(_mine(), every=2, input_size=SIZE)
    path = tmp_path / "mine.yaml"
    path.write_text(annify.dump(spec))
    message = "spec 'Mine_ann' was converted from a Mine of your own, and a spec never names code to import; "
    with pytest.raises(
        ConvertError, match=message + r"pass the module: annify.load\(spec, model=Mine\(...\)\)"
    ):
        annify.load(path)
    with pytest.raises(ConvertError, match="converted from a Mine, not a Sequential; pass the module it was"):
        annify.load(path, model=nn.Sequential(nn.Flatten(), nn.Linear(768, 4)))
    result = CliRunner().invoke(main, ["convert", str(path), "--out", str(tmp_path / "zoo")])
    assert_one_line_error(result, "converted from a Mine of your own", "annify.load(spec, model=Mine(...))")


def test_a_module_keeps_its_own_classifier():
    with pytest.raises(ConvertError, match="module:Mine predicts 4 classes, not 7: a module passed in keeps"):
        annify.convert(_mine(), heads=2, input_size=SIZE, num_classes=7)
    with pytest.raises(ConvertError, match="model_kwargs build a model by name"):
        annify.convert(_mine(), heads=2, input_size=SIZE, model_kwargs={"classes": 7})


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.units = nn.Sequential(_Unit(3), _Unit(3))

    def forward(self, x):
        return self.units(x)


def test_a_module_that_returns_no_logits_is_refused():
    with pytest.raises(ConvertError, match=r"module:_Features returns a 4-D tensor, not \(batch, classes\)"):
        annify.convert(_Features(), heads=2, input_size=SIZE)


def test_cli_converts_a_torchvision_model_to_a_spec_that_load_rebuilds(tmp_path):
    out = tmp_path / "zoo"
    args = ["convert", "torchvision:resnet18", "--heads", "3", "--input-size", "3,64,64", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    target = out / "tv_resann18.yaml"
    assert result.output.splitlines()[-1] == f"wrote {target}"
    spec = annify.load_spec(target)
    assert spec.model == "torchvision:resnet18" and spec.placement == {"heads": 3}
    net = annify.load(target).eval()
    assert net.taps == spec.taps and net.num_outputs == 3
    twin = torchvision.models.resnet18().eval()
    twin.load_state_dict(_without_heads(net), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(x)[-1], twin(x))


def test_cli_inspects_a_torchvision_model():
    result = CliRunner().invoke(main, ["inspect", "torchvision:resnet18", "--input-size", "3,64,64"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[1:-1]]
    assert [r[2] for r in rows if r[0] == "block"] == [
        f"layer{s}.{u}.relu_1" for s in (1, 2, 3, 4) for u in (0, 1)
    ]
    assert [r[2] for r in rows if r[0] == "trunk"] == ["conv1", "relu", "maxpool"]  # bn1: relu overwrites it


def test_hf_hub_names_go_to_timm(monkeypatch):
    """The whole name reaches timm.create_model (which reads the prefix); here it builds a local model."""
    seen = []
    real = timm.create_model

    def fake(name, **kwargs):
        seen.append((name, kwargs))
        return real("cifar_resnet_n3_c8", **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    _, spec, _ = annify.convert(
        "hf-hub:someone/tiny", heads=2, input_size=(1, 8, 8), model_kwargs={"in_chans": 1}
    )
    assert seen[0] == ("hf-hub:someone/tiny", {"in_chans": 1, "pretrained": False})
    assert spec.model == "hf-hub:someone/tiny" and spec.name == "tiny_ann"
    assert spec.model_kwargs == {"in_chans": 1}


def test_hf_hub_download_failure_is_a_one_line_error(monkeypatch, tmp_path):
    def offline(name, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
            "cached files.\nCheck your internet connection."
        )

    monkeypatch.setattr(timm, "create_model", offline)
    out = tmp_path / "zoo"
    result = CliRunner().invoke(
        main, ["convert", "hf-hub:timm/resnet18.a1_in1k", "--heads", "3", "--out", str(out)]
    )
    assert_one_line_error(
        result,
        "could not fetch 'hf-hub:timm/resnet18.a1_in1k' from the Hugging Face Hub (We couldn't connect",
        "pass it: annify.convert(model)",
    )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["torchvision:resnet19"],
            ["unknown torchvision classification model 'resnet19'", "did you mean resnet18"],
        ),
        (["torchvision:resnet18", "--in-chans", "1"], ["torchvision could not build 'resnet18'", "in_chans"]),
        (["module:Mine"], ["'module:Mine' stands for a module of your own", "annify.convert(module, ...)"]),
        (["tv:resnet18"], ["unknown model source 'tv:'", "torchvision:NAME"]),
    ],
    ids=["torchvision-typo", "torchvision-kwargs", "module-by-name", "unknown-source"],
)
def test_bad_model_names_are_one_line_errors(args, fragments, tmp_path):
    for command in (["convert", *args, "--heads", "2", "--out", str(tmp_path)], ["inspect", *args]):
        assert_one_line_error(CliRunner().invoke(main, command), *fragments)


@pytest.mark.parametrize(
    ("model", "source"),
    [
        ("resnet50", ("timm", "resnet50")),
        ("hf-hub:timm/resnet18.a1_in1k", ("hf-hub", "hf-hub:timm/resnet18.a1_in1k")),
        ("torchvision:swin_t", ("torchvision", "swin_t")),
        ("module:Mine", ("module", "Mine")),
    ],
)
def test_model_source(model, source):
    assert model_source(model) == source


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("torchvison:resnet18", "unknown model source 'torchvison:'"),
        ("torchvision:", "names no model after 'torchvision:'"),
        ("module:my-net", "after 'module:' comes the class name of your module"),
    ],
)
def test_specs_with_a_bad_model_source_are_refused(model, problem):
    with pytest.raises(SpecError, match=problem):
        parse({"model": model, "heads": [{"node": "model"}]})


def test_a_spec_of_a_module_takes_no_model_kwargs():
    with pytest.raises(SpecError, match="'model_kwargs' must be empty for module:"):
        parse({"model": "module:Mine", "model_kwargs": {"classes": 4}, "heads": [{"node": "model"}]})
