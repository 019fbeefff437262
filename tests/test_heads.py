"""The head registry and the head types: the paper's NCHW head and the token / channels-last head."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import annify
from annify import heads
from annify.heads import PaperHead, TokenHead


@pytest.fixture
def scratch_head():
    """Register a throwaway head type and remove it afterwards."""
    name = "test_linear_only"

    @heads.register(name)
    def linear_only(channels, num_classes, layout, **kw):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    yield name
    heads._HEADS.pop(name)


def test_shipped_head_types():
    assert heads.available() == ["bn_relu_pool_linear", "norm_linear", "norm_pool_linear"]
    assert heads.default_for("NCHW") == "bn_relu_pool_linear"
    assert heads.default_for("NHWC") == heads.default_for("NLC") == "norm_pool_linear"
    assert heads.default_for("NC") == "norm_linear"


def test_register_adds_a_head_type(scratch_head):
    assert scratch_head in heads.available()
    head = heads.build(scratch_head, 4, 3, "NCHW")
    assert head(torch.zeros(2, 4, 2, 2)).shape == (2, 3)


def test_register_refuses_duplicate_names(scratch_head):
    with pytest.raises(ValueError, match="'bn_relu_pool_linear' is already registered"):
        heads.register("bn_relu_pool_linear")(lambda *a, **k: nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        heads.register(scratch_head)(lambda *a, **k: nn.Identity())
    # the originals survive the refused registrations
    assert isinstance(heads.build("bn_relu_pool_linear", 4, 3, "NCHW"), PaperHead)


def test_unknown_head_type_lists_what_exists():
    with pytest.raises(KeyError) as info:
        heads.build("mlp", 4, 3, "NCHW")
    message = str(info.value)
    assert "unknown head type 'mlp'" in message
    for name in heads.available():
        assert name in message


def test_paper_head_is_bn_relu_gap_linear():
    torch.manual_seed(0)
    head = heads.build("bn_relu_pool_linear", 6, 4, "NCHW")
    assert [type(m) for m in head.children()] == [nn.BatchNorm2d, nn.ReLU, nn.Linear]
    assert (head.norm.num_features, head.fc.in_features, head.fc.out_features) == (6, 6, 4)
    with torch.no_grad():  # non-trivial statistics, so that BN and ReLU both matter
        head.norm.running_mean.uniform_(-1, 1)
        head.norm.running_var.uniform_(0.5, 2)
        head.norm.weight.uniform_(-1, 1)
    head.eval()
    x = torch.randn(2, 6, 5, 3)
    bn = F.batch_norm(
        x, head.norm.running_mean, head.norm.running_var, head.norm.weight, head.norm.bias, eps=head.norm.eps
    )
    expected = F.linear(bn.relu().mean((2, 3)), head.fc.weight, head.fc.bias)
    with torch.no_grad():
        out = head(x)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_token_head_leaves_out_prefix_tokens():
    torch.manual_seed(0)
    head = heads.build("norm_pool_linear", 8, 3, "NLC", num_prefix_tokens=1).eval()
    assert isinstance(head, TokenHead) and head.num_prefix_tokens == 1
    x = torch.randn(2, 5, 8)  # B×L×C: a class token then four patches
    with torch.no_grad():
        out = head(x)
        expected = head.fc(head.norm(x)[:, 1:].mean(1))
        other = torch.randn(2, 8)  # a constant shift would vanish in the LayerNorm
        changed_prefix = x.clone()
        changed_prefix[:, 0] = other
        changed_patch = x.clone()
        changed_patch[:, 1] = other
        assert out.shape == (2, 3)
        assert torch.equal(head(changed_prefix), out)
        assert not torch.allclose(head(changed_patch), out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_channels_last_head_pools_height_and_width():
    torch.manual_seed(0)
    head = heads.build("norm_pool_linear", 8, 3, "NHWC", num_prefix_tokens=1).eval()
    assert head.num_prefix_tokens == 0  # prefix tokens exist only in token sequences
    x = torch.randn(2, 4, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.fc(head.norm(x).mean((1, 2))), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "layout", "hint"),
    [
        ("bn_relu_pool_linear", "NLC", "norm_pool_linear"),
        ("bn_relu_pool_linear", "NHWC", "norm_pool_linear"),
        ("norm_pool_linear", "NCHW", "bn_relu_pool_linear"),
        ("norm_linear", "NCHW", "pooled NC"),
    ],
)
def test_layout_mismatch_is_refused(name, layout, hint):
    with pytest.raises(ValueError, match=hint):
        heads.build(name, 8, 3, layout)


def test_convert_reports_a_head_that_cannot_read_the_layout(make_tiny):
    with pytest.raises(annify.ConvertError, match="reads NLC or NHWC features"):
        make_tiny(every=2, head_type="norm_pool_linear")


def test_convert_reports_an_unknown_head_type(make_tiny):
    with pytest.raises(annify.ConvertError, match="unknown head type 'mlp'; available: bn_relu_pool_linear"):
        make_tiny(every=2, head_type="mlp")


def test_converted_heads_match_their_tap_layouts(zoo):
    vit = zoo("vit_small_patch16_224", (3, 224, 224)).net
    assert all(isinstance(h, TokenHead) and h.layout == "NLC" and h.num_prefix_tokens == 1 for h in vit.heads)
    swin = zoo("swin_tiny_patch4_window7_224", (3, 224, 224)).net
    assert all(isinstance(h, TokenHead) and h.layout == "NHWC" for h in swin.heads)
    resnet = zoo("resnet26", (3, 224, 224)).net
    assert all(isinstance(h, PaperHead) for h in resnet.heads)
    assert [h.norm.num_features for h in resnet.heads] == [256, 512, 1024]


def test_pooled_vector_tap_gets_the_norm_linear_head(make_tiny):
    net, spec, costs = make_tiny(at=["global_pool.flatten"])  # B×32 after pooling
    (head,) = net.heads
    assert isinstance(head, TokenHead) and head.layout == "NC"
    assert (head.norm.normalized_shape, head.fc.in_features, head.fc.out_features) == ((32,), 32, 5)
    # fvcore: LayerNorm 5 FLOPs per element with affine, linear 32·5
    assert costs.head_flops == [5 * 32 + 32 * 5, 0]
    assert spec.heads[0].block is None


@pytest.mark.parametrize("training", [False, True])
def test_paper_head_computes_what_bn_relu_pool_linear_computes_and_leaves_its_input(training):
    """Its ReLU works in place on BatchNorm's output: the same logits and gradients, the tap untouched."""
    torch.manual_seed(0)
    head = heads.build("bn_relu_pool_linear", 6, 4, "NCHW").train(training)
    head.norm.running_mean.uniform_(-1, 1)
    head.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    kept = x.detach().clone()
    norm = head.norm
    stats = norm.running_mean.clone(), norm.running_var.clone()
    out = head(x)
    grads = torch.autograd.grad(out.square().sum(), [x, head.norm.weight, head.fc.weight])
    assert torch.equal(x.detach(), kept)
    norm.running_mean.copy_(stats[0])
    norm.running_var.copy_(stats[1])
    normed = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training, 0.1, 1e-5)
    ref = head.fc(F.relu(normed).mean((2, 3)))
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, head.norm.weight, head.fc.weight])
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)


