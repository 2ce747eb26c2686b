"""Fuse sibling FULLY_CONNECTEDs of a TFLite file: the ops that read the same input become one op and SLICEs.

A Llama layer's query, key and value projections all read the normed hidden state, and so do its MLP's gate
and up projections. In a one-token decode step each is a small matrix-vector product, and LiteRT's hybrid
kernels (dynamic INT8, INT4 blockwise) pay per op: the input is quantized again for every op, and narrow
layers stream their weights slower than wide ones (benchmarks/tflite_int4_kernels_zen4*.md). `fuse_siblings` stacks the
weights of such siblings row-wise into one FULLY_CONNECTED and cuts its output back into the originals with
SLICEs (which XNNPACK runs), so SmolLM2's step has 121 FULLY_CONNECTEDs instead of 211.

Nothing is requantized: the rows are the ops' own integers, their per-channel or per-block scales are
concatenated in the same order, and the one dynamic quantization of the shared input is the one each op made
of it, so the outputs are bitwise the unfused ones (tested). Only ops whose outputs are float are fused: a
full-integer op requantizes its output to its own grid, which siblings do not share. The sliced outputs keep
their tensors (and edgeq's labels), so `tflite_check.read_back` finds each layer's rows in the fused weight.
Weights shared by several signatures stay shared: one fused buffer per set of buffers.

Opt-in (`edgeq export --fuse`): on the x86 hosts measured, the fused step was not faster beyond the spread
between processes (docs/tflite.md), so files keep one op per layer unless asked.
"""

from __future__ import annotations

import numpy as np

from .tflite_flatbuffer import inline_buffers, op_names, read_model, schema, signature_subgraphs, write_model
from .tflite_graph import int32_constant, labelled, op_code

FUSED_PREFIX = b"edgeq-fused/"


def _data(model_t, index: int) -> np.ndarray | None:
    d = model_t.buffers[index].data if index > 0 else None
    return None if d is None or not len(d) else np.asarray(d, dtype=np.uint8)


def _key(model_t, sg, op, uses: dict[int, int]):
    """What siblings must share to be fused, or None when the op cannot be: its input, weight type, layout of the
    weight's quantization, whether it has a bias, its options; a constant 2-D weight no other op reads (a fused
    copy would leave the original in the file too) and a float output."""
    s = schema()
    if len(op.inputs) < 2 or op.inputs[1] < 0 or len(op.outputs) != 1 or uses.get(int(op.inputs[1]), 0) != 1:
        return None
    w, out = sg.tensors[op.inputs[1]], sg.tensors[op.outputs[0]]
    if _data(model_t, w.buffer) is None or len(w.shape) != 2 or out.type != s.TensorType.FLOAT32:
        return None
    if sg.tensors[op.inputs[0]].type != s.TensorType.FLOAT32:
        return None
    rows, depth = int(w.shape[0]), int(w.shape[1])
    qp = w.quantization
    if w.type == s.TensorType.FLOAT32:
        quant = ("float",)
    elif qp is not None and qp.detailsType == s.QuantizationDetails.BlockwiseQuantization:
        det = qp.details
        if det.zeroPoints is not None and det.zeroPoints >= 0:
            return None  # symmetric blocks only (what LiteRT's blockwise kernels and edgeq write)
        quant = ("block", int(det.blockSize), sg.tensors[det.scales].type)
    elif qp is not None and qp.scale is not None and len(qp.scale) == rows and rows > 1 and qp.quantizedDimension == 0:
        quant = ("channel",)
    else:
        return None  # one scale per tensor: siblings' scales differ and cannot share one
    if w.type == s.TensorType.INT4 and depth % 2:
        return None  # rows not byte-aligned in the packed int4 buffer
    bias = len(op.inputs) > 2 and op.inputs[2] >= 0
    if bias and (sg.tensors[op.inputs[2]].type != s.TensorType.FLOAT32 or _data(model_t, sg.tensors[op.inputs[2]].buffer) is None):
        return None
    o = op.builtinOptions
    options = None if o is None else (o.fusedActivationFunction, o.weightsFormat, o.keepNumDims, o.asymmetricQuantizeInputs)
    return (op.inputs[0], w.type, depth, quant, bias, options)


def _concat_buffer(model_t, buffers: list[int], memo: dict) -> int:
    """A buffer holding the given buffers' bytes one after the other (one per distinct list: shared by signatures)."""
    key = tuple(buffers)
    if key not in memo:
        b = schema().BufferT()
        b.data = np.concatenate([_data(model_t, i) for i in buffers])
        model_t.buffers.append(b)
        memo[key] = len(model_t.buffers) - 1
    return memo[key]


