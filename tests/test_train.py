"""The trainer on a tiny CIFAR ResNet and digits: exact resume (also after SIGKILL), NaN stops, frozen
trunks, timm-format initialization, DDP on CPU and the settings it resolves."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import spec_file, tiny_spec
from safetensors.torch import load_file, save_file

import annify.train as train_module
from annify.convert import load
from annify.sources import create_model
from annify.spec import SpecError
from annify.train import DEFAULTS, TrainingDiverged, resolve_settings, train

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_spec("{batch_size: 128, lr: 0.05}")
STEPS_PER_EPOCH = 10  # digits' 1,167 training images in batches of 128


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    return spec_file(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def reference(spec_path, tmp_path_factory):
    """An uninterrupted two-epoch run."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    return train(spec_path, out=out, epochs=2, log=lambda _: None)


def weights_of(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- settings -------------------------------------------------------------------------------------


def test_settings_layering_and_errors():
    cfg = resolve_settings({"lr": 0.05, "epochs": 10}, {"lr": 0.2, "batch_size": None})
    assert cfg["lr"] == 0.2 and cfg["epochs"] == 10 and cfg["batch_size"] == DEFAULTS["batch_size"]
    assert (cfg["opt"], cfg["momentum"], cfg["weight_decay"], cfg["nesterov"]) == ("sgd", 0.9, 1e-4, False)
    with pytest.raises(SpecError) as e:
        resolve_settings({"lrate": 0.1}, {"epochs": 0, "weights": "adaloss", "head": 2})
    message = str(e.value)
    assert "unknown key 'lrate'" in message and "epochs must be a positive integer" in message
    assert "head is for --weights opt" in message  # every problem is reported together


def test_run_folder_and_schedule(reference):
    out = reference.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # lr / 10 after half the epochs: epoch 1 at 0.05, epoch 2 at 0.005 (the spec's train: lr)
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005])
    assert all(len(r["train_loss"]) == len(r["val_error"]) == len(r["weights"]) == 3 for r in rows)
    assert reference.spec.input_size == (3, 8, 8) and reference.epochs_done == 2
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["scheme"]["ema"].dtype == torch.float32
    net = load(out / "config.yaml", out / "checkpoints" / "last")  # the run folder is self-describing
    assert_same_weights({k: v for k, v in net.state_dict().items()}, weights_of(out))
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".*"))  # no temporary or old folders left


