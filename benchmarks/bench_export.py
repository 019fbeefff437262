"""Export size: every truncated network and segment of an anytime network, with each weight once.

Exports SPEC (default ``specs/resann50.yaml``, fresh weights) to ONNX with ``annify.export`` (checked
against PyTorch), then reports, from the same files:

- shared: the ONNX files as written (graphs) plus the one ``<name>.onnx.data`` they all read;
- embedded: the same files with their weights put back inside each one (``onnx.load`` with its
  external data, ``onnx.save``), which is how every file was written before the weights were shared;
- plain: the plain timm model exported alone, for scale.

Usage::

    python -m benchmarks.bench_export                 # specs/resann50.yaml
    python -m benchmarks.bench_export --spec specs/cifar_resann_n7_c16.yaml
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import annify
from benchmarks._common import export


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/resann50.yaml")
    args = parser.parse_args()
    import onnx

    torch.manual_seed(0)
    net = annify.load(args.spec).eval()
    params = sum(t.numel() * t.element_size() for t in net.state_dict().values() if t.is_floating_point())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        started = time.perf_counter()
        manifest = export(net, folder, formats=("onnx",))
        seconds = time.perf_counter() - started
        files = [folder / f["path"] for f in manifest["files"]]
        graphs = sum(p.stat().st_size for p in files)
        data = (folder / manifest["onnx_weights"]).stat().st_size
        embedded = 0
        for p in files:
            inline = Path(tmp) / "inline.onnx"
            onnx.save(onnx.load(str(p)), str(inline))
            embedded += inline.stat().st_size
        plain = Path(tmp) / "plain.onnx"
        model = annify.create_model(net.spec.model, **net.spec.model_kwargs, num_classes=net.spec.num_classes)
        x = torch.randn(1, *net.spec.input_size)
        torch.onnx.export(model.eval(), (x,), str(plain), dynamo=False, opset_version=17)
        plain_size = plain.stat().st_size
    kinds = {k: sum(f["kind"] == k for f in manifest["files"]) for k in ("truncated", "segment")}
    print(f"{args.spec}: {net.num_outputs} outputs, {kinds['truncated']} truncated networks + "
          f"{kinds['segment']} segments, exported and checked in {seconds:.0f} s")  # fmt: skip
    print(f"network weights (float tensors of the state dict): {_mb(params)}")
    print(f"embedded (each file carries its weights): {_mb(embedded)}")
    print(f"shared   (graphs {_mb(graphs)} + {manifest['onnx_weights']} {_mb(data)}): {_mb(graphs + data)}")
    print(f"plain timm model alone: {_mb(plain_size)}")
    print(
        f"shared / embedded = {(graphs + data) / embedded:.3f}; shared / plain = {(graphs + data) / plain_size:.3f}"
    )


if __name__ == "__main__":
    main()
