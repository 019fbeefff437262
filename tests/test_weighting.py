"""Loss-weight schemes: hand-computed weights, state round trips, registry errors, and DDP agreement."""

import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from annify import weighting
from annify.weighting import available, get, per_head_grad_norms, register

TOL = {"rtol": 1e-6, "atol": 1e-7}


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- fixed schemes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hparams", "expected"),
    [
        ("const", {}, [1.0, 1.0, 1.0, 1.0]),
        ("linear", {}, [0.25, 0.5, 0.75, 1.0]),
        ("half_end", {}, [2 / 3, 2 / 3, 2 / 3, 2.0]),  # total 4 = K, half of it on the last
        ("opt", {"head": 1}, [0.0, 1.0, 0.0, 0.0]),
        ("opt", {"head": -1}, [0.0, 0.0, 0.0, 1.0]),
        ("opt", {}, [0.0, 0.0, 0.0, 1.0]),
    ],
)
def test_fixed_schemes(name, hparams, expected):
    scheme = get(name, 4, **hparams)
    scheme.update(t(5.0, 1.0, 2.0, 3.0))  # fixed schemes ignore losses
    scheme.set_progress(3, 10)
    w = scheme.weights
    assert w.dtype == torch.float32 and w.device.type == "cpu" and w.shape == (4,)
    assert_close(w, torch.tensor(expected), **TOL)
    assert not scheme.needs_grad_norms


@pytest.mark.parametrize("name", ["const", "linear", "half_end", "opt", "adaloss", "sdn"])
def test_single_head_is_one(name):
    assert_close(get(name, 1).weights, t(1.0), rtol=0, atol=0)


def test_half_end_k2():
    assert_close(get("half_end", 2).weights, t(1.0, 1.0), **TOL)


def test_opt_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        get("opt", 3, head=3)
    with pytest.raises(ValueError, match="out of range"):
        get("opt", 3, head=-4)


def test_update_rejects_wrong_shape():
    with pytest.raises(ValueError, match="3 values"):
        get("adaloss", 3).update(t(1.0, 2.0))
    with pytest.raises(ValueError, match="3 values"):
        get("const", 3).update(torch.ones(1, 3))


# --- adaloss --------------------------------------------------------------------------------------


def test_adaloss_hand_computed():
    s = get("adaloss", 3)  # gamma 0.05, momentum 0.9, period 1
    assert_close(s.weights, t(1.0, 1.0, 1.0), rtol=0, atol=0)  # before any update
    s.update(t(2.0, 1.0, 4.0))
    # EMA starts at the first losses: [2, 1, 4]; B = 0.95 * [1/2, 1, 1/4] + 0.05
    assert_close(s.ema, t(2.0, 1.0, 4.0), **TOL)
    assert_close(s.weights, t(0.525, 1.0, 0.2875), **TOL)
    s.update(t(1.0, 1.0, 1.0))
    # EMA = 0.9 * [2, 1, 4] + 0.1 * 1 = [1.9, 1.0, 3.7]; B = [0.95/1.9 + 0.05, 1, 0.95/3.7 + 0.05]
    assert_close(s.ema, t(1.9, 1.0, 3.7), **TOL)
    assert_close(s.weights, t(0.55, 1.0, 0.30675676), **TOL)


def test_adaloss_hparams_hand_computed():
    s = get("adaloss", 2, gamma=0.2, momentum=0.5)
    s.update(t(4.0, 1.0))
    s.update(t(2.0, 3.0))
    # EMA = 0.5 * [4, 1] + 0.5 * [2, 3] = [3, 2]; B = 0.8 * [2/3, 1] + 0.2
    assert_close(s.ema, t(3.0, 2.0), **TOL)
    assert_close(s.weights, t(0.73333333, 1.0), **TOL)


def test_adaloss_max_is_one_min_at_least_gamma():
    gen = torch.Generator().manual_seed(0)
    for gamma in (0.0, 0.05, 0.15, 0.37):
        s = get("adaloss", 6, gamma=gamma)
        for _ in range(20):
            s.update(torch.rand(6, generator=gen) * 10 + 1e-3)
            w = s.weights
            assert w.max().item() == 1.0
            assert w.min().item() >= gamma - 1e-7
            assert torch.all(w <= 1.0)


