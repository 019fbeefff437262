"""The anytime HTTP server: every request answered by its deadline with the best output ready.

``Scheduler`` (no HTTP in it, so it is tested on its own) runs the network segment by segment on one
thread and batches the images of many requests together at every segment, as ``early_exit_stream``
pools undecided samples: images waiting for segment j from different requests share one call. The
deepest segment with images waiting runs next (so a cohort of images moves through the network
together while new arrivals gather at segment 0), unless an image without any output yet would miss
its deadline (see ``Scheduler._pick``). Each image stops at the
first of: its calibrated exit (``annify calibrate``'s thresholds), the output its FLOP budget affords,
the last output, or its deadline; at the deadline it gets the latest output it has. An image also
stops early when the next segment's measured time would overrun its deadline: work that cannot
finish in time is not started, which leaves the time to images that can. ``policy`` ``full`` (every
image to the last output, deadlines only measured) and ``exit:K`` (every image stops at output K) are
the baselines the load test compares against; they run no head but the one of the output they answer with.

``create_app`` puts it behind HTTP with FastAPI on uvicorn: a well-kept ASGI stack whose request
parsing (multipart uploads with size limits), lifespan hooks and graceful shutdown (uvicorn finishes
the requests in flight on SIGTERM/SIGINT before the scheduler stops) annify would otherwise write
itself. The serving libraries built on it or beside it (Ray Serve, LitServe, BentoML, Triton) batch
whole requests and reject or delay a request past its deadline; none batches segment by segment or
answers with a partial result, which is the point here, so the scheduler is annify's own.

A batch of images comes as multipart PNG/JPEG files or, cheaper to parse and to decode, as one
``Content-Type: application/x-npy`` body: a uint8 array N×H×W (grey) or N×H×W×C (C = 1 or 3) of the
8-bit pixels, as ``numpy.save`` writes it; it gets the same answers as the same pixels sent as PNGs.
Where the preprocess is a torchvision ``Compose`` (the run's timm transform), its tensor steps run once
on the whole request's batch rather than once per image (same numbers). uvicorn runs on uvloop and
httptools where they are installed (``uvicorn[standard]``, in annify's ``serve`` extra).

The server keeps no state between requests: replicas behind any HTTP load balancer scale it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from starlette.requests import Request as HTTPRequest  # FastAPI resolves the handlers' annotations here

from annify.cost import exit_flops
from annify.early_exit import _batched_carry, _has_batch, _inference, _pooled, _take
from annify.errors import InferenceError
from annify.report import format_sci
from annify.rewrite import AnytimeNet

__all__ = ["Answer", "Overloaded", "Scheduler", "create_app", "parse_policy", "serve"]


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Answer:
    """One image's answer: the logits of the output it stopped at, that output (0-based), its FLOPs,
    and ``deadline_hit``: the deadline stopped it before its exit, budget or last output."""

    logits: torch.Tensor
    exit: int
    flops: float
    deadline_hit: bool


class Request:
    """Images submitted together; ``future`` gets their answers (a list, in order) once all have one."""

    def __init__(self, n: int, deadline: float | None, target: int, thresholds: Sequence[float] | None):
        self.deadline, self.target, self.thresholds = deadline, target, thresholds
        self.answers: list[Answer | None] = [None] * n
        self.best: list[tuple[torch.Tensor, int, int] | None] = [None] * n  # (batch logits, row, output)
        self.left = n
        self.cut = False  # the deadline passed: every image answers with its first output ready
        self.future: Future = Future()


def parse_policy(policy: str, num_outputs: int) -> int | None:
    """'anytime' -> None (per request), 'full' -> the last output, 'exit:K' -> K - 1 (K 1-based)."""
    if policy in ("anytime", "full"):
        return None if policy == "anytime" else num_outputs - 1
    head, _, k = policy.partition(":")
    if head == "exit" and k.isdigit() and 1 <= int(k) <= num_outputs:
        return int(k) - 1
    raise InferenceError(
        f"unknown policy '{policy}'; use anytime, full or exit:K with K from 1 to {num_outputs}"
    )


class Scheduler:
    """Batches the images of many requests segment by segment on one worker thread (see the module doc).

    Args:
        net: the anytime network (put in eval mode).
        policy: ``anytime``, ``full`` or ``exit:K`` (see ``parse_policy``).
        thresholds: calibrated exit thresholds, used by requests that ask for early exit.
        max_queue: images admitted and not yet answered; beyond it ``submit`` raises ``Overloaded``.
        max_batch: images per segment call at most.
    """

    def __init__(
        self,
        net: AnytimeNet,
        policy: str = "anytime",
        thresholds: Sequence[float] | None = None,
        max_queue: int = 256,
        max_batch: int = 64,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.net, self.k = net.eval(), net.num_outputs
        self.fixed = parse_policy(policy, self.k)
        self.honour_deadlines = policy == "anytime"
        self.thresholds = None if thresholds is None else list(thresholds)
        if self.thresholds is not None and len(self.thresholds) != self.k:
            raise InferenceError(f"{len(self.thresholds)} thresholds for a network of {self.k} outputs")
        self.max_queue, self.max_batch, self.clock = max_queue, max_batch, clock
        # per output, what stopping there costs: a fixed policy runs no other head
        heads = None if self.fixed is None else [j == self.fixed for j in range(self.k)]
        self.flops = exit_flops(net, heads)
        self.batched = _batched_carry(net)
        self.seconds = [0.0] * self.k  # per segment call, an exponential moving average
        self.busy, self.answered = 0.0, 0  # worker seconds and images answered (Retry-After's estimate)
        self.waiting: list[list[tuple[tuple, list[tuple[Request, int]]]]] = [[] for _ in range(self.k)]
        self.pending = 0  # images admitted and not answered
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    # --- the client side ------------------------------------------------------------------------

    def submit(
        self,
        x: torch.Tensor,
        deadline_ms: float | None = None,
        budget_flops: float | None = None,
        early_exit: bool = False,
        arrived: float | None = None,
    ) -> Request:
        """Queue a batch of images (N×C×H×W); the returned request's ``future`` gets the answers.

        The deadline counts from ``arrived`` (the scheduler's clock; default now)."""
        target = self.k - 1 if self.fixed is None else self.fixed
        if budget_flops is not None and self.fixed is None:
            if budget_flops < self.flops[0]:
                raise InferenceError(
                    f"budget {format_sci(budget_flops)} FLOPs is below the first output's cost "
                    f"{format_sci(self.flops[0])}; raise X-Budget-Flops"
                )
            target = max(k for k, f in enumerate(self.flops) if f <= budget_flops)
        if early_exit and self.thresholds is None:
            raise InferenceError("this server has no calibrated thresholds; run `annify calibrate RUN` first")
        honour = self.honour_deadlines and deadline_ms is not None
        deadline = (self.clock() if arrived is None else arrived) + deadline_ms / 1000 if honour else None
        thresholds = self.thresholds if early_exit and self.fixed is None else None
        req = Request(x.shape[0], deadline, target, thresholds)
        with self.lock:
            self.check_room(x.shape[0])
            self.pending += x.shape[0]
            self.waiting[0].append(((x,), [(req, i) for i in range(x.shape[0])]))
            self.lock.notify()
        return req

    def check_room(self, n: int = 1) -> None:
        """Raise ``Overloaded`` (with a Retry-After estimate) unless ``n`` more images fit in the queue."""
        if self.stopping:
            raise Overloaded(1)
        if self.pending + n > self.max_queue:
            per_image = self.busy / self.answered if self.answered else 0.0
            raise Overloaded(max(1, math.ceil(self.pending * per_image)))

    def cut(self, req: Request) -> None:
        """The request's deadline passed: answer every image with the latest output it has; those with
        none yet answer with their first."""
        with self.lock:
            req.cut = True
            for i, best in enumerate(req.best):
                if best is not None and req.answers[i] is None:
                    logits, r, j = best
                    self._answer(req, i, logits[r], j, deadline_hit=True)

    # --- the worker -----------------------------------------------------------------------------

    def warm_up(self, input_size: Sequence[int]) -> None:
        """Run one image through every segment before serving: the first requests do not pay for
        warm-up, and every segment has a measured time for the deadline checks."""
        req = Request(1, None, self.k - 1 if self.fixed is None else self.fixed, None)
        with self.lock:
            self.pending += 1
            self.waiting[0].append(((torch.zeros(1, *input_size),), [(req, 0)]))
        while self.step():
            pass
        self.busy, self.answered = 0.0, 0

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="annify-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish every image admitted, then stop the worker (new submissions are refused)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not any(self.waiting):
                    self.lock.wait()
                if self.stopping and not any(self.waiting):
                    return
            self.step()

    def step(self) -> bool:
        """Run one segment on the images waiting for it (the most urgent segment); False if none wait."""
        with self.lock:
            j, chunks = self._pick()
            if j is None:
                return False
        flags = [True] if j == 0 else self.batched[j - 1]
        ids = [i for _, c in chunks for i in c]
        state = _pooled(chunks, flags)  # empties ``chunks``: the segment holds its input alone
        head = self.fixed is None or j == self.fixed  # a fixed policy needs its own output's head only
        start = self.clock()
        try:
            with _inference(self.net):
                state, logits = self.net.run_segment(j, state, head=head)
        except Exception as e:  # a failing batch fails its requests; the worker serves on
            self._fail(ids, e)
            return True
        took = self.clock() - start
        self.seconds[j] = took if self.seconds[j] == 0 else 0.8 * self.seconds[j] + 0.2 * took
        if not head:
            with self.lock:
                self.busy += took
                self.waiting[j + 1].append((state, ids))
            return True
        logits = logits.float()
        if any(req.thresholds is not None for req, _ in ids):
            conf = torch.softmax(logits, dim=-1).amax(dim=-1).tolist()
        now, keep = self.clock(), []
        with self.lock:
            answered = 0
            for r, (req, i) in enumerate(ids):
                if req.answers[i] is not None:  # answered at its deadline while this segment ran
                    continue
                req.best[i] = (logits, r, j)  # rows are taken only when answered: no copy per segment
                done = j >= req.target or (req.thresholds is not None and conf[r] >= req.thresholds[j])
                if done or req.cut:
                    self._answer(req, i, logits[r], j, deadline_hit=not done)
                    answered += 1
                elif req.deadline is not None and now + self.seconds[j + 1] > req.deadline:
                    self._answer(req, i, logits[r], j, deadline_hit=True)  # it cannot finish in time
                    answered += 1
                else:
                    keep.append(r)
            self.busy += took
            self.answered += answered
            if keep:
                if len(keep) < len(ids):
                    index = torch.tensor(keep, device=logits.device)
                    state = tuple(
                        _take(v, index) if flag and _has_batch(v, len(ids)) else v
                        for v, flag in zip(state, self.batched[j], strict=True)
                    )
                self.waiting[j + 1].append((state, [ids[r] for r in keep]))
        return True

    def _pick(self) -> tuple[int | None, list]:
        """The segment to run next and up to ``max_batch`` of its images (whole chunks); images answered
        already are dropped first.

        The deepest segment with images waiting goes first: images furthest along finish, and new
        arrivals gather into one batch at segment 0 meanwhile, so a cohort moves through the segments
        together at a batch worth running (one image per call costs several times more per image).
        Segment 0 goes first instead when an image waiting there, with no output yet, would otherwise
        miss its deadline: it needs its first answer before anything else.
        """
        for j in range(self.k):
            self.waiting[j] = [c for c in (self._live(j, c) for c in self.waiting[j]) if c is not None]
        live = [j for j in range(self.k) if self.waiting[j]]
        if not live:
            return None, []
        best = live[-1]
        if best != 0 and self.waiting[0]:
            latest = self.clock() + self.seconds[best] + self.seconds[0]  # when it would end if it waited
            deadlines = (
                req.deadline for _, ids in self.waiting[0] for req, _ in ids if req.deadline is not None
            )
            if any(d < latest for d in deadlines):
                best = 0
        taken, count = [], 0
        while self.waiting[best] and (not taken or count + len(self.waiting[best][0][1]) <= self.max_batch):
            chunk = self.waiting[best].pop(0)
            taken.append(chunk)
            count += len(chunk[1])
        return best, taken

    def _live(self, j: int, chunk):
        """``chunk`` (waiting for segment j) without its images answered already: expired work is
        dropped. None if none is left."""
        state, ids = chunk
        kept = [r for r, (req, i) in enumerate(ids) if req.answers[i] is None]
        if len(kept) == len(ids):
            return chunk
        if not kept:
            return None
        index, flags = torch.tensor(kept), [True] if j == 0 else self.batched[j - 1]
        state = tuple(
            _take(v, index) if flag and _has_batch(v, len(ids)) else v
            for v, flag in zip(state, flags, strict=True)
        )
        return state, [ids[r] for r in kept]

    def _fail(self, ids: list[tuple[Request, int]], error: Exception) -> None:
        """The segment call for these images raised: their requests get the error."""
        with self.lock:
            for req, i in ids:
                if req.answers[i] is None:
                    req.answers[i] = Answer(torch.empty(0), -1, 0.0, False)  # answered: its work is dropped
                    req.left -= 1
                    self.pending -= 1
                if not req.future.done():
                    req.future.set_exception(error)

    def _answer(self, req: Request, i: int, logits, exit_at: int, deadline_hit: bool) -> None:
        req.answers[i] = Answer(logits, exit_at, self.flops[exit_at], deadline_hit)
        req.left -= 1
        self.pending -= 1
        if req.left == 0 and not req.future.done():
            req.future.set_result(list(req.answers))


# --- HTTP ---------------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _number(headers, name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise _BadRequest(400, f"{name} must be a finite positive number, got '{value}'")
    return number


def _split(preprocess) -> tuple[Callable, Callable] | None:
    """A torchvision ``Compose`` with a to-tensor step (``ToTensor``, timm's ``MaybeToTensor``) split
    there, where every step after it is a ``Normalize``: (the steps on the PIL image before it, the
    steps after it). Those are elementwise, so run once on a whole batch they give the same numbers as
    on each image, for one call instead of one per image. None for any other preprocess (then it runs
    whole, per image)."""
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(steps, list):
        return None
    at = [i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor")]
    if len(at) != 1:
        return None
    before, after = steps[: at[0]], steps[at[0] + 1 :]
    if not all(type(t).__name__ == "Normalize" for t in after):
        return None

    def pil(im):
        for t in before:
            im = t(im)
        return im

    def tensor(x):
        for t in after:
            x = t(x)
        return x

    return pil, tensor


def _prepare(im, preprocess, split):
    """One decoded image (mode L or RGB) through the preprocess, or, where it splits, through its PIL
    steps only (an H×W×C uint8 array for ``_stack`` to finish with the whole batch)."""
    import numpy as np

    if split is None:
        return preprocess(im)
    im = split[0](im)
    a = np.asarray(im)
    if a.dtype != np.uint8:  # a PIL step left a mode to_tensor does not scale by 255: run it as is
        return preprocess(im)  # pragma: no cover - the timm/torchvision transforms keep uint8 modes
    return a[:, :, None] if a.ndim == 2 else a


def _stack(items: list, split) -> torch.Tensor:
    """The batch (N×C×H×W) of ``_prepare``'s results: arrays of one shape become one tensor that the
    preprocess's tensor steps run on at once, exactly as ``to_tensor`` and those steps per image would."""
    import numpy as np

    def tensors(arrays):  # to_tensor of H×W×C uint8 arrays, as a batch
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)

    if (
        split is not None
        and all(isinstance(a, np.ndarray) for a in items)
        and len({a.shape for a in items}) == 1
    ):
        return split[1](tensors(items))
    return torch.stack([split[1](tensors([a]))[0] if isinstance(a, np.ndarray) else a for a in items])


def _decode(blob: bytes, index: int, preprocess, channels: int, max_pixels: int, split=None):
    """An uploaded image as the network's input (C×H×W), or ``_prepare``'s array where the preprocess
    splits; a one-line error for what cannot be one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:  # opening reads the header only
            if im.width * im.height > max_pixels:
                raise _BadRequest(
                    413, f"image {index + 1} has {im.width}×{im.height} pixels, over the {max_pixels} allowed"
                )
            im = im.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise _BadRequest(400, f"image {index + 1} is not an image PIL can read; send PNG or JPEG") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _BadRequest(400, f"image {index + 1} cannot be read: {e}") from None
    return _prepare(im, preprocess, split)


NPY = "application/x-npy"
_INLINE_BYTES = 16 << 10  # bodies up to this size decode on the event loop (see predict)


def _npy(body: bytes, max_images: int, max_pixels: int):
    """An ``application/x-npy`` body: a uint8 array N×H×W (grey) or N×H×W×C (C = 1 or 3: grey or RGB),
    8-bit pixels as a PNG of them would decode to. Read by its header first: the shape must match the
    body's size, so a header cannot make the server allocate more than was sent."""
    import numpy as np

    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise _BadRequest(
            400, f"bad {NPY} body: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise _BadRequest(
            400, f"a {NPY} body must be a uint8 array N×H×W or N×H×W×C (C 1 or 3), got {dtype} {tuple(shape)}"
        )
    if math.prod(shape) != len(body) - f.tell():
        raise _BadRequest(
            400, f"bad {NPY} body: its header says {tuple(shape)}, its data has {len(body) - f.tell()} bytes"
        )
    if shape[0] == 0:
        raise _BadRequest(400, f"no image: the {NPY} array has 0 images")
    if shape[0] > max_images:
        raise _BadRequest(413, f"{shape[0]} images in one request, over the {max_images} allowed")
    if shape[1] * shape[2] > max_pixels:
        raise _BadRequest(413, f"image 1 has {shape[2]}×{shape[1]} pixels, over the {max_pixels} allowed")
    a = np.frombuffer(body, np.uint8, offset=f.tell())
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def _npy_bytes(a) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _decode_npy(a, preprocess, split, channels: int) -> list:
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    grey = a.ndim == 3 or a.shape[3] == 1
    return [
        _prepare(Image.fromarray(im.reshape(im.shape[:2]) if grey else im).convert(mode), preprocess, split)
        for im in a
    ]


def create_app(
    scheduler: Scheduler,
    preprocess: Callable,
    channels: int,
    max_body_bytes: int = 8 << 20,
    max_images: int = 64,
    max_pixels: int = 4096 * 4096,
    labels: Sequence[str] | None = None,
    early_exit_default: bool = False,
    guard_ms: float = 5.0,
):
    """The FastAPI app: ``POST /predict``, ``GET /healthz``, ``GET /metrics`` (Prometheus).

    ``POST /predict`` takes one image as the body (``Content-Type: image/png``, ``image/jpeg``, ...)
    or several (a batch) as ``multipart/form-data`` files or as one ``application/x-npy`` body (a uint8
    array N×H×W or N×H×W×C, C = 1 or 3, of 8-bit pixels: ``numpy.save``'s format), and the headers ``X-Deadline-Ms``,
    ``X-Budget-Flops``, ``X-Early-Exit`` (1/0: calibrated exit thresholds) and ``X-Top-K``. The
    deadline counts from when the request's body has arrived; computing stops ``guard_ms`` (at most a
    fifth of the deadline) earlier, for the answer to be written and sent in time. The scheduler starts and stops with the
    app's lifespan: at shutdown, the requests in flight are finished first.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    registry = CollectorRegistry()  # one per app: several servers in one process keep their own counts
    requests = Counter(
        "annify_requests", "POST /predict requests, by HTTP status", ["code"], registry=registry
    )
    exits = Counter(
        "annify_exits",
        "Images answered, by the output (1-based) they stopped at",
        ["output"],
        registry=registry,
    )
    cut_short = Counter(
        "annify_deadline_hits", "Images whose deadline stopped them before their exit", registry=registry
    )
    misses = Counter("annify_deadline_misses", "Requests answered after their deadline", registry=registry)
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    latency = Histogram(
        "annify_request_latency_seconds", "Latency of answered requests", buckets=buckets, registry=registry
    )
    overrun = Histogram(
        "annify_deadline_overrun_seconds", "How late the requests that missed their deadline were", buckets=buckets,
        registry=registry,
    )  # fmt: skip
    Gauge("annify_queue_images", "Images admitted and not answered", registry=registry).set_function(
        lambda: scheduler.pending
    )

    def warm_up() -> None:
        """Decode a PNG and an x-npy image once before serving: the first requests would otherwise pay for
        the imports and first calls on the event loop, and every request that arrived meanwhile with them."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("L", (8, 8)).save(buf, format="PNG")
        decode([buf.getvalue()], None)
        decode(None, _npy(_npy_bytes(np.zeros((1, 8, 8), np.uint8)), 1, max_pixels))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(warm_up)
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="annify", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, headers: dict | None = None):
        requests.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    import numpy as np

    split = _split(preprocess)

    async def images(request: HTTPRequest) -> tuple[list[bytes] | None, object, int]:
        """The request's images: (the encoded images, None, bytes) or, for an x-npy body, (None, the
        array, bytes)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise _BadRequest(413, f"the request has {length} bytes, over the {max_body_bytes} allowed")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form(
                    max_files=max_images, max_fields=max_images, max_part_size=max_body_bytes
                )
            except (MultiPartException, HTTPException) as e:  # starlette wraps the first in the second
                message = str(getattr(e, "detail", e))
                raise _BadRequest(
                    413 if "Too many" in message else 400, f"bad multipart body: {message}"
                ) from None
            blobs = [await f.read() for _, f in form.multi_items() if not isinstance(f, str)]
        else:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise _BadRequest(413, f"the request is over the {max_body_bytes} bytes allowed")
            if kind.split(";")[0].strip().lower() == NPY:
                return None, _npy(bytes(body), max_images, max_pixels), len(body)
            blobs = [bytes(body)] if body else []
        if not blobs:
            raise _BadRequest(
                400,
                "no image: send one as the body (Content-Type: image/png), several as multipart files "
                f"or as one {NPY} array",
            )
        if len(blobs) > max_images:
            raise _BadRequest(413, f"{len(blobs)} images in one request, over the {max_images} allowed")
        return blobs, None, sum(map(len, blobs))

    def decode(blobs: list[bytes] | None, array) -> torch.Tensor:
        if blobs is None:
            items = _decode_npy(array, preprocess, split, channels)
        else:
            items = [_decode(b, i, preprocess, channels, max_pixels, split) for i, b in enumerate(blobs)]
        return _stack(items, split)

    @app.post("/predict")
    async def predict(request: HTTPRequest):
        try:
            scheduler.check_room()  # a full queue sheds before the body is read and decoded: cheaply
            deadline_ms = _number(request.headers, "X-Deadline-Ms")
            budget = _number(request.headers, "X-Budget-Flops")
            flag = request.headers.get("X-Early-Exit")
            if flag is not None and flag.lower() not in ("1", "0", "true", "false"):
                raise _BadRequest(400, f"X-Early-Exit must be 1 or 0, got '{flag}'")
            early = early_exit_default if flag is None else flag.lower() in ("1", "true")
            topk = request.headers.get("X-Top-K", "5")
            if not topk.isdigit() or int(topk) < 1:
                raise _BadRequest(400, f"X-Top-K must be a positive integer, got '{topk}'")
            blobs, array, size = await images(request)
            arrived = scheduler.clock()
            # small bodies decode on the event loop, without a hop to a thread and back (the thread
            # holds the same interpreter lock); large ones decode off it, so the loop keeps serving
            if size <= _INLINE_BYTES:
                x = decode(blobs, array)
            else:
                x = await asyncio.to_thread(decode, blobs, array)
            # the scheduler stops a little before the deadline, so the answer is written and sent by
            # then rather than cut exactly at it and late by its own sending
            cut_ms = None if deadline_ms is None else deadline_ms - min(guard_ms, deadline_ms / 5)
            req = scheduler.submit(x, cut_ms, budget, early, arrived=arrived)
        except _BadRequest as e:
            return error(e.status, str(e))
        except InferenceError as e:
            return error(400, str(e))
        except Overloaded as e:
            return error(503, str(e), headers={"Retry-After": str(e.retry_after)})
        future = asyncio.wrap_future(req.future)
        try:
            if req.deadline is not None:
                try:
                    answers = await asyncio.wait_for(
                        asyncio.shield(future), max(0.0, req.deadline - scheduler.clock())
                    )
                except asyncio.TimeoutError:
                    scheduler.cut(req)
                    answers = await future
            else:
                answers = await future
        except Exception as e:  # the network raised on this request's batch
            return error(
                500, f"inference failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
        elapsed = scheduler.clock() - arrived
        late = deadline_ms is not None and elapsed * 1000 > deadline_ms
        requests.labels("200").inc()
        latency.observe(elapsed)
        if late:
            misses.inc()
            overrun.observe(elapsed - deadline_ms / 1000)
        predictions = []
        for a in answers:
            exits.labels(str(a.exit + 1)).inc()
            cut_short.inc(a.deadline_hit)
            probs = torch.softmax(a.logits.float(), dim=-1)
            top = probs.topk(min(int(topk), probs.numel()))
            predictions.append(
                {
                    "class": int(top.indices[0]),
                    **({"label": labels[int(top.indices[0])]} if labels else {}),
                    "topk": [
                        {"class": int(c), "prob": float(p)}
                        for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ],
                    "exit": a.exit,
                    "num_outputs": scheduler.k,
                    "flops": a.flops,
                    "deadline_hit": a.deadline_hit,
                }
            )
        # a JSONResponse as is: FastAPI's encoder would walk the plain dict again before the same json.dumps
        body = {
            "predictions": predictions,
            "latency_ms": elapsed * 1000,
            "deadline_ms": deadline_ms,
            "late": late,
        }
        return JSONResponse(body)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "outputs": scheduler.k, "queue": scheduler.pending}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    spec_path,
    checkpoint,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: str = "anytime",
    early_exit: bool = False,
    max_queue: int = 256,
    max_batch: int = 64,
    max_body_bytes: int = 8 << 20,
    max_images: int = 64,
    guard_ms: float = 5.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Serve ``spec_path`` with ``checkpoint``'s weights until SIGINT/SIGTERM (then finish what is in flight).

    The run folder's ``thresholds.json`` (``annify calibrate``) is loaded where there is one; with
    ``early_exit`` requests use it unless they send ``X-Early-Exit: 0``.
    """
    import uvicorn

    from annify.calibrate import read_thresholds
    from annify.convert import build, load_weights
    from annify.freeze import freeze
    from annify.images import image_transform
    from annify.run_dir import RunDir, resolve

    res = resolve(spec_path, checkpoint, mean, std, need_normalization=True)
    if res.note:
        log(res.note)
    net = build(res.spec)
    load_weights(net, res.weights)
    net = freeze(net)  # inference only: the same outputs bit for bit, less time per segment call
    thresholds = None
    if res.run is not None and RunDir(res.run).thresholds.is_file():
        thresholds = read_thresholds(res.run, res.weights).thresholds
    if early_exit and thresholds is None:
        raise InferenceError("--early-exit needs the run's thresholds.json; run `annify calibrate RUN` first")
    scheduler = Scheduler(net, policy, thresholds, max_queue, max_batch)
    scheduler.warm_up(res.spec.input_size)
    # torch, timm and the model are hundreds of thousands of long-lived objects: moved out of the
    # collector's reach, a full collection no longer walks them all (~200 ms on a shared 2-core machine,
    # a stall of the event loop)
    gc.collect()
    gc.freeze()
    # The scheduler thread runs Python between torch kernels; with the interpreter's default 5 ms
    # switch interval the event loop would wait that long for the GIL at every step of a request.
    sys.setswitchinterval(0.0005)
    app = create_app(
        scheduler, image_transform(res.spec, res.mean, res.std), res.spec.input_size[0], max_body_bytes, max_images,
        labels=labels, early_exit_default=early_exit, guard_ms=guard_ms,
    )  # fmt: skip
    log(
        f"serving {res.spec.name} ({net.num_outputs} outputs, policy {policy}"
        f"{', calibrated exits' if thresholds is not None else ''}) on http://{host}:{port}"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
