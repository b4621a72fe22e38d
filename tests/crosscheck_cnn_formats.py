"""Cross-check of the CNN-format writers and readers against the formats' own runtimes (not a pytest test:
those runtimes are not hashdb dependencies). Install them aside and run:

    pip install --no-deps --target /tmp/rt ncnn openvino openvino-telemetry mnn "opencv-python-headless<5"
    PYTHONPATH=$PWD:/tmp/rt python tests/crosscheck_cnn_formats.py

Checks: OpenCV 4's dnn module (its Caffe and Darknet importers) loads our .caffemodel (current and V1) and
.cfg/.weights files and computes the torch model's outputs; ncnn loads our .param/.bin files (fp32, fp16,
codebook, int8, depthwise) and computes the torch model's outputs; OpenVINO loads our IRs (f32, f16, u8
decompression, FakeQuantize) and computes the torch outputs; IRs written by OpenVINO itself read back to the
torch weights and give the torch code; MNN files written by MNN's converter (float, fp16, 8- and 4-bit) read
back to the ONNX weights (within half a quantization step) and give the torch code (quantized: within the
copy radius). Exits 1 on any mismatch.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn_format_writers import caffe_model, darknet_files, ncnn_files, openvino_files, torch_layers  # noqa: E402
from formats_fixtures import make_cnn  # noqa: E402

from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.codec.load import load_tensors  # noqa: E402

FAILED: list[str] = []


def check(what: str, ok: bool, detail: object = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what} {detail}")
    if not ok:
        FAILED.append(what)


def distance(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(bytes(x ^ y for x, y in zip(a, b, strict=True)), np.uint8)).sum())


def opencv_caffe_darknet(out: Path) -> None:
    import cv2

    torch.manual_seed(0)
    conv0, conv1 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3)
    layers = torch_layers({f"{i}.{k}": v.detach().numpy() for i, c in enumerate((conv0, conv1))
                           for k, v in c.state_dict().items()})  # fmt: skip
    x = torch.randn(1, 3, 9, 9)
    # caffe_model puts a BatchNorm after each conv: mean linspace(-1, 1), variance 1, scale factor 1
    bns = [nn.BatchNorm2d(n, eps=1e-5).eval() for n in (4, 5)]
    for bn in bns:
        bn.running_mean.copy_(torch.linspace(-1, 1, bn.num_features))
    ref = bns[1](conv1(torch.relu(bns[0](conv0(x))))).detach().numpy()
    proto = out / "net.prototxt"
    proto.write_text(
        'name: "net"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 '
        "dim: 9 } } }\n"
        'layer { name: "l0" type: "Convolution" bottom: "data" top: "l0" convolution_param { num_output: 4 '
        "kernel_size: 3 } }\n"
        'layer { name: "bn0" type: "BatchNorm" bottom: "l0" top: "bn0" }\n'
        'layer { name: "r0" type: "ReLU" bottom: "bn0" top: "r0" }\n'
        'layer { name: "l1" type: "Convolution" bottom: "r0" top: "l1" convolution_param { num_output: 5 '
        "kernel_size: 3 } }\n"
        'layer { name: "bn1" type: "BatchNorm" bottom: "l1" top: "bn1" }\n'
    )
    (out / "net.caffemodel").write_bytes(caffe_model(layers))
    net = cv2.dnn.readNetFromCaffe(str(proto), str(out / "net.caffemodel"))
    net.setInput(x.numpy())
    err = float(np.abs(net.forward() - ref).max())
    check("OpenCV runs our .caffemodel", err < 1e-4, err)
    v1_proto = out / "v1.prototxt"
    v1_proto.write_text(
        'name: "net"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 9\ninput_dim: 9\n'
        'layers { name: "l0" type: CONVOLUTION bottom: "data" top: "l0" convolution_param { num_output: 4 '
        "kernel_size: 3 } }\n"
        'layers { name: "r0" type: RELU bottom: "l0" top: "l0" }\n'
        'layers { name: "l1" type: CONVOLUTION bottom: "l0" top: "l1" convolution_param { num_output: 5 '
        "kernel_size: 3 } }\n"
    )
    (out / "v1.caffemodel").write_bytes(caffe_model(layers, v1=True))  # OpenCV reads no double_data
    net = cv2.dnn.readNetFromCaffe(str(v1_proto), str(out / "v1.caffemodel"))
    net.setInput(x.numpy())
    err = float(np.abs(net.forward() - conv1(torch.relu(conv0(x))).detach().numpy()).max())
    check("OpenCV runs our V1 .caffemodel", err < 1e-4, err)

    head = np.random.default_rng(0).standard_normal((3, 5, 1, 1)).astype(np.float32)
    weights = darknet_files(out, layers + [("conv", head, None)], "yolo", height=9)
    net = cv2.dnn.readNetFromDarknet(str(out / "yolo.cfg"), str(weights))
    net.setInput(x.numpy())
    y = net.forward()
    leaky = nn.LeakyReLU(0.1)
    a = leaky(conv0(x))
    c1 = nn.functional.conv2d(a, conv1.weight)  # batch_normalize=1: the biases are BN's shift
    mean = torch.linspace(-1, 1, 5).view(1, -1, 1, 1)
    b = leaky((c1 - mean) / torch.sqrt(torch.tensor(1 + 1e-6)) * 1.5 + conv1.bias.view(1, -1, 1, 1))
    s = b + b  # [maxpool size=1] is the identity, [route -2] is b again, [shortcut from=-3] adds b
    ref = leaky(nn.functional.conv2d(s, torch.from_numpy(head))).detach().numpy()
    err = float(np.abs(y - ref).max())
    check("OpenCV runs our Darknet .cfg + .weights", err < 1e-3, err)


def ncnn_runtime(out: Path) -> None:
    import ncnn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)).eval()
    layers = torch_layers({k: v.detach().numpy() for k, v in m.state_dict().items()})
    x = torch.randn(1, 3, 9, 9)
    ref = m(x).detach().numpy()[0]
    for storage, tol in (("fp32", 1e-5), ("fp16", 1e-3), ("table", 1e-2)):
        param, weights = ncnn_files(out, layers, f"n_{storage}", storage)
        net = ncnn.Net()
        loaded = (net.load_param(str(param)), net.load_model(str(weights)))
        ex = net.create_extractor()
        ex.input("data", ncnn.Mat(x.numpy()[0].copy()))
        _, y = ex.extract("b1")
        err = float(np.abs(np.array(y) - ref).max())
        check(f"ncnn runs our {storage} files", loaded == (0, 0) and err < tol, err)
    param, weights = ncnn_files(out, layers, "n_int8", "int8")
    net = ncnn.Net()
    check("ncnn loads our int8 files", (net.load_param(str(param)), net.load_model(str(weights))) == (0, 0))


def openvino_runtime(out: Path, hasher: ModelHasher) -> None:
    import openvino as ov

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 5, 3, bias=False)).eval()
    layers = torch_layers({k: v.detach().numpy() for k, v in m.state_dict().items()})
    x = torch.randn(1, 3, 16, 16)
    ref = m(x).detach().numpy()
    core = ov.Core()
    for storage, tol in (("f32", 1e-5), ("f16", 1e-3), ("u8", 2e-2), ("fq", 2e-2)):
        xml, _ = openvino_files(out, layers, f"ov_{storage}", storage)
        y = core.compile_model(core.read_model(str(xml)), "CPU")(x.numpy())[0]
        err = float(np.abs(y - ref).max())
        check(f"OpenVINO runs our {storage} IR", err < tol, err)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
                        nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 5 * 5, 7)).eval()  # fmt: skip
    want = [v.detach().numpy() for k, v in net.state_dict().items() if k.endswith("weight") and v.ndim == 4]
    for fp16 in (False, True):
        path = out / f"written_{int(fp16)}.xml"
        ov.save_model(ov.convert_model(net, example_input=torch.randn(1, 3, 9, 9)), str(path), compress_to_fp16=fp16)
        got = [t.array for t in load_tensors(path) if t.layout == "oihw"]
        shapes_ok = [a.shape for a in got] == [b.shape for b in want]
        err = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True)) if shapes_ok else None
        close = shapes_ok and err is not None and err < 1e-3
        check(f"an IR OpenVINO wrote (fp16={fp16}) reads to the torch kernels", close, err)
        check(f"an IR OpenVINO wrote (fp16={fp16}) gives the torch code", hasher.hash(path) == hasher.hash(net))


def mnn_converter(out: Path, hasher: ModelHasher) -> None:
    import _tools  # MNN's converter
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = make_cnn(10).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    nodes = [helper.make_node("Conv", ["x", "0.weight", "0.bias"], ["c0"]), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "2.weight", "2.bias"], ["c1"]),
             helper.make_node("BatchNormalization", ["c1", "3.weight", "3.bias", "3.running_mean", "3.running_var"],
                              ["b1"]),
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "5.weight", "5.bias"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 10, 10])],
                              initializer=[numpy_helper.from_array(v, name=k) for k, v in sd.items()])  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.save(proto, str(out / "m.onnx"))
    code = hasher.hash(model)
    for extra, name in (([], "f32"), (["--fp16"], "fp16"), (["--weightQuantBits", "8"], "q8"),
                        (["--weightQuantBits", "4"], "q4")):  # fmt: skip
        target = out / f"{name}.mnn"
        _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(out / "m.onnx"), "--MNNModel", str(target),
                           "--bizCode", "hashdb"] + extra)  # fmt: skip
        got = [t.array for t in load_tensors(target) if t.layout == "oihw"]
        shapes = [a.shape for a in got]
        check(f"MNN {name} file holds three kernels", shapes == [(16, 3, 3, 3), (24, 16, 3, 3), (24, 24, 3, 3)])
        if name == "f32":
            float_kernels = got
            check("MNN f32 first kernel is the ONNX one", np.array_equal(got[0], sd["0.weight"]))
        else:
            worst = 0.0
            for a, b in zip(got, float_kernels, strict=True):
                rows = b.reshape(b.shape[0], -1)
                step = (rows.max(axis=1) - rows.min(axis=1)) / (255 if name == "q8" else 15)
                err = np.abs(a - b).reshape(b.shape[0], -1).max(axis=1)
                worst = max(worst, float((err / step).max())) if name != "fp16" else worst
            check(f"MNN {name} dequantizes within half a step", worst <= 0.5 + 1e-3, worst)
        d = distance(hasher.hash(target), code)
        check(f"MNN {name} code vs torch", d == 0 if name in ("f32", "fp16") else d <= hasher.copy_radius, d)


def main() -> int:
    hasher = ModelHasher(256)
    with tempfile.TemporaryDirectory() as tmp:
        opencv_caffe_darknet(Path(tmp))
        ncnn_runtime(Path(tmp))
        openvino_runtime(Path(tmp), hasher)
        mnn_converter(Path(tmp), hasher)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all cross-checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
