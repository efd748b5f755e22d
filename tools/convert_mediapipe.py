"""Convert MediaPipe's face .tflite models to safetensors for omnisync_core.face.

Reads the three models bundled in the mediapipe 0.10.21 wheel (Apache-2.0) with the `tflite` flatbuffer
parser, walks each graph's operators in order and writes one safetensors file per model:

- tensors ``ops.{k}.weight`` / ``ops.{k}.bias`` / ``ops.{k}.alpha`` (float16, PyTorch NCHW layout) for op ``k`` of
  the compacted op list;
- metadata ``graph``: a JSON op list (type, input/output tensor ids, strides, explicit paddings, fused activation,
  ...) that ``omnisync_core.face.blazeface.TFLiteNet`` replays with plain torch ops.

Constant-folded at conversion time: DEQUANTIZE of fp16 weights, DENSIFY of sparse weights (full-range detector),
TFLite's SAME padding (turned into explicit, possibly asymmetric, pads), PAD ops that only feed a VALID
convolution (folded into that convolution's pads) and channel zero-padding that only feeds a residual ADD (the
ADD then adds the narrow tensor into a channel slice).

Usage: python tools/convert_mediapipe.py [--mediapipe-dir DIR] [--out omnisync_core/face/weights]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import tflite
import torch
from safetensors.torch import save_file
from tflite.BuiltinOperator import BuiltinOperator

MODELS = {
    "blazeface_short": "face_detection/face_detection_short_range.tflite",
    "blazeface_full": "face_detection/face_detection_full_range_sparse.tflite",
    "facemesh": "face_landmark/face_landmark.tflite",
}
OP_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
ACTS = {0: None, 1: "relu", 3: "relu6"}
NP_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


class Graph:
    """Thin accessor over one tflite subgraph."""

    def __init__(self, path: Path):
        self.buf = path.read_bytes()
        self.model = tflite.Model.GetRootAsModel(self.buf, 0)
        self.g = self.model.Subgraphs(0)
        self.consts: dict[int, np.ndarray] = {}

    def tensor(self, i):
        return self.g.Tensors(i)

    def shape(self, i) -> list[int]:
        t = self.tensor(i)
        return [int(s) for s in t.ShapeAsNumpy()] if t.ShapeLength() else []

    def raw(self, i) -> np.ndarray | None:
        """Constant data stored in the flatbuffer for tensor i (None for activations)."""
        t = self.tensor(i)
        b = self.model.Buffers(t.Buffer())
        if b is None:
            return None
        if b.DataLength():
            data = b.DataAsNumpy().tobytes()
        elif b.Offset() > 1:
            data = self.buf[b.Offset(): b.Offset() + b.Size()]
        else:
            return None
        return np.frombuffer(data, dtype=NP_TYPES[t.Type()]).copy()

    def const(self, i) -> np.ndarray | None:
        if i in self.consts:
            return self.consts[i]
        a = self.raw(i)
        if a is not None and self.tensor(i).Sparsity() is None:
            a = a.reshape(self.shape(i))
        return a

    def ops(self):
        for k in range(self.g.OperatorsLength()):
            op = self.g.Operators(k)
            oc = self.model.OperatorCodes(op.OpcodeIndex())
            name = OP_NAMES[max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())]
            yield name, op, [int(i) for i in op.InputsAsNumpy()], [int(i) for i in op.OutputsAsNumpy()]


def options(op, cls):
    o = cls()
    t = op.BuiltinOptions()
    o.Init(t.Bytes, t.Pos)
    return o


def _index_vector(kind, table):
    cls = {1: tflite.Int32Vector, 2: tflite.Uint16Vector, 3: tflite.Uint8Vector}[kind]
    v = cls()
    v.Init(table.Bytes, table.Pos)
    return v.ValuesAsNumpy()


def densify(values: np.ndarray, shape: list[int], sp) -> np.ndarray:
    """Expand a TFLite sparse tensor (DENSE / SPARSE_CSR levels, optional blocks) to a dense array."""
    order = [int(d) for d in sp.TraversalOrderAsNumpy()]
    block_map = [int(d) for d in sp.BlockMapAsNumpy()] if sp.BlockMapLength() else []
    rank, levels = len(shape), len(order)
    meta = [sp.DimMetadata(i) for i in range(levels)]
    block = {d: meta[order.index(rank + j)].DenseSize() for j, d in enumerate(block_map)}
    out = np.zeros(shape, dtype=values.dtype)
    coord = [0] * levels

    def write(v):
        idx = []
        for d in range(rank):
            c = coord[d]
            if d in block:
                c = c * block[d] + coord[rank + block_map.index(d)]
            idx.append(c)
        out[tuple(idx)] = v

    def walk(level, pos):
        m, d = meta[level], order[level]
        if m.Format() == 0:  # DENSE
            n = m.DenseSize()
            children = ((i, pos * n + i) for i in range(n))
        else:  # SPARSE_CSR
            seg = _index_vector(m.ArraySegmentsType(), m.ArraySegments())
            ind = _index_vector(m.ArrayIndicesType(), m.ArrayIndices())
            children = ((int(ind[k]), k) for k in range(int(seg[pos]), int(seg[pos + 1])))
        for c, p in children:
            coord[d] = c
            if level == levels - 1:
                write(values[p])
            else:
                walk(level + 1, p)

    walk(0, 0)
    return out


def same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TFLite SAME padding: the odd extra pixel goes after (right/bottom)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def convert(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    g = Graph(path)
    ops, weights = [], {}
    raw_ops = list(g.ops())
    consumers: dict[int, int] = {}
    for _, _, ins, _ in raw_ops:
        for i in ins:
            consumers[i] = consumers.get(i, 0) + 1
    pad_of: dict[int, tuple[int, list[int]]] = {}  # output id of a foldable PAD -> (its input, [t, b, l, r])

    def add(entry, **tensors):
        k = len(ops)
        ops.append(entry)
        for name, arr in tensors.items():
            weights[f"ops.{k}.{name}"] = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float16)

    for name, op, ins, outs in raw_ops:
        if name in ("DEQUANTIZE", "DENSIFY"):
            a = g.consts.get(ins[0])
            if a is None:
                a, sparsity = g.raw(ins[0]), g.tensor(ins[0]).Sparsity()
                a = a.reshape(g.shape(ins[0])) if sparsity is None else densify(a, g.shape(ins[0]), sparsity)
            g.consts[outs[0]] = a
            continue
        x, y = ins[0], outs[0]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            depthwise = name == "DEPTHWISE_CONV_2D"
            o = options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
            assert o.DilationHFactor() == 1 and o.DilationWFactor() == 1
            w, b = g.const(ins[1]).astype(np.float32), g.const(ins[2]).astype(np.float32)
            kh, kw = w.shape[1:3]
            sh, sw = o.StrideH(), o.StrideW()
            if o.Padding() == 0:
                _, h, wd, _ = g.shape(x)
                pads = [*same_pads(h, kh, sh), *same_pads(wd, kw, sw)]
            else:
                pads = [0, 0, 0, 0]
            if x in pad_of:  # fold an explicit PAD op into this convolution
                x, extra = pad_of.pop(x)
                pads = [p + e for p, e in zip(pads, extra)]
            if depthwise:  # [1, kh, kw, C*M] -> [C*M, 1, kh, kw]
                assert o.DepthMultiplier() == 1
                w = w.transpose(3, 0, 1, 2)
                groups = w.shape[0]
            else:  # [O, kh, kw, I] -> [O, I, kh, kw]
                w = w.transpose(0, 3, 1, 2)
                groups = 1
            add(dict(type="conv", inputs=[x], out=y, stride=[sh, sw], pads=pads, groups=groups,
                     act=ACTS[o.FusedActivationFunction()]), weight=w, bias=b)
        elif name == "PAD":
            p = g.const(ins[1]).reshape(4, 2).tolist()  # NHWC [[before, after]] * 4
            assert p[0] == [0, 0]
            spatial_only = p[3] == [0, 0]
            consumer_ops = [n for n, _, i2, _ in raw_ops if y in i2]
            if spatial_only and consumers.get(y) == 1 and consumer_ops[0] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                pad_of[y] = (x, [*p[1], *p[2]])
                continue
            if p[1] == p[2] == [0, 0] and consumers.get(y) == 1 and consumer_ops[0] == "ADD":
                pad_of[y] = (x, p[3])  # channel zero-padding feeding a residual ADD: add into a slice instead
                continue
            add(dict(type="pad", inputs=[x], out=y, pads=[*p[1], *p[2], *p[3]]))
        elif name == "RELU":
            add(dict(type="act", inputs=[x], out=y, act="relu"))
        elif name == "PRELU":
            add(dict(type="prelu", inputs=[x], out=y), alpha=g.const(ins[1]).reshape(-1).astype(np.float32))
        elif name == "ADD":
            o = options(op, tflite.AddOptions)
            entry = dict(type="add", inputs=list(ins), out=y, act=ACTS[o.FusedActivationFunction()])
            for j, i in enumerate(ins):
                if i in pad_of:  # inputs[0] becomes the narrow tensor added into channels [c0, c0 + C) of inputs[1]
                    src, (c0, _) = pad_of.pop(i)
                    entry.update(inputs=[src, ins[1 - j]], channel_offset=c0)
            add(entry)
        elif name == "MAX_POOL_2D":
            o = options(op, tflite.Pool2DOptions)
            k, s = [o.FilterHeight(), o.FilterWidth()], [o.StrideH(), o.StrideW()]
            _, h, wd, _ = g.shape(x)
            pads = [*same_pads(h, k[0], s[0]), *same_pads(wd, k[1], s[1])] if o.Padding() == 0 else [0, 0, 0, 0]
            add(dict(type="maxpool", inputs=[x], out=y, kernel=k, stride=s, pads=pads,
                     act=ACTS[o.FusedActivationFunction()]))
        elif name == "RESHAPE":
            add(dict(type="reshape", inputs=[x], out=y, shape=g.shape(y)))
        elif name == "CONCATENATION":
            o = options(op, tflite.ConcatenationOptions)
            add(dict(type="concat", inputs=ins, out=y, axis=o.Axis(), rank=len(g.shape(y))))
        elif name == "RESIZE_BILINEAR":
            o = options(op, tflite.ResizeBilinearOptions)
            add(dict(type="resize", inputs=[x], out=y, size=g.shape(y)[1:3], align_corners=bool(o.AlignCorners()),
                     half_pixel=bool(o.HalfPixelCenters())))
        elif name == "DEPTH_TO_SPACE":
            o = options(op, tflite.DepthToSpaceOptions)
            add(dict(type="depth_to_space", inputs=[x], out=y, block=o.BlockSize()))
        else:
            raise NotImplementedError(f"{path.name}: unsupported op {name}")
    assert not pad_of
    inp = int(g.g.InputsAsNumpy()[0])
    graph = dict(source=path.name, input=inp, input_shape=g.shape(inp),
                 outputs=[int(i) for i in g.g.OutputsAsNumpy()],
                 output_names=[g.tensor(int(i)).Name().decode() for i in g.g.OutputsAsNumpy()], ops=ops)
    return weights, graph


def main():
    import mediapipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mediapipe-dir", type=Path, default=Path(mediapipe.__file__).parent / "modules")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "omnisync_core/face/weights")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rel in MODELS.items():
        weights, graph = convert(args.mediapipe_dir / rel)
        meta = {"graph": json.dumps(graph, separators=(",", ":")), "format": "omnisync-tflite-oplist-v1",
                "source": f"mediapipe {mediapipe.__version__}: mediapipe/modules/{rel}", "license": "Apache-2.0"}
        dst = args.out / f"{name}.safetensors"
        save_file(weights, str(dst), metadata=meta)
        dst.chmod(0o644)
        print(f"{dst}: {len(graph['ops'])} ops, {len(weights)} tensors, {dst.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