def test_adaloss_period_holds_weights_while_ema_moves():
    s = get("adaloss", 2, period=3)
    s.update(t(2.0, 1.0))
    s.update(t(2.0, 1.0))
    assert_close(s.weights, t(1.0, 1.0), rtol=0, atol=0)  # no refresh before step 3
    s.update(t(2.0, 1.0))
    assert_close(s.weights, t(0.525, 1.0), **TOL)  # EMA [2, 1]
    held = s.weights
    s.update(t(4.0, 1.0))
    assert_close(s.ema, t(2.2, 1.0), **TOL)  # EMA moved...
    s.update(t(4.0, 1.0))
    assert_close(s.ema, t(2.38, 1.0), **TOL)
    assert torch.equal(s.weights, held)  # ...weights did not
    s.update(t(4.0, 1.0))
    # EMA = 0.9 * 2.38 + 0.4 = 2.542; B = 0.95 / 2.542 + 0.05
    assert_close(s.weights, t(0.42372148, 1.0), **TOL)


def test_adaloss_zero_and_nonfinite_losses():
    s = get("adaloss", 2)
    s.update(t(0.0, 2.0))  # zero loss: clamped, weight 1, no 0/0
    assert torch.isfinite(s.weights).all()
    assert_close(s.weights, t(1.0, 0.05), **TOL)
    s = get("adaloss", 2)
    s.update(t(2.0, 1.0))
    s.update(t(float("inf"), 1.0))  # e.g. an AMP overflow step: head 0's EMA is left unchanged
    assert_close(s.ema, t(2.0, 1.0), **TOL)
    s.update(t(float("nan"), float("nan")))
    assert_close(s.ema, t(2.0, 1.0), **TOL)
    assert_close(s.weights, t(0.525, 1.0), **TOL)


@pytest.mark.parametrize(("name", "hparams"), [("adaloss", {"period": 2}), ("adaloss_grad", {}), ("sdn", {})])
def test_state_dict_round_trip(name, hparams):
    gen = torch.Generator().manual_seed(1)
    seq = [torch.rand(4, generator=gen) + 0.1 for _ in range(7)]

    def feed(scheme, x):
        if scheme.needs_grad_norms:
            scheme.update(torch.ones(4), grad_norms=x)
        else:
            scheme.update(x)

    a = get(name, 4, **hparams)
    a.set_progress(2, 9)
    for x in seq[:3]:
        feed(a, x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = get(name, 4, **hparams)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a.weights, b.weights)
    for i, x in enumerate(seq[3:]):
        feed(a, x)
        feed(b, x)
        a.set_progress(3 + i, 9)
        b.set_progress(3 + i, 9)
        assert torch.equal(a.weights, b.weights)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        other = b.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_load_state_dict_wrong_num_heads():
    with pytest.raises(ValueError, match="3 heads"):
        get("adaloss", 4).load_state_dict(get("adaloss", 3).state_dict())


# --- adaloss_grad and gradient norms --------------------------------------------------------------


def test_adaloss_grad_uses_grad_norms():
    s = get("adaloss_grad", 2)
    assert s.needs_grad_norms and not get("adaloss", 2).needs_grad_norms
    with pytest.raises(ValueError, match="grad_norms"):
        s.update(t(1.0, 1.0))
    s.update(t(1.0, 1.0), grad_norms=t(2.0, 4.0))  # equal losses, unequal gradients
    assert_close(s.weights, t(1.0, 0.525), **TOL)
    s.update(t(5.0, 0.1), grad_norms=t(2.0, 4.0))  # losses play no part
    assert_close(s.weights, t(1.0, 0.525), **TOL)


def test_per_head_grad_norms_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.tensor([5.0], requires_grad=True)
    losses = [3.0 * w[0], -4.0 * w[1], (w * w).sum()]  # gradients [3, 0], [0, -4], 2w = [2, 4]
    norms = per_head_grad_norms(losses, [w, unused])
    assert norms.dtype == torch.float32 and not norms.requires_grad
    assert_close(norms, t(3.0, 4.0, 20.0**0.5), **TOL)
    sum(losses).backward()  # graphs were retained for the trainer's own backward
    assert_close(w.grad, t(5.0, 0.0), **TOL)


# --- sdn ------------------------------------------------------------------------------------------


