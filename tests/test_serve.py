"""The anytime server: the scheduler on its own, then a real server on an ephemeral 127.0.0.1 port
spoken to over HTTP (deadlines honoured, shedding, bad requests, metrics, shutdown)."""

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from torchvision import transforms

from annify.cost import exit_flops
from annify.early_exit import early_exit
from annify.errors import InferenceError
from annify.serve import Overloaded, Scheduler, _prepare, _split, _stack, create_app

SIZE = (1, 8, 8)


@pytest.fixture
def net(tiny):
    return tiny[0].eval()  # cifar_resnet_n3_c8 at 1×8×8, 5 outputs


def record_segments(monkeypatch, net, seconds=0.0):
    """Record (segment, batch) of every run_segment call; each call sleeps ``seconds`` (a slow network)."""
    calls, real = [], net.run_segment

    def spy(j, state, head=True):
        calls.append((j, state[0].shape[0]))
        time.sleep(seconds)
        return real(j, state, head)

    monkeypatch.setattr(net, "run_segment", spy)
    return calls


def images(n, seed=0):
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(seed))


def run_all(s: Scheduler) -> None:
    while s.step():
        pass


def test_scheduler_batches_the_images_of_many_requests_segment_by_segment(net, monkeypatch):
    calls = record_segments(monkeypatch, net)
    s = Scheduler(net)
    reqs = [s.submit(images(2, seed)) for seed in range(3)]
    run_all(s)
    assert calls == [(j, 6) for j in range(5)]  # three requests, one call per segment
    for seed, req in enumerate(reqs):
        with torch.no_grad():
            want = net(images(2, seed))[-1]
        answers = req.future.result(timeout=0)
        assert [a.exit for a in answers] == [4, 4] and not any(a.deadline_hit for a in answers)
        torch.testing.assert_close(torch.stack([a.logits for a in answers]), want, rtol=1e-5, atol=1e-5)
    assert s.pending == 0


def test_scheduler_early_exit_pools_the_undecided_and_matches_early_exit(net, monkeypatch):
    x = images(16)
    with torch.no_grad():
        conf = [torch.softmax(z, -1).amax(-1) for z in net(x)]
    thresholds = [float(conf[k].median()) for k in range(4)] + [0.0]  # about half exit at each output
    want_logits, want_exit, want_flops = early_exit(net, x, thresholds)
    calls = record_segments(monkeypatch, net)
    s = Scheduler(net, thresholds=thresholds)
    reqs = [s.submit(x[i : i + 4], early_exit=True) for i in range(0, 16, 4)]
    run_all(s)
    answers = [a for r in reqs for a in r.future.result(timeout=0)]
    assert [a.exit for a in answers] == want_exit.tolist()
    assert [a.flops for a in answers] == want_flops.tolist()
    torch.testing.assert_close(torch.stack([a.logits for a in answers]), want_logits, rtol=1e-5, atol=1e-5)
    batches = [b for _, b in calls]
    assert batches[0] == 16 and batches == sorted(batches, reverse=True) and batches[-1] < 16


@pytest.mark.parametrize(("policy", "output"), [("full", 4), ("exit:2", 1)])
def test_fixed_policies_run_only_the_head_they_answer_with(net, monkeypatch, policy, output):
    heads, real = [], net.run_segment
    monkeypatch.setattr(
        net, "run_segment", lambda j, state, head=True: heads.append(head) or real(j, state, head)
    )
    s = Scheduler(net, policy=policy)
    s.warm_up(SIZE)
    heads.clear()
    req = s.submit(images(3), deadline_ms=1e-6, budget_flops=1.0)  # neither applies to a fixed policy
    run_all(s)
    assert heads == [j == output for j in range(output + 1)]
    want = exit_flops(net, [j == output for j in range(5)])[output]
    assert [(a.exit, a.flops, a.deadline_hit) for a in req.future.result(timeout=0)] == [
        (output, want, False)
    ] * 3
    with torch.no_grad():
        torch.testing.assert_close(
            req.future.result()[0].logits, net(images(3))[output][0], rtol=1e-5, atol=1e-5
        )
    with pytest.raises(InferenceError, match="unknown policy 'exit:9'"):
        Scheduler(net, policy="exit:9")


def test_scheduler_budget_stops_at_the_latest_affordable_output(net):
    s = Scheduler(net)
    flops = exit_flops(net)
    req = s.submit(images(1), budget_flops=flops[2] + 1)
    run_all(s)
    (answer,) = req.future.result(timeout=0)
    assert (answer.exit, answer.flops, answer.deadline_hit) == (2, flops[2], False)
    with pytest.raises(InferenceError, match="below the first output's cost"):
        s.submit(images(1), budget_flops=flops[0] / 2)
    with pytest.raises(InferenceError, match="no calibrated thresholds"):
        s.submit(images(1), early_exit=True)