@pytest.mark.parametrize(
    "shape, mean, std",
    [
        ((8, 32, 64, 64), 3.0, 2.0),
        ((3, 128, 56, 56), 3.0, 2.0),
        ((64, 32, 16, 16), 3.0, 2.0),  # the smallest size fused
        # a mean 100 standard deviations from zero (a residual stream's offset channel): sums of
        # x and x² taken apart would lose the variance and the gradient (30 % off before centring)
        ((8, 32, 64, 64), 100.0, 1.0),
    ],
)
def test_fused_training_head_matches_batchnorm_relu_pool_in_float64(shape, mean, std):
    """Large maps in training take the fused BN-ReLU-pool: same logits, gradients and running statistics
    as the autograd chain computed in float64, to float32 rounding; the tap is left untouched."""
    assert shape[0] * shape[1] * shape[2] * shape[3] >= heads.FUSED_MIN_NUMEL
    torch.manual_seed(0)
    head = heads.build("bn_relu_pool_linear", shape[1], 10, "NCHW").train()
    head.norm.weight.data.normal_()  # negative scales flip the ReLU's side: both must be right
    head.norm.bias.data.normal_()
    ref = heads.build("bn_relu_pool_linear", shape[1], 10, "NCHW").train().double()
    ref.load_state_dict(head.state_dict())
    x = (torch.randn(shape) * std + mean).requires_grad_()
    kept = x.detach().clone()
    x64 = x.detach().double().requires_grad_()
    out = head(x)
    want = ref.fc(F.relu(ref.norm(x64)).mean((2, 3)))
    g = torch.randn(out.shape)
    grads = torch.autograd.grad(out, [x, head.norm.weight, head.norm.bias, head.fc.weight], g)
    wants = torch.autograd.grad(want, [x64, ref.norm.weight, ref.norm.bias, ref.fc.weight], g.double())

    def rel(a, b):
        return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())

    def off(dx):  # elements of dx further than 1e-4 of its largest value from float64's
        return int(((dx.detach().double() - wants[0]).abs() > 1e-4 * wants[0].abs().max()).sum())

    assert torch.equal(x.detach(), kept)
    assert rel(out, want) < 1e-5
    for got, w in zip(grads[1:], wants[1:], strict=True):
        assert rel(got, w) < 1e-4
    for name in ("running_mean", "running_var"):
        assert rel(getattr(head.norm, name), getattr(ref.norm, name)) < 1e-5
    assert int(head.norm.num_batches_tracked) == int(ref.norm.num_batches_tracked) == 1
    # dx: within 1e-4 everywhere but where float32's rounding of x̂ flips the ReLU's mask at its edge
    # (a few elements of a million, with a large mean); the chain in float32 (what the head computed
    # before the fusion) flips as many
    chain = heads.build("bn_relu_pool_linear", shape[1], 10, "NCHW").train()
    chain.load_state_dict(ref.float().state_dict())
    x32 = x.detach().clone().requires_grad_()
    (dx32,) = torch.autograd.grad(chain.fc(F.relu(chain.norm(x32)).mean((2, 3))), [x32], g)
    assert off(grads[0]) <= min(4, off(dx32) + 1)
    if mean / std < 10:
        assert off(grads[0]) == 0 and rel(grads[0], wants[0]) <= rel(dx32, wants[0]) * 1.5 + 1e-6


