"""The train stage: an anytime network's training recipe, read top to bottom.

setup (settings, devices, data, network, optimizer, weight scheme, resume) → loop (one weighted
loss ``sum_i w_i * CE_i`` per step, the weight scheme updated once per optimizer step) → evaluate
(every output on val and test) → save (run folder).

The recipe is the paper's: SGD, lr 0.1, momentum 0.9, weight decay 1e-4, no Nesterov, lr / 10 at
1/2 and 3/4 of the epochs. A spec's ``train:`` section changes the defaults; arguments (the command
line) win over both.

Run folder ``out``::

    config.yaml          the resolved spec, its train: section holding every setting of the run
    data.json            the data source and the mean/std its images were normalised with
    metrics.jsonl        one JSON line per epoch (train loss, val error, weights, lr, images/s)
    checkpoints/last/    model.safetensors + state.pt (optimizer, scheduler, weight scheme, RNGs)
    checkpoints/best/    model.safetensors + best.json, lowest mean val error over the outputs
    anytime.json / .csv  per output: node, flops, fraction, val_error, test_error (final weights)
    anytime.png          error against FLOPs;  weights.png: each output's loss weight per epoch

Reproducibility: every random draw of epoch e (shuffle, augmentation, dropout) is seeded from
(seed, e), so a run resumed from ``checkpoints/last`` ends with the same weights as one never
interrupted (exactly, on CPU, with or without DataLoader workers). Checkpoint folders are swapped in by renames, so a kill at any
moment leaves the last complete one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from annify import run_dir, trained_start, weighting
from annify._files import atomic_write, remove_leftovers
from annify.config import DEFAULTS, head_epochs, resolve_settings, run_label
from annify.convert import build, load_weights
from annify.cost import count, with_costs
from annify.data import build_datasets, data_info, describe_batches, make_batches, set_epoch
from annify.errors import CheckpointError, TrainError, TrainingDiverged
from annify.evaluate import (
    Evaluation,
    anytime_table,
    evaluate,
    fit_to_data,
    plot_anytime,
    plot_weights,
    resolve_device,
    save_table,
)
from annify.sources import model_source
from annify.spec import Spec, SpecError, dump, load_spec

__all__ = [
    "DEFAULTS",
    "CheckpointError",
    "RunResult",
    "TrainingDiverged",
    "resolve_settings",
    "run_label",
    "train",
]


@dataclass
class RunResult:
    """What a run produced."""

    out: Path  # the run folder
    spec: Spec  # the resolved spec (data's classes and size, costs, train settings)
    net: nn.Module  # the trained network (final weights, on the training device)
    epochs_done: int
    table: list[dict]  # anytime rows, see annify.evaluate.anytime_table
    seconds: float  # wall time of this call
    rank: int  # 0 on the process that wrote the files
    original: dict | None = None  # the --init network's row (output "original"), measured before training


def train(
    spec_or_path: Spec | str | os.PathLike,
    *,
    out: str | os.PathLike,
    device: str = "auto",
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    resume: bool = False,
    workers: int = 0,
    loader: str = "auto",
    stop_after: int | None = None,
    log: Callable[[str], Any] = print,
    model: nn.Module | None = None,
    **settings: Any,
) -> RunResult:
    """Train an anytime network and write its run folder (see the module docstring).

    ``settings`` are the run's settings (``DEFAULTS`` lists them: data, epochs, weights, ...); one
    left out or None takes the spec's ``train:`` value, else its default. The other arguments say
    how to run, not what to learn: ``amp`` (bf16 autocast) and ``channels_last`` default to on for
    CUDA and off for the CPU, where they run too when asked (with ``compile``, inductor), so the
    GPU code paths are exercised on any machine. Under ``torchrun`` (WORLD_SIZE > 1) this runs
    DistributedDataParallel (gloo on CPU, nccl on CUDA); ``batch_size`` is per process and rank 0
    writes the files. ``resume`` continues from ``out/checkpoints/last`` with the same settings (it
    starts afresh, with a note, when there is none). ``stop_after`` ends the run once that many
    epochs are done, as a time-limited job would. ``loader``: see ``annify.data.make_batches``.
    ``model`` is the module a ``module:CLASS`` spec was converted from (``annify.convert(module)``),
    passed again (a spec never names code to import); its classifier must already fit the data.
    """
    started = time.perf_counter()
    # ---------------------------------------------------------------- setup
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    cfg = resolve_settings(spec.train, settings)
    out = Path(out)
    _check_out(out)
    world, rank, dev, owns_group = _start_distributed(device)
    held = None
    try:
        held = run_dir.lock(out) if rank == 0 else None  # one process writes a run folder at a time
        if model is None and model_source(spec.model)[0] == "module":
            raise TrainError(
                f"{spec.name} was converted from a module of your own ({spec.model}), which a spec never "
                "imports; name the code that builds it yourself: annify train SPEC --module my_net.py:MyNet, or from "
                "Python annify.train.train(spec, model=YourModule(...), out=...)"
            )
        run = _setup(
            spec, cfg, out, resume, dev, rank, world, amp, channels_last, compile, loader, workers, log, model
        )
        # ------------------------------------------------------------ loop: train, evaluate on val, save
        val: Evaluation | None = None
        done = run.start_epoch
        for epoch in range(run.start_epoch, cfg["epochs"]):
            if stop_after is not None and epoch >= stop_after:
                break
            row = _train_epoch(run, epoch)
            val = evaluate(run.net, run.eval_batches["val"], dev, run.amp, run.channels_last)
            _end_epoch(run, epoch, row, val)
            done = epoch + 1
        # ------------------------------------------------------------ evaluate the final weights, save
        table = _finish(run, val)
        seconds = time.perf_counter() - started
        return RunResult(out, run.spec, run.net, done, table, seconds, rank, run.original)
    except KeyboardInterrupt:
        if rank == 0:
            last = run_dir.RunDir(out).last_checkpoint()
            log(
                f"interrupted: {out} keeps its last checkpoint ({last}); continue it with the same command "
                "and --resume (annify demo resumes by itself)"
                if last is not None
                else f"interrupted before the first checkpoint of {out}; run the same command again to start over"
            )
        raise
    finally:
        if held is not None:
            held.release()
        if owns_group:
            dist.destroy_process_group()


# -------------------------------------------------------------------- the run's pieces


@dataclass
class _Run:
    """What one training run holds from setup to the end."""

    out: Path
    cfg: dict
    spec: Spec  # refitted to the data, with costs at the trained size and the settings
    net: nn.Module  # the AnytimeNet
    model: nn.Module  # what the steps call: the net, wrapped by DDP and torch.compile where asked
    costs: Any
    optimizer: Any
    scheduler: Any
    scheme: weighting.WeightScheme
    head_local: weighting.HeadLocal | None
    trunk_params: list[torch.Tensor]
    train_batches: Any
    eval_batches: dict
    dev: torch.device
    amp: bool
    channels_last: bool
    rank: int
    world: int
    say: Callable[[str], Any]
    resumed: bool
    start_epoch: int
    best: float
    wrap: Callable[[nn.Module], nn.Module]  # DDP and torch.compile as asked (again when the trunk thaws)
    teacher: nn.Module | None = None  # the frozen original network, with teacher="original"
    original: dict | None = None  # its anytime row (trained_start.original_row)
    frozen: bool = False  # whether the trunk is frozen now (freeze_trunk, or the heads-only phase)

    @property
    def nodes(self) -> list[str]:
        return [h.node for h in self.spec.heads]

    @property
    def folder(self) -> run_dir.RunDir:
        return run_dir.RunDir(self.out)


def _start_distributed(device: str) -> tuple[int, int, torch.device, bool]:
    """(world size, rank, device, whether this call started the process group)."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world, dist.get_rank() if world > 1 else 0, dev, owns_group