def test_sdn_ramp_by_hand():
    s = get("sdn", 7)  # C = [0.15, 0.3, 0.45, 0.6, 0.75, 0.9], SDN's own values
    assert_close(s.weights, t(0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 1.0), **TOL)
    s.set_progress(0, 10)  # SDN's epoch 1: 0.01 + C / 10
    assert_close(s.weights, t(0.025, 0.04, 0.055, 0.07, 0.085, 0.1, 1.0), **TOL)
    s.set_progress(4, 10)  # SDN's epoch 5: 0.01 + C / 2
    assert_close(s.weights, t(0.085, 0.16, 0.235, 0.31, 0.385, 0.46, 1.0), **TOL)
    s.set_progress(9, 10)  # last epoch: 0.01 + C, capped at C
    assert_close(s.weights, t(0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0), **TOL)
    s3 = get("sdn", 3)  # C = [0.45, 0.9]
    s3.set_progress(1, 4)  # 0.01 + 2 * C / 4
    assert_close(s3.weights, t(0.235, 0.46, 1.0), **TOL)
    with pytest.raises(ValueError, match="epoch"):
        s3.set_progress(4, 4)


# --- registry -------------------------------------------------------------------------------------


def test_registry_available_sorted():
    names = available()
    assert names == sorted(names)
    assert {"const", "linear", "half_end", "opt", "adaloss", "adaloss_grad", "sdn"} <= set(names)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):

        @register("const")
        class Again(weighting.WeightScheme):
            pass


def test_registry_register_new_scheme():
    try:

        @register("_test_double")
        class Double(weighting.WeightScheme):
            def __init__(self, num_heads, scale=2.0):
                super().__init__(num_heads)
                self._weights.fill_(scale)

        assert "_test_double" in available()
        assert_close(get("_test_double", 2, scale=3.0).weights, t(3.0, 3.0), rtol=0, atol=0)
    finally:
        weighting._REGISTRY.pop("_test_double", None)


def test_registry_unknown_name_lists_available():
    with pytest.raises(KeyError, match="adaloss, adaloss_grad, const"):
        get("adaloos", 3)


def test_registry_unknown_hparam():
    with pytest.raises(ValueError, match="'gama'.*gamma, momentum, period"):
        get("adaloss", 3, gama=0.1)
    with pytest.raises(ValueError, match="'head'.*none"):
        get("const", 3, head=0)


def test_bad_hparam_values():
    with pytest.raises(ValueError, match="period"):
        get("adaloss", 3, period=0)
    with pytest.raises(ValueError, match="gamma"):
        get("adaloss", 3, gamma=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        get("const", 0)


# --- distributed: every rank must hold the weights of the mean losses ------------------------------

RANK_LOSSES = [
    [t(2.0, 1.0, 4.0), t(1.0, 1.5, 3.0), t(0.5, 0.7, 2.5)],  # rank 0
    [t(1.0, 3.0, 2.0), t(2.0, 0.5, 1.0), t(0.9, 0.4, 3.5)],  # rank 1
]


def _ddp_worker(rank, world_size, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        s = get("adaloss", 3)
        for losses in RANK_LOSSES[rank]:
            s.update(losses)
        torch.save(s.weights, f"{out_dir}/weights_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_adaloss_ddp_identical_weights(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "weights_0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_1.pt", weights_only=True)
    assert torch.equal(w0, w1)
    ref = get("adaloss", 3)
    for a, b in zip(*RANK_LOSSES, strict=True):
        ref.update((a + b) / 2)
    assert_close(w0, ref.weights, **TOL)
    assert not torch.equal(w0, get("adaloss", 3).weights)  # the test is not vacuous


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["const", "adaloss", "adaloss_grad", "sdn"])
def test_scheme_state_stays_on_the_device(name):
    """The trainer keeps a scheme on the GPU: its updates never copy to the host; checkpoints hold CPU tensors."""
    s = get(name, 3).to("cuda")
    s.set_progress(0, 2)
    losses = torch.tensor([2.0, 1.0, 4.0], device="cuda")
    s.update(losses, grad_norms=losses) if s.needs_grad_norms else s.update(losses)
    assert s.weights.is_cuda
    state = s.state_dict()
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    back = get(name, 3).to("cuda")
    back.load_state_dict(state)
    assert back.weights.is_cuda and torch.equal(back.weights, s.weights)