def _tensor(sg, like, shape: list[int], buffer: int, name: bytes, quantization=None) -> int:
    t = schema().TensorT()
    t.shape, t.type, t.buffer, t.name = np.array(shape, dtype=np.int32), like.type, buffer, name
    if like.shapeSignature is not None and len(like.shapeSignature):
        sig = [int(x) for x in like.shapeSignature]
        sig[-1] = shape[-1] if sig[-1] != -1 else -1
        t.shapeSignature = np.array(sig, dtype=np.int32)
    t.quantization = quantization
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _int32(model_t, sg, values: list[int], name: bytes, memo: dict) -> int:
    """A constant int32 vector (one tensor per distinct value in a subgraph)."""
    key = ("int32", id(sg), tuple(values))
    if key not in memo:
        memo[key] = int32_constant(model_t, sg, values, name)
    return memo[key]


def _joined(names: list[bytes]) -> bytes:
    """A fused tensor's name: its parts' edgeq labels joined (what `fused_names` splits), or the first converter name."""
    if all(labelled(n) for n in names):
        return FUSED_PREFIX + b"+".join(names)
    return FUSED_PREFIX + names[0] + b"+%d" % (len(names) - 1)


def _fuse_group(model_t, sg, ops: list, memo: dict, slice_code: int, tag: bytes) -> list:
    """The fused FULLY_CONNECTED and one SLICE per op of `ops`, writing each op's output tensor."""
    s = schema()
    weights = [sg.tensors[op.inputs[1]] for op in ops]
    first = weights[0]
    rows = [int(w.shape[0]) for w in weights]
    total = sum(rows)
    quant = None
    qp = first.quantization
    if first.type != s.TensorType.FLOAT32 and qp is not None:
        quant = s.QuantizationParametersT()
        if qp.detailsType == s.QuantizationDetails.BlockwiseQuantization:
            scales = [sg.tensors[w.quantization.details.scales] for w in weights]
            det = s.BlockwiseQuantizationT()
            det.blockSize, det.zeroPoints = qp.details.blockSize, -1
            det.scales = _tensor(sg, scales[0], [total] + [int(x) for x in scales[0].shape[1:]],
                                 _concat_buffer(model_t, [t.buffer for t in scales], memo), FUSED_PREFIX + scales[0].name)
            quant.detailsType, quant.details = s.QuantizationDetails.BlockwiseQuantization, det
        else:
            quant.scale = np.concatenate([np.asarray(w.quantization.scale, dtype=np.float32) for w in weights])
            quant.zeroPoint = np.concatenate([np.asarray(w.quantization.zeroPoint if w.quantization.zeroPoint is not None
                                                         else [0] * int(w.shape[0]), dtype=np.int64) for w in weights])
            quant.quantizedDimension = 0
    weight = _tensor(sg, first, [total, int(first.shape[1])], _concat_buffer(model_t, [w.buffer for w in weights], memo),
                     _joined([w.name for w in weights]), quant)
    inputs = [ops[0].inputs[0], weight]
    if len(ops[0].inputs) > 2 and ops[0].inputs[2] >= 0:
        biases = [sg.tensors[op.inputs[2]] for op in ops]
        inputs.append(_tensor(sg, biases[0], [total], _concat_buffer(model_t, [b.buffer for b in biases], memo),
                              FUSED_PREFIX + biases[0].name))
    outs = [sg.tensors[op.outputs[0]] for op in ops]
    shape = [int(x) for x in outs[0].shape]
    fused_out = _tensor(sg, outs[0], shape[:-1] + [total], 0, _joined([o.name for o in outs]))
    fc = s.OperatorT()
    fc.opcodeIndex, fc.inputs, fc.outputs = ops[0].opcodeIndex, np.array(inputs, dtype=np.int32), np.array([fused_out], dtype=np.int32)
    fc.builtinOptionsType, fc.builtinOptions = ops[0].builtinOptionsType, ops[0].builtinOptions
    new = [fc]
    start = 0
    for op, out, n in zip(ops, outs, rows):
        dims = [int(x) for x in out.shape]
        begin = _int32(model_t, sg, [0] * (len(dims) - 1) + [start], FUSED_PREFIX + b"begin_%d%s" % (start, tag), memo)
        size = _int32(model_t, sg, dims[:-1] + [n], FUSED_PREFIX + b"size_%d%s" % (n, tag), memo)
        sl = s.OperatorT()
        sl.opcodeIndex, sl.inputs, sl.outputs = slice_code, np.array([fused_out, begin, size], dtype=np.int32), op.outputs
        sl.builtinOptionsType, sl.builtinOptions = s.BuiltinOptions.SliceOptions, s.SliceOptionsT()
        new.append(sl)
        start += n
    return new