def _setup(
    spec, cfg, out, resume, dev, rank, world, amp, channels_last, compile, loader, workers, log, model=None
) -> _Run:
    """Run folder, data, network, optimizer, weight scheme and resume state, in that order."""
    say = log if rank == 0 else (lambda *_: None)
    cuda = dev.type == "cuda"
    use_amp = cuda if amp is None else amp
    use_cl = cuda if channels_last is None else channels_last
    last = run_dir.RunDir(out).last_checkpoint()
    if last is not None and not resume:
        raise TrainError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    if resume and last is None:
        say(f"note: no checkpoint in {out} to resume from; starting from scratch")
    foreign = [] if resume else run_dir.foreign_results(out, spec, cfg)
    if foreign:
        raise TrainError(
            f"{out} holds another run's results ({', '.join(foreign)}), which this run would replace; "
            "choose another --out, or delete those files to reuse the folder"
        )

    # data and network
    spec, note = fit_to_data(spec, cfg["data"])
    if note:
        say(note)
    datasets = build_datasets(cfg["data"], input_size=spec.input_size, train_subset=cfg["train_subset"])
    batches = make_batches(
        datasets, cfg["batch_size"], loader, workers, dev, seed=cfg["seed"], rank=rank, world=world
    )
    say(f"data: {cfg['data']}, {len(datasets['train'])} train / {len(datasets['val'])} val / "
        f"{len(datasets['test'])} test images, {describe_batches(batches['train'], workers)}")  # fmt: skip
    torch.manual_seed(cfg["seed"])
    net = build(spec, model)
    costs = count(net, spec.input_size)  # at the size actually trained
    spec = replace(with_costs(spec, costs), train=dict(cfg))
    net.describe(spec)  # its costs at the trained size: cost.exit_flops(result.net) reads them
    has_original = False
    if cfg["init"] is not None and last is None:  # a resumed run reads its checkpoint instead
        has_original = trained_start.load_init(net, spec, cfg["init"], say)
    teacher = None
    if cfg["teacher"] == "original" and cfg["distill"]:
        source, teaches = net, has_original  # a fresh run: the network just loaded is the original
        if last is not None:  # a resumed one: the original again, from its source
            source = build(spec, model)
            teaches = trained_start.load_init(source, spec, cfg["init"], lambda *_: None)
        if teaches:
            teacher = trained_start.teacher_from(source, model).to(dev)
            if use_cl:
                teacher.to(memory_format=torch.channels_last)
        elif last is None:
            say(
                "note: no original network on this data (its classifier was skipped), so nothing to distil from"
            )
    net.to(dev)
    if use_cl:
        net.to(memory_format=torch.channels_last)
    original = trained_start.read_original(out) if last is not None else None
    if has_original:  # the network the user had, on the same splits, before any step
        val0, test0 = (evaluate(net, batches[s], dev, use_amp, use_cl) for s in ("val", "test"))
        original = trained_start.original_row(
            val0.errors[-1], test0.errors[-1], costs.flops_single[-1], costs.flops[-1]
        )

    # optimizer, weights, resume
    if last is not None:
        load_weights(net, last)  # a checkpoint of another spec gets a one-line ConvertError
    optimizer, scheduler = _optimizer(net, cfg)
    scheme = _scheme(cfg, spec, net.num_outputs).to(dev)
    start_epoch, best = 0, math.inf
    if last is not None:
        start_epoch, best = _restore(last, cfg, optimizer, scheduler, scheme)
        say(f"resuming {out} after epoch {start_epoch}")
    if rank == 0:
        _start_run_folder(out, spec, cfg, start_epoch, f"device={dev} amp={'bf16' if use_amp else 'off'} "
                          f"compile={compile} world_size={world}")  # fmt: skip
        if has_original:
            trained_start.write_original(out, original, cfg["init"])
            say(f"original network ({cfg['init']}): val error {100 * original['val_error']:.2f} %, "
                f"test error {100 * original['test_error']:.2f} %")  # fmt: skip

    def wrap(net: nn.Module) -> nn.Module:
        model = net
        if world > 1:
            model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if cuda else None)
        return torch.compile(model) if compile else model

    trunk = [p for n, p in net.named_parameters() if not n.startswith(net.exits_prefix)]
    head_local = weighting.HeadLocal(net) if cfg["head_local"] else None
    return _Run(
        out, cfg, spec, net, net, costs, optimizer, scheduler, scheme, head_local, trunk, batches["train"],
        {s: batches[s] for s in ("val", "test")}, dev, use_amp, use_cl, rank, world, say, last is not None,
        start_epoch, best, wrap, teacher, original, frozen=None,
    )  # fmt: skip


