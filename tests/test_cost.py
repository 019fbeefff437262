"""Costs: hand-derived FLOPs on a tiny model, fvcore's conventions, and cross-checks on real models."""

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ConvBNReLU
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import annify
from annify import AnytimeNet, count, tap_points, trace
from annify import heads as head_registry
from annify.cost import mha_flop_jit, sdpa_flop_jit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fvcore.nn import FlopCountAnalysis


class ConvBlock(ConvBNReLU):
    """x + relu(bn(conv3x3(x))), C channels in and out."""

    def forward(self, x):
        return x + super().forward(x)


class Tiny(nn.Module):
    """stem conv3x3 1→4, three ConvBlock(4), global mean, linear 4→3; no timm anywhere."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(ConvBlock(4), ConvBlock(4), ConvBlock(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny_costs():
    traced = trace(Tiny().eval(), (1, 8, 8))
    taps = tap_points(traced)
    assert [t.node for t in taps] == ["blocks.0.add", "blocks.1.add", "blocks.2.add"]
    nodes = [t.node for t in taps[:-1]]  # the last block feeds the classifier
    heads = [head_registry.build("bn_relu_pool_linear", 4, 3, "NCHW") for _ in nodes]
    return count(AnytimeNet(traced, nodes, heads))


# On paper, at 1×8×8 (H·W = 64), C = 4, fvcore's convention (one multiply-add = 1 FLOP):
#   stem conv     H·W·Cout·Cin·k·k = 64·4·1·9                = 2304
#   block conv    64·4·4·9                                   = 9216
#   block BN      eval affine, 2 per element: 2·64·4         =  512   (add and ReLU: not counted)
#   block                                                    = 9728
#   classifier    linear 4·3                                 =   12   (mean: not counted)
#   head          BN 2·64·4 + linear 4·3                     =  524   (ReLU, mean: not counted)
# Parameters: stem 36; block conv 144 + BN 8 = 152; head BN 8 + fc 12+3 = 23; classifier 15.
STEM, BLOCK, CLASSIFIER, HEAD = 2304, 9728, 12, 524


def test_hand_derived_trunk_and_head_flops(tiny_costs):
    assert tiny_costs.trunk_flops == [STEM + BLOCK, BLOCK, BLOCK + CLASSIFIER]
    assert tiny_costs.head_flops == [HEAD, HEAD, 0]


def test_hand_derived_anytime_and_single_exit_flops(tiny_costs):
    assert tiny_costs.flops == [
        STEM + BLOCK + HEAD,  # 12556
        STEM + 2 * BLOCK + 2 * HEAD,  # 22808
        STEM + 3 * BLOCK + CLASSIFIER + 2 * HEAD,  # 32548
    ]
    assert tiny_costs.flops_single == [
        STEM + BLOCK + HEAD,
        STEM + 2 * BLOCK + HEAD,
        STEM + 3 * BLOCK + CLASSIFIER,
    ]
    assert tiny_costs.fraction == [f / 32548 for f in tiny_costs.flops]


def test_hand_derived_params(tiny_costs):
    assert tiny_costs.params == [36 + 152 + 23, 36 + 2 * (152 + 23), 36 + 3 * 152 + 2 * 23 + 15]
    assert tiny_costs.params_single == [36 + 152 + 23, 36 + 2 * 152 + 23, 36 + 3 * 152 + 15]


def test_uncounted_operators_are_reported(tiny_costs):
    # three residual adds; the classifier's mean and each head's mean
    assert tiny_costs.unsupported == {"aten::add": 3, "aten::mean": 3}


def test_fvcore_counts_eval_batchnorm_as_its_affine():
    """The convention the module docstring states: 2 FLOPs per element, 1 without affine."""
    x = torch.zeros(1, 4, 8, 8)
    for affine, per_element in ((True, 2), (False, 1)):
        fca = FlopCountAnalysis(nn.BatchNorm2d(4, affine=affine).eval(), x).unsupported_ops_warnings(False)
        assert fca.total() == per_element * x.numel()


def test_count_leaves_the_mode_alone(tiny):
    net, _, costs = tiny
    net.train()
    assert count(net).flops == costs.flops
    assert net.training


def test_counting_hands_fvcore_only_what_a_segment_reads(monkeypatch, make_tiny):
    """Each segment is traced with just the modules and parameters it reads (fast); the counts are
    those of tracing it with the whole network attached, as counting did before."""
    import annify.cost as cost

    net, _, costs = make_tiny(every=1)
    hooked = []
    real = cost._reads
    monkeypatch.setattr(
        cost, "_reads", lambda n, g: hooked.append(len(list(real(n, g).modules()))) or real(n, g)
    )
    assert count(net) == costs
    assert len(hooked) == 9 and sum(hooked) < 1.5 * len(list(net.modules()))  # about once, not 9 times
    monkeypatch.setattr(cost, "_reads", lambda n, g: n)  # the whole network, as counting did before
    assert count(net) == costs


def test_params_cover_every_parameter_once(tiny):
    net, _, costs = tiny
    assert costs.params[-1] == sum(p.numel() for p in net.parameters())
    assert costs.params == sorted(costs.params)
    assert costs.flops == sorted(costs.flops)


def test_resnet26_matches_flop_counter_mode(zoo):
    """fvcore against torch's own counter (2 FLOPs per multiply-add, no BatchNorm): within 2%."""
    z = zoo("resnet26", (3, 224, 224))
    costs = count(z.net)
    trunk = sum(costs.trunk_flops)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        z.twin(torch.zeros(1, 3, 224, 224))
    reference = counter.get_total_flops() / 2
    assert trunk == pytest.approx(reference, rel=0.02)
    assert trunk > reference  # fvcore also counts BatchNorm
    assert trunk == pytest.approx(2.357e9, rel=0.005)
    assert costs.head_flops[:-1] and all(h > 0 for h in costs.head_flops[:-1])
    assert costs.params[-1] == sum(p.numel() for p in z.net.parameters())
    assert "aten::add_" in costs.unsupported  # the residual adds, made in place (annify.rewrite)


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_handle_counts_qk_and_av():
    q, k, v = torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 7, 8), torch.zeros(2, 3, 7, 4)
    plain = FlopCountAnalysis(_Attention(), (q, k, v)).unsupported_ops_warnings(False)
    assert plain.total() == 0  # what fvcore does on its own
    fca = FlopCountAnalysis(_Attention(), (q, k, v)).unsupported_ops_warnings(False)
    fca.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    assert fca.total() == 2 * 3 * 5 * 7 * (8 + 4)  # B·H·L·S·(D + Dv)


