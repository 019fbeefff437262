"""The convert stage: the paper's placements, the other placement rules, naming, rebuilding, bad input."""

import dataclasses
import re

import pytest
import torch
import yaml
from helpers import ConvBNReLU
from torch import nn

import annify
from annify import ConvertError, build, convert, spec_name
from annify.convert import _head_costs
from annify.placement import choose
from annify.spec import parse

# Placement does not depend on the input size; 64×64 keeps tracing and costing quick.
SMALL = (3, 64, 64)


def nodes(spec) -> list[str]:
    return [h.node for h in spec.heads]


def placed(model: str, **placement) -> tuple[list[str], list[int]]:
    """The nodes and 1-based block indices ``convert`` picks, and the last block (tracing only, no costing)."""
    traced = annify.trace(annify.create_model(model).eval(), SMALL, train_graph=False)
    taps = annify.tap_points(traced)
    picked, _ = choose(traced, taps, **placement)
    index = {t.node: t.index for t in taps}
    return picked, [index[n] for n in picked] + [len(taps)]


def test_resann50_after_every_two_bottlenecks():
    picked, blocks = placed("resnet50", every=2)
    assert picked == [
        "layer1.1.act3",
        "layer2.0.act3",
        "layer2.2.act3",
        "layer3.0.act3",
        "layer3.2.act3",
        "layer3.4.act3",
        "layer4.0.act3",
    ]
    assert blocks == [2, 4, 6, 8, 10, 12, 14, 16]  # 8 outputs: layer4.2 feeds the classifier
    assert spec_name("resnet50") == "resann50"


def test_resann101_after_every_three_bottlenecks():
    picked, blocks = placed("resnet101", every=3)
    assert len(blocks) == 11  # outputs, the classifier included
    assert blocks == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33]
    assert picked[:3] == ["layer1.2.act3", "layer2.2.act3", "layer3.1.act3"]
    assert picked[-1] == "layer3.22.act3"


def test_resann26_end_to_end():
    net, spec, costs = convert("resnet26", every=2, input_size=SMALL)
    assert nodes(spec) == ["layer1.1.act3", "layer2.1.act3", "layer3.1.act3", "model"]
    assert [h.block for h in spec.heads] == [2, 4, 6, 8]
    assert spec.name == "resann26"
    assert spec.placement == {"every": 2, "start": 2}
    assert net.num_outputs == len(costs.flops) == 4


def test_denseann169_every_fourteen_dense_layers_from_the_twelfth():
    picked, blocks = placed("densenet169", start=12, every=14)
    assert blocks == [12, 26, 40, 54, 68, 82]
    assert picked == [
        "features.denseblock2.denselayer7.cat",  # block 1 has 6 layers: layer 12 is block 2's 6th
        "features.denseblock3.denselayer9.cat",
        "features.denseblock3.denselayer23.cat",
        "features.denseblock4.denselayer5.cat",
        "features.denseblock4.denselayer19.cat",
    ]
    assert spec_name("densenet169") == "denseann169"


@pytest.fixture(scope="module")
def tiny_traced():
    """The tiny model traced once, with its candidate tap points (blocks and finer trunk points)."""
    model = annify.create_model("cifar_resnet_n3_c8", 5, in_chans=1).eval()
    traced = annify.trace(model, (1, 8, 8), train_graph=False)
    return traced, annify.tap_points(traced, trunk=True)


def test_start_and_every(tiny_traced):
    picked, placement = choose(*tiny_traced, start=3, every=3)
    assert picked == ["stages.0.2.add", "stages.1.2.add"]  # block 9 feeds the classifier
    assert placement == {"every": 3, "start": 3}
    picked, placement = choose(*tiny_traced, every=1)
    assert len(picked) == 8 and placement == {"every": 1, "start": 1}
    picked, _ = choose(*tiny_traced, start=2)  # every defaults to 1
    assert picked[0] == "stages.0.1.add" and len(picked) == 7


def test_the_last_block_never_gets_a_head(tiny_traced):
    assert choose(*tiny_traced, start=8, every=1)[0] == ["stages.2.1.add"]
    with pytest.raises(ConvertError, match="places no head: .* heads go after blocks 1 to 8"):
        choose(*tiny_traced, start=9, every=1)  # the 9th feeds the classifier: no head to give


