"""The rewrite: segments that change nothing, stop early, keep timm's state dict, and train."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import annify
from annify.rewrite import add_into

# (model, input size): a small input where the architecture allows one.
FAMILIES = [
    ("resnet26", (3, 224, 224)),
    ("densenet121", (3, 32, 32)),
    ("vit_small_patch16_224", (3, 224, 224)),
    ("swin_tiny_patch4_window7_224", (3, 224, 224)),
    pytest.param("resnet50", (3, 224, 224), marks=pytest.mark.slow),
    pytest.param("densenet121", (3, 224, 224), marks=pytest.mark.slow),
    pytest.param("convnext_tiny", (3, 224, 224), marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", (3, 224, 224), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "size"), FAMILIES)
def test_last_output_equals_timm_exactly(zoo, name, size):
    z = zoo(name, size)
    outs, ref = z.outputs()
    assert len(outs) == z.net.num_outputs == len(z.net.taps) + 1 >= 2
    assert torch.equal(outs[-1], ref)
    for out in outs[:-1]:
        assert out.shape == ref.shape


def test_tiny_last_output_equals_timm_exactly(tiny_net, tiny_twin, tiny_input):
    with torch.no_grad():
        assert torch.equal(tiny_net(tiny_input)[-1], tiny_twin(tiny_input))


def test_train_mode_output_equals_timm_exactly(tiny_net, tiny_twin, tiny_input):
    """In train mode BatchNorm uses batch statistics; the rewrite must not change that either."""
    tiny_net.train()
    tiny_twin.train()
    assert torch.equal(tiny_net(tiny_input)[-1], tiny_twin(tiny_input))
    trunk_bn, twin_bn = (
        tiny_net.get_submodule("stages.1.0.norm1"),
        tiny_twin.get_submodule("stages.1.0.norm1"),
    )
    assert torch.equal(trunk_bn.running_mean, twin_bn.running_mean)


def _spy_segments(monkeypatch, net) -> list[int]:
    """Record the index of every segment the network runs."""
    ran: list[int] = []
    for j, seg in enumerate(net.segments):
        for attr in ("fn", "boxed"):  # a segment runs one or the other (see run_segment)
            if getattr(seg, attr) is None:
                continue

            real = getattr(seg, attr)

            def fn(*args, _fn=real, _j=j):
                ran.append(_j)
                return _fn(*args)

            monkeypatch.setattr(seg, attr, fn)
    return ran


def _spy_heads(net) -> tuple[list[int], list]:
    called: list[int] = []
    hooks = [h.register_forward_hook(lambda m, i, o, j=j: called.append(j)) for j, h in enumerate(net.heads)]
    return called, hooks


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_forward_until_computes_only_what_k_outputs_need(monkeypatch, tiny_net, tiny_input, k):
    with torch.no_grad():
        full = tiny_net(tiny_input)
        ran = _spy_segments(monkeypatch, tiny_net)
        called, hooks = _spy_heads(tiny_net)
        part = tiny_net.forward_until(tiny_input, k)
    for h in hooks:
        h.remove()
    assert len(part) == k
    for a, b in zip(part, full[:k], strict=True):
        assert torch.equal(a, b)
    assert ran == list(range(k))
    assert called == list(range(min(k, len(tiny_net.heads))))


def test_forward_until_rejects_k_out_of_range(tiny_net, tiny_input):
    for k in (0, tiny_net.num_outputs + 1):
        with pytest.raises(ValueError, match="between 1 and 5"):
            tiny_net.forward_until(tiny_input, k)


def test_forward_until_carries_every_live_tensor_in_densenet(zoo):
    """Inside a dense block several tensors cross each cut; stopping early must still be exact."""
    z = zoo("densenet121", (3, 32, 32))
    with torch.no_grad():
        full = z.net(z.x)
        for k in (1, 3, z.net.num_outputs):
            part = z.net.forward_until(z.x, k)
            assert all(torch.equal(a, b) for a, b in zip(part, full[:k], strict=True))
    assert max(seg.carry for seg in z.net.segments[:-1]) > 1


def test_stream_is_lazy_and_gives_the_same_outputs(monkeypatch, tiny_net, tiny_input):
    with torch.no_grad():
        full = tiny_net(tiny_input)
        ran = _spy_segments(monkeypatch, tiny_net)
        stream = tiny_net.stream(tiny_input)
        assert ran == []
        first = next(stream)
        assert ran == [0]
        rest = list(stream)
    assert ran == list(range(tiny_net.num_outputs))
    for a, b in zip([first, *rest], full, strict=True):
        assert torch.equal(a, b)


def test_timm_state_dict_loads_with_only_heads_missing(tiny_net, tiny_input):
    fresh = annify.create_model("cifar_resnet_n3_c8", 5, in_chans=1).eval()  # other random weights
    result = tiny_net.load_state_dict(fresh.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("heads.") for k in result.missing_keys)
    assert {f"heads.{k}" for k, _ in tiny_net.heads.named_parameters()} <= set(result.missing_keys)
    with torch.no_grad():
        assert torch.equal(tiny_net(tiny_input)[-1], fresh(tiny_input))


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet26", (3, 224, 224)), ("swin_tiny_patch4_window7_224", (3, 224, 224))],
)
def test_state_dict_is_timm_keys_plus_heads(zoo, name, size):
    """Swin's traced `_tensor_constant*` snapshots must not add keys."""
    z = zoo(name, size)
    heads = {f"heads.{k}" for k in z.net.heads.state_dict()}
    assert heads
    assert set(z.net.state_dict()) == set(z.twin.state_dict()) | heads
    result = z.net.load_state_dict(z.twin.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {k for k in heads if not k.endswith("num_batches_tracked")}


def test_segments_share_the_models_own_parameters(zoo):
    """The network holds the traced model's modules under their own names: nothing is copied."""
    z = zoo("resnet26", (3, 224, 224))
    model = z.traced.model
    assert z.net.conv1 is model.conv1
    assert z.net.get_parameter("layer3.1.conv2.weight") is model.layer3[1].conv2.weight
    own = {id(p) for p in model.parameters()}
    trunk = [p for n, p in z.net.named_parameters() if not n.startswith("heads.")]
    assert {id(p) for p in trunk} == own


def test_gradients_reach_trunk_and_heads(tiny_net, tiny_input):
    net = tiny_net.train()
    target = torch.tensor([1, 3])
    outs = net(tiny_input)
    sum(F.cross_entropy(o, target) for o in outs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    for head in net.heads:
        assert head.fc.weight.grad.abs().sum() > 0
    all_losses = net.stem.weight.grad.clone()
    # the early heads' losses reach the stem: its gradient differs from the last output's alone
    net.zero_grad()
    F.cross_entropy(net(tiny_input)[-1], target).backward()
    assert not torch.allclose(net.stem.weight.grad, all_losses)


class _AddThenReLU(nn.Module):
    """Three units relu_(x + conv(x)), as torchvision's ResNets run them: ReLU(inplace=True) after the add."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        for conv in self.convs:
            x = self.act(x + conv(x))
        return self.fc(x.mean((2, 3)))


def _small_net(cls, taps):
    """(model, its anytime net with paper heads at ``taps``, x, the model's eval output, what head 0 sees).

    ``cls`` builds a 4-channel model; the list fills with a copy of head 0's input at every call.
    """
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model.eval()(x)
    traced = annify.trace(model, (4, 6, 6))
    heads = [annify.heads.build("bn_relu_pool_linear", 4, 3, "NCHW") for _ in taps]
    net = annify.AnytimeNet(traced, taps, heads)
    seen: list[torch.Tensor] = []
    net.exits[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return model, net, x, expected, seen


def test_a_head_at_a_value_overwritten_in_place_reads_a_copy():
    """A head at the add that ReLU(inplace=True) then overwrites: it sees the add (negatives included),
    the trunk is unchanged, and backward does not find its saved input modified."""
    model, net, x, expected, seen = _small_net(_AddThenReLU, ["add", "add_1"])
    with torch.no_grad():
        outs = net.eval()(x)
    assert torch.equal(outs[-1], expected)
    assert seen[0].min() < 0  # the add itself, before the ReLU
    net.train()
    sum(F.cross_entropy(o, torch.tensor([0, 2])) for o in net(x)).backward()  # no in-place error
    assert all(h.fc.weight.grad is not None for h in net.exits)


def test_train_mode_updates_batchnorm_statistics(tiny_net, tiny_input):
    trunk_bn = tiny_net.get_submodule("stages.0.0.norm1")
    head_bn = tiny_net.heads[0].norm
    before = trunk_bn.running_mean.clone(), head_bn.running_mean.clone()
    tiny_net.train()
    tiny_net(tiny_input)
    assert not torch.equal(trunk_bn.running_mean, before[0])
    assert not torch.equal(head_bn.running_mean, before[1])
    assert int(trunk_bn.num_batches_tracked) == int(head_bn.num_batches_tracked) == 1
    tiny_net.eval()
    with torch.no_grad():
        tiny_net(tiny_input)
    assert int(trunk_bn.num_batches_tracked) == 1


@pytest.fixture(scope="module")
def droppy():
    """A 4-block ViT at 3×32×32 with stochastic depth 0.5, and a twin with the same weights."""
    kwargs = {"img_size": 32, "depth": 4, "drop_path_rate": 0.5}
    net, _, _ = annify.convert("vit_small_patch16_224", every=1, input_size=(3, 32, 32), model_kwargs=kwargs)
    twin = annify.create_model("vit_small_patch16_224", **kwargs)
    twin.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("heads.")})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return net, twin, x


def test_drop_path_still_drops_in_train_mode(droppy):
    net, twin, x = droppy
    assert net._train_segments is not None
    net.train()
    twin.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = net(x)
        torch.manual_seed(1)
        b = net(x)
        torch.manual_seed(0)
        again = net(x)
        torch.manual_seed(0)
        ref = twin(x)
    assert not torch.equal(a[-1], b[-1])
    assert all(torch.equal(u, v) for u, v in zip(a, again, strict=True))
    assert torch.equal(a[-1], ref)  # the same paths dropped as timm's own model


def test_eval_mode_is_deterministic_with_drop_path(droppy):
    net, twin, x = droppy
    net.eval()
    twin.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        a = net(x)
        torch.manual_seed(1)
        b = net(x)
        ref = twin(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert torch.equal(a[-1], ref)


def test_segments_follow_the_mode(droppy):
    net, _, _ = droppy
    assert net.train().segments is net._train_segments
    assert net.eval().segments is net._eval_segments


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_on_cuda(monkeypatch, tiny_net, tiny_twin, tiny_input):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    device = torch.device("cuda")
    net, twin, x = tiny_net.to(device), tiny_twin.to(device), tiny_input.to(device)
    with torch.no_grad():
        outs = net(x)
        assert torch.equal(outs[-1], twin(x))
        part = net.forward_until(x, 2)
    assert all(o.device.type == "cuda" for o in outs)
    assert all(torch.equal(a, b) for a, b in zip(part, outs[:2], strict=True))
    costs = annify.count(net)  # costing works on the device the net lives on
    assert costs.flops[-1] > 0


def test_a_model_with_its_own_heads_child_keeps_it():
    """efficientvim owns a `heads` module: the added heads go under `exit_heads.` and nothing is shadowed."""
    from annify.convert import convert
    from annify.sources import create_model

    torch.manual_seed(0)
    net, _, _ = convert("efficientvim_m1", heads=4)
    model = create_model("efficientvim_m1").eval()
    result = net.load_state_dict(model.state_dict(), strict=False)
    assert net.exits_name == "exit_heads" and net.exits_prefix == "exit_heads."
    assert not result.unexpected_keys and {k.split(".")[0] for k in result.missing_keys} == {"exit_heads"}
    # the model's own child stays where the traced code reads it
    assert net.heads is not net.exits and net.heads.state_dict().keys() == model.heads.state_dict().keys()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(net.eval()(x)[-1], model(x))


# --------------------------------------------------------------------------- residual adds made in place


def _into(net) -> list[int]:
    """How many ``add_into`` calls each segment of ``net`` (current mode) makes."""
    return [sum(n.target is add_into for n in s.graph.nodes) for s in net.segments]


def test_residual_adds_write_into_their_left_operand(tiny_net):
    """Every unit of the tiny CIFAR ResNet ends in ``conv2(...) + shortcut``: 9 adds, all in place."""
    assert sum(_into(tiny_net)) == 9
    assert sum(_into(tiny_net.train())) == 9


def test_a_training_network_compiles_into_one_graph(tiny_input):
    """torch.compile (``annify train --compile``) sees the whole training forward, head-local gradient
    scaling included, as one graph: a graph break (``add_into``'s dtype check once made 17 of them on
    CIFAR) leaves every piece to run apart, and the converted step gained nothing from compiling."""
    from annify.weighting import HeadLocal

    torch.manual_seed(0)
    net, _, _ = annify.convert("cifar_resnet_n3_c8", every=1, input_size=(1, 8, 8), num_classes=10,
                               model_kwargs={"in_chans": 1})  # fmt: skip
    net.train()
    HeadLocal(net)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(tiny_input)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_add_into_writes_only_where_the_sum_has_the_left_operands_shape_and_dtype():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    expected = a + b
    out = add_into(a, b)
    assert out.data_ptr() == a.data_ptr() and torch.equal(out, expected)
    narrow = torch.randn(2, 1)  # broadcasting: the sum is wider than a
    before = narrow.clone()
    assert torch.equal(add_into(narrow, b), before + b) and torch.equal(narrow, before)
    low = torch.randn(2, 3).to(torch.bfloat16)  # type promotion: bf16 + float32 is float32
    before = low.clone()
    out = add_into(low, b)
    assert out.dtype == torch.float32 and torch.equal(out, before + b) and torch.equal(low, before)


# (model, input size): residual families, small inputs; trunk gradients against the plain model
INPLACE_FAMILIES = [
    ("resnet18", (3, 32, 32), 8),  # BasicBlock: bn2(...) += shortcut
    ("resnet26", (3, 32, 32), 8),  # Bottleneck: bn3(...) += shortcut
    ("regnetx_002", (3, 32, 32), 13),  # drop_path(conv3(...)) + shortcut: Identity looked through
    ("efficientnet_b0", (3, 32, 32), 9),  # drop_path(bn3(...)) + shortcut, bn3 a BatchNormAct2d without act
]


@pytest.mark.parametrize(("name", "size", "n_into"), INPLACE_FAMILIES)
def test_inplace_adds_change_no_output_and_no_gradient(name, size, n_into):
    """Eval outputs ``torch.equal`` to timm's; in training, the outputs and every trunk gradient too."""
    from annify.convert import convert
    from annify.sources import create_model

    torch.manual_seed(0)
    net, _, _ = convert(name, every=2, input_size=size, num_classes=7)
    twin = create_model(name, num_classes=7)
    twin.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("heads.")})
    assert sum(_into(net.eval())) == n_into
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(x)[-1], twin.eval()(x))
    net.train()
    twin.train()
    target = torch.tensor([1, 5])
    F.cross_entropy(net(x)[-1], target).backward()
    F.cross_entropy(twin(x), target).backward()
    trunk = dict(twin.named_parameters())
    for key, p in net.named_parameters():
        if not key.startswith("heads."):
            assert torch.equal(p.grad, trunk[key].grad), key