def test_attention_is_counted_in_a_small_vit(monkeypatch):
    """With the handle, the total grows by exactly depth·heads·L·L·2·head_dim."""
    model = timm.create_model(
        "vit_small_patch16_224", img_size=32, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()
    traced = trace(model, (3, 32, 32), train_graph=False)
    net = AnytimeNet(traced, [], [])
    with_attention = count(net)
    monkeypatch.setattr(annify.cost, "sdpa_flop_jit", lambda inputs, outputs: 0)
    without = count(net)
    tokens, head_dim = 4 + 1, 32
    assert with_attention.flops[-1] - without.flops[-1] == 2 * 2 * tokens * tokens * 2 * head_dim
    assert "aten::scaled_dot_product_attention" not in with_attention.unsupported


class _SelfAttention(nn.Module):
    """One nn.MultiheadAttention over a token sequence, as torchvision's ViT calls it."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


# On paper, B = 2, L = S = 5 tokens, E = 8 channels in 2 heads of D = 4 (one multiply-add = 1 FLOP):
#   q, k, v in-projection   B·L·E·3E = 2·5·8·24                    = 1920
#   attention QKᵀ and AV    B·H·L·S·(D + Dv) = 2·2·5·5·(4 + 4)     =  800
#   out-projection          B·L·E·E = 2·5·8·8                      =  640
#   total (biases are not counted, as fvcore counts none for linear) 3360
MHA_FLOPS = 1920 + 800 + 640


def test_fused_multi_head_attention_is_counted_by_hand():
    layer, x = _SelfAttention(8, 2).eval(), torch.zeros(2, 5, 8)
    with torch.no_grad():
        plain = FlopCountAnalysis(layer, (x,)).unsupported_ops_warnings(False)
        assert plain.total() == 0  # fvcore on its own: the fused op is not counted at all
        assert plain.unsupported_ops() == {"aten::_native_multi_head_attention": 1}
        fca = FlopCountAnalysis(layer, (x,)).unsupported_ops_warnings(False)
        fca.set_op_handle("aten::_native_multi_head_attention", mha_flop_jit)
        assert fca.total() == MHA_FLOPS


def test_fused_and_unfused_attention_count_the_same():
    """With the fast path off, nn.MultiheadAttention runs linear + SDPA + linear: the same count."""
    traced = trace(_SelfAttention(8, 2).eval(), (5, 8), train_graph=False)  # inputs of L×E tokens
    net = AnytimeNet(traced, [], [])
    assert count(net, (5, 8)).flops == [MHA_FLOPS // 2]  # batch 1
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        unfused = count(net, (5, 8))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert unfused.flops == [MHA_FLOPS // 2]
    assert "aten::_native_multi_head_attention" not in unfused.unsupported


def test_vit_small_total_with_attention(zoo):
    """4.608 GFLOPs at 224 (4.251 G if attention were dropped, as plain fvcore does)."""
    costs = count(zoo("vit_small_patch16_224", (3, 224, 224)).net)
    assert sum(costs.trunk_flops) == pytest.approx(4.608e9, rel=0.005)
    assert {"aten::add", "aten::gelu"} <= set(costs.unsupported)