def _scheme(cfg: dict, spec: Spec, num_outputs: int) -> weighting.WeightScheme:
    hp = dict(cfg["weight_hparams"])
    if cfg["weights"] == "opt" and cfg["head"] is not None:
        if cfg["head"] > num_outputs:
            raise SpecError(
                f"head {cfg['head']} is out of range: {spec.name} has {num_outputs} outputs (1 to "
                f"{num_outputs}; `annify eval` lists them)"
            )
        hp["head"] = cfg["head"] - 1
    return weighting.get(cfg["weights"], num_outputs, **hp)


def _start_run_folder(out: Path, spec: Spec, cfg: dict, start_epoch: int, machine: str) -> None:
    """config.yaml, data.json and the metrics of the epochs kept; leftovers of an interrupted write go."""
    folder = run_dir.RunDir(out)
    folder.checkpoints.mkdir(parents=True, exist_ok=True)
    for place in (folder.root, folder.checkpoints):  # what a kill left of a write in progress
        remove_leftovers(place)
    header = f"annify eval {folder.config} --checkpoint {folder.last}\n"
    header += f"resolved spec and settings of the run in {out}, written by `annify train`\n{machine}"
    atomic_write(folder.config, dump(spec, header))
    info = data_info(cfg["data"])  # what `annify predict` must normalise images with
    record = {"source": cfg["data"], "mean": list(info.mean), "std": list(info.std)}
    atomic_write(folder.data, json.dumps(record, indent=1) + "\n")
    _keep_metrics(folder.metrics, start_epoch)


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One epoch of weighted steps; the metrics row of the epoch (without validation).

    A step never waits for the device: the losses, their finiteness and the weight scheme stay
    there (``_EpochLosses``), and the host reads them only at a progress check, at most every
    ``CHECK_EVERY_S`` seconds, and at the epoch's end. A non-finite loss stops the run at the
    next check with ``TrainingDiverged`` naming the first step and output it hit; the steps run
    after it are dropped with the run (no checkpoint is written from them).
    """
    from tqdm.auto import tqdm

    cfg, net = run.cfg, run.net
    _seed_all(_epoch_seed(cfg["seed"], epoch, run.rank))
    run.train_batches.generator.manual_seed(_epoch_seed(cfg["seed"], epoch, 0))  # shuffle (one process)
    set_epoch({"train": run.train_batches}, epoch)  # shuffle (DistributedSampler)
    run.scheduler.step(epoch)
    run.scheme.set_progress(epoch, cfg["epochs"])
    _set_phase(run, cfg["freeze_trunk"] or epoch < head_epochs(cfg))
    _train_mode(net, run.frozen)
    distill = (cfg["distill"], cfg["distill_temperature"])
    watch = _EpochLosses(net.num_outputs, run.dev)
    steps, images, tic = 0, 0, time.perf_counter()
    estimate = epoch == run.start_epoch and run.rank == 0  # once, from this call's first steps
    bar = tqdm(
        run.train_batches,
        desc=f"epoch {epoch + 1}/{cfg['epochs']}",
        leave=False,
        disable=True if run.rank != 0 else None,
    )  # fmt: skip  (None: off when not a TTY)
    for x, y in bar:
        x, y = x.to(run.dev, non_blocking=True), y.to(run.dev, non_blocking=True)  # no-op on the fast path
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if run.head_local is not None:
            run.head_local.set(run.scheme.weights)
        losses, ce = output_objectives(run.model, x, y, run.amp, *distill, teacher=run.teacher)  # (K,), (K,)
        weighted_update(losses, run.scheme, run.optimizer, run.trunk_params, run.head_local, observed=ce)
        steps, images = steps + 1, images + len(y) * run.world
        watch.add(losses, steps)
        if watch.due(steps):
            _check(watch.read(steps), run, epoch, bar)
            if estimate and time.perf_counter() - tic >= ESTIMATE_AFTER_S:
                estimate = _say_estimate(run, epoch, steps, time.perf_counter() - tic)
    mean = _check(watch.read(steps), run, epoch, bar)  # also waits for the last step
    seconds = time.perf_counter() - tic
    if estimate:
        _say_estimate(run, epoch, steps, seconds)
    if cfg["bn_recalibrate"]:
        recalibrate_bn(net, run.train_batches, cfg["bn_recalibrate"], run.dev, run.amp, run.channels_last)
    if run.world > 1:  # DDP syncs buffers before each forward; the last forward's BN updates differ
        for b in net.buffers():
            dist.broadcast(b, 0)
    return {
        "epoch": epoch + 1,
        "train_loss": mean,
        "weights": run.scheme.weights.tolist(),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": round(images / seconds, 1),
        "time_s": round(seconds, 3),
    }


ESTIMATE_AFTER_S = 10.0  # the run's duration is estimated from the steps of its first seconds
LONG_JOB_S = 120.0  # and said when the rest takes longer than this


def _say_estimate(run: _Run, epoch: int, steps: int, seconds: float) -> bool:
    """Say how long the rest of the run will take, from the time its first ``steps`` took; returns False."""
    per_step = seconds / max(steps, 1)
    per_epoch = len(run.train_batches)
    left = per_step * (per_epoch * (run.cfg["epochs"] - epoch) - steps)
    if left >= LONG_JOB_S:
        run.say(
            f"estimate: about {_duration(left)} more for {run.cfg['epochs'] - epoch} epochs of {per_epoch} steps "
            f"({per_step:.3g} s a step, evaluation not counted); --epochs N or --train-subset N shortens it"
        )
    return False


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


CHECK_EVERY_S = 2.0  # seconds between the host's looks at the losses (progress bar, finiteness)
_NEVER = 2**62  # "no non-finite loss yet", larger than any step code


class _EpochLosses:
    """An epoch's per-output losses, kept on the training device so that a step needs no host sync.

    ``add`` sums the detached losses and records, per output, the first step whose loss was not
    finite (as ``2 * step`` for nan, ``2 * step + 1`` for inf). ``read`` brings them to the host,
    the one sync, averaged over the ranks under DDP. ``due`` says when to read: every ``every``
    steps, where ``every`` is re-estimated at each read so that reads come about ``CHECK_EVERY_S``
    seconds apart; the ranks agree on it (the smallest), so they all read, and stop, at one step.
    """

    def __init__(self, k: int, device: torch.device) -> None:
        self.sum = torch.zeros(k, dtype=torch.float64, device=device)  # (K,) summed over steps
        self.first_bad = torch.full((k,), _NEVER, dtype=torch.int64, device=device)  # (K,) step codes
        self.every, self.last_step, self.last_time = 1, 0, time.perf_counter()

    def add(self, losses: torch.Tensor, step: int) -> None:
        v = losses.detach().float()
        code = torch.where(torch.isfinite(v), _NEVER, 2 * step + torch.isinf(v).long())
        self.sum += v.double()
        torch.minimum(self.first_bad, code, out=self.first_bad)

    def due(self, step: int) -> bool:
        return step - self.last_step >= self.every

    def read(self, step: int) -> tuple[list[float], list[int]]:
        """(mean loss of each output so far, first non-finite step code of each output), on the host."""
        now = time.perf_counter()
        per_step = (now - self.last_time) / max(step - self.last_step, 1)
        every = max(1, int(CHECK_EVERY_S / per_step)) if per_step > 0 else 1
        total = self.sum.clone()
        codes = torch.cat([self.first_bad, self.first_bad.new_tensor([every])])  # (K + 1,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            dist.all_reduce(codes, op=dist.ReduceOp.MIN)
            total /= dist.get_world_size()
        mean, codes = (total / max(step, 1)).tolist(), codes.tolist()  # the host sync
        self.every, self.last_step, self.last_time = codes[-1], step, now
        return mean, codes[:-1]


def _check(seen: tuple[list[float], list[int]], run: _Run, epoch: int, bar) -> list[float]:
    """Show the losses on the progress bar; stop the run if one was not finite. Returns the means."""
    mean, codes = seen
    first = min(codes)
    if first < _NEVER:
        i = codes.index(first)
        node = "the model's classifier" if run.nodes[i] == "model" else run.nodes[i]
        where = (
            f"last good checkpoint: {run.folder.last}"
            if run.resumed or epoch > run.start_epoch
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"loss of output {i + 1} ({node}) is {'inf' if first % 2 else 'nan'} at epoch {epoch + 1} "
            f"step {first // 2}; {where}"
        )
    bar.set_postfix_str("loss " + "|".join(f"{v:.2f}" for v in mean))
    return mean


def _end_epoch(run: _Run, epoch: int, row: dict, val: Evaluation) -> None:
    """Metrics line and checkpoints (last; best by anytime quality, the mean val error over outputs)."""
    row = {**row, "val_error": val.errors, "val_loss": val.losses}
    score = sum(val.errors) / len(val.errors)
    if run.rank == 0:
        try:
            with open(run.folder.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk, most often: the checkpoint kept is the one to resume from
            raise run.folder.unwritable(run.folder.metrics, e) from None
        run.say(_epoch_line(row, run.cfg["epochs"]))
        state = {
            "epoch": epoch + 1,
            "best": min(run.best, score),
            "settings": run.cfg,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scheme": run.scheme.state_dict(),
            "rng": _rng_state(),
        }
        weights_file = _weights_writer(run.net)
        run.folder.write_checkpoint(
            run.folder.last, {run_dir.WEIGHTS: weights_file, run_dir.STATE: _saver(state)}
        )
        if score < run.best:
            info = {"epoch": epoch + 1, "val_error": val.errors}
            run.folder.write_checkpoint(
                run.folder.best, {run_dir.WEIGHTS: weights_file, run_dir.BEST_INFO: _json(info)}
            )
    run.best = min(run.best, score)


def _finish(run: _Run, val: Evaluation | None) -> list[dict]:
    """The anytime table of the final weights on val and test; rank 0 writes it and the plots."""
    if val is None:
        val = evaluate(run.net, run.eval_batches["val"], run.dev, run.amp, run.channels_last)
    test = evaluate(run.net, run.eval_batches["test"], run.dev, run.amp, run.channels_last)
    table = anytime_table(run.nodes, run.costs.flops, val, test)
    if run.rank == 0:
        cfg, out = run.cfg, run.out
        save_table(table + ([run.original] if run.original else []), out)
        curves = {s: [(r["flops"], r[f"{s}_error"]) for r in table] for s in ("val", "test")}
        o = run.original
        marks = {f"original, {s}": (o["flops"], o[f"{s}_error"]) for s in ("val", "test")} if o else None
        title = f"{run.spec.name}, {cfg['weights']}, {cfg['data']}"
        plot_anytime(curves, run.folder.anytime_png, title=title, marks=marks)
        history = [(r["epoch"], r["weights"]) for r in _read_metrics(run.folder.metrics)]
        if history:
            plot_weights(history, run.folder.weights_png, title=f"{cfg['weights']} weights")
    if run.world > 1:
        dist.barrier()
    return table


# -------------------------------------------------------------------- setup helpers


def _check_out(out: Path) -> None:
    """A one-line error, before any work, when the run folder cannot be a writable folder."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OSError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"--out {out}: {existing} is not writable; choose another --out")


