"""Load + hash time and peak memory per model file format, for one ~25M-parameter CNN.

    python3 bench/formats_bench.py                 # writes the formats section of bench/RESULTS.md
    python3 bench/formats_bench.py --params 2e6    # a quick small run (no RESULTS.md rewrite)

The same float32 weights (a VGG-like chain of 3x3 convolutions, 25.1M parameters, seeded) are saved in
every format hashdb reads; each file is then hashed (ModelHasher(256)) in a fresh subprocess that first
warms the codec's JIT on a tiny in-memory model and imports the readers. Time is the median of --repeats
runs of ``ModelHasher.hash(path)`` (the file was just written: in the page cache); peak is the peak RSS of
the first run above the RSS just before it (the mark reset through /proc/self/clear_refs; mapped file pages
that were touched count), so later runs' allocator leftovers cannot hide or inflate it.
Targets (issue 7): no format over 1.5x the safetensors time, peak under 2x the weights' bytes.
Keras/TFLite/Flax rows need their reader modules (hashdb/codec/readers/keras.py, tflite.py, flax.py), as do
the Caffe/Darknet/ncnn/OpenVINO/MXNet/MNN rows (written by tests/cnn_format_writers.py): without them the row is
skipped with a note.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench._results import machine_line, write_section  # noqa: E402


def chain(params: float) -> list[int]:
    """Channel widths of a 3x3 conv chain with about ``params`` weights (25.1M at the default)."""
    widths = [3, 64, 128, 256, 512]
    while sum(9 * a * b for a, b in zip(widths, widths[1:], strict=False)) < params - 9 * 512 * 1024:
        widths.append(512)
    if params > 20e6:
        widths.append(1024)
    return widths


def weights(params: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    widths = chain(params)
    out: dict[str, np.ndarray] = {}
    for i, (cin, cout) in enumerate(zip(widths, widths[1:], strict=False)):
        out[f"{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        out[f"{i}.bias"] = (0.01 * rng.standard_normal(cout)).astype(np.float32)
    return out


# ---------------------------------------------------------------- writers, one per format


def _module(sd: dict[str, np.ndarray]):  # noqa: ANN202
    import torch
    import torch.nn as nn

    convs = []
    for i in range(len(sd) // 2):
        w = sd[f"{i}.weight"]
        conv = nn.Conv2d(w.shape[1], w.shape[0], 3)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.copy_(torch.from_numpy(sd[f"{i}.bias"]))
        convs.append(conv)
    return nn.Sequential(*convs)


def write_all(sd: dict[str, np.ndarray], folder: Path) -> dict[str, Path | str]:
    """format label -> written file/folder, or a note saying why the row is skipped."""
    import torch
    from safetensors.numpy import save_file

    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    out: dict[str, Path | str] = {}
    save_file(sd, str(folder / "m.safetensors"))
    out["safetensors"] = folder / "m.safetensors"
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(folder / "f16.safetensors"))
    out["safetensors fp16"] = folder / "f16.safetensors"
    shards = folder / "hf_sharded"
    shards.mkdir()
    (shards / "config.json").write_text("{}")
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(shards / name))
        weight_map.update(dict.fromkeys(part, name))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out["HF folder, 2 safetensors shards"] = shards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(tsd, folder / "sd.pt")
        out["torch zip state_dict"] = folder / "sd.pt"
        torch.save(tsd, folder / "legacy.pt", _use_new_zipfile_serialization=False)
        out["torch legacy state_dict"] = folder / "legacy.pt"
        module = _module(sd)
        torch.save(module, folder / "module.pt")
        out["torch whole nn.Module"] = folder / "module.pt"
        torch.save({"epoch": 3, "state_dict": tsd, "optimizer": {"state": {}, "param_groups": []}}, folder / "ckpt.pt")
        out["torch training checkpoint"] = folder / "ckpt.pt"
        torch.jit.script(module).save(str(folder / "script.pt"))
        out["TorchScript"] = folder / "script.pt"
    np.savez(folder / "m.npz", **sd)
    out["npz"] = folder / "m.npz"
    np.savez_compressed(folder / "c.npz", **sd)
    out["npz compressed"] = folder / "c.npz"
    (folder / "m.pdparams").write_bytes(pickle.dumps(sd, protocol=4))
    out["paddle .pdparams"] = folder / "m.pdparams"
    if importlib.util.find_spec("onnx") is not None:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", f"{i}.weight", f"{i}.bias"], ["y"]) for i in range(1)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            initializer=[numpy_helper.from_array(v, name=k) for k, v in sd.items()],
        )  # fmt: skip
        onnx.save(helper.make_model(graph), str(folder / "m.onnx"))
        out["onnx"] = folder / "m.onnx"
    else:
        out["onnx"] = "skipped: the onnx package is not installed"
    out.update(_other_helpers_formats(sd, folder))
    out.update(_round3_formats(sd, folder))
    return out


def _round3_formats(sd: dict[str, np.ndarray], folder: Path) -> dict[str, Path | str]:
    """TensorFlow checkpoint and SavedModel, Paddle inference, Core ML NeuralNetwork and ML Program, ONNX with
    Constant-node weights and int8 QDQ weights, written by the spec-built writers of tests/formats_writers.py."""
    out: dict[str, Path | str] = {}
    missing = [m for m in ("tensorflow", "paddle", "coreml") if not _has_reader(m)]
    if missing:
        return {"TF / Paddle / Core ML": f"skipped: hashdb/codec/readers/{missing[0]}.py is not here yet"}
    sys.path.insert(0, str(ROOT))
    try:
        from tests import formats_writers as fw
    finally:
        sys.path.remove(str(ROOT))
    n = len(sd) // 2
    keras = {}
    for i in range(n):
        keras[f"layer_with_weights-{i}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = sd[f"{i}.weight"].transpose(2, 3, 1, 0)
        keras[f"layer_with_weights-{i}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = sd[f"{i}.bias"]
    ckpt = folder / "tf_ckpt"
    ckpt.mkdir()
    fw.tf_checkpoint(ckpt / "ckpt-1", keras)
    out["TF checkpoint folder (.index + .data)"] = ckpt
    saved = folder / "tf_savedmodel"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01")
    fw.tf_checkpoint(saved / "variables" / "variables", keras)
    out["TF SavedModel folder"] = saved
    paddle = {f"conv2d_{i}.w_0": sd[f"{i}.weight"] for i in range(n)}
    paddle |= {f"conv2d_{i}.b_0": sd[f"{i}.bias"] for i in range(n)}
    out["Paddle inference .pdmodel + .pdiparams"] = fw.paddle_inference(
        folder / "inference", paddle, [f"conv2d_{i}.w_0" for i in range(n)]
    )
    layers = [fw.nn_conv(f"conv{i}", *sd[f"{i}.weight"].shape[:2], (3, 3), fw.wp_float(sd[f"{i}.weight"]),
                         fw.wp_float(sd[f"{i}.bias"])) for i in range(n)]  # fmt: skip
    out["Core ML .mlmodel (NeuralNetwork)"] = fw.coreml_nn(folder / "m.mlmodel", layers)
    blobs = fw.BlobWriter()
    ops = []
    for i in range(n):
        w = sd[f"{i}.weight"]
        val = fw.mil_blob_value(w, "@model_path/weights/weight.bin", blobs.add(w))
        ops.append(fw.mil_op("const", f"w{i}", attrs={"val": val}))
        ops.append(fw.mil_op("conv", f"y{i}", {"x": "x", "weight": f"w{i}"}))
    spec = fw.mlpackage(folder / "m.mlpackage", ops)
    (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
    out["Core ML .mlpackage (ML Program)"] = folder / "m.mlpackage"
    if importlib.util.find_spec("onnx") is None:
        out["onnx Constant nodes"] = out["onnx int8 QDQ"] = "skipped: the onnx package is not installed"
        return out
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(path: Path, nodes: list, inits: list) -> Path:
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 3, 32, 32])],
            [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT, None)], initializer=inits,
        )  # fmt: skip
        onnx.save(helper.make_model(graph), str(path))
        return path

    convs = [helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"x{i + 1}"]) for i in range(n)]
    consts = [
        helper.make_node("Constant", [], [f"w{i}"], value=numpy_helper.from_array(sd[f"{i}.weight"])) for i in range(n)
    ]
    out["onnx Constant nodes"] = save(folder / "const.onnx", consts + convs, [])
    qdq, inits = [], []
    for i in range(n):
        w = sd[f"{i}.weight"]
        scale = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
        inits += [numpy_helper.from_array(np.round(w / scale[:, None, None, None]).astype(np.int8), f"q{i}"),
                  numpy_helper.from_array(scale, f"s{i}")]  # fmt: skip
        qdq.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=0))
    out["onnx int8 QDQ"] = save(folder / "qdq.onnx", qdq + convs, inits)
    return out


def _has_reader(name: str) -> bool:
    return (ROOT / "hashdb" / "codec" / "readers" / f"{name}.py").exists()


def _other_helpers_formats(sd: dict[str, np.ndarray], folder: Path) -> dict[str, Path | str]:
    """Keras (HDF5 written with h5py the way Keras 2 and Keras 3 lay it out), Flax msgpack, TFLite."""
    out: dict[str, Path | str] = {}
    n = len(sd) // 2
    layers = [(f"conv2d_{i}", sd[f"{i}.weight"].transpose(2, 3, 1, 0), sd[f"{i}.bias"]) for i in range(n)]
    if not _has_reader("keras"):
        out["keras .h5"] = out["keras .keras"] = "skipped: hashdb/codec/readers/keras.py is not here yet"
    elif importlib.util.find_spec("h5py") is None:
        out["keras .h5"] = out["keras .keras"] = "skipped: h5py is not installed"
    else:
        import h5py

        with h5py.File(folder / "m.h5", "w") as f:
            g = f.create_group("model_weights")
            g.attrs["layer_names"] = [name.encode() for name, _, _ in layers]
            for name, kernel, bias in layers:
                lg = g.create_group(name)
                lg.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
                lg.create_dataset(f"{name}/kernel:0", data=kernel)
                lg.create_dataset(f"{name}/bias:0", data=bias)
        out["keras .h5"] = folder / "m.h5"
        weights_h5 = folder / "model.weights.h5"
        with h5py.File(weights_h5, "w") as f:
            for name, kernel, bias in layers:
                v = f.create_group(f"layers/{name}/vars")
                v.create_dataset("0", data=kernel)
                v.create_dataset("1", data=bias)
        config = {
            "class_name": "Sequential",
            "config": {
                "layers": [
                    {"class_name": "Conv2D", "config": {"name": name, "kernel_size": [3, 3]}} for name, _, _ in layers
                ]
            },
        }
        with zipfile.ZipFile(folder / "m.keras", "w") as z:
            z.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
            z.writestr("config.json", json.dumps(config))
            z.write(weights_h5, "model.weights.h5")
        out["keras .keras"] = folder / "m.keras"
    if not _has_reader("flax"):
        out["flax .msgpack"] = "skipped: hashdb/codec/readers/flax.py is not here yet"
    else:
        import msgpack

        def ext(arr: np.ndarray) -> msgpack.ExtType:  # flax.serialization's ndarray encoding
            return msgpack.ExtType(1, msgpack.packb((list(arr.shape), arr.dtype.name, arr.tobytes())))

        tree = {"params": {f"Conv_{i}": {"kernel": ext(k), "bias": ext(b)} for i, (_, k, b) in enumerate(layers)}}
        (folder / "m.msgpack").write_bytes(msgpack.packb(tree))
        out["flax .msgpack"] = folder / "m.msgpack"
    if not _has_reader("tflite"):
        out["tflite"] = "skipped: hashdb/codec/readers/tflite.py is not here yet"
    elif importlib.util.find_spec("flatbuffers") is None:
        out["tflite"] = "skipped: the flatbuffers package is not installed"
    else:
        out["tflite"] = _write_tflite(sd, folder / "m.tflite")
    _write_cnn_formats(sd, folder, out)
    return out


def _write_cnn_formats(sd: dict[str, np.ndarray], folder: Path, out: dict[str, Path | str]) -> None:
    """Caffe, Darknet, ncnn, OpenVINO IR, MXNet and MNN files of the same weights, by the spec-built writers of
    tests/cnn_format_writers.py (the ncnn and OpenVINO ones checked against those runtimes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from cnn_format_writers import (
            caffe_model,
            darknet_files,
            mnn_model,
            mxnet_files,
            ncnn_files,
            openvino_files,
            torch_layers,
        )
    finally:
        sys.path.remove(str(ROOT / "tests"))
    layers = torch_layers(sd)
    for name, module in (("caffe", "caffe"), ("darknet", "darknet"), ("ncnn", "ncnn"), ("openvino", "openvino"),
                         ("mxnet", "mxnet")):  # fmt: skip
        if not _has_reader(module):
            out[name] = f"skipped: hashdb/codec/readers/{module}.py is not here yet"
            continue
        (folder / name).mkdir()
    if _has_reader("caffe"):
        (folder / "caffe" / "m.caffemodel").write_bytes(caffe_model(layers))
        out["caffe .caffemodel"] = folder / "caffe" / "m.caffemodel"
    if _has_reader("darknet"):
        out["darknet .weights + .cfg"] = darknet_files(folder / "darknet", layers, "m", height=4 * len(layers) + 8)
    if _has_reader("ncnn"):
        out["ncnn .param + .bin"] = ncnn_files(folder / "ncnn", layers, "m")[0]
    if _has_reader("openvino"):
        out["openvino .xml + .bin"] = openvino_files(folder / "openvino", layers, "m")[0]
    if _has_reader("mxnet"):
        out["mxnet .params"] = mxnet_files(folder / "mxnet", layers, "m")
    if not _has_reader("mnn"):
        out["mnn"] = "skipped: hashdb/codec/readers/mnn.py is not here yet"
    elif importlib.util.find_spec("flatbuffers") is None:
        out["mnn"] = "skipped: the flatbuffers package is not installed"
    else:
        (folder / "m.mnn").write_bytes(mnn_model(layers))
        out["mnn .mnn"] = folder / "m.mnn"


def _write_tflite(sd: dict[str, np.ndarray], path: Path) -> Path:
    """A chain of CONV_2D ops (float32 OHWI kernels), written with the flatbuffers Builder by the writer of
    tests/test_formats_tflite.py (the fixtures the LiteRT interpreter is checked against there)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_formats_tflite import TFLiteModel, add_conv
    finally:
        sys.path.remove(str(ROOT / "tests"))
    n = len(sd) // 2
    m = TFLiteModel()
    hw = 2 * n + 4
    x = m.tensor("input", (1, hw, hw, 3))
    for i in range(n):
        x = add_conv(m, x, hw, sd[f"{i}.weight"], "f32", f"conv{i}")
        hw -= 2
    path.write_bytes(m.to_bytes([0], [x]))
    return path


# ---------------------------------------------------------------- measuring

_CHILD = r"""
import importlib, json, os, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from hashdb.codec import ModelHasher
h = ModelHasher(256)
h.hash({{"w": np.random.default_rng(0).standard_normal((64, 32, 3, 3)).astype(np.float32)}})  # JIT warm-up
for name in ("pickle", "safetensors", "numpy", "onnx", "keras", "tflite", "flax", "tensorflow", "paddle", "coreml",
             "caffe", "darknet", "ncnn", "openvino", "mxnet", "mnn"):  # reader imports
    try:
        importlib.import_module("hashdb.codec.readers." + name)
    except ImportError:
        pass
try:
    import onnx  # noqa: F401
except ImportError:
    pass
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
source = {path!r}
if source == "memory":  # the floor: the same weights as an in-memory numpy mapping, no file read
    from bench.formats_bench import weights
    source = weights({params!r})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark to the current RSS
base = rss()
times = []
t = time.perf_counter()
code = h.hash(source)
times.append(time.perf_counter() - t)
peak = hwm() - base
for _ in range({repeats} - 1):
    t = time.perf_counter()
    assert h.hash(source) == code
    times.append(time.perf_counter() - t)
print(json.dumps({{"times": times, "peak": peak, "code": code.hex(), "torch": "torch" in sys.modules}}))
"""


def measure(path: Path | str, repeats: int, params: float) -> dict:
    script = _CHILD.format(root=str(ROOT), path=str(path), repeats=repeats, params=params)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout)


def size_of(path: Path | str) -> int:
    if isinstance(path, str):
        return 0
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    pair = path.with_suffix(".bin")  # an ncnn .param or OpenVINO .xml: the weights are in the .bin beside it
    if path.suffix in (".param", ".xml") and pair.is_file():
        return path.stat().st_size + pair.stat().st_size
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave bench/RESULTS.md alone")
    parser.add_argument("--only", default="", help="comma-separated label substrings: measure only those rows "
                        "(and safetensors, the baseline, and the in-memory floor); implies --no-write")  # fmt: skip
    args = parser.parse_args()
    sd = weights(args.params)
    nparams = sum(v.size for v in sd.values())
    wbytes = 4 * nparams
    folder = Path(tempfile.mkdtemp(prefix="hashdb-formats-"))
    try:
        files: dict[str, Path | str] = write_all(sd, folder)
        files["numpy mapping in memory (no file: the codec alone)"] = "memory"
        if args.only:
            wanted = [w.strip() for w in args.only.split(",") if w.strip()]
            keep = ("safetensors", "numpy mapping in memory (no file: the codec alone)")
            files = {k: v for k, v in files.items() if k in keep or any(w in k for w in wanted)}
        rows, notes, base_time, codes = [], [], None, set()
        for label, path in files.items():
            if isinstance(path, str) and path != "memory":
                notes.append(f"- {label}: {path}")
                print(f"{label}: {path}", flush=True)
                continue
            r = measure(path, args.repeats, args.params)
            if "error" in r:
                notes.append(f"- {label}: error: {r['error']}")
                print(f"{label}: error {r['error']}", flush=True)
                continue
            t = statistics.median(r["times"])
            base_time = t if base_time is None else base_time
            codes.add(r["code"]) if "fp16" not in label and "int8" not in label else None
            row = (label, size_of(path) / 1e6, t, t / base_time, r["peak"] / 1e6, r["peak"] / wbytes, r["torch"])
            rows.append(row)
            print(f"{label:34s} {row[1]:8.1f} MB  {t:6.3f} s  {row[3]:5.2f}x  peak {row[4]:7.1f} MB "
                  f"({row[5]:.2f}x)  torch={row[6]}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    command = "python3 bench/formats_bench.py" + ("" if args.params == 25e6 else f" --params {args.params:g}")
    command += "" if args.repeats == 3 else f" --repeats {args.repeats}"
    lines = [
        "## Model file formats: load + hash time and peak memory (bench/formats_bench.py)",
        "",
        f"`{command}` -- {machine_line()}; one thread; the machine was shared with other jobs.",
        f"{nparams / 1e6:.1f}M float32 parameters ({wbytes / 1e6:.0f} MB of weights), ModelHasher(256), median of "
        f"{args.repeats} runs in a fresh process after a JIT warm-up; peak = peak RSS of the first run above the RSS "
        "before it.",
        f"Every format gave the same code as safetensors (fp16 and int8 rows aside): {len(codes) == 1}.",
        "",
        "| format | file MB | load+hash s | x safetensors | peak MB | peak / weights | imports torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, mb, t, ratio, peak, pratio, uses_torch in rows:
        lines.append(f"| {label} | {mb:.1f} | {t:.3f} | {ratio:.2f} | {peak:.0f} | {pratio:.2f} | {uses_torch} |")
    floor = [r for r in rows if r[0].startswith("numpy mapping in memory")]
    files_rows = [r for r in rows if not r[0].startswith("numpy mapping in memory")]
    if floor and files_rows:
        extra = [(r[4] - floor[0][4]) * 1e6 / wbytes for r in files_rows]
        slow = [r[0] for r in files_rows if r[3] > 1.5]
        big = [r[0] for r in rows if r[5] >= 2.0]
        worst = max(files_rows, key=lambda r: r[5])
        lines += [
            "",
            f"The codec alone (in-memory row, weights allocated before the mark) peaks at {floor[0][5]:.2f}x "
            f"the weights; with a file the peak is {min(extra):.2f}-{max(extra):.2f}x above that (the weights "
            f"themselves, mapped or read, and what a reader holds while reading: the highest, {worst[0]}, "
            f"{worst[5]:.2f}x). At or over 2x the weights: {', '.join(big) or 'none'}. Over 1.5x the "
            f"safetensors time: {', '.join(slow) or 'none'}.",
        ]
    if notes:
        lines += ["", *notes]
    body = "\n".join(lines)
    print(body)
    if not args.no_write and not args.only and args.params == 25e6:
        write_section("formats", body)


if __name__ == "__main__":
    main()