def test_scheduler_answers_a_cut_request_with_its_latest_output_and_drops_its_work(net, monkeypatch):
    calls = record_segments(monkeypatch, net)
    s = Scheduler(net)
    req = s.submit(images(2), deadline_ms=60_000)
    s.step(), s.step()
    s.cut(req)  # what the HTTP handler does when the deadline passes
    answers = req.future.result(timeout=0)
    assert [(a.exit, a.deadline_hit) for a in answers] == [(1, True), (1, True)]
    assert not s.step() and len(calls) == 2  # the expired images' remaining segments never run
    cut_early = s.submit(images(1), deadline_ms=60_000)
    s.cut(cut_early)  # no output yet: it gets its first one
    run_all(s)
    assert [(a.exit, a.deadline_hit) for a in cut_early.future.result(timeout=0)] == [(0, True)]


def test_scheduler_skips_a_segment_that_cannot_finish_by_the_deadline(net):
    clock = [0.0]
    s = Scheduler(net, clock=lambda: clock[0])
    s.seconds = [0.01] * 5  # measured: 10 ms per segment
    req = s.submit(images(1), deadline_ms=25)
    s.step()  # at t = 0 the next segment ends at 10 ms: go on
    clock[0] = 0.02
    s.step()  # at 20 ms the next would end at 30 ms, past the deadline: answer now
    (answer,) = req.future.result(timeout=0)
    assert (answer.exit, answer.deadline_hit) == (1, True)


def test_scheduler_runs_the_deepest_segment_unless_a_first_output_is_due(net, monkeypatch):
    calls = record_segments(monkeypatch, net)
    clock = [0.0]
    s = Scheduler(net, clock=lambda: clock[0])
    s.seconds = [0.01] * 5
    s.submit(images(2))
    s.step(), s.step()  # that cohort waits for segment 2
    s.submit(images(1))  # no deadline: it waits at segment 0 while the cohort goes on
    s.step()
    urgent = s.submit(images(1), deadline_ms=15)  # segment 2 then 0 would end at 20 ms: too late
    s.step()
    assert [j for j, _ in calls] == [0, 1, 2, 0] and calls[-1][1] == 2  # both newcomers, together
    assert urgent.future.done() is False and urgent.best[0][2] == 0  # it has its first output
    run_all(s)
    assert calls[4:] == [
        (3, 2),
        (4, 2),
        (1, 2),
        (2, 2),
        (3, 2),
        (4, 2),
    ]  # the cohort first, then the newcomers


def test_a_failing_segment_fails_its_requests_and_the_worker_serves_on(net, monkeypatch):
    real = net.run_segment

    def broken(j, state, head=True):
        if j == 2 and state[0].shape[0] == 3:
            raise RuntimeError("out of memory")
        return real(j, state, head)

    monkeypatch.setattr(net, "run_segment", broken)
    s = Scheduler(net)
    failed = s.submit(images(3))
    run_all(s)
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.future.result(timeout=0)
    assert s.pending == 0
    fine = s.submit(images(1))
    run_all(s)
    assert fine.future.result(timeout=0)[0].exit == 4


def test_scheduler_sheds_load_beyond_its_queue(net):
    s = Scheduler(net, max_queue=3)
    s.submit(images(2))
    with pytest.raises(Overloaded) as e:
        s.submit(images(2))
    assert e.value.retry_after >= 1
    s.submit(images(1))  # exactly full is fine


# --- over HTTP ------------------------------------------------------------------------------------


class Server:
    """The app on uvicorn in a thread, on an ephemeral 127.0.0.1 port."""

    def __init__(self, app):
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=10
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(net):
    """``serve(**scheduler_kwargs)`` -> a running Server; stopped after the test."""
    running = []

    def start(seconds=0.0, app_kwargs=None, preprocess=None, **kwargs):
        s = Scheduler(net, **kwargs)
        s.warm_up(SIZE)
        app = create_app(s, preprocess or (lambda im: torch.zeros(SIZE)), channels=1, **(app_kwargs or {}))
        running.append(Server(app))
        running[-1].scheduler = s
        return running[-1]

    yield start
    for server in running:
        if server.thread.is_alive():
            server.stop()


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), color=128).save(buf, format="PNG")
    return buf.getvalue()


