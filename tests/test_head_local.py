"""Head-local weighting (the gradient-scaling op at each tap) and distillation from the last output:
gradients and formulas checked by hand, and the trainer with both under resume, frozen trunks and DDP."""

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_spec
from safetensors.torch import load_file

from annify.spec import SpecError
from annify.train import resolve_settings, train
from annify.weighting import HeadLocal, distill_losses, scale_grad

TINY = tiny_spec("{batch_size: 128, lr: 0.05}")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(TINY)
    return path


# --- the op ---------------------------------------------------------------------------------------


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = scale_grad(x, torch.tensor(0.25))
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.25, 0.5, 0.75]))


def test_head_local_gradients_by_hand(make_tiny):
    """Head i's parameters get dCE_i/dtheta_i at full weight; the trunk gets sum_i w_i dCE_i/dtrunk."""
    torch.manual_seed(0)
    net = make_tiny(every=3)[0].train()  # heads after units 3 and 6, plus the classifier: K = 3
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    w = torch.tensor([0.1, 0.4, 0.7])
    prefix = net.exits_prefix
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]

    # by hand: each output's own gradient, over every parameter, from separate backward passes
    state = {k: v.clone() for k, v in net.state_dict().items()}  # BN running stats move per forward
    per_output = []
    for i in range(3):
        net.load_state_dict(state)
        ce = F.cross_entropy(net(x)[i], y)
        per_output.append(torch.autograd.grad(ce, params, allow_unused=True))

    def expected(j: int, name: str) -> torch.Tensor:
        grads = [g[j] if g[j] is not None else torch.zeros_like(params[j]) for g in per_output]
        if name.startswith(prefix):  # head h's parameters: its own loss at full weight
            h = int(name[len(prefix) :].split(".")[0])
            return grads[h]
        return sum(w[i] * grads[i] for i in range(3))  # the trunk (and the model's classifier)

    net.load_state_dict(state)
    local = HeadLocal(net)
    local.set(w)
    losses = torch.stack([F.cross_entropy(o, y) for o in net(x)])
    net.zero_grad()
    local.objective(losses, w).backward()
    for j, name in enumerate(names):
        torch.testing.assert_close(params[j].grad, expected(j, name), rtol=1e-4, atol=1e-6, msg=name)
    local.remove()
    net.load_state_dict(state)
    plain = torch.autograd.grad(F.cross_entropy(net(x)[0], y), params[0])[0]  # hooks gone: no scaling
    torch.testing.assert_close(plain, per_output[0][0])


def test_distill_formula_by_hand():
    torch.manual_seed(1)
    outs = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 2, 1, 2])
    gamma, t = 0.3, 2.0
    got = distill_losses(outs, y, gamma, t)

    def log_softmax(z):  # by hand, in float64
        z = z.double()
        return z - z.exp().sum(1, keepdim=True).log()

    def ce(z):
        return -log_softmax(z)[torch.arange(4), y].mean()

    p_last = log_softmax(outs[-1].detach() / t).exp()
    want = []
    for o in outs[:-1]:
        kl = (p_last * (p_last.log() - log_softmax(o / t))).sum(1).mean()
        want.append((1 - gamma) * ce(o) + gamma * t * t * kl)
    want.append(ce(outs[-1]))
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=1e-6)
    # the teacher is detached: the last output's gradient comes from its own CE alone
    got.sum().backward()
    alone = torch.autograd.grad(F.cross_entropy(outs[-1], y), outs[-1])[0]
    torch.testing.assert_close(outs[-1].grad, alone)
    # gamma = 0 is plain cross-entropy
    plain = torch.stack([F.cross_entropy(o, y) for o in outs])
    torch.testing.assert_close(distill_losses(outs, y, 0.0, t), plain)