def test_heads_n_spaces_outputs_evenly_by_cost(make_tiny):
    _, spec, costs = make_tiny(heads=4)
    assert len(spec.heads) == len(costs.flops) == 4
    fractions = [h.fraction for h in spec.heads]
    for k, f in enumerate(fractions, 1):
        assert f == pytest.approx(k / 4, abs=0.08)
    assert spec.placement == {"heads": 4}


def test_flops_period_as_fraction_and_as_flops(make_tiny, tiny_traced):
    _, spec, costs = make_tiny(flops_period=0.25)
    assert len(spec.heads) == 4
    for k, h in enumerate(spec.heads, 1):
        assert h.fraction == pytest.approx(k / 4, abs=0.08)
    heads = _head_costs(tiny_traced[0], 5, None)  # as convert counts them
    picked, placement = choose(*tiny_traced, flops_period=costs.flops[-1] / 4, head_flops=heads)  # in FLOPs
    assert picked == nodes(spec)[:-1]
    assert placement == {"flops_period": costs.flops[-1] / 4}
    assert spec.placement == {"flops_period": 0.25}


def test_heads_land_near_their_targets_on_a_model_with_coarse_blocks():
    """regnetx_002's blocks are its five stages; trunk points inside them bring each output near k/4."""
    _, spec, _ = convert("regnetx_002", heads=4)
    targets = [0.25, 0.5, 0.75, 1.0]
    assert [h.fraction for h in spec.heads] == pytest.approx(targets, abs=0.05)
    assert spec.placement == {"heads": 4}
    # the block outputs alone could not: the nearest of them to 1/2 is a whole stage away
    traced = annify.trace(annify.create_model("regnetx_002").eval(), (3, 224, 224), train_graph=False)
    taps, cum, total = annify.inspect_model("regnetx_002")
    fraction = {t.node: c / total for t, c in zip(taps, cum)}
    by_blocks, _ = choose(traced, annify.tap_points(traced), heads=4)
    assert max(abs(fraction[n] - t) for n, t in zip(by_blocks, targets)) > 0.2


def test_automatic_placement_never_taps_inside_a_branch():
    """Every candidate --heads and --flops-period may use on resnet18: the stem and each unit's output;
    never the conv path the shortcut bypasses, nor the residual add that ReLU(inplace=True) overwrites;
    every cut carries one tensor."""
    traced = annify.trace(annify.create_model("resnet18").eval(), SMALL, train_graph=False)
    taps = annify.tap_points(traced, trunk=True)
    picked, _ = choose(traced, taps, flops_period=0.01)  # 99 targets: every usable candidate is taken
    assert picked[:3] == ["conv1", "act1", "maxpool"]  # bn1 is overwritten by act1 in place
    units = picked[3:]
    assert units == [f"layer{s}.{u}.act2" for s in (1, 2, 3, 4) for u in (0, 1)][:-1]  # the last feeds fc
    net = annify.AnytimeNet(traced, picked, [nn.Identity() for _ in picked])
    assert [seg.carry for seg in net.segments[:-1]] == [1] * len(picked)
    assert not any(re.search(r"\.(conv|bn)\d$|\.add$", n) for n in picked)


