"""Tracing: repeated blocks, tap points and their layouts, train graphs, and models FX cannot trace."""

import operator

import pytest
import timm
import timm.layers._fx as timm_fx
import torch
import torchvision
from torch import nn

from annify import TraceError, trace
from annify.trace import find_blocks

# Repeated units per model (the research notes' counts; efficientnet_b0 includes its two one-unit stages).
BLOCKS = {
    "resnet26": 8,
    "resnet50": 16,
    "densenet121": 58,
    "vit_small_patch16_224": 12,
    "convnext_tiny": 18,
    "efficientnet_b0": 16,
    "swin_tiny_patch4_window7_224": 12,
}


@pytest.mark.parametrize(("name", "count"), BLOCKS.items())
def test_find_blocks_counts_the_repeated_units(name, count):
    with torch.device("meta"):  # structure only: no weights to initialise
        model = timm.create_model(name)
    assert len(find_blocks(model)) == count


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet26", (3, 224, 224)),
        ("densenet121", (3, 32, 32)),
        ("vit_small_patch16_224", (3, 224, 224)),
        ("swin_tiny_patch4_window7_224", (3, 224, 224)),
        pytest.param("resnet50", (3, 224, 224), marks=pytest.mark.slow),
        pytest.param("convnext_tiny", (3, 224, 224), marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", (3, 224, 224), marks=pytest.mark.slow),
    ],
)
def test_one_tap_point_per_block(zoo, name, size):
    taps = zoo(name, size).taps
    assert len(taps) == BLOCKS[name]
    assert [t.index for t in taps] == list(range(1, len(taps) + 1))
    assert len({t.node for t in taps}) == len(taps)


def test_resnet_taps_are_bottleneck_outputs_in_nchw(zoo):
    taps = zoo("resnet26", (3, 224, 224)).taps
    assert [t.node for t in taps] == [f"layer{s}.{u}.act3" for s in (1, 2, 3, 4) for u in (0, 1)]
    first, last = taps[0], taps[-1]
    assert (first.layout, first.channels, first.spatial) == ("NCHW", 256, (56, 56))
    assert first.shape == (256, 56, 56)
    assert (last.layout, last.channels, last.spatial) == ("NCHW", 2048, (7, 7))


def test_vit_taps_are_tokens_in_nlc(zoo):
    taps = zoo("vit_small_patch16_224", (3, 224, 224)).taps
    assert [t.node for t in taps] == [f"blocks.{i}.add_1" for i in range(12)]
    for t in taps:  # 196 patches plus the class token, 384 channels
        assert (t.layout, t.channels, t.spatial, t.shape) == ("NLC", 384, (197,), (197, 384))


def test_swin_taps_are_channels_last(zoo):
    taps = zoo("swin_tiny_patch4_window7_224", (3, 224, 224)).taps
    first = taps[0]
    assert first.node == "layers.0.blocks.0.reshape_1"
    assert (first.layout, first.channels, first.spatial) == ("NHWC", 96, (56, 56))
    assert first.shape == (56, 56, 96)
    assert {t.layout for t in taps} == {"NHWC"}
    assert (taps[-1].channels, taps[-1].spatial) == (768, (7, 7))


def test_densenet_taps_are_the_concatenation_of_all_features_so_far(zoo):
    taps = zoo("densenet121", (3, 32, 32)).taps
    assert all(t.node.endswith(".cat") for t in taps)
    block1 = taps[:6]
    # the cat before dense layer i+1 holds the 64 stem channels plus i layers' 32 new ones
    assert [t.node for t in block1] == [f"features.denseblock1.denselayer{i}.cat" for i in range(2, 7)] + [
        "features.denseblock1.cat"
    ]
    assert [t.module for t in block1] == [f"features.denseblock1.denselayer{i}" for i in range(1, 7)]
    assert [t.channels for t in block1] == [64 + 32 * i for i in range(1, 7)]
    # the second block starts from the transition's 128 channels
    assert taps[6].node == "features.denseblock2.denselayer2.cat"
    assert taps[6].channels == 128 + 32


def test_densenet_tap_value_is_the_concatenation(zoo):
    """The value at a tap is the block's input followed by every dense layer's output so far."""
    z = zoo("densenet121", (3, 32, 32))
    assert z.net.taps[0] == "features.denseblock1.denselayer3.cat"  # after dense layers 1 and 2
    block = z.twin.features.denseblock1
    seen = {}
    hooks = [
        z.twin.features.pool0.register_forward_hook(lambda m, i, o: seen.__setitem__("input", o)),
        block.denselayer1.register_forward_hook(lambda m, i, o: seen.__setitem__(1, o)),
        block.denselayer2.register_forward_hook(lambda m, i, o: seen.__setitem__(2, o)),
    ]
    try:
        with torch.no_grad():
            z.twin(z.x)
            _, feature = z.net.run_segment(0, (z.x,), head=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(feature, torch.cat([seen["input"], seen[1], seen[2]], 1))


def test_train_graph_kept_where_drop_path_changes_it(zoo):
    swin = zoo("swin_tiny_patch4_window7_224", (3, 224, 224))  # timm default drop_path_rate 0.1
    assert swin.traced.train_graph is not None
    eval_nodes = len(swin.traced.eval_graph.nodes)
    assert len(swin.traced.train_graph.nodes) > eval_nodes  # the stochastic-depth ops


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet26", (3, 224, 224)),
        ("densenet121", (3, 32, 32)),
        ("vit_small_patch16_224", (3, 224, 224)),  # timm's default drop_path_rate is 0 here
        pytest.param("resnet50", (3, 224, 224), marks=pytest.mark.slow),
    ],
)
def test_no_train_graph_where_modes_trace_alike(zoo, name, size):
    assert zoo(name, size).traced.train_graph is None


