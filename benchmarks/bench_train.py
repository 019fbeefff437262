"""Training-step cost: an anytime network trained as ``annify.train.train`` trains it, against the plain timm model.

One training step is what ``annify.train.train`` does per batch with its defaults: head-local AdaLoss
(the gradient-scaling op at each tap), forward (every output), the K per-output cross-entropies, the
weighted objective, ``zero_grad``, backward, the optimizer step (the trainer's own ``_optimizer``:
timm's SGD, momentum 0.9, wd 1e-4, torch's fused kernel), the weight scheme's update and the
device-side loss record, read by the host at the trainer's rate-limited checks. The plain step is
the usual one: forward, cross-entropy of the single output, ``zero_grad``, backward, the same
optimizer. Both start from the same trunk weights and see the same batch every repeat (lr 0.01, so
repeating one batch neither diverges nor changes the arithmetic).

Parts (``--parts step,optimizer,profile``):

step: per model, the steps below run round-robin in the same rounds (``benchmarks._common.interleaved``);
    ratios are taken within each round, the table gives their median and spread:
    ``plain`` (timm model), ``annify`` (converted, the trainer's step), ``const`` (converted, CONST
    weights, no head-local scaling), and with ``--before`` also ``before``: the step of commit 818ca72
    (per-tensor SGD loop, AdaLoss on the CPU, the losses copied to the host, checked and formatted
    every step), rebuilt here for the before/after comparison. The goal: annify / plain at most
    ``1 + heads' FLOP share + 0.05``. ``--diagnose`` adds ``trunk`` (the converted segments without
    heads), ``pool_linear`` (the trainer's step with every head's BN-ReLU left out), to split the
    overhead between the cut-up trunk and the heads, and ``unfused`` (the trainer's step with the
    paper heads' fused BN-ReLU-pool turned off), the before of the fused head. ``--compile`` runs
    ``plain``, ``annify`` and ``const`` with every forward through ``torch.compile`` (inductor), as
    ``annify train --compile`` does (and ``eager``, the trainer's step uncompiled, to show what
    compiling buys); the compilation runs once before the rounds.
optimizer: ``optimizer.step()`` alone on the converted network, per-tensor loop against fused.
profile: ``torch.profiler`` over 3 steps of plain and of annify: the operators whose self time grew
    most, to say where the converted step's extra time goes.
gpu: ``--device cuda``: images/s of resnet50 at 224, bf16 autocast and channels-last (what
    ``train()`` uses on CUDA), converted + AdaLoss vs plain, alternating blocks of steps. Where torch
    sees no CUDA device the script says so and exits 0.

Usage::

    python -m benchmarks.bench_train                                  # CPU parts, 1 thread
    python -m benchmarks.bench_train --models cifar --before --repeats 20
    python -m benchmarks.bench_train --models cifar,resnet50 --parts step --compile   # both compiled
    python -m benchmarks.bench_train --device cuda                    # GPU part

Results go to ``benchmarks/results/train.md`` (one section per part and model) and ``train.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import annify
import benchmarks._common as common
from benchmarks._common import (
    RESULTS,
    annify_step,
    command,
    heads,
    heads_share,
    interleaved,
    machine,
    machine_line,
    plain_step,
    ratios,
    set_threads,
    spread,
    step_optimizer,
    summary,
    table,
    train_pair,
    twin,
    write_json,
    write_text,
)

# the step part's clock: CPU time of this thread, all of torch's work at 1 thread (``_common.interleaved``)
CLOCK = time.thread_time


# -------------------------------------------------------------------- the steps


def before_step(net, x, y):
    """The trainer's step at commit 818ca72: per-tensor SGD, head-local AdaLoss on the CPU, and every
    step the losses copied to the host, checked for finiteness, summed and formatted for the bar."""
    from annify import weighting

    optimizer = step_optimizer(net, fused=False)
    scheme, local = weighting.get("adaloss", net.num_outputs), weighting.HeadLocal(net)
    loss_sum = torch.zeros(net.num_outputs, dtype=torch.float64)

    def step() -> None:
        nonlocal loss_sum
        local.set(scheme.weights)
        losses = annify.train.output_objectives(net, x, y)[0]  # (K,)
        mean = losses.detach().float().cpu()
        if not torch.isfinite(mean).all():
            raise FloatingPointError("loss is not finite")
        total = local.objective(losses, scheme.weights.to(losses.device))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheme.update(losses.detach().cpu())
        loss_sum += mean.double()
        "loss " + "|".join(f"{v:.2f}" for v in mean.tolist())

    return step


def trunk_step(net, x, y):
    """Diagnostic: the converted network's segments without any head, cross-entropy on the last output."""
    optimizer = step_optimizer(net)

    def step() -> None:
        state = (x,)
        for j in range(net.num_outputs):
            state, out = net.run_segment(j, state, head=False)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class _PoolLinear(torch.nn.Module):
    """Diagnostic head: the paper's head without its BN-ReLU (pool, then its own linear layer)."""

    def __init__(self, head) -> None:
        super().__init__()
        self.fc = head.fc

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _unfused(step):
    """``step`` with the paper heads' fused training path off (BatchNorm, ReLU, mean as autograd's chain)."""

    def run() -> None:
        with heads.unfused():
            step()

    return run