def _set_phase(run: _Run, frozen: bool) -> None:
    """Freeze or thaw the trunk (``freeze_trunk``, the heads-only epochs of ``head_epochs``); rewrap the model.

    A frozen trunk's parameters take no gradient (the optimizer skips them) and its BatchNorm layers
    stay in eval mode, so a heads-only epoch leaves the trunk, and the last output, exactly as they were.
    """
    if run.frozen == frozen:
        return
    for name, p in run.net.named_parameters():
        p.requires_grad_(not frozen or name.startswith(run.net.exits_prefix))
    run.model = run.wrap(run.net)  # DDP registers the parameters that take gradients when it wraps
    if run.frozen is not None and not frozen:
        run.say(f"the trunk trains from here on (lr {run.cfg['lr']:g}); the heads so far trained alone")
    run.frozen = frozen


class _Schedule:
    """Each parameter group's lr: its base lr × ``decay_rate`` per milestone passed; the milestones of a
    two-phase run (``head_epochs``) apply within each phase, so the joint phase starts at the full lr."""

    def __init__(self, optimizer, cfg: dict) -> None:
        self.optimizer, self.base = optimizer, [g["lr"] for g in optimizer.param_groups]
        split, epochs = head_epochs(cfg), cfg["epochs"]
        phases = [(0, split), (split, epochs)] if 0 < split < epochs else [(0, epochs)]
        # a fraction f decays the lr for the epochs that start at or after f of the phase
        self.phases = [
            (start, [start + (math.ceil(round(m * (end - start), 6)) if isinstance(m, float) else m)
                     for m in cfg["milestones"]])
            for start, end in phases
        ]  # fmt: skip
        self.rate = cfg["decay_rate"]

    def factor(self, epoch: int) -> float:
        _, at = [p for p in self.phases if p[0] <= epoch][-1]
        return self.rate ** sum(m <= epoch for m in at)

    def step(self, epoch: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * self.factor(epoch)

    def state_dict(self) -> dict:
        return {"base": list(self.base)}  # the lr follows from the epoch; nothing else to keep

    def load_state_dict(self, state: dict) -> None:
        pass  # runs written with timm's multistep scheduler resume with the same lrs


def _optimizer(net: nn.Module, cfg: dict):
    """timm's optimizer (torch's fused kernel where the class has one) and the multistep schedule.

    The heads train at ``head_lr`` (default ``lr``), the trunk and the model's classifier at ``lr``;
    timm's convention for weight decay (none on biases and norm parameters) in both.

    Fused: one kernel over all parameters instead of a few per tensor; ``optimizer.step()`` of SGD on
    the CPU (BENCHMARKS.md §8) takes 0.38x the per-tensor loop's time for the converted CIFAR ResNet
    (21 outputs), 0.41x for resnet50. The update is the same arithmetic, rounded differently.
    """
    import inspect

    from timm.optim import create_optimizer_v2, get_optimizer_class, param_groups_weight_decay

    extra = {"nesterov": cfg["nesterov"]} if cfg["opt"] in ("sgd", "momentum", "nesterov") else {}
    if "fused" in inspect.signature(get_optimizer_class(cfg["opt"], bind_defaults=False)).parameters:
        extra["fused"] = True
    groups = []
    head_lr = cfg["lr"] if cfg["head_lr"] is None else cfg["head_lr"]
    exits = getattr(net, "exits", None)  # an AnytimeNet's added heads; a plain module has none
    heads = {id(p) for p in exits.parameters()} if exits is not None else set()
    for group in param_groups_weight_decay(net, cfg["weight_decay"]):
        for is_head, lr in ((False, cfg["lr"]), (True, head_lr)):
            params = [p for p in group["params"] if (id(p) in heads) == is_head]
            if params:
                groups.append({**group, "params": params, "lr": lr})
    optimizer = create_optimizer_v2(
        groups,
        opt=cfg["opt"],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        momentum=cfg["momentum"],
        **extra,
    )
    return optimizer, _Schedule(optimizer, cfg)


def _train_mode(net: nn.Module, freeze_trunk: bool) -> None:
    """Train mode; with a frozen trunk only the heads train (trunk BatchNorm statistics stay put)."""
    if freeze_trunk:
        net.eval()
        net.exits.train()
    else:
        net.train()


def output_objectives(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool = False,
    distill: float = 0.0,
    temperature: float = 1.0,
    teacher: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(every output's objective, every output's cross-entropy), two (K,) tensors (``weighting.objectives``).

    ``teacher``: a frozen network whose logits every output also learns from (``distill`` > 0).
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        outs = model(x)  # K × (B, num_classes)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)  # (B, num_classes)
    return weighting.objectives(outs, y, distill, temperature, target if teacher is not None else None)


def weighted_update(
    losses: torch.Tensor,
    scheme,
    optimizer,
    trunk_params: list[torch.Tensor],
    head_local: weighting.HeadLocal | None = None,
    observed: torch.Tensor | None = None,
) -> None:
    """One optimizer step on Σᵢ wᵢ·ℓᵢ, then the weight scheme's update (once per optimizer step).

    With ``head_local`` (whose ``set`` ran before this step's forward) the objective is
    ``Σ_{i<K} ℓᵢ + w_K·ℓ_K``: the weights act on the trunk through the taps' gradient scaling.
    ``observed``: what the scheme balances, when not the objectives themselves (the cross-entropies
    of a distilled run).
    """
    weights = scheme.weights.to(losses.device)  # no copy: the trainer keeps the scheme on the device
    total = (weights * losses).sum() if head_local is None else head_local.objective(losses, weights)
    if not total.requires_grad:
        raise TrainError("nothing to train: every output with a nonzero weight is frozen")
    norms = weighting.per_head_grad_norms(list(losses), trunk_params) if scheme.needs_grad_norms else None
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    seen = (losses if observed is None else observed).detach()
    if norms is None:
        scheme.update(seen)
    else:
        scheme.update(seen, norms)


@torch.no_grad()
def recalibrate_bn(
    net: nn.Module, batches, images: int, device: torch.device, amp: bool = False, channels_last: bool = False
) -> None:
    """Recompute the BatchNorm statistics of the layers now in train mode on up to ``images`` training images.

    The running averages (momentum 0.1) trail the weights; after few steps at a high learning rate they
    describe a network that no longer exists (one epoch of 2,000 Fashion-MNIST images: the last output
    80 % wrong in eval mode, 58 % with recomputed statistics). Each layer gets the plain average over the
    batches, as pycls's precise BN does. Layers in eval mode (a frozen trunk) are
    left exactly as they are; the random state is restored, so training continues as it would have.
    """
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    layers = [m for m in layers if m.track_running_stats]
    if not layers or images <= 0:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            seen, j = 0, 0
            for x, _ in batches:
                for m in layers:  # 1/(j+1): the plain average of the j+1 batches so far, with no host sync
                    m.momentum = 1.0 / (j + 1)
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    net(x[: images - seen])
                seen, j = seen + min(len(x), images - seen), j + 1
                if seen >= images:
                    break
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum


def _epoch_line(row: dict, epochs: int) -> str:
    def nums(xs, scale=1.0, fmt=".2f"):
        return " ".join(f"{scale * x:{fmt}}" for x in xs)

    return (
        f"epoch {row['epoch']}/{epochs}  loss {nums(row['train_loss'])}  val err % {nums(row['val_error'], 100, '.1f')}"
        f"  w {nums(row['weights'])}  lr {row['lr']:.3g}  {row['images_per_s']:.0f} img/s  {row['time_s']:.1f}s"
    )


# -------------------------------------------------------------------- reproducibility


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and CUDA
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict:
    """RNG states as tensors and lists, which ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -------------------------------------------------------------------- checkpoints and run files


def _weights_writer(net: nn.Module) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    return lambda path: save_file(tensors, str(path))


def _saver(state: dict) -> Callable[[Path], None]:
    return lambda path: torch.save(state, path)


def _json(data: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data) + "\n")


_BEFORE_SETTINGS = {
    "head_local": False, "distill": 0.0, "distill_temperature": 1.0, "train_subset": None, "bn_recalibrate": 0,
}  # fmt: skip


def _restore(folder: Path, cfg: dict, optimizer, scheduler, scheme) -> tuple[int, float]:
    """Load optimizer, scheduler, weight scheme and RNG states; return (epochs done, best score)."""
    state = run_dir.read_state(folder)
    path = folder / run_dir.STATE
    # a setting a run predates had, for that run, the value of the behaviour before it existed
    saved = {**_BEFORE_SETTINGS, **state.get("settings", {})}
    changed = [k for k in cfg if saved.get(k, DEFAULTS[k]) != cfg[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k, DEFAULTS[k])!r} in the run, {cfg[k]!r} now" for k in changed)
        raise CheckpointError(
            f"the run in {folder.parent.parent} used other settings ({diffs}); resume with the same ones"
        )
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheme.load_state_dict(state["scheme"])
        _set_rng_state(state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint state {path} does not fit this run ({str(e).splitlines()[0]})"
        ) from None
    return int(state["epoch"]), float(state["best"])


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line a kill cut short
    return rows


def _keep_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines of epochs after the checkpoint (written before a kill), so a resume does not repeat them."""
    rows = [r for r in _read_metrics(path) if r.get("epoch", 0) <= epochs_done]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