def test_tracer_constants_do_not_make_graphs_differ():
    """Swin's traces hold `_tensor_constant*` snapshots, numbered anew in the second trace."""
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=64,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        drop_path_rate=0.0,
    )
    traced = trace(model, (3, 64, 64))
    assert any(n.target.startswith("_tensor_constant") for n in traced.eval_graph.nodes if n.op == "get_attr")
    assert traced.train_graph is None


class _Block(nn.Module):
    def __init__(self, scale_in_training: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.scale_in_training = scale_in_training

    def forward(self, x):
        x = self.conv(x)
        if self.scale_in_training and self.training:
            x = x * 2
        return x


class _Stack(nn.Module):
    def __init__(self, scale_in_training: bool):
        super().__init__()
        self.blocks = nn.Sequential(*(_Block(scale_in_training) for _ in range(3)))

    def forward(self, x):
        return self.blocks(x)


@pytest.mark.parametrize("branches", [True, False])
def test_train_graph_only_where_it_differs(branches):
    model = _Stack(branches).train()
    traced = trace(model, (2, 4, 4))
    assert (traced.train_graph is not None) == branches
    assert model.training  # trace restores the mode it found
    if branches:
        assert sum(n.target is operator.mul for n in traced.train_graph.nodes) == 3
        assert not any(n.target is operator.mul for n in traced.eval_graph.nodes)


class _RowDrop(nn.Module):
    """x + stochastic_depth(conv(x)): torchvision's op is one leaf call whose `training` argument alone differs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        return x + self.drop(self.conv(x))


def test_train_graph_kept_where_only_a_constant_argument_differs():
    traced = trace(_RowDrop(), (2, 4, 4))
    assert traced.train_graph is not None
    for graph, training in ((traced.eval_graph, False), (traced.train_graph, True)):
        (call,) = [n for n in graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]
        assert call.args[-1] is training


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 1), Gate(), nn.Conv2d(2, 2, 1))

    def forward(self, x):
        return self.body(x)


def test_untraceable_module_is_named_with_the_way_out():
    with pytest.raises(TraceError) as info:
        trace(_Gated(), (1, 4, 4))
    message = str(info.value)
    assert "'body.1'" in message
    assert "Gate" in message
    assert "timm.layers.register_notrace_module(Gate)" in message


def test_registered_notrace_module_becomes_a_leaf():
    timm.layers.register_notrace_module(Gate)
    try:
        traced = trace(_Gated(), (1, 4, 4))
    finally:
        timm_fx._leaf_modules.discard(Gate)
    assert traced.qualnames == ["body.0", "body.1", "body.2"]
    assert traced.shapes["body.1"] == (2, 2, 4, 4)


def test_trace_records_shapes_and_input_size(zoo):
    traced = zoo("resnet26", (3, 224, 224)).traced
    assert traced.input_size == (3, 224, 224)
    assert traced.shapes["layer1.0.act3"] == (2, 256, 56, 56)  # propagated at batch 2
    assert traced.shapes["fc"] == (2, 1000)
    assert traced.node("layer1.0.act3").op == "call_module"
    with pytest.raises(KeyError, match="layer9.0.act3"):
        traced.node("layer9.0.act3")


@pytest.mark.parametrize(
    ("name", "stages"),
    [
        ("resnet10t", ["act1", "layer1", "layer2", "layer3", "layer4"]),  # one unit per stage
        ("regnetx_002", ["stem", "s1", "s2", "s3", "s4"]),  # units held as named attributes b1, b2, ...
    ],
)
def test_models_without_repeated_units_fall_back_to_timms_stages(name, stages):
    model = timm.create_model(name)
    assert find_blocks(model) == [f["module"] for f in model.feature_info] == stages


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("test_vit", {}),
        (
            "swin_tiny_patch4_window7_224",
            {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 1, 1]},
        ),
    ],
)
def test_node_names_are_torchvisions(monkeypatch, model, kwargs):
    """annify's tracer names nodes as torchvision's NodePathTracer does (specs store the names), only
    faster; tensor constants are numbered on across traces, so they are compared by position."""
    import importlib
    import re

    from torchvision.models.feature_extraction import NodePathTracer

    trace_module = importlib.import_module("annify.trace")
    m = timm.create_model(model, **kwargs).eval()

    def names(training):
        _, found = trace_module._trace_mode(m, training)
        return [re.sub(r"_tensor_constant\d+", "C", f"{k}={v}") for k, v in found.items()]

    ours = [names(False), names(True)]
    monkeypatch.setattr(trace_module, "_Tracer", NodePathTracer)
    assert [names(False), names(True)] == ours
    assert any(re.search(r"_\d+$", n) for n in ours[0])  # repeated names got their local _N suffixes
