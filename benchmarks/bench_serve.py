"""Load test of `annify serve` on loopback: anytime serving against full-network serving and a fixed exit.

One server process per policy (`annify serve RUN/config.yaml --checkpoint RUN --policy P`, bound to
127.0.0.1), driven by this process with aiohttp, every body encoded once up front (the client shares the
machine's cores with the server: it costs ~0.9 ms of CPU a request, httpx building multipart bodies
~3 ms, BENCHMARKS §20b):

1. capacity: the full network's throughput (images/s) with ``--clients`` closed-loop clients sending one
   request each, back to back, for ``--capacity-s`` seconds (policy ``full``);
2. for each load in ``--loads`` (multiples of that capacity) and each policy, open-loop Poisson
   arrivals for ``--duration`` seconds (at most ``--max-requests`` requests): one digit of the test
   split per request, a deadline drawn uniformly from ``--deadline-ms`` sent as X-Deadline-Ms.

Each request carries ``--images`` digits (default 8), as one ``application/x-npy`` array of their
pixels or, with ``--body multipart``, as PNG files: on a small network one image's
compute is shorter than an HTTP round trip through Python on both ends, which would then be all
that is measured. Capacity, load and goodput are counted in images.

Policies: ``full`` (every image runs the whole network; the deadline is only measured), ``exit:K``
(every image stops at output K: the earliest output whose validation error is within 1 point of the
last output's, from the run's anytime.json), ``anytime`` (each image stops at its deadline), and
``anytime+calibrated`` (also exits at the run's calibrated thresholds, ``annify calibrate``).

Per (policy, load): goodput (images answered within their deadline per second of the arrival window),
deadline misses (requests answered late, shed with 503, or unanswered, over all sent), accuracy of the
answers, p50/p99 latency of the answered requests (client side, counted from each arrival's
intended send time, so a client late to send counts against the deadline), the p99 of that send lag,
and the share of answers the server itself reports late (its clock, from the body's arrival). The targets (issue 21): at 1.5× load at least
2× the full network's goodput with at most 1 % deadline misses; accuracy within 1 point of the full
network's at 0.5× load.

Without ``--run`` a run is trained first (``--train-spec`` on digits for ``--epochs``) and calibrated
(``annify calibrate``, consistency ≤ 0.02 with δ = 0.1), into ``--workdir``.

Usage::

    python -m benchmarks.bench_serve                   # trains, calibrates, ~6 min of load
    python -m benchmarks.bench_serve --run runs/x --duration 8 --loads 0.5,1,1.5,2

Results: Markdown on stdout, ``benchmarks/results/serve.json`` and ``serve.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks._common import (
    RESULTS,
    RunDir,
    build_datasets,
    figure,
    machine,
    machine_line,
    save_figure,
    table,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent


def annify(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "annify", *args], env=env, **kwargs)


def prepare_run(args) -> Path:
    run = Path(args.run or Path(args.workdir) / "run")
    if not RunDir(run).config.is_file():
        print(f"training {args.train_spec} on digits for {args.epochs} epochs into {run}", flush=True)
        train = [
            "train",
            args.train_spec,
            "--data",
            "digits",
            "--epochs",
            str(args.epochs),
            "--out",
            str(run),
        ]
        assert annify(*train, stdout=subprocess.DEVNULL).wait() == 0
    if not RunDir(run).thresholds.is_file():
        assert annify("calibrate", str(run), "--epsilon", "0.02", "--delta", "0.1").wait() == 0
    return run


def test_images(n: int) -> list[tuple[bytes, int, np.ndarray]]:
    """(PNG bytes, label, the 8-bit grey pixels the PNG decodes to) of the first n digits of the test split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    test = build_datasets("digits", input_size=(1, 8, 8), augment=False)["test"]
    digits = load_digits()
    # the test split's raw images: the same split build_datasets makes, read back unnormalised
    mean, std = np.asarray(test.mean).reshape(-1), np.asarray(test.std).reshape(-1)
    out = []
    for i in range(min(n, len(test))):
        x, y = test[i]
        raw = ((x[0].numpy() * std[0] + mean[0]) * 255).clip(0, 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(raw, mode="L").save(buf, format="PNG")
        out.append((buf.getvalue(), int(y), raw))
    assert digits.images.shape[1:] == (8, 8)
    return out


class ServerProcess:
    def __init__(self, run: Path, policy: str, max_queue: int, guard_ms: float = 5.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        early = ["--early-exit"] if policy == "anytime+calibrated" else []
        self.proc = annify(
            "serve", str(RunDir(run).config), "--checkpoint", str(run), "--port", str(self.port),
            "--policy", policy.split("+")[0], "--max-queue", str(max_queue), "--guard-ms", str(guard_ms), *early, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server for {policy} did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


BOUNDARY = "annify-bench-serve"


def bodies(images, n: int, kind: str) -> list[tuple[bytes, str]]:
    """Per first image i, the body of a request of images i..i+n-1 and its Content-Type, encoded once
    up front (the client's own work per request is then only sending it): ``multipart`` (n PNG files)
    or ``npy`` (one uint8 n×8×8 array of the pixels those PNGs decode to)."""
    out = []
    for first in range(len(images)):
        batch = [images[(first + k) % len(images)] for k in range(n)]
        if kind == "npy":
            buf = io.BytesIO()
            np.save(buf, np.stack([raw for _, _, raw in batch]))
            out.append((buf.getvalue(), "application/x-npy"))
        else:
            parts = [
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{k}.png"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + png
                + b"\r\n"
                for k, (png, _, _) in enumerate(batch)
            ]
            out.append(
                (
                    b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(),
                    f"multipart/form-data; boundary={BOUNDARY}",
                )
            )
    return out


def session(connections: int):
    """An aiohttp client session (its per-request cost is a fraction of httpx's, which matters on a
    machine the client shares with the server)."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=30)
    )


async def post(
    http, url: str, body: tuple[bytes, str], headers: dict | None = None
) -> tuple[int, dict | None]:
    """(status, JSON body of a 200) of one POST /predict; status 0 where it failed or timed out."""
    import aiohttp

    try:
        async with http.post(
            f"{url}/predict", data=body[0], headers={"Content-Type": body[1], **(headers or {})}
        ) as r:
            return r.status, (await r.json() if r.status == 200 else None)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0, None


async def capacity(url: str, images, clients: int, seconds: float, per_request: int, kind: str) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    encoded = bodies(images, per_request, kind)

    async def client(c: int, http):
        nonlocal done
        i = c * per_request
        while time.perf_counter() < stop:
            status, _ = await post(http, url, encoded[i % len(encoded)])
            done += per_request * (status == 200)
            i += clients * per_request

    async with session(clients + 8) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        return done / (time.perf_counter() - start)


async def open_loop(
    url: str, images, rate: float, seconds: float, deadlines, max_requests: int, seed: int, per_request: int,
    kind: str,
) -> dict:  # fmt: skip
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while len(arrivals) < max_requests:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        arrivals.append((t, rng.uniform(*deadlines), rng.randrange(len(images))))
    encoded = bodies(images, per_request, kind)
    results = []
    gc.collect()
    gc.freeze()  # the client's long-lived objects (torch, the data) out of the collector's full passes

    async def one(http, at, deadline, i, start):
        due = start + at  # the arrival's time: latency counts from it, so a client late to send is late
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        lag = (time.perf_counter() - due) * 1000
        labels = [images[(i + k) % len(images)][1] for k in range(per_request)]
        status, body = await post(http, url, encoded[i], {"X-Deadline-Ms": f"{deadline:.3f}"})
        latency = (time.perf_counter() - due) * 1000
        results.append((status, latency, deadline, labels, body, lag))

    async with session(1024) as http:
        await post(http, url, encoded[0])  # not counted: the client's own first-call costs (imports)
        start = time.perf_counter() + 0.05
        await asyncio.gather(*(one(http, at, d, i, start) for at, d, i in arrivals))
    answered = [r for r in results if r[0] == 200]
    good = [r for r in answered if r[1] <= r[2]]
    lat = sorted(r[1] for r in answered)
    lags = sorted(r[5] for r in results)
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    exits = [p["exit"] for r in answered for p in r[4]["predictions"]]
    right = [p["class"] == y for r in answered for p, y in zip(r[4]["predictions"], r[3], strict=True)]
    return {
        "sent": len(results),
        "answered": len(answered),
        "shed": sum(r[0] == 503 for r in results),
        "goodput": len(good) * per_request / seconds,
        "misses": 1 - len(good) / max(1, len(results)),
        "accuracy": statistics.fmean(right) if right else None,
        "server_late": sum(r[4]["late"] for r in answered) / max(1, len(answered)),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "send_lag_p99_ms": lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else float("nan"),
        "mean_exit": statistics.fmean(exits) + 1 if exits else None,
    }


def plot(rows, path: Path) -> None:
    fig, ax = figure((6, 4), title="annify serve: goodput under Poisson load")
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["load"], r["goodput"]) for r in rows if r["policy"] == policy]
        ax.plot(*zip(*pts), marker="o", label=policy)
    ax.set_xlabel("offered load (× the full network's capacity)")
    ax.set_ylabel("goodput (answers within deadline / s)")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a trained run folder (default: train one into --workdir)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "annify" / "bench_serve"))
    p.add_argument("--train-spec", default=str(ROOT / "specs" / "cifar_resann_n9_c64.yaml"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--loads", default="0.5,1,1.5,2")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per (policy, load)")
    p.add_argument("--max-requests", type=int, default=4000, help="requests per (policy, load) at most")
    p.add_argument("--deadline-ms", default="20,100", help="deadlines drawn uniformly from LO,HI ms")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients measuring capacity")
    p.add_argument("--images", type=int, default=8, help="images per request (a batch)")
    p.add_argument(
        "--body", choices=("npy", "multipart"), default="npy",
        help="a request's images as one application/x-npy array of pixels, or as multipart PNG files",
    )  # fmt: skip
    p.add_argument("--capacity-s", type=float, default=8.0)
    p.add_argument(
        "--capacity", type=float,
        help="images/s taken as the full network's capacity instead of measuring it (to offer another run's rates)",
    )  # fmt: skip
    p.add_argument("--max-queue", type=int, default=256, help="the servers' --max-queue (images)")
    p.add_argument(
        "--guard-ms", type=float, default=15.0,
        help="the servers' --guard-ms: on a shared machine the client's own delays count against the deadline",
    )  # fmt: skip
    p.add_argument("--policies", default="full,exit,anytime,anytime+calibrated")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    run = prepare_run(args)
    table_rows = json.loads(RunDir(run).anytime_json.read_text())
    last = table_rows[-1]["val_error"]
    fixed = next(r["output"] for r in table_rows if r["val_error"] <= last + 0.01)
    policies = [f"exit:{fixed}" if x == "exit" else x for x in args.policies.split(",")]
    images = test_images(360)
    deadlines = tuple(float(v) for v in args.deadline_ms.split(","))
    loads = [float(v) for v in args.loads.split(",")]

    if args.capacity is not None:
        cap = args.capacity
        print(f"full network capacity: {cap:.1f} images/s (given, not measured)", flush=True)
    else:
        server = ServerProcess(run, "full", args.max_queue)
        try:
            asyncio.run(capacity(server.url, images, args.clients, 2.0, args.images, args.body))  # warm-up
            cap = asyncio.run(
                capacity(server.url, images, args.clients, args.capacity_s, args.images, args.body)
            )
        finally:
            server.stop()
        print(
            f"full network capacity: {cap:.1f} images/s ({args.clients} closed-loop clients, {args.images} images each)",
            flush=True,
        )

    rows = []
    for policy in policies:
        server = ServerProcess(run, policy, args.max_queue, args.guard_ms)
        try:
            for load in loads:
                r = asyncio.run(
                    open_loop(
                        server.url,
                        images,
                        load * cap / args.images,
                        args.duration,
                        deadlines,
                        args.max_requests,
                        args.seed,
                        args.images,
                        args.body,
                    )  # fmt: skip
                )
                rows.append({"policy": policy, "load": load, **r})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()

    header = [
        "policy",
        "load",
        "sent",
        "goodput /s",
        "misses %",
        "shed",
        "accuracy %",
        "p50 ms",
        "p99 ms",
        "send lag p99 ms",
        "mean output",
        "server late %",
    ]
    print(f"\nfull network capacity {cap:.1f} images/s; {args.images} images per request ({args.body}); deadlines uniform "
          f"in {deadlines} ms; {args.duration:g} s of Poisson arrivals per row; run {run}\n")  # fmt: skip
    print(
        table(
            header,
            [
                [
                    r["policy"],
                    f"{r['load']:g}×",
                    r["sent"],
                    f"{r['goodput']:.1f}",
                    f"{100 * r['misses']:.1f}",
                    r["shed"],
                    "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}",
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['send_lag_p99_ms']:.1f}",
                    "-" if r["mean_exit"] is None else f"{r['mean_exit']:.1f}",
                    f"{100 * r['server_late']:.1f}",
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    print()
    print(machine_line())
    out = {"capacity": cap, "deadline_ms": deadlines, "args": vars(args), "rows": rows, "machine": machine()}
    write_json(RESULTS / "serve.json", out, indent=2)
    plot(rows, RESULTS / "serve.png")
    print(f"wrote {RESULTS / 'serve.json'} and {RESULTS / 'serve.png'}")


if __name__ == "__main__":
    main()
