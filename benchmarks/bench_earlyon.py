"""annify against earlyon 0.3.0 (PyPI), the early-exit toolkit people use today.

earlyon wraps named submodules with forward hooks and hangs an MLP head (pool, 128 hidden, ReLU,
dropout, linear) on each; ``wrapper(x, mode="training")`` returns every exit's logits and the final
logits, which is the "compute every output" path compared here (in eval mode, under ``no_grad``).
Its routing path ``wrapper(x)`` works at batch size 1 only.

Parts (``--parts overhead,families``):

overhead: timm resnet50 with exits after every second bottleneck unit (annify's ``--every 2``
    nodes: layer1.1, layer2.0, layer2.2, layer3.0, layer3.2, layer3.4, layer4.0), plain model vs
    earlyon vs annify, timed round-robin in the same rounds; ratios to the plain model per round.
families: for the smallest model of every timm family (``benchmarks/sweeps/results/families.json``), wrap it
    with ``earlyon.models.custom.custom_ee`` at 3 block outputs (module paths of annify's
    ``tap_points``, evenly spaced by block index; timm's ``feature_info`` modules where annify cannot
    trace) and run the all-exits forward and a batch-1 routed inference.

Usage::

    python -m benchmarks.bench_earlyon
    python -m benchmarks.bench_earlyon --parts overhead --threads 1 --batch 4
    python -m benchmarks.bench_earlyon --parts overhead --compile   # all three compiled

Results are printed as Markdown and written to ``benchmarks/results/earlyon.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import annify
import benchmarks._common as common
from benchmarks._common import (
    RESULTS,
    command,
    default_input_size,
    heads_share,
    interleaved,
    machine,
    machine_line,
    model_pair,
    ratios,
    set_threads,
    spread,
    summary,
    table,
    write_json,
)
from benchmarks.sweeps._breadth import MAX_PARAMS, failure_reason, families, run_check
from benchmarks.sweeps._breadth import RESULTS as SWEEP_RESULTS


def _earlyon():
    """Import earlyon, or say exactly why it cannot be used."""
    try:
        import earlyon
        from earlyon.models.custom import custom_ee
    except Exception as e:
        raise SystemExit(
            f"earlyon is not usable: {type(e).__name__}: {e} (pip install earlyon==0.3.0)"
        ) from e
    return earlyon.__version__, custom_ee


def overhead(batch: int, repeats: int, threads: list[int], compile: bool = False) -> dict:
    _, custom_ee = _earlyon()
    plain, net = model_pair("resnet50", every=2)
    spec = net.spec
    share = heads_share(spec)[2]  # the heads' FLOPs over the plain model's
    target = 1 + share + 0.03
    nodes = [h.node for h in spec.heads[:-1]]  # 'layer1.1.act3', ...: the block's module is the prefix
    layers = [n.rsplit(".", 1)[0] for n in nodes]
    backbone = annify.plain_model(net)  # earlyon wraps its own copy
    wrapper = custom_ee(backbone, layers, num_classes=1000).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():  # same final output from all three, as a sanity check
        ref = plain(x)
        same = {
            "annify": torch.equal(net(x)[-1], ref),
            "earlyon": torch.equal(wrapper(x, mode="training")[-1], ref),
        }
    rows, out = (
        [],
        {"exit_layers": layers, "final_output_equal": same, "heads_share": share, "target": target},
    )
    out["compiled"] = compile
    verdicts = []
    for th in threads:
        set_threads(th)
        fns = {
            "plain": lambda: plain(x),
            "earlyon": lambda: wrapper(x, mode="training"),
            "annify": lambda: net(x),
        }
        if compile:  # all three through torch.compile (inductor), compiled anew for each thread count
            torch._dynamo.reset()
            eager, fns = fns, {k: torch.compile(f) for k, f in fns.items()}
            started = time.perf_counter()
            with torch.no_grad():
                for k, f in list(fns.items()):
                    try:
                        got = f()
                    except RuntimeError as e:  # earlyon 0.3.0 raises under torch.compile: it runs eager
                        if k != "earlyon":
                            raise
                        out["earlyon_compile_error"] = str(e).splitlines()[0]
                        print(f"earlyon cannot be compiled, so it runs eager: {out['earlyon_compile_error']}")
                        fns[k] = f = eager[k]
                        got = f()
                    torch.testing.assert_close(got if k == "plain" else got[-1], ref, rtol=1e-3, atol=1e-3)
            print(
                f"{th} thread(s): compiled the three forwards in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        with torch.no_grad():
            t = interleaved(fns, repeats, warmup=3)
        res = {
            "threads": th,
            "repeats": repeats,
            "median_s": {k: statistics.median(v) for k, v in t.items()},
            "earlyon/plain": summary(ratios(t["earlyon"], t["plain"])),
            "annify/plain": summary(ratios(t["annify"], t["plain"])),
            "annify/earlyon": summary(ratios(t["annify"], t["earlyon"])),
            "times_s": t,
        }
        out[f"threads={th}"] = res
        for label, key in (
            ("earlyon", "earlyon/plain"),
            ("annify", "annify/plain"),
            ("annify / earlyon", "annify/earlyon"),
        ):
            s = res[key]
            num = {"earlyon": "earlyon", "annify": "annify", "annify / earlyon": "annify"}[label]
            rows.append(
                [
                    th,
                    label,
                    f"{res['median_s'][num] * 1e3:.0f}",
                    f"**{s['median']:.3f}**",
                    spread(s),
                    repeats,
                ]
            )
        rows.append([th, "plain timm resnet50", f"{res['median_s']['plain'] * 1e3:.0f}", "1", "", repeats])
        a_p, a_e = res["annify/plain"]["median"], res["annify/earlyon"]["median"]
        res["meets_target"], res["not_slower_than_earlyon"] = a_p <= target, a_e <= 1
        verdicts.append(
            f"- {th} thread(s): annify / plain {a_p:.3f} against the target {target:.3f} "
            f"(1 + heads' FLOP share {share * 100:.2f}% + 3%): {'met' if a_p <= target else '**not met**'}; "
            f"annify / earlyon {a_e:.3f} (goal <= 1): {'met' if a_e <= 1 else '**not met**'}"
        )
    how = ""
    if compile:
        how = ", plain and annify compiled (torch.compile, inductor), earlyon "
        how += "eager (it refuses torch.compile)" if "earlyon_compile_error" in out else "compiled"
    print(f"\n### Every exit vs plain timm resnet50, 7 exits + final (batch {batch}, eval, `no_grad`{how})\n")
    print(table(["threads", "what", "median time (ms)", "median ratio", "spread", "repeats"], rows))
    print(f"\nExit layers: {', '.join(layers)}; final output torch.equal to plain: {same}")
    print("\n" + "\n".join(verdicts))
    return out


def _exit_layers(name: str) -> tuple[list[str], list[int], list[str], str]:
    """3 block module paths at about 1/4, 1/2, 3/4 of the blocks, with channel counts and layouts.

    The blocks are annify's tap points (module paths), or timm's ``feature_info`` stages where annify
    finds fewer than 4.
    """
    model = annify.create_model(name).eval()
    try:
        taps = annify.tap_points(annify.trace(model, default_input_size(model), train_graph=False))
        blocks = [(t.module, t.channels, t.layout) for t in taps]
        source = "annify tap_points"
    except Exception:
        blocks = []
    if len(blocks) < 4:
        info = getattr(model, "feature_info", [])
        blocks = [(f["module"], f["num_chs"], f.get("fmt", "NCHW?")) for f in info if f.get("module")]
        source = "timm feature_info"
    n = len(blocks)
    picked = list(dict.fromkeys(blocks[max(round(n * k / 4) - 1, 0)] for k in (1, 2, 3)))
    return [b[0] for b in picked], [b[1] for b in picked], [b[2] for b in picked], source


def check_earlyon(name: str) -> dict:
    """Wrap ``name`` with 3 earlyon exits; run every exit (eval, batch 1) and a batch-1 routed inference."""
    _, custom_ee = _earlyon()
    layers, channels, layouts, source = _exit_layers(name)
    torch.manual_seed(0)
    model = annify.create_model(name).eval()
    size = default_input_size(model)
    x = torch.randn(1, *size)
    with torch.no_grad():
        ref = model(x)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    out = {"exit_layers": layers, "channels": channels, "layouts": layouts, "source": source}
    stage = "custom_ee"
    try:
        wrapper = custom_ee(model, layers, num_classes=ref.shape[-1], input_shape=(1, *size)).eval()
        # earlyon reads a 4-D feature as NCHW: on a channels-last block output (swin, convnext
        # internals) its head pools over the wrong axes and its width is H, not C
        # (annify's DenseNet taps are the concatenation after the layer, so there the tap's channel
        # count is not the hooked module's: judge by layout where annify found the block)
        widths = [ep.in_channels for ep in wrapper.config.exit_points]
        out["head_widths"] = widths
        if source == "annify tap_points":
            out["widths_match_channels"] = "NHWC" not in layouts
        else:
            out["widths_match_channels"] = widths == channels
        stage = "all-exits forward"
        with torch.no_grad():
            outs = wrapper(x, mode="training")
        final = outs[-1][0] if isinstance(outs[-1], (tuple, list)) else outs[-1]
        out["outputs"] = len(outs)
        out["equal"] = bool(torch.equal(final, ref))
        out["max_abs_diff"] = None if out["equal"] else float((final - ref).abs().max())
        out["heads_shape_ok"] = all(tuple(o.shape) == tuple(ref.shape) for o in outs[:-1])
        stage = "routed inference"
        result = wrapper(x)  # batch-1 routing; also materialises earlyon's FLOP estimate
        out["routed_exit"] = int(result.exit_taken)
        out["flops_estimate_reliable"] = bool(wrapper.flops_estimate.reliable)
    except Exception as e:
        raise RuntimeError(f"{stage} ({', '.join(layers)}): {failure_reason(e)}") from None
    return out


def family_coverage(timeout: int, only: set[str]) -> dict:
    version, _ = _earlyon()
    breadth_path = SWEEP_RESULTS / "breadth.json"  # bench_breadth's
    annify_rows = {}
    if breadth_path.is_file():
        annify_rows = {r["module"]: r for r in json.loads(breadth_path.read_text())["rows"]}
    rows, out = [], {}
    for fam in families():
        if only and fam["module"] not in only:
            continue
        if fam["model"] is None or fam["params"] > MAX_PARAMS:
            continue
        res = run_check(check_earlyon, fam["model"], timeout)
        out[fam["module"]] = {"model": fam["model"], **res}
        a = annify_rows.get(fam["module"], {}).get("annify", {})
        rows.append(
            [
                fam["module"],
                f"`{fam['model']}`",
                "ok" if res["ok"] else "fail",
                {True: "yes", False: "**no**"}.get(res.get("widths_match_channels"), "-"),
                "ok" if a.get("ok") else ("fail" if a else "-"),
                (res.get("reason") or "").replace("|", "\\|"),
            ]
        )
        print(
            f"{fam['module']:<28} {fam['model']:<40} {'ok' if res['ok'] else 'FAIL'} {res.get('reason', '')}",
            flush=True,
        )
    n_ok = sum(r["ok"] for r in out.values())
    n_width = sum(bool(r.get("widths_match_channels")) for r in out.values())
    print(f"\n### Families: earlyon {version} attaches 3 exits and runs: {n_ok}/{len(out)}", end="")
    print(f" (heads sized to the block's channel count: {n_width}/{len(out)})\n")
    print(
        table(["family", "model", "earlyon runs", "head width = channels", "annify", "earlyon failure"], rows)
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="overhead,families")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated families for the coverage part")
    ap.add_argument(
        "--compile", action="store_true", help="overhead part: all three forwards through torch.compile"
    )
    common.cpu_memory_option(ap)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    version, _ = _earlyon()
    parts = set(args.parts.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    path = RESULTS / "earlyon.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update({"earlyon": version})
    set_threads(max(threads))
    memory = common.set_cpu_memory(args.cpu_memory)
    print(machine_line(), f"earlyon {version}", memory)
    if "overhead" in parts:
        result["overhead (compiled)" if args.compile else "overhead"] = {
            "command": command(),
            "machine": machine(),
            "batch": args.batch,
            "cpu_memory": memory,
            "results": overhead(args.batch, args.repeats, threads, args.compile),
        }
    if "families" in parts:
        fam = family_coverage(args.timeout, set(filter(None, args.only.split(","))))
        result["families"] = {
            "command": command(),
            "machine": machine(),
            "results": fam,
        }
    write_json(path, result)


if __name__ == "__main__":
    main()