def post(url, headers=None, **kwargs):
    content = kwargs.pop("content", None if "files" in kwargs else png())
    headers = {"Content-Type": "image/png", **(headers or {})} if content is not None else headers
    return httpx.post(f"{url}/predict", content=content, headers=headers, timeout=30, **kwargs)


def test_http_deadline_is_honoured_with_the_best_output_ready(serve, net, monkeypatch):
    server = serve()
    record_segments(monkeypatch, net, seconds=0.15)  # 5 segments: 0.75 s for the whole network
    r = post(server.url, {"X-Deadline-Ms": "400"})
    assert r.status_code == 200, r.text
    body = r.json()
    (p,) = body["predictions"]
    assert p["deadline_hit"] and 0 <= p["exit"] < 4 and p["flops"] == exit_flops(net)[p["exit"]]
    assert body["latency_ms"] < 400 + 150  # answered at the deadline, not after the whole network
    assert set(p) == {"class", "topk", "exit", "num_outputs", "flops", "deadline_hit"} and len(p["topk"]) == 5
    r = post(server.url, {"X-Top-K": "2"})  # no deadline: the whole network
    (p,) = r.json()["predictions"]
    assert (p["exit"], p["deadline_hit"], len(p["topk"])) == (4, False, 2) and r.json()["late"] is False


def test_http_batches_of_images_and_budgets(serve, net):
    server = serve()
    files = [("images", (f"{i}.png", png(), "image/png")) for i in range(3)]
    r = post(server.url, {"X-Budget-Flops": str(exit_flops(net)[1])}, files=files)
    assert r.status_code == 200, r.text
    assert [p["exit"] for p in r.json()["predictions"]] == [1, 1, 1]


def test_http_sheds_load_with_503_and_retry_after(serve, net, monkeypatch):
    server = serve(max_queue=2)
    record_segments(monkeypatch, net, seconds=0.1)

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            send = [
                client.post(f"{server.url}/predict", content=png(), headers={"Content-Type": "image/png"})
                for _ in range(4)
            ]
            return await asyncio.gather(*send)

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert codes[0] == 200 and codes[-1] == 503
    shed = [r for r in asyncio.run(burst()) if r.status_code == 503]
    assert shed and all(int(r.headers["Retry-After"]) >= 1 for r in shed)
    assert "busy" in shed[0].json()["error"]


def test_http_bad_requests_get_4xx_with_one_line(serve, net):
    server = serve(app_kwargs={"max_body_bytes": 4096, "max_images": 2})
    cases = [
        (post(server.url, content=b"not an image"), 400, "image 1 is not an image PIL can read"),
        (post(server.url, content=b""), 400, "no image"),
        (post(server.url, {"X-Deadline-Ms": "soon"}), 400, "X-Deadline-Ms must be a finite positive number"),
        (post(server.url, {"X-Deadline-Ms": "nan"}), 400, "X-Deadline-Ms"),
        (post(server.url, {"X-Budget-Flops": "10"}), 400, "below the first output's cost"),
        (post(server.url, {"X-Early-Exit": "1"}), 400, "no calibrated thresholds"),
        (post(server.url, {"X-Early-Exit": "maybe"}), 400, "X-Early-Exit must be 1 or 0"),
        (post(server.url, {"X-Top-K": "0"}), 400, "X-Top-K must be a positive integer"),
        (post(server.url, content=b"x" * 5000), 413, "has 5000 bytes, over the 4096 allowed"),
        (
            post(server.url, files=[("i", (f"{i}.png", png(), "image/png")) for i in range(3)]),
            413,
            "Too many files",
        ),
    ]
    for r, status, fragment in cases:
        assert r.status_code == status, r.text
        message = r.json()["error"]
        assert fragment in message and "\n" not in message, message


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def digits(n):
    return (
        torch.randint(0, 256, (n, *SIZE[1:]), generator=torch.Generator().manual_seed(1))
        .to(torch.uint8)
        .numpy()
    )


