"""Anytime inference on tiny networks: budgets, deadlines (fake clock), EANN skipping, early exit, predict."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_line_error
from PIL import Image
from torch import nn

from annify import heads as head_registry
from annify.convert import convert
from annify.cost import exit_flops, segment_costs
from annify.eann import MemberTable, build_schedule
from annify.early_exit import (
    budget_curve,
    calibrate_temperatures,
    early_exit,
    early_exit_stream,
    fit_thresholds,
)
from annify.images import load_image
from annify.report import format_flops
from annify.rewrite import AnytimeNet
from annify.runtime import AnytimeRunner, EANNRuntime
from annify.trace import trace

TINY = dict(input_size=(1, 8, 8), num_classes=10, model_kwargs={"in_chans": 1})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net, spec, costs = convert("cifar_resnet_n3_c8", every=1, **TINY)  # 9 outputs
    return net.eval(), spec, costs


@pytest.fixture(scope="module")
def digits():
    from annify.data import build_datasets, build_loaders

    return build_loaders(build_datasets("digits", input_size=(1, 8, 8), augment=False), batch_size=128)


def spy_segments(monkeypatch, net, clock=None, ms_per_segment=1.0):
    """Record (segment, batch size of the largest carried tensor, head) of every run_segment call.

    Optionally advances a fake clock by ``ms_per_segment`` per call.
    """
    calls = []
    real = net.run_segment

    def spy(j, state, head=True):
        biggest = max((v for v in state if isinstance(v, torch.Tensor)), key=torch.numel)
        calls.append((j, biggest.shape[0], head))
        if clock is not None:
            clock.now += ms_per_segment / 1000
        return real(j, state, head)

    monkeypatch.setattr(net, "run_segment", spy)
    return calls


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_costs_come_from_the_spec_and_match_fvcore(tiny):
    net, spec, costs = tiny
    trunk, head = segment_costs(net)
    assert trunk == [float(f) for f in costs.trunk_flops]
    assert head == [float(f) for f in costs.head_flops]
    assert exit_flops(net) == [float(h.flops) for h in spec.heads]
    # a spec without numbers falls back to counting
    net.describe(dataclasses.replace(spec, heads=[dataclasses.replace(h, flops=None) for h in spec.heads]))
    try:
        assert segment_costs(net) == (trunk, head)
    finally:
        net.describe(spec)
    # a spec of other outputs is not this network's description
    moved = dataclasses.replace(
        spec, heads=[dataclasses.replace(spec.heads[0], node="stem"), *spec.heads[1:]]
    )
    with pytest.raises(ValueError, match="this network's read"):
        net.describe(moved)
    assert net.spec is spec


def test_budget_returns_latest_fitting_output_and_computes_nothing_beyond(tiny, monkeypatch):
    net, spec, _ = tiny
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        full = net(x)
    flops = [h.flops for h in spec.heads]
    runner = AnytimeRunner(net)
    calls = spy_segments(monkeypatch, net)
    for budget, want in [(flops[3], 3), (flops[3] - 1, 2), (flops[0], 0), (flops[-1] * 10, 8)]:
        calls.clear()
        result = runner.run(x, budget_flops=budget)
        assert result.output_index == want and result.member is None
        assert [c[0] for c in calls] == list(range(want + 1))
        assert result.flops_spent == flops[want] and result.outputs_computed == want + 1
        assert torch.equal(result.logits, full[want])


def test_budget_below_first_output_is_a_clear_error(tiny):
    net, spec, _ = tiny
    first = spec.heads[0].flops  # 81,488 for this net
    expected = (
        f"budget 1.2e4 FLOPs is below the first output's cost {first / 1e4:.1f}e4; raise --budget-flops"
    )
    with pytest.raises(ValueError) as info:
        AnytimeRunner(net).run(torch.zeros(1, 1, 8, 8), budget_flops=1.2e4)
    assert str(info.value) == expected


def test_deadline_returns_latest_output_ready_in_time(tiny, monkeypatch):
    net, spec, _ = tiny
    flops = [h.flops for h in spec.heads]
    clock = FakeClock()
    runner = AnytimeRunner(net, clock=clock)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        full = net(x)
    calls = spy_segments(monkeypatch, net, clock=clock, ms_per_segment=1.0)  # each segment takes 1 ms

    # outputs are ready at 1, 2, 3, 4 ms...; at 3.5 ms output 2 is the latest ready; segment 3
    # overran the deadline and is the last thing computed
    result = runner.run(x, deadline_ms=3.5)
    assert (result.output_index, result.late, len(calls)) == (2, False, 4)
    assert result.flops_spent == flops[3] and result.outputs_computed == 4
    assert torch.equal(result.logits, full[2])
    assert result.elapsed_ms == pytest.approx(4.0)

    calls.clear()
    result = runner.run(x, deadline_ms=0.5)  # not even the first output is ready in time
    assert (result.output_index, result.late, len(calls)) == (0, True, 1)

    calls.clear()
    result = runner.run(x, deadline_ms=100)
    assert (result.output_index, result.late, len(calls)) == (8, False, 9)

    calls.clear()
    result = runner.run(x, budget_flops=flops[5], deadline_ms=100)  # the budget binds first
    assert (result.output_index, len(calls)) == (5, 6)
    with pytest.raises(ValueError, match="must be positive"):
        runner.run(x, deadline_ms=0)


def test_steps_are_lazy(tiny, monkeypatch):
    net, spec, _ = tiny
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        full = net(x)
    runner = AnytimeRunner(net)
    calls = spy_segments(monkeypatch, net)
    steps = runner.steps(x)
    first, second = next(steps), next(steps)
    assert len(calls) == 2 and torch.is_grad_enabled()  # no_grad does not leak out between steps
    assert not first[2].requires_grad
    assert (first[0], first[1]) == (spec.heads[0].flops, 0) and torch.equal(first[2], full[0])
    rest = list(steps)
    assert [s[1] for s in rest] == list(range(2, 9)) and second[1] == 1
    assert [s[0] for s in rest] == [h.flops for h in spec.heads[2:]]


# --------------------------------------------------------------------------- EANN


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(1)
    a, _, costs_a = convert("cifar_resnet_n3_c8", every=3, **TINY)  # 3 outputs
    b, _, costs_b = convert("cifar_resnet_n3_c8", every=2, **TINY)  # 5 outputs
    return [a.eval(), b.eval()], [costs_a, costs_b]


def eann_used(nets):
    tables = [
        MemberTable("a", [h.flops for h in nets[0].spec.heads], [0.5, 0.6, 0.4], [0.5, 0.6, 0.4]),
        MemberTable("b", [h.flops for h in nets[1].spec.heads], [0.45, 0.35, 0.36, 0.3, 0.31], [0.3] * 5),
    ]
    return build_schedule(tables)


def test_eann_computes_only_used_heads_and_charges_what_it_computes(members, monkeypatch):
    nets, costs = members
    steps = eann_used(nets)
    eann = EANNRuntime.from_schedule(nets, steps)
    assert eann.used == [[True, False, True], [False, True, False, True, False]]

    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out_a, out_b = nets[0](x), nets[1](x)
    heads_called = []
    hooks = [
        h.register_forward_hook(lambda *_, m=m, k=k: heads_called.append((m, k)))
        for m, net in enumerate(nets)
        for k, h in enumerate(net.heads)
    ]
    segments_b = spy_segments(monkeypatch, nets[1])
    try:
        with torch.no_grad():
            pairs = eann(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert heads_called == [(0, 0), (1, 1), (1, 3)]  # a's head 1 and b's heads 0, 2 never run
    assert [c[0] for c in segments_b] == [0, 1, 2, 3]  # b stops after its last used output

    ta, ha = costs[0].trunk_flops, costs[0].head_flops
    tb, hb = costs[1].trunk_flops, costs[1].head_flops
    a_total = sum(ta) + ha[0]  # a's trunk and its one used head
    want = [
        ta[0] + ha[0],
        a_total,
        a_total + tb[0] + tb[1] + hb[1],
        a_total + sum(tb[:4]) + hb[1] + hb[3],
    ]
    assert [f for f, _ in pairs] == want
    assert [(e.member, e.output) for e in eann.exits] == [(0, 0), (0, 2), (1, 1), (1, 3)]
    for (_, logits), ref in zip(pairs, [out_a[0], out_a[2], out_b[1], out_b[3]], strict=True):
        assert torch.equal(logits, ref)
    with pytest.raises(ValueError, match="has 5 outputs but used"):
        EANNRuntime(nets, [[True] * 3, [True] * 4])


def test_runner_budget_over_an_eann(members, monkeypatch):
    nets, _ = members
    eann = EANNRuntime.from_schedule(nets, eann_used(nets))
    runner = AnytimeRunner(eann)
    costs = [e.flops for e in eann.exits]
    segments_b = spy_segments(monkeypatch, nets[1])
    x = torch.randn(1, 1, 8, 8)
    result = runner.run(x, budget_flops=costs[2] + 1)
    assert (result.member, result.output_index, result.flops_spent) == (1, 1, costs[2])
    assert [c[0] for c in segments_b] == [0, 1]
    segments_b.clear()
    result = runner.run(x, budget_flops=costs[1])
    assert (result.member, result.output_index) == (0, 2) and segments_b == []
    with pytest.raises(ValueError, match="below the first output's cost"):
        runner.run(x, budget_flops=costs[0] / 2)


# --------------------------------------------------------------------------- budgeted batch


def test_temperature_recovers_the_scale_of_calibrated_logits():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(6000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)  # calibrated at T = 1
    temps = calibrate_temperatures([3 * z, 0.5 * z, z], labels)
    assert all(t > 0 for t in temps)
    assert temps == pytest.approx([3.0, 0.5, 1.0], rel=0.08)


@pytest.fixture(scope="module")
def val_probs(tiny, digits):
    net, spec, _ = tiny
    with torch.no_grad():
        batches = [(net(x), y) for x, y in digits["val"]]
    logits = [torch.cat([b[0][k] for b in batches]) for k in range(net.num_outputs)]
    labels = torch.cat([y for _, y in batches])
    temps = calibrate_temperatures(logits, labels)
    return [torch.softmax(z / t, dim=1) for z, t in zip(logits, temps, strict=True)], temps


def test_thresholds_hit_the_target_average_cost_on_validation(tiny, val_probs):
    net, spec, _ = tiny
    probs, _ = val_probs
    flops = exit_flops(net)
    conf = torch.stack([p.max(dim=1).values for p in probs])
    for frac in (0.2, 0.5, 0.8):
        target = flops[0] + frac * (flops[-1] - flops[0])
        thresholds = fit_thresholds(probs, target, flops)
        passed = conf >= torch.tensor(thresholds).unsqueeze(1)
        passed[-1] = True
        first = [int(np.argmax(col)) for col in passed.T.numpy()]
        avg = sum(flops[k] for k in first) / len(first)
        assert abs(avg - target) < 0.01 * flops[-1], (frac, avg, target)
        assert len(set(first)) > 2  # exits spread over several outputs
    with pytest.raises(ValueError, match="outside what exiting can reach"):
        fit_thresholds(probs, flops[0] / 2, flops)


def test_thresholds_with_labels_never_lose_to_a_fixed_exit_on_validation(tiny, digits, val_probs):
    net, spec, _ = tiny
    probs, _ = val_probs
    labels = torch.cat([y for _, y in digits["val"]])
    flops = exit_flops(net)
    conf = torch.stack([p.max(dim=1).values for p in probs])
    correct = torch.stack([p.argmax(dim=1) for p in probs]) == labels

    def val_accuracy(thresholds):
        passed = conf >= torch.tensor(thresholds).unsqueeze(1)
        passed[-1] = True
        first = passed.float().argmax(dim=0)
        return float(correct[first, torch.arange(len(labels))].float().mean()), float(
            torch.tensor(flops)[first].mean()
        )

    for frac in (0.2, 0.5, 0.8):
        target = flops[0] + frac * (flops[-1] - flops[0])
        acc, avg = val_accuracy(fit_thresholds(probs, target, flops, labels))
        assert avg <= target + 0.01 * flops[-1]
        fixed = max(float(correct[k].float().mean()) for k in range(len(flops)) if flops[k] <= target)
        assert acc >= fixed, (frac, acc, fixed)
        geometric, _ = val_accuracy(fit_thresholds(probs, target, flops))
        assert acc >= geometric - 1e-9, (frac, acc, geometric)


@pytest.fixture(scope="module")
def half_cost(tiny, val_probs):
    """(thresholds at half the way from the first output's cost to the full cost, temperatures, a batch of 64)."""
    net, _, _ = tiny
    probs, temps = val_probs
    flops = exit_flops(net)
    thresholds = fit_thresholds(probs, (flops[0] + flops[-1]) / 2, flops)
    return thresholds, temps, torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_early_exit_shrinks_the_batch_and_matches_the_full_network(tiny, half_cost, monkeypatch):
    net, spec, _ = tiny
    thresholds, temps, x = half_cost
    flops = exit_flops(net)
    with torch.no_grad():
        full = net(x)
    calls = spy_segments(monkeypatch, net)
    logits, exit_at, cost = early_exit(net, x, thresholds, temps)

    sizes = [b for _, b, _ in calls]
    remaining = [int((exit_at >= j).sum()) for j in range(len(calls))]
    assert sizes == remaining  # each segment sees only the samples still undecided
    assert sizes[0] == 64 and sizes[-1] < 64
    assert len(set(exit_at.tolist())) > 2
    for i, k in enumerate(exit_at.tolist()):  # exits are the full network's outputs at that exit
        torch.testing.assert_close(logits[i], full[k][i], rtol=0, atol=1e-6)
        conf = torch.softmax(full[k][i] / temps[k], 0).max()
        assert k == net.num_outputs - 1 or conf >= thresholds[k]
    assert all(t <= 1 for t in thresholds)  # every head runs, so the cost is the anytime cost
    # it runs under inference_mode, but hands back ordinary tensors (usable in autograd, changeable)
    assert not any(t.is_inference() for t in (logits, exit_at, cost))
    assert cost.tolist() == [flops[k] for k in exit_at.tolist()]


def test_early_exit_compares_each_confidence_with_its_threshold_in_float32(tiny, half_cost):
    """A float32 max softmax is compared with the threshold rounded to float32, as torch compares a
    float32 tensor with a Python number: a threshold one double step above a sample's confidence still
    lets it exit (the test is done on Python floats, so the rounding has to be explicit)."""
    net, _, _ = tiny
    thresholds, temps, x = half_cost
    with torch.no_grad():
        full = net(x)
    conf = torch.softmax(full[0] / temps[0], dim=-1).amax(dim=-1)
    i = int(conf.argmin())  # the least confident sample: a threshold at its confidence lets all go
    c = float(conf[i])
    above = math.nextafter(c, math.inf)  # > c as a double, c once rounded to float32
    assert above > c and float(torch.tensor(above, dtype=torch.float32)) == c
    _, exit_at, _ = early_exit(net, x, [above, *thresholds[1:]], temps)
    assert exit_at.tolist() == [0] * len(x)
    next32 = float(torch.nextafter(conf[i], torch.tensor(math.inf)))  # the next float32: it stays
    _, exit_at, _ = early_exit(net, x, [next32, *thresholds[1:]], temps)
    assert int(exit_at[i]) != 0 and 0 in exit_at.tolist()


def test_early_exit_skips_the_heads_no_sample_can_exit_at(tiny, half_cost, monkeypatch):
    """Outputs whose threshold is above 1 (inf before the first exit allowed) run their segment but
    not their head, and the FLOPs returned are the trunk plus the heads that did run."""
    net, _, _ = tiny
    thresholds, temps, x = half_cost
    skipped = [0, 1, 3]
    thresholds = [math.inf if j in skipped else t for j, t in enumerate(thresholds)]
    thresholds[2] = 1.5  # above 1 but finite: no max softmax reaches it either
    skipped.append(2)
    with torch.no_grad():
        full = net(x)
    calls = spy_segments(monkeypatch, net)
    logits, exit_at, cost = early_exit(net, x, thresholds, temps)
    assert [j for j, _, head in calls if not head] == sorted(skipped)
    assert not set(exit_at.tolist()) & set(skipped) and len(set(exit_at.tolist())) > 1
    trunk, head = segment_costs(net)
    for i, k in enumerate(exit_at.tolist()):
        torch.testing.assert_close(logits[i], full[k][i], rtol=0, atol=1e-6)
        want = sum(trunk[: k + 1]) + sum(h for j, h in enumerate(head[: k + 1]) if j not in skipped)
        assert float(cost[i]) == pytest.approx(want, rel=1e-12)
        assert float(cost[i]) < exit_flops(net)[k]


def test_early_exit_keeps_a_channels_last_batch_channels_last(tiny, half_cost, monkeypatch):
    net, _, _ = tiny
    thresholds, temps, x = half_cost
    cl = torch.channels_last
    net.to(memory_format=cl)
    try:
        with torch.no_grad():
            full = net(x.contiguous(memory_format=cl))
        formats = []
        real = net.run_segment

        def spy(j, state, head=True):
            formats.append([v.is_contiguous(memory_format=cl) for v in state if isinstance(v, torch.Tensor)])
            return real(j, state, head)

        monkeypatch.setattr(net, "run_segment", spy)
        logits, exit_at, _ = early_exit(net, x.contiguous(memory_format=cl), thresholds, temps)
    finally:
        net.to(memory_format=torch.contiguous_format)
    assert len(formats) > 2 and all(all(f) for f in formats)  # the cut survivors are channels-last too
    for i, k in enumerate(exit_at.tolist()):
        torch.testing.assert_close(logits[i], full[k][i], rtol=0, atol=1e-6)


class Toy(nn.Module):
    """Carries a tensor without a batch dimension (4 channel gains) and an int across every cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        gain = self.stem.weight.sum(dim=(1, 2, 3)).abs() + 1  # (4,)
        width = x.shape[-1]
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b1(x))
        x = torch.relu(self.b2(x)) * gain.view(1, -1, 1, 1) / width
        return self.fc(x.mean(dim=(2, 3)))


def toy_net() -> AnytimeNet:
    """A 3-output anytime network over ``Toy`` (heads after ``relu`` and ``relu_1``)."""
    torch.manual_seed(0)
    traced = trace(Toy().eval(), (1, 8, 8))
    heads = [head_registry.build("bn_relu_pool_linear", 4, 10, "NCHW") for _ in range(2)]
    return AnytimeNet(traced, ["relu", "relu_1"], heads).eval()


def test_early_exit_slices_only_what_has_the_batch_dimension(monkeypatch):
    net = toy_net()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = net(x)
    state = net.run_segment(0, (x,))[0]
    assert state[0].shape == (4,) and isinstance(state[1], int)  # what makes this net a test
    # thresholds that let 4 samples exit at output 0 and 2 of the other 4 at output 1, so the
    # second cut happens at batch size 4, the length of the carried gains
    conf = [torch.softmax(f, dim=1).max(dim=1).values for f in full[:2]]
    t0 = float(conf[0].sort(descending=True).values[3])
    rest = conf[1][conf[0] < t0]
    t1 = float(rest.sort(descending=True).values[1])
    exit_flops(net)  # counted once here (no spec), so the spy below sees only early exit
    calls = spy_segments(monkeypatch, net)
    logits, exit_at, _ = early_exit(net, x, [t0, t1, 0.0])
    assert [b for _, b, _ in calls] == [8, 4, 2]
    assert torch.bincount(exit_at, minlength=3).tolist() == [4, 2, 2]
    for i, k in enumerate(exit_at.tolist()):
        torch.testing.assert_close(logits[i], full[k][i], rtol=0, atol=1e-6)


def test_early_exit_stream_pools_the_undecided_across_batches_and_matches_early_exit(
    tiny, half_cost, monkeypatch
):
    net, _, _ = tiny
    thresholds, temps, _ = half_cost
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(6)]
    alone = [early_exit(net, x, thresholds, temps) for x in xs]
    calls = spy_segments(monkeypatch, net)
    got = list(early_exit_stream(net, iter(xs), thresholds, temps))
    assert len(got) == len(xs)
    for (logits, exit_at, cost), (logits1, exit_at1, cost1) in zip(got, alone, strict=True):
        assert torch.equal(exit_at, exit_at1) and torch.equal(cost, cost1)
        torch.testing.assert_close(logits, logits1, rtol=1e-5, atol=1e-6)
    # a segment runs once 16 samples (the first batch's size) wait for it, except when the input ends
    ends = max(i for i, (j, _, _) in enumerate(calls) if j == 0)  # the last call on a new batch
    assert all(b >= 16 for _, b, _ in calls[: ends + 1])
    per_batch = sum(int(e.max()) + 1 for _, e, _ in alone)  # segment calls of one early exit per batch
    assert len(calls) <= per_batch / 2
    assert sum(b for _, b, _ in calls) == sum(int(e.sum()) + len(e) for _, e, _ in alone)  # same work


def test_early_exit_stream_hands_out_each_batch_as_soon_as_it_is_decided(tiny, half_cost):
    net, _, _ = tiny
    _, temps, x = half_cost
    everyone_first = [0.0] * net.num_outputs  # every sample exits at output 0
    pulled = []

    def batches():
        for i in range(3):
            pulled.append(i)
            yield x[16 * i : 16 * (i + 1)]

    stream = early_exit_stream(net, batches(), everyone_first, temps)
    logits, exit_at, _ = next(stream)
    assert pulled == [0] and exit_at.tolist() == [0] * 16  # not waiting for the other batches
    assert len(list(stream)) == 2 and pulled == [0, 1, 2]
    assert list(early_exit_stream(net, iter([]), everyone_first)) == []
    with pytest.raises(ValueError, match="non-empty"):
        list(early_exit_stream(net, [x[:0]], everyone_first))


def test_early_exit_stream_does_not_pool_batches_of_another_image_size(monkeypatch):
    net = toy_net()  # carries the image width as an int: batches of two widths must not share a call
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 1, 8, 8, generator=gen), torch.randn(8, 1, 12, 12, generator=gen)]
    thresholds = [0.5, 0.5, 0.0]
    alone = [early_exit(net, x, thresholds) for x in xs]
    calls = spy_segments(monkeypatch, net)
    got = list(early_exit_stream(net, xs, thresholds, pool=16))
    assert [j for j, _, _ in calls].count(0) == 2  # each width ran on its own
    for (logits, exit_at, _), (logits1, exit_at1, _) in zip(got, alone, strict=True):
        assert torch.equal(exit_at, exit_at1)
        torch.testing.assert_close(logits, logits1, rtol=1e-5, atol=1e-6)


def test_budget_curve_fits_on_val_and_reports_test(tiny, digits):
    net, spec, _ = tiny
    flops = exit_flops(net)
    targets = [flops[0] + f * (flops[-1] - flops[0]) for f in (0.3, 0.7)]
    rows = budget_curve(net, digits["val"], digits["test"], targets)
    assert [r["target_flops"] for r in rows] == targets
    for r in rows:  # a budget: validation cost stays within it (the best policy may spend less)
        assert r["val_avg_flops"] <= r["target_flops"] + 0.01 * flops[-1]
        assert flops[0] <= r["avg_flops"] <= flops[-1] and 0 <= r["accuracy"] <= 1 and r["wall_s"] > 0
    assert rows[0]["val_avg_flops"] <= rows[1]["target_flops"]
    # the reported test numbers are what early exit over the test batches with those thresholds gives
    correct = spent = total = 0
    images, labels = zip(*digits["test"], strict=True)
    exits = early_exit_stream(net, images, rows[1]["thresholds"], rows[1]["temperatures"])
    for (logits, _, cost), y in zip(exits, labels, strict=True):
        correct += int((logits.argmax(1) == y).sum())
        spent += float(cost.sum())
        total += len(y)
    assert rows[1]["accuracy"] == correct / total
    assert rows[1]["avg_flops"] == pytest.approx(spent / total)


# --------------------------------------------------------------------------- images and predict


def test_load_image_resizes_converts_and_normalizes(tiny, tmp_path):
    _, spec, _ = tiny
    Image.new("RGB", (16, 12), (200, 100, 50)).save(tmp_path / "rgb.png")
    x = load_image(tmp_path / "rgb.png", spec)  # 1-channel spec: converted to L, CIFAR mean averaged
    gray = round((200 * 299 + 100 * 587 + 50 * 114) / 1000) / 255  # PIL's L conversion, 0..255
    mean, std = sum((0.4914, 0.4822, 0.4465)) / 3, sum((0.2470, 0.2435, 0.2616)) / 3
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x, torch.full((1, 8, 8), (gray - mean) / std), atol=1e-5, rtol=0)
    rgb = load_image(tmp_path / "rgb.png", dataclasses.replace(spec, input_size=(3, 8, 8)))
    want = [
        (v / 255 - m) / s
        for v, m, s in zip((200, 100, 50), (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616), strict=True)
    ]
    torch.testing.assert_close(rgb[:, 4, 4], torch.tensor(want), atol=1e-5, rtol=0)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image '.*bad.png'"):
        load_image(tmp_path / "bad.png", spec)
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "missing.png", spec)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A spec file, a checkpoint and two digit PNGs on disk."""
    from safetensors.torch import save_file

    from annify.spec import dump

    net, spec, _ = tiny
    root = tmp_path_factory.mktemp("predict")
    (root / "tiny.yaml").write_text(dump(spec))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "model.safetensors"))
    from sklearn.datasets import load_digits

    images = load_digits().images[:2]
    paths = []
    for i, img in enumerate(images):
        path = root / f"digit{i}.png"
        Image.fromarray((img * 16).clip(0, 255).astype(np.uint8), mode="L").save(path)
        paths.append(str(path))
    return root, paths