def test_settings_validate_head_local_and_distill():
    cfg = resolve_settings({"head_local": True, "distill": 0.5}, {"distill_temperature": 2.0})
    assert (cfg["head_local"], cfg["distill"], cfg["distill_temperature"]) == (True, 0.5, 2.0)
    bad = [
        ({"head_local": "yes"}, "head_local must be true or false"),
        ({"distill": 1.5}, "distill must be a number in [0, 1]"),
        ({"distill_temperature": 0}, "distill_temperature must be a positive number"),
        ({"train_subset": 0}, "train_subset must be a positive integer"),
        ({"head_local": True, "weights": "adaloss_grad"}, "adaloss_grad measures each head's trunk gradient"),
    ]
    for section, message in bad:
        with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
            resolve_settings(section, {})


# --- the trainer ----------------------------------------------------------------------------------


def test_train_head_local_distill_resumes_exactly(spec_path, tmp_path):
    kw = dict(epochs=2, head_local=True, distill=0.5, distill_temperature=2.0, log=lambda _: None)
    full = train(spec_path, out=tmp_path / "full", **kw)
    train(spec_path, out=tmp_path / "cut", stop_after=1, **kw)
    resumed = train(spec_path, out=tmp_path / "cut", resume=True, **kw)
    a = load_file(str(full.out / "checkpoints/last/model.safetensors"))
    b = load_file(str(resumed.out / "checkpoints/last/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (full.out / "metrics.jsonl").read_text().splitlines()]
    assert min(rows[-1]["weights"]) < 1.0  # AdaLoss adapted the weights that the taps scale by
    assert "head_local: true" in (full.out / "config.yaml").read_text()


def test_head_local_changes_heads_not_trunk_direction(spec_path, tmp_path):
    """One step from the same start: head-local and plain AdaLoss differ (heads learn at full weight)."""
    plain = train(spec_path, out=tmp_path / "plain", epochs=1, head_local=False, log=lambda _: None)
    local = train(spec_path, out=tmp_path / "local", epochs=1, head_local=True, log=lambda _: None)
    a, b = plain.net.state_dict(), local.net.state_dict()
    assert not torch.equal(a["heads.0.fc.weight"], b["heads.0.fc.weight"])


def test_head_local_with_frozen_trunk_trains_heads_at_full_weight(spec_path, tmp_path):
    torch.manual_seed(0)
    frozen = train(
        spec_path, out=tmp_path / "f", epochs=1, freeze_trunk=True, head_local=True, log=lambda _: None
    )
    const = train(
        spec_path, out=tmp_path / "c", epochs=1, freeze_trunk=True, weights="const", log=lambda _: None
    )
    # with the trunk frozen, head-local AdaLoss trains every head on its own loss at weight 1: CONST
    a, b = frozen.net.state_dict(), const.net.state_dict()
    heads = [k for k in a if k.startswith("heads.")]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in heads)


def _ddp_worker(rank, port, spec_path, out, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    result = train(
        spec_path, out=out, epochs=1, batch_size=64, head_local=True, distill=0.3, log=lambda _: None
    )
    torch.save({k: v.cpu() for k, v in result.net.state_dict().items()}, f"{results}/rank{rank}.pt")


def test_head_local_under_ddp_ranks_agree(spec_path, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(
        _ddp_worker, args=(port, str(spec_path), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True
    )
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(math.isfinite(v.float().sum()) for v in a.values())


def test_head_local_is_the_default_for_adaloss_only():
    """The default follows the Fashion-MNIST reproduction (BENCHMARKS.md §7): head-local AdaLoss."""
    assert resolve_settings({}, {})["head_local"] is True  # weights: adaloss
    assert resolve_settings({}, {"weights": "const"})["head_local"] is False
    assert resolve_settings({}, {"weights": "adaloss_grad"})["head_local"] is False  # no clash by default
    assert resolve_settings({"head_local": False}, {})["head_local"] is False  # the paper's exact rule
    with pytest.raises(SpecError, match="adaloss_grad measures each head's trunk gradient"):
        resolve_settings({}, {"weights": "adaloss_grad", "head_local": True})