class _Residuals(nn.Module):
    """Adds whose left operand must not be written into: a ReLU output, a tap, a value carried over a cut."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act(self.c[0](x)) + x  # ReLU's backward reads its output
        y = self.c[1](x)  # tapped, then added
        x = y + x
        z = self.c[2](x)  # produced before the cut at c.3, added after it
        w = self.c[3](x)
        x = z + w
        return self.fc(x.mean((2, 3)))


def test_adds_that_must_not_write_into_their_left_operand_stay_out_of_place():
    model, net, x, expected, seen = _small_net(_Residuals, ["c.1", "c.3"])
    assert _into(net.eval()) == [0, 0, 0]
    with torch.no_grad():
        outs = net(x)
        assert torch.equal(outs[-1], expected)
        assert torch.equal(seen[0], model.c[1](model.act(model.c[0](x)) + x))  # the tap as computed
    net.train()
    sum(F.cross_entropy(o, torch.tensor([0, 2])) for o in net(x)).backward()  # no in-place error


class _Chain(nn.Module):
    """Four convolutions in a row: the tap after the first leaves a segment of two before the next tap."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.d(self.c(self.b(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("handed_over", [True, False])
def test_a_state_handed_over_as_a_list_is_freed_at_its_last_use(handed_over):
    """run_segment given a list empties it, so the carried value dies once the segment's first operation
    has read it (before the second runs); given a tuple, the caller's values stay as they are."""
    model, net, x, expected, _ = _small_net(_Chain, ["a", "c"])
    seen: list[bool] = []
    net.c.register_forward_pre_hook(lambda m, args: seen.append(ref() is None))
    with torch.no_grad():
        carried, _ = net.eval().run_segment(0, [x])
        ref = weakref.ref(carried[0])
        state = list(carried) if handed_over else tuple(carried)
        del carried
        nxt, _ = net.run_segment(1, state)
        outs = [net.run_segment(2, list(nxt))[1]]
    assert seen == [handed_over]
    assert (state == []) if handed_over else (len(state) == 1 and state[0] is not None)
    assert torch.equal(outs[-1], expected)
    with torch.no_grad():
        assert torch.equal(net(x)[-1], expected)


def test_forward_frees_each_carried_value_at_its_last_use():
    """net(x) (stream, run_segments) keeps no reference to a segment's input: the value carried out of
    segment 0 is dead before segment 1's second operation runs."""
    model, net, x, expected, _ = _small_net(_Chain, ["a", "c"])
    refs: list = []
    seen: list[bool] = []
    net.a.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out)))
    net.c.register_forward_pre_hook(lambda m, args: seen.append(refs[-1]() is None))
    with torch.no_grad():
        outs = net.eval()(x)
    assert seen == [True]
    assert torch.equal(outs[-1], expected)