# --- resume ---------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted(spec_path, reference, tmp_path):
    out = tmp_path / "run"
    first = train(spec_path, out=out, epochs=2, stop_after=1, log=lambda _: None)
    assert first.epochs_done == 1
    with open(out / "metrics.jsonl", "a") as f:  # as if killed after logging epoch 2, mid-line
        f.write('{"epoch": 2, "bogus": true}\n{"epo')
    lines = []
    second = train(spec_path, out=out, epochs=2, resume=True, log=lines.append)
    assert second.epochs_done == 2 and "resuming" in "\n".join(lines)
    assert_same_weights(weights_of(out), weights_of(reference.out))
    ref_state = torch.load(reference.out / "checkpoints/last/state.pt", weights_only=True)
    state = torch.load(out / "checkpoints/last/state.pt", weights_only=True)
    assert torch.equal(state["scheme"]["ema"], ref_state["scheme"]["ema"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "bogus" not in rows[1]
    assert second.table == reference.table


def test_resume_refuses_other_settings(spec_path, reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference.out, out)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 in the run, 0.1 now\)"):
        train(spec_path, out=out, epochs=2, lr=0.1, resume=True, log=lambda _: None)
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --resume"):
        train(spec_path, out=out, epochs=2, log=lambda _: None)


def test_train_never_replaces_another_runs_results(spec_path, reference, tmp_path):
    import shutil

    out = tmp_path / "results"
    shutil.copytree(reference.out, out)
    shutil.rmtree(out / "checkpoints")  # another run's plots and tables, no checkpoint
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"holds another run's results \(config.yaml, .*anytime.png"):
        train(spec_path, out=out, epochs=2, lr=0.1, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    # the same run (same model, heads and settings) stopped before its first checkpoint starts again there
    again = train(spec_path, out=out, epochs=2, log=lambda _: None)
    assert again.table == reference.table


def test_resume_finds_checkpoint_left_mid_swap(spec_path, reference, tmp_path):
    import shutil

    out = tmp_path / "swap"
    shutil.copytree(reference.out, out)
    (out / "checkpoints" / "last").rename(out / "checkpoints" / ".old-last")  # killed between the renames
    result = train(spec_path, out=out, epochs=2, resume=True, log=lambda _: None)
    assert result.epochs_done == 2 and result.table == reference.table


def test_resume_after_sigkill(spec_path, reference, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as the in-process reference
    command = [sys.executable, "-m", "annify", "train", str(spec_path), "--epochs", "2", "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoints" / "last" / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert torch.load(state, weights_only=True)["epoch"] == 1  # killed during epoch 2
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert_same_weights(weights_of(out), weights_of(reference.out))


# --- divergence -----------------------------------------------------------------------------------


def test_nan_stops_and_keeps_last_checkpoint(spec_path, tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned_build(spec, model=None):
        net = build(spec, model)

        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():  # a training step, not BN recalibration
                calls["n"] += 1
                if calls["n"] == STEPS_PER_EPOCH + 3:  # epoch 2, step 3
                    return output * float("nan")
            return output

        net.heads[1].register_forward_hook(hook)
        return net

    build = train_module.build
    monkeypatch.setattr(train_module, "build", poisoned_build)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as e:
        train(spec_path, out=out, epochs=2, log=lambda _: None)
    assert isinstance(e.value, ValueError)
    last = out / "checkpoints" / "last"
    assert (
        str(e.value)
        == f"loss of output 2 (stages.1.2.add) is nan at epoch 2 step 3; last good checkpoint: {last}"
    )
    net = load(out / "config.yaml", last)
    assert all(torch.isfinite(t).all() for t in net.state_dict().values() if t.is_floating_point())
    assert torch.load(last / "state.pt", weights_only=True)["epoch"] == 1


# --- no host sync per step -------------------------------------------------------------------------

SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _syncs_in_epochs(monkeypatch, spec_path, out, check_every_s, **settings) -> tuple[int, int]:
    """(calls that copy a tensor to the host during the training epochs, optimizer steps taken)."""
    calls, steps = {"n": 0, "inside": False}, {"n": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += calls["inside"]
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    epoch, update = train_module._train_epoch, train_module.weighted_update

    def counted_epoch(*args):
        calls["inside"] = True
        try:
            return epoch(*args)
        finally:
            calls["inside"] = False

    def counted_update(*args, **kwargs):
        steps["n"] += 1
        return update(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_epoch", counted_epoch)
    monkeypatch.setattr(train_module, "weighted_update", counted_update)
    monkeypatch.setattr(train_module, "CHECK_EVERY_S", check_every_s)
    train(spec_path, out=out, epochs=1, train_subset=256, log=lambda _: None, **settings)
    return calls["n"], steps["n"]


@pytest.mark.parametrize("weights", ["adaloss", "sdn"])
def test_no_host_sync_per_step(spec_path, tmp_path, monkeypatch, weights):
    """Steps copy nothing to the host: the losses are read at the (rate-limited) checks only."""
    rare = {b: _syncs_in_epochs(monkeypatch, spec_path, tmp_path / f"b{b}", 1e9, batch_size=b, weights=weights)
            for b in (64, 32)}  # fmt: skip
    assert rare[32][1] == 2 * rare[64][1] == 8  # twice the steps...
    assert rare[32][0] == rare[64][0] <= 6  # ...and the same few copies (first step, epoch end)
    every, steps = _syncs_in_epochs(
        monkeypatch, spec_path, tmp_path / "every", 0.0, batch_size=32, weights=weights
    )
    assert every >= rare[32][0] + steps - 1  # a check after every step: the counter does see them


# --- frozen trunk and timm-format init ------------------------------------------------------------


def test_init_from_timm_file_and_freeze_trunk(spec_path, tmp_path):
    # A timm state dict of the same model with another class count: the classifier is skipped.
    torch.manual_seed(123)
    timm_model = create_model("cifar_resnet_n3_c8", num_classes=7)
    for m in timm_model.modules():  # non-trivial BatchNorm statistics, so "unchanged" means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    file = tmp_path / "pretrained.safetensors"
    save_file(timm_model.state_dict(), str(file))
    lines = []
    result = train(
        spec_path, out=tmp_path / "frozen", epochs=1, init=str(file), freeze_trunk=True, log=lines.append
    )
    text = "\n".join(lines)
    assert "skipped fc.bias, fc.weight (another class count)" in text
    assert "the 2 added heads start fresh" in text
    source, trained = timm_model.state_dict(), result.net.state_dict()
    trunk = [k for k in source if not k.startswith("fc.")]
    assert trunk and all(torch.equal(trained[k], source[k]) for k in trunk)  # weights and BN statistics
    # the heads trained: compare with a fresh build from the same seed
    torch.manual_seed(0)
    fresh = train_module.build(result.spec).state_dict()
    heads = [k for k in trained if k.startswith("heads.") and k.endswith("weight")]
    assert all(not torch.equal(trained[k], fresh[k]) for k in heads)
    assert torch.equal(trained["fc.weight"], fresh["fc.weight"])  # the model's classifier stays frozen


def test_init_rejects_other_model(spec_path, tmp_path):
    file = tmp_path / "other.safetensors"
    save_file(create_model("cifar_resnet_n5_c16").state_dict(), str(file))
    with pytest.raises(ValueError, match="does not fit cifar_resnet_n3_c8"):
        train(spec_path, out=tmp_path / "x", epochs=1, init=str(file), log=lambda _: None)
    with pytest.raises(ValueError, match="timm has no pretrained weights for cifar_resnet_n3_c8"):
        train(spec_path, out=tmp_path / "y", epochs=1, init="timm", log=lambda _: None)


# --- DDP on CPU -----------------------------------------------------------------------------------


def _ddp_worker(rank, port, spec_path, out, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    result = train(spec_path, out=out, epochs=1, batch_size=64, weights="adaloss_grad", log=lambda _: None)
    torch.save({k: v.cpu() for k, v in result.net.state_dict().items()}, f"{results}/rank{rank}.pt")


def test_ddp_two_processes_agree(spec_path, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(port, str(spec_path), str(out), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_weights(ranks[0], ranks[1])
    assert_same_weights(ranks[0], weights_of(out))  # rank 0 wrote the checkpoint
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = rows[0]["weights"]
    assert len(rows) == 1 and max(weights) == 1.0 and min(weights) < 1.0  # adaloss_grad adapted them
    assert len(json.loads((out / "anytime.json").read_text())) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_compile(spec_path, tmp_path):
    result = train(
        spec_path, out=tmp_path / "cuda", epochs=2, device="cuda", compile=True, log=lambda _: None
    )
    stem = result.net.stem.weight
    assert stem.is_cuda and stem.is_contiguous(memory_format=torch.channels_last)
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"][-1] < rows[0]["train_loss"][-1]  # bf16 training makes progress
    assert_same_weights(weights_of(result.out), {k: v.cpu() for k, v in result.net.state_dict().items()})


def test_gpu_code_paths_on_cpu_bf16_channels_last(spec_path, tmp_path):
    """bf16 autocast and channels-last run on the CPU when asked: only the device differs on a GPU."""
    with _conv_output_dtypes() as dtypes:
        result = train(spec_path, out=tmp_path / "cpu", epochs=1, device="cpu", amp=True, channels_last=True,
                       head_local=True, log=lambda _: None)  # fmt: skip
    assert dtypes == {torch.bfloat16}  # every training step's convolutions ran under bf16 autocast
    assert result.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert "amp=bf16" in (result.out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert all(map(math.isfinite, rows[0]["train_loss"] + rows[0]["val_error"]))
    with _conv_output_dtypes() as dtypes:
        off = train(spec_path, out=tmp_path / "default", epochs=1, device="cpu", log=lambda _: None)
    assert dtypes == {torch.float32}  # the CPU default: float32, NCHW
    assert "amp=off" in (off.out / "config.yaml").read_text()
    assert not off.net.stem.weight.is_contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _conv_output_dtypes():
    """The dtypes every nn.Conv2d in training mode (a training step's forward) produced while the block ran."""
    seen = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_gpu_code_paths_on_cpu_with_compile(spec_path, tmp_path):
    """The whole CUDA recipe (bf16, channels-last, torch.compile with inductor) on the CPU: about 100 s here
    with a cold compile cache (5 min while every residual add broke the graph), so in the default suite.
    Dynamo's counters say it really compiled, and into graphs without a break."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train(spec_path, out=tmp_path / "c", epochs=1, device="cpu", amp=True, channels_last=True,
                   compile=True, head_local=True, distill=0.3, log=lambda _: None)  # fmt: skip
    stats = torch._dynamo.utils.counters
    assert stats["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not stats["graph_break"], f"the network is not one graph: {dict(stats['graph_break'])}"
    assert "compile=True" in (result.out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert all(map(math.isfinite, rows[0]["train_loss"]))


def test_paper_schedule():
    net = torch.nn.Linear(2, 2)
    cfg = resolve_settings({}, {"epochs": 300})
    optimizer, scheduler = train_module._optimizer(net, cfg)
    lrs = {}
    for epoch in (0, 149, 150, 224, 225, 299):
        scheduler.step(epoch)
        lrs[epoch] = optimizer.param_groups[0]["lr"]
    assert lrs == pytest.approx({0: 0.1, 149: 0.1, 150: 0.01, 224: 0.01, 225: 0.001, 299: 0.001})
    assert not any(g["nesterov"] for g in optimizer.param_groups)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-4]  # none on biases
    assert all(g["fused"] for g in optimizer.param_groups)  # torch's one-kernel update
    lamb, _ = train_module._optimizer(net, resolve_settings({}, {"opt": "lamb"}))
    assert "fused" not in lamb.param_groups[0]  # timm's own optimizers have no fused kernel
    optimizer, scheduler = train_module._optimizer(net, resolve_settings({}, {"epochs": 1}))
    scheduler.step(0)
    assert optimizer.param_groups[0]["lr"] == 0.1  # a one-epoch run never decays
