"""Training-step cost: an anytime network trained with AdaLoss against the plain timm model.

One training step is what ``annify.train.train`` does per batch: forward (every output), the K
per-output cross-entropies, the finiteness check on their detached values (a copy to the CPU), the
weighted sum, ``zero_grad``, backward, SGD step (timm's optimizer, momentum 0.9, wd 1e-4) and the
weight scheme's update. The plain step is the usual one: forward, cross-entropy of the single
output, ``zero_grad``, backward, SGD step. Both start from the same trunk weights and see the same
batch every repeat (lr 0.01, so repeating one batch neither diverges nor changes the arithmetic).

Parts:

cpu: (a) converted network with AdaLoss vs the plain timm model, (b) AdaLoss vs CONST on the
    converted network, on a CIFAR ResNet at 3×32×32 (heads after every unit, as in the paper) and
    on resnet50 at 224 (``--every 2``: the paper's 8 outputs). The three steps run round-robin in
    the same rounds (``benchmarks/_timing.interleaved``); ratios are taken within each round, and
    the table gives their median and spread.
gpu: (c) ``--device cuda``: images/s of resnet50 at 224, bf16 autocast and channels-last (what
    ``train()`` uses on CUDA), converted + AdaLoss vs plain, alternating blocks of steps. Where
    torch sees no CUDA device the script says so and exits 0.

Usage::

    PYTHONPATH=. python benchmarks/bench_train.py                      # CPU parts, 1 thread
    PYTHONPATH=. python benchmarks/bench_train.py --device cuda        # GPU part
    PYTHONPATH=. python benchmarks/bench_train.py --models cifar --repeats 40 --threads 2

Results go to ``benchmarks/results/train.md``; each part rewrites only its own section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._timing import _quantile, interleaved, machine, machine_line, set_threads, table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {  # name: (timm model, placement, input size, classes, batch)
    "cifar": ("cifar_resnet_n7_c16", 1, (3, 32, 32), 10, 64),
    "resnet50": ("resnet50", 2, (3, 224, 224), 1000, 8),
}


# -------------------------------------------------------------------- the steps


def _optimizer(model):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9, nesterov=False)


def annify_step(net, scheme, x, y, amp: bool = False):
    """One step exactly as ``annify.train.train`` takes it (single process), returning nothing."""
    from annify.train import _EpochLosses, output_losses, weighted_update

    optimizer = _optimizer(net)
    trunk = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith(net.exits_prefix)]
    scheme.to(x.device)
    watch, steps = _EpochLosses(net.num_outputs, x.device), [0]

    def step() -> None:
        losses = output_losses(net, x, y, amp)  # (K,)
        weighted_update(losses, scheme, optimizer, trunk)
        steps[0] += 1
        watch.add(losses, steps[0])
        if watch.due(steps[0]):  # the trainer's rate-limited look at the losses (finiteness, progress)
            watch.read(steps[0])

    return step


def plain_step(model, x, y, amp: bool = False):
    """The plain timm model's step: cross-entropy on its one output."""
    optimizer = _optimizer(model)
    dev = x.device

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)  # (B, classes)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _pair(name: str, device: str):
    """(plain timm model, converted network with the same trunk weights, spec, batch, input size)."""
    from annify.convert import convert, create_model

    model, every, size, classes, batch = MODELS[name]
    torch.manual_seed(0)
    net, spec, _ = convert(model, every=every, input_size=size, num_classes=classes)
    plain = create_model(model, num_classes=classes)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(net.exits_prefix) for k in missing), (missing, unexpected)
    return plain.to(device).train(), net.to(device).train(), spec, batch, size, classes


def _stats(r: list[float]) -> dict:
    return {
        "median": statistics.median(r),
        "iqr": [_quantile(r, 0.25), _quantile(r, 0.75)],
        "min_max": [min(r), max(r)],
    }


def _spread(s: dict) -> str:
    return f"IQR {s['iqr'][0]:.3f}–{s['iqr'][1]:.3f}, min–max {s['min_max'][0]:.3f}–{s['min_max'][1]:.3f}"


# -------------------------------------------------------------------- (a) and (b) on the CPU