def _pool_linear_heads(net):
    for j, head in enumerate(net.exits):
        net.exits[j] = _PoolLinear(head)
    return net


# -------------------------------------------------------------------- the CPU parts


def step_part(
    name: str, repeats: int, before: bool, diagnose: bool, compile: bool = False
) -> tuple[str, dict]:
    from annify import weighting

    plain, net, spec, batch, size, classes = train_pair(name, "cpu")
    k = net.num_outputs
    x = torch.randn(batch, *size)
    y = torch.randint(0, classes, (batch,))
    if compile:  # every model's forward through torch.compile (inductor), as `annify train --compile` does
        torch._dynamo.reset()
        nets = {n: twin(net) for n in ("annify", "const")}
        fns = {
            "plain": plain_step(plain, x, y, compiled=torch.compile(plain)),
            "annify": annify_step(nets["annify"], weighting.get("adaloss", k), x, y,
                                  model=torch.compile(nets["annify"])),
            "const": annify_step(nets["const"], weighting.get("const", k), x, y, head_local=False,
                                 model=torch.compile(nets["const"])),
        }  # fmt: skip
        fns["eager"] = annify_step(twin(net), weighting.get("adaloss", k), x, y)  # what compiling buys
        started = time.perf_counter()
        for fn in fns.values():  # compile outside the rounds (the warm-up would, at the cost of its clock)
            fn()
        print(f"{name}: compiled three steps in {time.perf_counter() - started:.0f} s", flush=True)
    else:
        fns = {
            "plain": plain_step(plain, x, y),
            "annify": annify_step(twin(net), weighting.get("adaloss", k), x, y),  # every variant built alike
            "const": annify_step(twin(net), weighting.get("const", k), x, y, head_local=False),
        }
    if before:
        fns["before"] = before_step(twin(net), x, y)
    if diagnose:
        fns["trunk"] = trunk_step(twin(net), x, y)
        fns["pool_linear"] = annify_step(_pool_linear_heads(twin(net)), weighting.get("adaloss", k), x, y)
        fns["unfused"] = _unfused(annify_step(twin(net), weighting.get("adaloss", k), x, y))
    print(f"{name}: {spec.model}, {k} outputs, batch {batch}, {repeats} rounds of {list(fns)}", flush=True)
    wall: dict[str, list[float]] = {n: [] for n in fns}

    def timed(n, fn):  # the wall time of each call as well, for the record
        def run():
            t0 = time.perf_counter()
            fn()
            wall[n].append(time.perf_counter() - t0)

        return run

    t = interleaved({n: timed(n, fn) for n, fn in fns.items()}, repeats, warmup=2, clock=CLOCK)
    wall = {n: v[-repeats:] for n, v in wall.items()}
    pairs = [("annify", "plain"), ("const", "plain"), ("annify", "const")]
    pairs += [("before", "plain"), ("annify", "before")] if before else []
    pairs += [("annify", "eager")] if compile else []
    pairs += (
        [("trunk", "plain"), ("pool_linear", "plain"), ("unfused", "plain"), ("annify", "unfused")]
        if diagnose
        else []
    )
    ratio = {f"{a}/{b}": summary(ratios(t[a], t[b])) for a, b in pairs}
    med = {n: statistics.median(v) for n, v in t.items()}
    share = heads_share(spec)[2]
    goal = 1 + share + 0.05
    met = ratio["annify/plain"]["median"] <= goal
    what = f"{spec.model} {'×'.join(map(str, size))}, batch {batch}, {k} outputs"
    if compile:
        what += ", every model compiled (torch.compile, inductor; compile time outside the rounds)"
    labels = {
        "annify/plain": "converted, the trainer's step (head-local AdaLoss) / plain timm",
        "const/plain": "converted, CONST without head-local scaling / plain timm",
        "annify/const": "head-local AdaLoss / CONST (both converted)",
        "before/plain": "the step before (818ca72) / plain timm",
        "annify/before": "the step now / the step before (818ca72)",
        "trunk/plain": "diagnostic: the converted trunk alone (segments, no heads) / plain timm",
        "pool_linear/plain": "diagnostic: the trainer's step with each head's BN-ReLU left out / plain timm",
        "unfused/plain": "diagnostic: the trainer's step with the heads' BN-ReLU-pool unfused (autograd's chain) / plain timm",
        "annify/unfused": "the fused head's step / the same step unfused",
        "annify/eager": "the trainer's step compiled / the same step eager (what `--compile` buys)",
    }
    wall_ratio = {f"{a}/{b}": summary(ratios(wall[a], wall[b])) for a, b in pairs}
    rows = [
        [
            labels[key], f"{med[key.split('/')[0]] * 1e3:.0f}", f"**{r['median']:.3f}**", spread(r),
            f"{wall_ratio[key]['median']:.3f} (IQR {wall_ratio[key]['iqr'][0]:.3f}–{wall_ratio[key]['iqr'][1]:.3f})",
        ]
        for key, r in ratio.items()
    ]  # fmt: skip
    rows.append(["plain timm step", f"{med['plain'] * 1e3:.0f}", "1", "", ""])
    md = (
        f"{what}; {repeats} rounds, timed by {'CPU time of the one torch thread' if CLOCK is time.thread_time else 'wall time'} "
        f"(wall-time ratios in the last column). Heads' FLOP share {share * 100:.2f} %, so the goal is annify / plain "
        f"≤ {goal:.3f}: **{'met' if met else 'not met'}** (median {ratio['annify/plain']['median']:.3f}).\n\n"
    )
    md += table(
        [
            "comparison",
            "median step, CPU ms",
            "median ratio",
            "spread of per-round ratios",
            "wall-time ratio",
        ],
        rows,
    )
    if before:
        sps = {n: 1 / med[n] for n in ("before", "annify")}
        md += (
            f"\n\nSteps/s: before {sps['before']:.3f}, now {sps['annify']:.3f} (medians; the ratio above is "
            "the per-round one)."
        )
    raw = {
        "model": spec.model, "outputs": k, "batch": batch, "input_size": list(size), "repeats": repeats,
        "heads_flop_share": share, "goal": goal, "met": met, "median_s": med, "ratios": ratio, "times_s": t,
        "clock": CLOCK.__name__, "wall_ratios": wall_ratio, "wall_s": wall, "compiled": compile,
    }  # fmt: skip
    return md, raw


