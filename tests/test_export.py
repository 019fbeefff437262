"""ONNX and TorchScript export of a tiny anytime network, checked here independently of export's own check."""

import json
import sys
import warnings

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import annify.export as export_module
from annify.convert import convert
from annify.export import ExportError, export


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net, spec, _ = convert(
        "cifar_resnet_n3_c8", every=3, input_size=(1, 8, 8), num_classes=10, model_kwargs={"in_chans": 1}
    )  # 3 outputs
    return net.eval(), spec


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    net, _ = tiny
    folder = tmp_path_factory.mktemp("export")
    return folder, export(net, folder)


def run_onnx(path, inputs: dict) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def run_torchscript(path, args) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in recent torch
        out = torch.jit.load(str(path))(*args)
    return list(out) if isinstance(out, tuple) else [out]


def test_manifest_lists_every_file_with_its_cost(tiny, exported):
    net, spec = tiny
    folder, manifest = exported
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    names = sorted(f["path"] for f in manifest["files"])
    stems = [f"{spec.name}_{kind}{i}" for kind in ("out", "seg") for i in range(3)]
    assert names == sorted(f"{s}{ext}" for s in stems for ext in (".onnx", ".pt"))
    weights = f"{spec.name}.onnx.data"
    assert manifest["onnx_weights"] == weights
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*names, weights, "manifest.json"]
    )  # no temp files
    assert manifest["segments_exported"] and manifest["flops"] == [h.flops for h in spec.heads]
    truncated = {f["output"]: f["flops"] for f in manifest["files"] if f["kind"] == "truncated"}
    assert truncated == {k: h.flops_single for k, h in enumerate(spec.heads)}  # single-exit networks
    segment = {f["output"]: f["flops"] for f in manifest["files"] if f["kind"] == "segment"}
    assert sum(segment.values()) == spec.heads[-1].flops
    first = next(f for f in manifest["files"] if f["path"].endswith("_seg1.onnx"))
    assert first["inputs"] == [{"name": "in0", "shape": ["batch", 8, 8, 8]}]
    assert first["outputs"][-1] == {"name": "logits", "shape": ["batch", 10]}
    assert all(f["max_abs_diff"] <= 1e-4 for f in manifest["files"])


def test_onnx_files_store_each_weight_once(tiny, exported):
    import onnx
    from onnx.external_data_helper import uses_external_data

    net, spec = tiny
    folder, manifest = exported
    data = (folder / manifest["onnx_weights"]).read_bytes()
    big = [t for t in net.state_dict().values() if t.numel() * t.element_size() >= export_module._INLINE]
    # every large tensor of the network is in the shared file, and the file holds nothing twice
    stored = sum(t.numel() * t.element_size() for t in big)
    assert stored <= len(data) <= stored + export_module._ALIGN * len(big)
    ranges = set()
    for f in manifest["files"]:
        if f["format"] != "onnx":
            continue
        model = onnx.load(str(folder / f["path"]), load_external_data=False)
        for t in model.graph.initializer:
            if uses_external_data(t):
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == manifest["onnx_weights"]
                ranges.add((int(info["offset"]), int(info["length"])))
        assert (folder / f["path"]).stat().st_size < len(data) / 3  # graphs only, no copies of the weights
    ends = sorted(ranges)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # distinct tensors never overlap
    assert sum(n for _, n in ranges) == stored


def test_truncated_networks_match_pytorch(tiny, exported):
    net, spec = tiny
    folder, _ = exported
    x = torch.randn(4, 1, 8, 8)  # a batch size the export never saw
    with torch.no_grad():
        want = net(x)
    for k in range(net.num_outputs):
        stem = folder / f"{spec.name}_out{k}"
        (onnx_out,) = run_onnx(stem.with_suffix(".onnx"), {"x": x})
        (ts_out,) = run_torchscript(stem.with_suffix(".pt"), (x,))
        torch.testing.assert_close(onnx_out, want[k], rtol=0, atol=1e-4)
        torch.testing.assert_close(ts_out, want[k], rtol=0, atol=1e-4)


def test_segments_chain_into_the_anytime_network(tiny, exported):
    net, spec = tiny
    folder, _ = exported
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = net(x)
    onnx_state, ts_state = [x], [x]
    for j in range(net.num_outputs):
        stem = folder / f"{spec.name}_seg{j}"
        names = ["x"] if j == 0 else [f"in{i}" for i in range(len(onnx_state))]
        *onnx_state, onnx_logits = run_onnx(
            stem.with_suffix(".onnx"), dict(zip(names, onnx_state, strict=True))
        )
        *ts_state, ts_logits = run_torchscript(stem.with_suffix(".pt"), ts_state)
        torch.testing.assert_close(onnx_logits, want[j], rtol=0, atol=1e-4)
        torch.testing.assert_close(ts_logits, want[j], rtol=0, atol=1e-4)
    assert onnx_state == [] and ts_state == []


def test_export_restores_mode_and_rejects_bad_requests(tiny, tmp_path, monkeypatch):
    net, _ = tiny
    with pytest.raises(ExportError, match="unknown export format tflite"):
        export(net, tmp_path, formats=("tflite",))
    monkeypatch.setattr(export_module, "ATOL", -1.0)  # any difference at all now fails the check
    net.train()
    try:
        with pytest.raises(ExportError, match=r"_out0.pt: torchscript output differs from PyTorch"):
            export(net, tmp_path, formats=("torchscript",))
        assert net.training
    finally:
        net.eval()
    assert list(tmp_path.iterdir()) == []  # a file that fails its check is never moved into place
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ExportError, match=r"pip install annify\[onnx\]"):
        export(net, tmp_path, formats=("onnx",))


def test_export_command(tiny, tmp_path):
    from safetensors.torch import save_file

    from annify.cli import main
    from annify.spec import dump

    net, spec = tiny
    (tmp_path / "tiny.yaml").write_text(dump(spec))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    args = ["export", str(tmp_path / "tiny.yaml"), "--mean", "0.5", "--std", "0.25", "--checkpoint", ""]
    args[-1] = str(tmp_path / "w.safetensors")
    result = CliRunner().invoke(main, [*args, "--format", "onnx", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {f["format"] for f in manifest["files"]} == {"onnx"} and len(manifest["files"]) == 6
    assert (manifest["mean"], manifest["std"], manifest["input_size"]) == (
        [0.5],
        [0.25],
        list(spec.input_size),
    )
    assert result.output.strip().endswith(f"wrote {tmp_path / 'out' / 'manifest.json'}")

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    args[-1] = str(tmp_path / "other.safetensors")
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out2")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "does not fit this spec" in result.output


def test_networks_carrying_non_tensors_export_truncated_networks_only(tmp_path):
    from test_runtime import toy_net  # carries an int and a batch-free tensor across its cuts

    net = toy_net()
    manifest = export(net, tmp_path, formats=("onnx",))
    assert not manifest["segments_exported"] and "only truncated networks" in manifest["note"]
    assert [(f["kind"], f["output"]) for f in manifest["files"]] == [("truncated", k) for k in range(3)]
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        want = net(x)
    for k in range(3):
        (got,) = run_onnx(tmp_path / f"anytime_out{k}.onnx", {"x": x})
        torch.testing.assert_close(got, want[k], rtol=0, atol=1e-4)