def test_small_maps_and_eval_keep_the_autograd_chain():
    """The fused path is only for large float32 maps in training: below the size, under autocast, inside
    ``heads.unfused()`` and in eval, the head runs BatchNorm, ReLU and the mean as autograd's chain."""
    torch.manual_seed(0)
    head = heads.build("bn_relu_pool_linear", 8, 4, "NCHW").train()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    assert x.numel() < heads.FUSED_MIN_NUMEL
    assert "BatchNormReLUPool" not in str(head(x).grad_fn.next_functions)
    big = torch.randn(2, 8, 256, 256, requires_grad=True)
    assert "BatchNormReLUPool" in str(head(big).grad_fn.next_functions)
    with heads.unfused():
        assert "BatchNormReLUPool" not in str(head(big).grad_fn.next_functions)
    assert "BatchNormReLUPool" in str(head(big).grad_fn.next_functions)  # back on after the block
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision keeps BatchNorm's own rules
        assert "BatchNormReLUPool" not in str(head(big).grad_fn.next_functions)
    head.eval()
    assert "BatchNormReLUPool" not in str(head(big).grad_fn.next_functions)


def test_a_compiled_head_hands_the_chain_to_the_compiler(monkeypatch):
    """Under torch.compile the fused function is not traced: the compiler sees BatchNorm, ReLU and the
    mean, which it fuses itself (traced, the fused head's per-slice loop would become many kernels)."""
    torch.manual_seed(0)
    head = heads.build("bn_relu_pool_linear", 8, 4, "NCHW").train()
    big = torch.randn(2, 8, 256, 256, requires_grad=True)
    want = head(big)  # eager: the fused path
    monkeypatch.setattr(
        heads._BatchNormReLUPool, "apply", lambda *a: pytest.fail("the fused path was traced")
    )
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(head, backend=backend, fullgraph=True)(big)
    assert any("batch_norm" in t for t in seen)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_head_pools_in_slices_without_autograd_and_gives_the_same_logits(monkeypatch, channels_last):
    """In eval under no_grad on the CPU the paper head pools the batch a few samples at a time (here
    forced to 3 per slice: 3 + 3 + 1) and returns exactly the logits of BatchNorm-ReLU-mean over the
    whole batch; with autograd on it runs the whole batch at once."""
    torch.manual_seed(0)
    head = heads.build("bn_relu_pool_linear", 16, 5, "NCHW").eval()
    head.norm.running_mean.normal_()
    head.norm.running_var.uniform_(0.5, 2)
    head.norm.weight.data.normal_()
    head.norm.bias.data.normal_()
    x = torch.randn(7, 16, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    monkeypatch.setattr(heads, "_EVAL_SLICE_BYTES", 3 * x[0].numel() * x.element_size())
    calls = []
    head.norm.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        want = head.fc(F.relu(F.batch_norm(x, *_stats(head.norm), False, 0.0, 1e-5)).mean((2, 3)))
        got = head(x)
    assert calls == [3, 3, 1]
    assert torch.equal(got, want)
    assert torch.equal(x, kept)  # the ReLU works in place on BatchNorm's output, never on the tap
    calls.clear()
    assert torch.equal(head(x), want)  # autograd on: one call over the batch
    assert calls == [7]


def _stats(bn):
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


def test_converted_network_trains_the_same_with_the_fused_head():
    """A converted CIFAR ResNet at batch 64 (its first-stage heads read 64×16×32×32 maps, fused): every
    gradient of one training step agrees with the same step through autograd's chain."""
    torch.manual_seed(0)
    net, _, _ = annify.convert("cifar_resnet_n2_c16", every=1, num_classes=10, input_size=(3, 32, 32))
    twin, _, _ = annify.convert("cifar_resnet_n2_c16", every=1, num_classes=10, input_size=(3, 32, 32))
    twin.load_state_dict(net.state_dict())
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def grads(model):
        outs = model.train()(x)
        sum(F.cross_entropy(o, y) for o in outs).backward()
        return outs, {n: p.grad for n, p in model.named_parameters()}

    outs, got = grads(net)
    with heads.unfused():
        ref_outs, want = grads(twin)
    assert "BatchNormReLUPool" in str(outs[0].grad_fn.next_functions)
    assert "BatchNormReLUPool" not in str(ref_outs[0].grad_fn.next_functions)
    for o, r in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-3, atol=1e-5, msg=n)
