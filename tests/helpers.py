"""Helpers shared by the test modules (pytest puts this folder on sys.path); fixtures live in conftest.py."""

import gzip
import pickle
import struct

import numpy as np
import torch
from torch import nn


class ConvBNReLU(nn.Module):
    """relu(bn(conv3x3(x))), C channels in and out, no bias: a unit whose cost is easy to derive."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def tiny_spec(train: str = "{batch_size: 128}") -> str:
    """A hand-written spec: cifar_resnet_n3_c8 at 3×32×32 with heads after stages 1 and 2."""
    return f"""\
name: tiny
model: cifar_resnet_n3_c8
input_size: [3, 32, 32]
num_classes: 10
heads:
  - {{node: stages.0.2.add}}
  - {{node: stages.1.2.add}}
  - {{node: model}}
train: {train}
"""


def spec_file(tmp_path_factory, text: str | None = None):
    """A spec file (``tiny_spec()`` unless ``text``) in a fresh temporary folder: a module fixture's body."""
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(tiny_spec() if text is None else text)
    return path


def assert_one_line_error(result, *fragments: str, alone: bool = True) -> None:
    """Exit code 1, an ``Error: ...`` line holding every fragment, no traceback.

    With ``alone`` nothing else was printed; otherwise the error is the last line (commands that
    train print progress before they fail).
    """
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    if alone:
        assert len(lines) == 1, result.output
    assert lines[-1].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def write_cifar(root, kind, n_train=60, n_test=20, num_classes=10):
    """A tiny copy of the CIFAR python release in its real pickle format; returns the labels."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    key = "labels" if kind == "cifar10" else "fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] if kind == "cifar10" else ["train"]
    train_labels = rng.integers(0, num_classes, n_train).tolist()
    per_file = n_train // len(names)
    batches = [(name, train_labels[i * per_file : (i + 1) * per_file]) for i, name in enumerate(names)]
    test_labels = rng.integers(0, num_classes, n_test).tolist()
    batches.append(("test_batch" if kind == "cifar10" else "test", test_labels))
    for name, labels in batches:
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        batch = {b"data": data, key.encode(): labels, b"filenames": [b"x.png"] * len(labels)}
        if kind == "cifar100":
            batch[b"coarse_labels"] = [0] * len(labels)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder, train_labels, test_labels


IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic (0, 0, type 0x08, ndim), big-endian dims, data."""
    head = struct.pack(">BBBB", 0, 0, 8, array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.numpy().tobytes()


def write_idx(folder, n_train=200, n_test=50, classes=10, gz=True, seed=0):
    """A tiny MNIST-family release: returns (train images, train labels, test images, test labels)."""
    g = torch.Generator().manual_seed(seed)
    data = (
        torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        (torch.arange(n_train) % classes).to(torch.uint8),
        torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        (torch.arange(n_test) % classes).to(torch.uint8),
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(IDX_NAMES, data, strict=True):
        raw = _idx(array)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(raw)
        else:
            (folder / name).write_bytes(raw)
    return data