def optimizer_part(name: str, repeats: int) -> tuple[str, dict]:
    """``optimizer.step()`` alone on the converted network: per-tensor loop against torch's fused kernel."""
    _, net, spec, *_ = train_pair(name, "cpu")
    gen = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opts = {"loop": step_optimizer(net, fused=False), "fused": step_optimizer(net)}
    for o in opts.values():  # lr 0 would skip nothing; a tiny lr keeps the weights near where they were
        for g in o.param_groups:
            g["lr"] = 1e-9
    t = interleaved({n: o.step for n, o in opts.items()}, repeats, warmup=3, clock=CLOCK)
    r = summary(ratios(t["fused"], t["loop"]))
    tensors = sum(1 for _ in net.parameters())
    md = (
        f"{spec.model}, {net.num_outputs} outputs ({tensors} parameter tensors), `optimizer.step()` of SGD "
        f"(momentum 0.9, wd 1e-4), {repeats} rounds, {CLOCK.__name__}: loop {statistics.median(t['loop']) * 1e3:.1f} ms, fused "
        f"{statistics.median(t['fused']) * 1e3:.1f} ms; fused / loop **{r['median']:.3f}** ({spread(r)})."
    )
    return md, {"model": spec.model, "tensors": tensors, "ratio_fused_over_loop": r, "times_s": t}