NORM = ("--mean", "0.5", "--std", "0.25")  # bare weights outside a run: the normalisation is given


def invoke(*args):
    from annify.cli import main

    args = [*args, *NORM] if args and args[0] == "predict" and "--help" not in args else list(args)
    return CliRunner().invoke(main, [str(a) for a in args])


def test_predict_json_reports_top_classes_output_and_flops(tiny, saved):
    net, spec, _ = tiny
    root, paths = saved
    result = invoke("predict", root / "tiny.yaml", "--checkpoint", root, "--topk", "3", "--json", *paths)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["image"] for r in rows] == paths
    for r, path in zip(rows, paths, strict=True):
        with torch.no_grad():
            want = torch.softmax(net(load_image(path, spec, [0.5], [0.25])[None])[-1][0], 0)
        assert (r["output_index"], r["flops"], r["late"]) == (8, spec.heads[-1].flops, False)
        assert [t["class"] for t in r["topk"]] == want.topk(3).indices.tolist()
        assert [t["prob"] for t in r["topk"]] == pytest.approx(want.topk(3).values.tolist(), abs=1e-6)

    result = invoke(
        "predict", root / "tiny.yaml", "--checkpoint", root, "--deadline-ms", 60_000, "--json", paths[0]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["output_index"], row["late"]) == (8, False) and 0 < row["elapsed_ms"] < 60_000

    (root / "labels.txt").write_text("".join(f"digit {i}\n" for i in range(10)))
    budget = spec.heads[2].flops + 1
    result = invoke(
        "predict", root / "tiny.yaml", "--checkpoint", root, "--budget-flops", budget, "--labels",
        root / "labels.txt", paths[0],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert line.startswith(f"{paths[0]}: digit ") and "output 3/9" in line
    assert f"{format_flops(spec.heads[2].flops)} FLOPs" in line


def test_predict_budget_below_first_output_is_a_one_line_error(saved):
    root, paths = saved
    result = invoke("predict", root / "tiny.yaml", "--checkpoint", root, "--budget-flops", "1e3", paths[0])
    assert_one_line_error(
        result, "budget 1.0e3 FLOPs is below the first output's cost 8.1e4; raise --budget-flops"
    )


def test_predict_unreadable_image_is_a_one_line_error(saved):
    root, paths = saved
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    result = invoke("predict", root / "tiny.yaml", "--checkpoint", root, paths[0], root / "bad.png")
    assert_one_line_error(result, f"cannot read image '{root / 'bad.png'}'")


def test_predict_rejects_a_checkpoint_of_another_network(saved, tmp_path):
    from safetensors.torch import save_file

    root, paths = saved
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    result = invoke("predict", root / "tiny.yaml", "--checkpoint", tmp_path / "other.safetensors", paths[0])
    assert_one_line_error(result, "does not fit this spec")


def test_runtime_commands_have_help_with_an_example():
    for command in ("predict", "export"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Example: annify " + command in result.output


def test_predict_normalises_with_the_runs_own_statistics(tiny, saved, tmp_path):
    """From a run folder (no --mean/--std), predict normalises with the run's data.json: its probabilities
    are the network's on the image normalised by hand with that mean and std, not with another's."""
    import shutil

    net, _, _ = tiny
    root, paths = saved
    run = tmp_path / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    shutil.copy(root / "tiny.yaml", run / "config.yaml")
    shutil.copy(root / "model.safetensors", run / "checkpoints" / "last" / "model.safetensors")
    (run / "data.json").write_text('{"source": "digits", "mean": [0.3], "std": [0.4]}')
    from annify.cli import main

    args = ["predict", root / "tiny.yaml", "--checkpoint", run, "--topk", "10", "--json", paths[0]]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    got = torch.zeros(10)
    for top in row["topk"]:
        got[top["class"]] = top["prob"]
    pixels = torch.from_numpy(np.asarray(Image.open(paths[0]), dtype=np.float32))  # 8×8 gray: the spec's size

    def probs(mean, std):
        with torch.no_grad():
            return torch.softmax(net(((pixels / 255 - mean) / std)[None, None])[-1][0], 0)

    torch.testing.assert_close(got, probs(0.3, 0.4), atol=1e-6, rtol=0)
    assert (got - probs(0.5, 0.25)).abs().max() > 1e-3  # the normalisation changes the answer


def test_find_run_from_inside_a_run_folder(tmp_path):
    from annify.run_dir import find_run, normalization

    run = tmp_path / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("")
    (run / "data.json").write_text('{"source": "digits", "mean": [0.3], "std": [0.4]}')
    for inside in (run, run / "checkpoints" / "last", run / "checkpoints" / "last" / "model.safetensors"):
        assert find_run(inside) == run.resolve()
    assert normalization(run) == ([0.3], [0.4])
    assert find_run(tmp_path / "elsewhere") is None