class _ParentAdds(nn.Module):
    """Four repeated units whose outputs are branches: ``x = x + unit(x)`` happens outside them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.ModuleList(ConvBNReLU(8) for _ in range(4))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            x = x + unit(x)
        return self.fc(x.mean((2, 3)))


def test_block_outputs_inside_a_branch_are_left_to_every_and_at():
    traced = annify.trace(_ParentAdds().eval(), (3, 16, 16), train_graph=False)
    taps = annify.tap_points(traced, trunk=True)
    assert [(t.kind, t.index, t.node) for t in taps] == [
        ("trunk", None, "stem"),
        ("in-branch", 1, "units.0.act"),
        ("trunk", None, "add"),
        ("in-branch", 2, "units.1.act"),
        ("trunk", None, "add_1"),
        ("in-branch", 3, "units.2.act"),
        ("trunk", None, "add_2"),
        ("in-branch", 4, "units.3.act"),
    ]  # add_3 is what the classifier reads
    assert choose(traced, taps, every=1)[0] == ["units.0.act", "units.1.act", "units.2.act"]  # numbering kept
    assert choose(traced, taps, flops_period=0.01)[0] == ["stem", "add", "add_1", "add_2"]
    # trunk cost at add, add_1, add_2: 0.31, 0.54, 0.77 of the whole; targets 1/3 and 2/3
    assert choose(traced, taps, heads=3)[0] == ["add", "add_2"]
    with pytest.raises(ConvertError, match=r"between 1 and 5 \(4 tap points plus the classifier\), got 6; block "
                       r"outputs inside branches are left to --every K and --at NODE"):  # fmt: skip
        choose(traced, taps, heads=6)


class _TwoTowers(nn.Module):
    """Two towers of two units each, side by side until their sum feeds the classifier."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(nn.Sequential(ConvBNReLU(3), ConvBNReLU(3)) for _ in range(2))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((self.towers[0](x) + self.towers[1](x)).mean((2, 3)))


class _TwoStreams(nn.Module):
    """A unit that passes two streams on, as TNT's blocks do: (a, b) -> (a + f(a) + h(b'), b') with b' = b + g(b)."""

    def __init__(self, c: int):
        super().__init__()
        self.f, self.g, self.h = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, streams):
        a, b = streams
        b = b + self.g(b)
        return a + self.f(a) + self.h(b), b


class _StreamNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.units = nn.Sequential(*(_TwoStreams(4) for _ in range(4)))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a, _ = self.units((self.stem(x), x.mean(1, keepdim=True).expand(-1, 4, -1, -1)))
        return self.fc(a.mean((2, 3)))


def test_a_stream_that_blocks_pass_on_beside_their_output_is_no_branch():
    """The cut after a unit's output also carries the unit's second stream, which only later units read."""
    traced = annify.trace(_StreamNet().eval(), (3, 8, 8), train_graph=False)
    taps = annify.tap_points(traced, trunk=True)
    assert [(t.kind, t.node) for t in taps if t.index] == [("block", f"units.{i}.add_2") for i in range(4)]
    picked, _ = choose(traced, taps, heads=4)
    assert picked == ["units.0.add_2", "units.1.add_2", "units.2.add_2"]


def test_a_model_whose_blocks_all_lie_in_branches_has_no_automatic_placement():
    traced = annify.trace(_TwoTowers().eval(), (3, 8, 8), train_graph=False)
    taps = annify.tap_points(traced, trunk=True)
    assert [t.kind for t in taps] == ["in-branch"] * 4
    with pytest.raises(
        ConvertError, match="found no tap point on _TwoTowers's trunk for automatic placement; "
    ):
        choose(traced, taps, heads=2)
    assert choose(traced, taps, every=1)[0] == ["towers.0.0.act", "towers.0.1.act", "towers.1.0.act"]


def test_at_exact_names_in_execution_order(make_tiny):
    _, spec, _ = make_tiny(at=["stages.2.0.add", "stages.0.1.conv1"])
    assert nodes(spec) == ["stages.0.1.conv1", "stages.2.0.add", "model"]
    assert [h.block for h in spec.heads] == [None, 7, 9]  # a node inside a unit is no block output
    assert spec.placement == {"at": ["stages.2.0.add", "stages.0.1.conv1"]}


def test_at_globs(tiny_traced):
    picked, _ = choose(*tiny_traced, at=["stages.1.*.add", "stages.1.0.add"])  # overlapping globs
    assert picked == ["stages.1.0.add", "stages.1.1.add", "stages.1.2.add"]
    picked, _ = choose(*tiny_traced, at=["stages.?.0.norm1"])
    assert picked == ["stages.0.0.norm1", "stages.1.0.norm1", "stages.2.0.norm1"]