def cpu_part(names: list[str], repeats: int, extra_schemes: list[str]) -> tuple[str, dict]:
    from annify import weighting

    rows, raw = [], {}
    for name in names:
        plain, net, spec, batch, size, classes = _pair(name, "cpu")
        k = net.num_outputs
        x = torch.randn(batch, *size)
        y = torch.randint(0, classes, (batch,))
        fns = {
            "plain": plain_step(plain, x, y),
            "adaloss": annify_step(net, weighting.get("adaloss", k), x, y),
            "const": annify_step(net, weighting.get("const", k), x, y),
        }
        for s in extra_schemes:
            fns[s] = annify_step(net, weighting.get(s, k), x, y)
        print(
            f"{name}: {spec.model}, {k} outputs, batch {batch}, {repeats} rounds of {list(fns)}", flush=True
        )
        t = interleaved(fns, repeats, warmup=3)
        ratio = {
            f"{a}/{b}": _stats([p / q for p, q in zip(t[a], t[b], strict=True)])
            for a, b in [("adaloss", "plain"), ("adaloss", "const"), ("const", "plain")]
            + [(s, "adaloss") for s in extra_schemes]
        }
        med = {n: statistics.median(v) for n, v in t.items()}
        raw[name] = {
            "model": spec.model,
            "outputs": k,
            "batch": batch,
            "input_size": list(size),
            "repeats": repeats,
            "median_s": med,
            "ratios": ratio,
            "times_s": t,
        }
        what = f"{spec.model} {'×'.join(map(str, size))}, batch {batch}, {k} outputs"
        for key, label in [
            ("adaloss/plain", "(a) converted + AdaLoss / plain timm"),
            ("adaloss/const", "(b) AdaLoss / CONST (converted)"),
            ("const/plain", "converted + CONST / plain timm"),
            *[(f"{s}/adaloss", f"{s} / AdaLoss (converted)") for s in extra_schemes],
        ]:
            num = key.split("/")[0]
            rows.append(
                [
                    what,
                    label,
                    f"{med[num] * 1e3:.1f}",
                    f"{batch / med[num]:.1f}",
                    f"**{ratio[key]['median']:.3f}**",
                    _spread(ratio[key]),
                ]
            )
        rows.append(
            [what, "plain timm step", f"{med['plain'] * 1e3:.1f}", f"{batch / med['plain']:.1f}", "1", ""]
        )
        del plain, net, fns
    md = table(
        ["model", "comparison", "median step (ms)", "images/s", "median ratio", "spread of per-round ratios"],
        rows,
    )
    return md, raw


# -------------------------------------------------------------------- (c) on a GPU


def gpu_part(batch: int, steps: int, repeats: int) -> tuple[str, dict]:
    from annify import weighting

    dev = torch.device("cuda")
    plain, net, spec, _, size, classes = _pair("resnet50", "cuda")
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
    ratio = _stats([a / p for a, p in zip(ips["adaloss"], ips["plain"], strict=True)])
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
            _spread(ratio),
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
    path.write_text(text)


GPU_NOT_MEASURED = (
    "## (c) GPU: resnet50 at 224, bf16, converted + AdaLoss vs plain (images/s)\n\n"
    "Not measured: this session has no GPU (torch.cuda.is_available() is False). "
    "Run `PYTHONPATH=. python benchmarks/bench_train.py --device cuda` on a CUDA machine to fill this section.\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="cifar,resnet50", help="CPU part: comma list of cifar, resnet50")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU part)")
    ap.add_argument(
        "--extra-schemes", default="", help="also time these schemes, e.g. adaloss_grad (CPU part)"
    )
    ap.add_argument("--gpu-batch", type=int, default=128)
    ap.add_argument("--gpu-steps", type=int, default=10, help="steps per timed block on the GPU")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    path = Path(args.results) / "train.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
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
            f"Command: `{command}`\n\n{machine_line()}\n\nTook {time.perf_counter() - started:.0f} s.\n\n{md}\n"
        )
        _write_section(path, "gpu", body, title)
        print(body)
        return

    threads = set_threads(args.threads)
    info = machine()
    print(machine_line(info), flush=True)
    started = time.perf_counter()
    extra = [s for s in args.extra_schemes.split(",") if s]
    md, _ = cpu_part([m for m in args.models.split(",") if m], args.repeats, extra)
    after = machine()["load_average_1_5_15"]
    body = "\n".join(
        [
            "## (a) and (b) CPU: one training step",
            "",
            f"Command: `{command}`",
            "",
            machine_line(info) + f"; load average after the run {after}.",
            "",
            "The 2 cores are shared with other engineers' jobs (see the load averages), so absolute "
            f"times drift; the ratios are taken within each round and are the numbers to read. torch threads: "
            f"{threads}. fp32. Took {time.perf_counter() - started:.0f} s.",
            "",
            "Ratios are time ratios (above 1: slower than the denominator). Step = forward of every output, "
            "K cross-entropies, their finiteness check, weighted sum, backward, SGD step, scheme update "
            "(see the script's docstring); the plain step is the timm model with one cross-entropy.",
            "",
            md,
            "",
        ]
    )
    _write_section(path, "cpu", body, title)
    if "<!-- begin gpu -->" not in path.read_text():
        _write_section(path, "gpu", GPU_NOT_MEASURED, title)
    print(body)


if __name__ == "__main__":
    main()