def profile_part(name: str, steps: int = 6, top: int = 14) -> tuple[str, dict]:
    """Self CPU time per operator over ``steps`` steps of plain and of annify, by the converted step's surplus."""
    from torch.profiler import ProfilerActivity, profile

    from annify import weighting

    plain, net, spec, batch, size, classes = train_pair(name, "cpu")
    x = torch.randn(batch, *size)
    y = torch.randint(0, classes, (batch,))
    fns = {
        "plain": plain_step(plain, x, y),
        "annify": annify_step(net, weighting.get("adaloss", net.num_outputs), x, y),
    }
    per_op: dict[str, dict] = {n: {} for n in fns}
    for fn in fns.values():
        fn()  # warm up
    for r in range(steps):  # interleaved, one profiled step at a time, the order alternating
        for n in list(fns)[:: 1 if r % 2 == 0 else -1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fns[n]()
            for e in prof.key_averages():
                calls, ms = per_op[n].get(e.key, (0.0, 0.0))
                per_op[n][e.key] = (calls + e.count / steps, ms + e.self_cpu_time_total / steps / 1e3)
    total = {n: sum(ms for _, ms in ops.values()) for n, ops in per_op.items()}
    names = set(per_op["plain"]) | set(per_op["annify"])
    zero = (0.0, 0.0)
    surplus = {o: per_op["annify"].get(o, zero)[1] - per_op["plain"].get(o, zero)[1] for o in names}
    rows = []
    for o in sorted(names, key=lambda o: -surplus[o])[:top]:
        a, b = per_op["plain"].get(o, zero), per_op["annify"].get(o, zero)
        share = surplus[o] / total["plain"] * 100
        rows.append(
            [
                f"`{o}`",
                f"{a[0]:.0f}",
                f"{b[0]:.0f}",
                f"{a[1]:.1f}",
                f"{b[1]:.1f}",
                f"{surplus[o]:+.1f}",
                f"{share:+.1f} %",
            ]
        )
    md = (
        f"{spec.model}, batch {batch}, {net.num_outputs} outputs; `torch.profiler`, self CPU time per step "
        f"(mean of {steps}): plain {total['plain']:.0f} ms, annify {total['annify']:.0f} ms "
        f"(+{(total['annify'] / total['plain'] - 1) * 100:.1f} %, profiler on; steps interleaved). "
        "Operators by the converted step's surplus:\n\n"
    )
    md += table(
        ["operator", "calls plain", "calls annify", "ms plain", "ms annify", "surplus ms", "of plain"], rows
    )
    return md, {"model": spec.model, "totals_ms": total, "per_op": per_op}


# -------------------------------------------------------------------- (c) on a GPU


def gpu_part(batch: int, steps: int, repeats: int) -> tuple[str, dict]:
    """Images/s on CUDA (not run in the session that wrote this: no GPU was lent, so untested)."""
    from annify import weighting

    dev = torch.device("cuda")
    plain, net, spec, _, size, classes = train_pair("resnet50", "cuda")
    plain.to(memory_format=torch.channels_last)
    net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, *size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=dev)
    one = {
        "plain": plain_step(plain, x, y, amp=True),
        "adaloss": annify_step(net, weighting.get("adaloss", net.num_outputs), x, y, amp=True),
    }

    def block(fn):
        def run() -> None:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()

        return run

    print(
        f"gpu: resnet50, {net.num_outputs} outputs, batch {batch}, {repeats} rounds of {steps} steps",
        flush=True,
    )
    t = interleaved({k: block(f) for k, f in one.items()}, repeats, warmup=2)
    ips = {k: [batch * steps / s for s in v] for k, v in t.items()}
    ratio = summary(ratios(ips["adaloss"], ips["plain"]))
    raw = {
        "gpu": torch.cuda.get_device_name(),
        "batch": batch,
        "steps_per_round": steps,
        "repeats": repeats,
        "images_per_s_median": {k: statistics.median(v) for k, v in ips.items()},
        "throughput_ratio_adaloss_over_plain": ratio,
        "times_s": t,
    }
    rows = [
        ["plain timm resnet50", f"{raw['images_per_s_median']['plain']:.0f}", "1", ""],
        [
            f"converted ({net.num_outputs} outputs) + AdaLoss",
            f"{raw['images_per_s_median']['adaloss']:.0f}",
            f"**{ratio['median']:.3f}**",
            spread(ratio),
        ],
    ]
    md = f"GPU: {raw['gpu']}, bf16 autocast, channels-last, batch {batch}, {steps} steps per timed block.\n\n"
    md += table(["what", "images/s (median)", "throughput ratio to plain", "spread"], rows)
    return md, raw