def test_spec_records_the_conversion(tiny):
    net, spec, costs = tiny
    assert (spec.model, spec.input_size, spec.num_classes) == ("cifar_resnet_n3_c8", (1, 8, 8), 5)
    assert spec.model_kwargs == {"in_chans": 1}
    assert spec.cost_convention == annify.CONVENTION
    assert [h.flops for h in spec.heads] == costs.flops
    assert [h.flops_single for h in spec.heads] == costs.flops_single
    assert [h.params for h in spec.heads] == costs.params
    assert [h.fraction for h in spec.heads] == [round(f, 4) for f in costs.fraction]
    assert spec.taps == net.taps
    assert net.spec is spec


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("resnet50", "resann50"),
        ("resnet101", "resann101"),
        ("densenet169", "denseann169"),
        ("cifar_resnet_n7_c16", "cifar_resann_n7_c16"),
        ("vit_small_patch16_224", "vit_small_patch16_224_ann"),
        ("convnext_tiny", "convnext_tiny_ann"),
        ("torchvision:resnet18", "tv_resann18"),  # not timm's resann18
        ("torchvision:swin_t", "tv_swin_t_ann"),
        ("hf-hub:timm/resnet18.a1_in1k", "resann18.a1_in1k"),
        ("module:Mine", "Mine_ann"),
    ],
)
def test_spec_name(model, name):
    assert spec_name(model) == name


def test_spec_name_default_and_override(tiny, make_tiny):
    assert tiny[1].name == "cifar_resann_n3_c8"
    assert make_tiny(every=4, name="mine")[1].name == "mine"


def test_build_rebuilds_the_same_network(tiny, tiny_input):
    net, spec, _ = tiny
    net.eval()
    for rebuilt_spec in (spec, parse(yaml.safe_load(annify.dump(spec)))):
        again = build(rebuilt_spec).eval()
        assert again.taps == net.taps
        assert [type(h) for h in again.heads] == [type(h) for h in net.heads]
        again.load_state_dict(net.state_dict(), strict=True)
        with torch.no_grad():
            for a, b in zip(again(tiny_input), net(tiny_input), strict=True):
                assert torch.equal(a, b)


def test_load_reads_a_spec_file(tiny, tmp_path):
    _, spec, _ = tiny
    path = tmp_path / "tiny.yaml"
    path.write_text(annify.dump(spec))
    net = annify.load(path)
    assert net.taps == spec.taps and net.spec == spec


def test_load_with_a_checkpoint_restores_the_weights(tiny, tiny_input, tmp_path):
    from safetensors.torch import save_file

    net, spec, _ = tiny
    (tmp_path / "tiny.yaml").write_text(annify.dump(spec))
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    loaded = annify.load(tmp_path / "tiny.yaml", tmp_path).eval()  # a checkpoint folder
    with torch.no_grad():
        outs = zip(loaded(tiny_input), net.eval()(tiny_input), strict=True)
        assert all(torch.equal(a, b) for a, b in outs)


def test_load_refuses_a_checkpoint_that_does_not_fit(tiny, tmp_path):
    from safetensors.torch import save_file

    net, spec, _ = tiny
    (tmp_path / "tiny.yaml").write_text(annify.dump(spec))
    trunk_only = {k: v for k, v in net.state_dict().items() if not k.startswith("heads.")}
    save_file(trunk_only, tmp_path / "trunk.safetensors")
    with pytest.raises(ConvertError, match="does not fit this spec: 28 missing"):  # 4 heads x 7 keys
        annify.load(tmp_path / "tiny.yaml", tmp_path / "trunk.safetensors")
    with pytest.raises(ConvertError, match="not found"):
        annify.load(tmp_path / "tiny.yaml", tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConvertError, match="not a readable safetensors file"):
        annify.load(tmp_path / "tiny.yaml", tmp_path / "junk.safetensors")


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConvertError, match="unknown model 'resnet5O'; did you mean resnet50"):
        convert("resnet5O", every=2)


def test_node_not_found_points_to_inspect(make_tiny):
    with pytest.raises(ConvertError) as info:
        make_tiny(at=["stages.9.add"])
    message = str(info.value)
    assert "node 'stages.9.add' is not in cifar_resnet_n3_c8" in message
    assert "Hint: annify inspect cifar_resnet_n3_c8 lists the tap points" in message