def _prune(model_t) -> None:
    """Drop the tensors no op, subgraph or signature reads any more and the buffers no tensor holds, renumbering."""
    s = schema()
    used_buffers = {0}
    for i, sg in enumerate(model_t.subgraphs):
        keep = set(int(x) for x in sg.inputs) | set(int(x) for x in sg.outputs)
        for op in sg.operators:
            for field in (op.inputs, op.outputs, op.intermediates):
                keep.update(int(x) for x in (field if field is not None else []) if x >= 0)
        for t in list(keep):
            qp = sg.tensors[t].quantization
            if qp is not None and qp.detailsType == s.QuantizationDetails.BlockwiseQuantization:
                keep.update(x for x in (qp.details.scales, qp.details.zeroPoints) if x is not None and x >= 0)
        order = sorted(keep)
        new_index = {old: new for new, old in enumerate(order)}
        sg.tensors = [sg.tensors[old] for old in order]

        def remap(arr):
            return None if arr is None else np.array([new_index[int(x)] if x >= 0 else -1 for x in arr], dtype=np.int32)

        for op in sg.operators:
            op.inputs, op.outputs, op.intermediates = remap(op.inputs), remap(op.outputs), remap(op.intermediates)
        sg.inputs, sg.outputs = remap(sg.inputs), remap(sg.outputs)
        for t in sg.tensors:
            qp = t.quantization
            if qp is not None and qp.detailsType == s.QuantizationDetails.BlockwiseQuantization:
                qp.details.scales = new_index[qp.details.scales]
                if qp.details.zeroPoints is not None and qp.details.zeroPoints >= 0:
                    qp.details.zeroPoints = new_index[qp.details.zeroPoints]
            used_buffers.add(t.buffer)
        for d in model_t.signatureDefs or []:
            if d.subgraphIndex == i:
                for m in (d.inputs or []) + (d.outputs or []):
                    m.tensorIndex = new_index[m.tensorIndex]
    used_buffers.update(m.buffer for m in model_t.metadata or [])
    order = sorted(used_buffers)
    new_buffer = {old: new for new, old in enumerate(order)}
    model_t.buffers = [model_t.buffers[old] for old in order]
    for sg in model_t.subgraphs:
        for t in sg.tensors:
            t.buffer = new_buffer[t.buffer]
    for m in model_t.metadata or []:
        m.buffer = new_buffer[m.buffer]


def fused_names(name: str | bytes) -> list[str] | None:
    """The names of the tensors a fused tensor's name joins (its rows' owners, in order), else None."""
    name = name.decode() if isinstance(name, bytes) else name
    prefix = FUSED_PREFIX.decode()
    return name[len(prefix):].split("+") if name.startswith(prefix) else None


def fuse_siblings(buf: bytes) -> tuple[bytes, dict[int, list[list[str]]]]:
    """`buf` with each set of fusable sibling FULLY_CONNECTEDs (see the module docstring) made one; returns the new
    flatbuffer and, per subgraph that changed, the groups fused (their output tensors' names). Unchanged: `buf`."""
    model_t = read_model(buf)
    inline_buffers(model_t, buf)  # large files keep their data past the flatbuffer; the offsets change on writing
    codes = op_names(model_t)
    groups_by_sg: dict[int, list[list]] = {}
    for i, sg in enumerate(model_t.subgraphs):
        groups: dict = {}
        uses: dict[int, int] = {}
        for op in sg.operators:
            for t in op.inputs:
                uses[int(t)] = uses.get(int(t), 0) + 1
        for op in sg.operators:
            if codes[op.opcodeIndex] == "FULLY_CONNECTED":
                key = _key(model_t, sg, op, uses)
                if key is not None:
                    groups.setdefault(key, []).append(op)
        found = [g for g in groups.values() if len(g) > 1]
        if found:
            groups_by_sg[i] = found
    if not groups_by_sg:
        return buf, {}
    slice_code = op_code(model_t, codes, "SLICE")
    memo: dict = {}
    report = {}
    for i, groups in groups_by_sg.items():
        sg = model_t.subgraphs[i]
        first = {id(g[0]): g for g in groups}
        member = {id(op) for g in groups for op in g}
        operators = []
        for op in sg.operators:
            if id(op) in first:
                # tensor names stay unique in the file (ai-edge-quantizer requires it), as `tflite_graph.label` keeps them
                operators += _fuse_group(model_t, sg, first[id(op)], memo, slice_code, b"@%d" % i if i else b"")
            elif id(op) not in member:
                operators.append(op)
        sg.operators = operators
        report[i] = [[sg.tensors[op.outputs[0]].name.decode() for op in g] for g in groups]
    _prune(model_t)
    return write_model(model_t), report


def fused_meta(buf: bytes, fused: dict[int, list[list[str]]]) -> dict | None:
    """Per signature, how many groups of sibling FULLY_CONNECTEDs `tflite_fuse` made one op, and the groups' edgeq layers."""
    if not fused:
        return None
    names = {index: name for name, index in signature_subgraphs(buf).items()}
    out = {}
    for index, groups in fused.items():
        layers = [[found[0] for found in map(labelled, g) if found] for g in groups]
        out[names.get(index, f"subgraph {index}")] = {"groups": len(groups), "ops_removed": sum(len(g) - 1 for g in groups),
                                                      "layers": [g for g in layers if g] or None}
    return out
