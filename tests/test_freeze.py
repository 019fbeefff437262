"""annify.freeze: a copy for inference whose outputs equal the network's bit for bit, at less cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import annify
from annify.errors import InferenceError
from annify.freeze import lowered


def _realistic_norms(net: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm statistics and affine parameters away from the identity (at their defaults,
    BatchNorm in eval is x * 1 + 0 and any way of computing it would agree)."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


def _outputs(net, x, mode=torch.inference_mode):
    with mode():
        return net(x)


def _call_modules(net) -> list[type]:
    return [
        type(net.get_submodule(n.target))
        for seg in net.segments
        for n in seg.graph.nodes
        if n.op == "call_module"
    ]


@pytest.fixture
def trained_looking(tiny_net):
    _realistic_norms(tiny_net)
    return tiny_net


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_frozen_outputs_equal_the_networks_bit_for_bit(trained_looking, channels_last, batch, mode):
    net = trained_looking
    x = torch.randn(batch, *annify_size(net))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    frozen = annify.freeze(net)
    want, got = _outputs(net, x, mode), _outputs(frozen, x, mode)
    assert len(got) == len(want) == net.num_outputs
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        assert torch.equal(a, b), f"output {k} differs by {float((a - b).abs().max())}"


def annify_size(net) -> tuple[int, ...]:
    return tuple(net.input_size)


def test_freeze_lowers_the_trunks_and_heads_module_calls(trained_looking):
    net = trained_looking
    frozen = annify.freeze(net)
    before = _call_modules(net)
    assert nn.Conv2d in before and nn.BatchNorm2d in before  # the tiny ResNet's own layers
    after = _call_modules(frozen)
    for t in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear, nn.Identity):
        assert t not in after, f"{t.__name__} still called as a module"
    # the heads are plain functions, not the head modules
    assert all(not isinstance(h, nn.Module) for h in frozen._frozen_heads)


def test_a_module_without_a_lowering_keeps_its_call():
    class Doubler(nn.Module):  # a type freeze knows nothing about
        def forward(self, x):
            return x * 2

    assert lowered(Doubler()) is None
    assert lowered(nn.Conv2d(1, 1, 3, padding_mode="reflect")) is None  # the module pads first
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()  # eval uses the batch's statistics
    assert lowered(bn) is None
    for m in (nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(2).eval(), nn.Linear(5, 3), nn.MaxPool2d(2)):
        _realistic_norms(m)
        x = torch.randn(3, 2, 6, 6) if not isinstance(m, nn.Linear) else torch.randn(3, 5)
        assert torch.equal(lowered(m)(x), m(x)), type(m).__name__


def test_a_module_with_a_forward_hook_keeps_its_call_and_the_hook_runs(trained_looking):
    net = trained_looking
    conv = next(m for m in net.modules() if type(m) is nn.Conv2d)
    relu = next(m for m in net.modules() if type(m) is nn.ReLU)  # a ReLU freeze would make in place
    seen = []
    conv.register_forward_hook(lambda mod, args, out: seen.append("conv"))
    relu.register_forward_pre_hook(lambda mod, args: seen.append("relu"))
    frozen = annify.freeze(net)
    kept = _call_modules(frozen)
    assert nn.Conv2d in kept and nn.ReLU in kept  # those two, not lowered
    seen.clear()
    x = torch.randn(2, *annify_size(net))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(net, x), _outputs(frozen, x), strict=True))
    assert sorted(seen) == ["conv", "conv", "relu", "relu"]  # the hooks ran in both networks


def test_frozen_early_exit_gives_the_same_exits_logits_and_flops(trained_looking):
    net = trained_looking
    frozen = annify.freeze(net)
    x = torch.randn(32, *annify_size(net))
    with torch.no_grad():
        probs = [torch.softmax(z, -1) for z in net(x)]
    conf = torch.stack([p.max(-1).values for p in probs])
    thresholds = [float(c.median()) for c in conf[:-1]] + [0.0]  # about half leave at each output
    want = annify.early_exit(net, x, thresholds)
    got = annify.early_exit(frozen, x, thresholds)
    assert len(set(want[1].tolist())) > 1  # samples really left at several outputs
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    streamed = list(annify.early_exit_stream(frozen, x.split(8), thresholds))
    assert torch.equal(torch.cat([e for _, e, _ in streamed]), want[1])


def test_freezing_leaves_the_network_alone_and_takes_a_snapshot(trained_looking):
    net = trained_looking
    x = torch.randn(4, *annify_size(net))
    frozen = annify.freeze(net)
    before = _outputs(frozen, x)
    assert not net.frozen and frozen.frozen and annify.freeze(frozen) is frozen
    net.train()  # the original still trains
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.eval()
    after = _outputs(frozen, x)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not torch.equal(_outputs(net, x)[-1], after[-1])  # the change did reach the network


def test_a_frozen_network_refuses_training_moving_and_loading(trained_looking):
    frozen = annify.freeze(trained_looking)
    with pytest.raises(InferenceError, match="frozen for inference"):
        frozen.train()
    with pytest.raises(InferenceError, match=r"annify.freeze\(net.to"):
        frozen.to(memory_format=torch.channels_last)
    with pytest.raises(InferenceError, match="frozen from"):
        frozen.load_state_dict(trained_looking.state_dict())
    frozen.eval()  # eval() is train(False): allowed
    assert not frozen.training


def test_freeze_takes_an_anytime_network_only():
    with pytest.raises(TypeError, match="AnytimeNet"):
        annify.freeze(nn.Linear(2, 2))


def test_gradients_reach_the_input_of_a_frozen_network(trained_looking):
    net = trained_looking
    frozen = annify.freeze(net)
    x = torch.randn(2, *annify_size(net))
    grads = []
    for n in (net, frozen):
        xi = x.clone().requires_grad_()
        n(xi)[-1].sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    assert all(p.grad is None for p in frozen.parameters())


@pytest.mark.parametrize(
    ("model", "placement"),
    [("resnet18", {"every": 1}), ("mobilenetv3_small_050", {"heads": 4}), ("densenet121", {"heads": 3})],
)
def test_frozen_timm_models_equal_theirs_bit_for_bit(model, placement):
    torch.manual_seed(0)
    net, _, _ = annify.convert(model, input_size=(3, 64, 64), num_classes=10, **placement)
    net.eval()
    _realistic_norms(net)
    frozen = annify.freeze(net)
    for channels_last in (False, True):
        x = torch.randn(3, 3, 64, 64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for a, b in zip(_outputs(net, x), _outputs(frozen, x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frozen_equals_the_network_on_cuda(monkeypatch, trained_looking):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    net = trained_looking.to("cuda")
    frozen = annify.freeze(net)  # frozen after the move: its constants live on the GPU
    x = torch.randn(8, *annify_size(net), device="cuda")
    got = _outputs(frozen, x)
    assert all(o.device.type == "cuda" for o in got)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(net, x), got, strict=True))