def pngs(a) -> list[bytes]:
    out = []
    for im in a:
        buf = io.BytesIO()
        Image.fromarray(im, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_a_composed_preprocess_runs_its_tensor_steps_once_per_batch_with_the_same_numbers():
    preprocess = transforms.Compose(
        [
            transforms.Resize(8),
            transforms.CenterCrop(8),
            transforms.ToTensor(),
            transforms.Normalize([0.3], [0.4]),
        ]
    )
    split = _split(preprocess)
    ims = [Image.fromarray(a, mode="L") for a in digits(5)]
    want = torch.stack([preprocess(im) for im in ims])
    assert torch.equal(_stack([_prepare(im, preprocess, split) for im in ims], split), want)
    assert _split(lambda im: torch.zeros(SIZE)) is None  # anything else runs per image
    assert _split(transforms.Compose([transforms.ToTensor(), transforms.Resize(4)])) is None


def test_http_takes_a_batch_as_one_npy_array_like_multipart_pngs(serve, net):
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.3], [0.4])])
    server = serve(preprocess=preprocess)
    a = digits(3)
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs(a))]
    want = post(server.url, files=files).json()["predictions"]
    for body in (a, a[..., None], np.asfortranarray(a)):  # N×H×W, N×H×W×1, column-major
        r = post(server.url, {"Content-Type": "application/x-npy"}, content=npy(body))
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == want
    with torch.no_grad():
        logits = net(torch.stack([preprocess(Image.fromarray(im, mode="L")) for im in a]))[-1]
    assert [p["class"] for p in want] == logits.argmax(-1).tolist()


def test_http_bad_npy_bodies_get_4xx_with_one_line(serve, net):
    server = serve(app_kwargs={"max_images": 2})
    kind = {"Content-Type": "application/x-npy"}
    cases = [
        (npy(digits(1).astype(np.float32)), 400, "must be a uint8 array"),
        (npy(digits(1)[0]), 400, "must be a uint8 array N×H×W"),
        (npy(np.zeros((1, 8, 8, 2), np.uint8)), 400, "(C 1 or 3)"),
        (npy(digits(2))[:-10], 400, "its data has"),
        (b"not an npy file", 400, "bad application/x-npy body"),
        (npy(np.zeros((0, 8, 8), np.uint8)), 400, "no image"),
        (npy(digits(3)), 413, "3 images in one request, over the 2 allowed"),
    ]
    for body, status, fragment in cases:
        r = post(server.url, kind, content=body)
        assert r.status_code == status, r.text
        message = r.json()["error"]
        assert fragment in message and "\n" not in message, message


def test_http_healthz_and_metrics(serve, net):
    server = serve()
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok", "outputs": 5, "queue": 0}
    post(server.url)
    post(server.url, {"X-Budget-Flops": str(exit_flops(net)[0])})
    post(server.url, {"X-Deadline-Ms": "0.001"})  # answered late, with its first output
    post(server.url, content=b"junk")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'annify_requests_total{code="200"} 3.0' in text and 'annify_requests_total{code="400"} 1.0' in text
    assert 'annify_exits_total{output="5"} 1.0' in text and 'annify_exits_total{output="1"} 2.0' in text
    assert "annify_request_latency_seconds_count 3.0" in text
    assert "annify_deadline_misses_total 1.0" in text and "annify_deadline_overrun_seconds_count 1.0" in text
    assert "annify_queue_images 0.0" in text


def test_http_shutdown_finishes_requests_in_flight(serve, net, monkeypatch):
    server = serve()
    record_segments(monkeypatch, net, seconds=0.2)
    result = {}
    client = threading.Thread(target=lambda: result.setdefault("r", post(server.url)))
    client.start()
    while server.scheduler.pending == 0:  # the request is in flight
        time.sleep(0.01)
    server.stop()  # what SIGTERM does
    client.join(timeout=20)
    r = result["r"]
    assert r.status_code == 200 and r.json()["predictions"][0]["exit"] == 4
    assert server.scheduler.thread is not None and not server.scheduler.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        post(server.url)


def test_serve_command_binds_loopback_by_default_and_refuses_bad_settings_in_one_line(tiny, tmp_path):
    from click.testing import CliRunner
    from helpers import assert_one_line_error
    from safetensors.torch import save_file

    from annify.cli import main
    from annify.spec import dump

    net, spec, _ = tiny
    (tmp_path / "tiny.yaml").write_text(dump(spec))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    command = main.get_command(None, "serve")
    assert next(p for p in command.params if p.name == "host").default == "127.0.0.1"
    base = [
        "serve",
        str(tmp_path / "tiny.yaml"),
        "--checkpoint",
        str(tmp_path),
        "--mean",
        "0.5",
        "--std",
        "0.25",
    ]
    result = CliRunner().invoke(main, [*base, "--early-exit"])
    assert_one_line_error(result, "--early-exit needs the run's thresholds.json")
    result = CliRunner().invoke(main, [*base, "--policy", "exit:9"])
    assert_one_line_error(result, "unknown policy 'exit:9'; use anytime, full or exit:K with K from 1 to 5")