def test_spec_with_an_unknown_node_points_to_inspect(tiny):
    _, spec, _ = tiny
    heads = [dataclasses.replace(spec.heads[0], node="stages.9.add"), *spec.heads[1:]]
    with pytest.raises(ConvertError, match="'stages.9.add' is not in .* Hint: annify inspect"):
        build(dataclasses.replace(spec, heads=heads))


def test_spec_with_heads_out_of_order_is_refused(tiny):
    _, spec, _ = tiny
    heads = [spec.heads[1], spec.heads[0], *spec.heads[2:]]
    with pytest.raises(ConvertError, match="execution order"):
        build(dataclasses.replace(spec, heads=heads))


def test_spec_must_end_with_the_classifier(tiny):
    _, spec, _ = tiny
    with pytest.raises(ConvertError, match="node: model"):
        build(dataclasses.replace(spec, heads=spec.heads[:-1]))


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"every": 0}, "--every and --start must be positive"),
        ({"every": -2}, "--every and --start must be positive"),
        ({"every": 2, "start": 0}, "--every and --start must be positive"),
        ({"heads": 0}, r"--heads must be between 1 and 14 \(13 tap points plus the classifier\), got 0"),
        ({"heads": 999}, r"--heads must be between 1 and 14 \(13 tap points plus the classifier\), got 999"),
        ({"flops_period": -0.5}, "--flops-period must be positive"),
        ({"every": 2, "heads": 3}, "choose one placement, not every and heads"),
        ({"start": 2, "at": ["stages.0.0.add"]}, "choose one placement"),
        ({}, "give a placement"),
    ],
)
def test_bad_placements_are_refused(tiny_traced, placement, message):
    with pytest.raises(ConvertError, match=message):
        choose(*tiny_traced, **placement)


def test_convert_refuses_a_bad_placement_before_building():
    with pytest.raises(ConvertError, match="--every and --start must be positive"):
        convert("cifar_resnet_n3_c8", every=0, input_size=(1, 8, 8), model_kwargs={"in_chans": 1})


def test_bad_model_kwargs_are_refused():
    with pytest.raises(ConvertError, match="timm could not build 'cifar_resnet_n3_c8'"):
        convert("cifar_resnet_n3_c8", every=2, model_kwargs={"colour": "red"})


def test_a_model_without_a_classifier_needs_a_class_count():
    with pytest.raises(ConvertError, match=r"has no classifier \(num_classes=0\); pass --num-classes N"):
        convert(
            "cifar_resnet_n3_c8", every=2, num_classes=0, input_size=(1, 8, 8), model_kwargs={"in_chans": 1}
        )


def test_plain_model_is_the_original_with_the_trunk_weights(tiny_net, tiny_input):
    plain = annify.plain_model(tiny_net)
    assert not plain.training and type(plain).__name__ == "CifarResNet"
    assert set(plain.state_dict()) == set(tiny_net.trunk_state_dict())
    assert not {id(p) for p in plain.parameters()} & {id(p) for p in tiny_net.parameters()}  # nothing shared
    with torch.no_grad():
        assert torch.equal(plain(tiny_input), tiny_net(tiny_input)[-1])
    tiny_net.spec = None
    with pytest.raises(annify.ConvertError, match="has no spec"):
        annify.plain_model(tiny_net)


@pytest.mark.parametrize(
    ("model", "size", "placement"),
    [
        ("cifar_resnet_n3_c8", (3, 32, 32), {"heads": 4}),
        ("resnet18", SMALL, {"flops_period": 0.2}),
        ("vit_tiny_patch16_224", None, {"heads": 3}),
    ],
)
def test_placement_by_cost_counts_the_trunk_once(model, size, placement, monkeypatch):
    """Placing heads by FLOPs counts the trunk at every candidate; convert reuses those counts for the
    final network instead of tracing its trunk again, and gets exactly what a fresh count gets."""
    import annify.cost

    trunks = []  # the network of each trunk segment fvcore counted
    reads = annify.cost._reads
    monkeypatch.setattr(annify.cost, "_reads", lambda net, graph: trunks.append(net) or reads(net, graph))
    net, spec, costs = convert(model, input_size=size, **placement)
    monkeypatch.undo()
    assert trunks and not any(o is net for o in trunks)  # the candidates' network only
    assert costs == annify.cost.count(net)