# -------------------------------------------------------------------- train.md


def _write_section(path: Path, name: str, body: str, title: str) -> None:
    """Replace the section ``name`` of train.md (between markers), keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.is_file() else f"# {title}\n\n"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip() + "\n\n" + block
    write_text(path, text)


GPU_NOT_MEASURED = (
    "## (c) GPU: resnet50 at 224, bf16, converted + AdaLoss vs plain (images/s)\n\n"
    "Not measured: this session has no GPU (torch.cuda.is_available() is False). "
    "Run `python -m benchmarks.bench_train --device cuda` on a CUDA machine to fill this section.\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="cifar,resnet50", help="CPU part: comma list of cifar, resnet50")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU part)")
    ap.add_argument("--parts", default="step,optimizer,profile", help="CPU parts: step, optimizer, profile")
    ap.add_argument("--before", action="store_true", help="step part: also time the step of commit 818ca72")
    ap.add_argument(
        "--diagnose", action="store_true", help="step part: also the trunk alone and heads without BN-ReLU"
    )
    ap.add_argument(
        "--compile", action="store_true", help="step part: every model's forward through torch.compile"
    )
    ap.add_argument("--gpu-batch", type=int, default=128)
    ap.add_argument("--gpu-steps", type=int, default=10, help="steps per timed block on the GPU")
    ap.add_argument("--results", default=str(RESULTS))
    common.cpu_memory_option(ap)
    args = ap.parse_args()
    path = Path(args.results) / "train.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = command()
    title = "Training step: anytime network with AdaLoss vs the plain timm model"

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(
                "CUDA is not available (torch.cuda.is_available() is False): the GPU part (resnet50 at 224, "
                "bf16 images/s) was not measured. Run this on a machine with a CUDA device."
            )
            if not path.is_file() or "<!-- begin gpu -->" not in path.read_text():
                _write_section(path, "gpu", GPU_NOT_MEASURED, title)
            return
        started = time.perf_counter()
        md, _ = gpu_part(args.gpu_batch, args.gpu_steps, args.repeats)
        body = (
            "## (c) GPU: resnet50 at 224, bf16, converted + AdaLoss vs plain (images/s)\n\n"
            f"Command: `{cmd}`\n\n{machine_line()}\n\nTook {time.perf_counter() - started:.0f} s.\n\n{md}\n"
        )
        _write_section(path, "gpu", body, title)
        print(body)
        return

    threads = set_threads(args.threads)
    memory = common.set_cpu_memory(args.cpu_memory)
    if threads > 1:  # other threads' work is not this thread's CPU time
        global CLOCK
        CLOCK = time.perf_counter
    parts = [p for p in args.parts.split(",") if p]
    if args.compile and (args.before or args.diagnose or parts != ["step"]):
        raise SystemExit(
            "--compile times the step part alone: use --parts step without --before or --diagnose"
        )
    raw_path = path.with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    for part in parts:
        for name in [m for m in args.models.split(",") if m]:
            info = machine()
            print(machine_line(info), flush=True)
            started = time.perf_counter()
            if part == "step":
                md, data = step_part(name, args.repeats, args.before, args.diagnose, args.compile)
            elif part == "optimizer":
                md, data = optimizer_part(name, max(args.repeats, 20))
            elif part == "profile":
                md, data = profile_part(name)
            else:
                raise SystemExit(f"unknown part {part!r}: step, optimizer, profile")
            body = (
                f"### {part}: {name}\n\nCommand: `{cmd}`\n\n{machine_line(info)}; load average after "
                f"{machine()['load_average_1_5_15']}; torch threads {threads}, fp32, {memory}, took "
                f"{time.perf_counter() - started:.0f} s.\n\n{md}\n"
            )
            key = f"{part}-compiled-{name}" if args.compile else f"{part}-{name}"
            _write_section(path, key, body, title)
            raw[key] = {**data, "command": cmd, "machine": info, "cpu_memory": memory}
            write_json(raw_path, raw)
            print(body, flush=True)
    if "<!-- begin gpu -->" not in path.read_text():
        _write_section(path, "gpu", GPU_NOT_MEASURED, title)


if __name__ == "__main__":
    main()
