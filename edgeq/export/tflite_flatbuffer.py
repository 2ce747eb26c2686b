"""A .tflite file as a flatbuffer: read, edit, write, with LiteRT's own generated schema.

Torch-free on purpose, like `tflite_runtime`: the board agent uses it to load one signature of a file alone
(`write_signature_alone`), which needs `ai_edge_litert`'s schema module (`tflite_runtime` has none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeqError


def schema():
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise EdgeqError("tflite: reading a .tflite flatbuffer needs ai-edge-litert's schema (pip install ai-edge-litert)") from None
    return schema_py_generated


def read_model(buf: bytes):
    s = schema()
    return s.ModelT.InitFromObj(s.Model.GetRootAs(buf, 0))


def write_model(model_t) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model_t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def one_add_model() -> bytes:
    """The smallest file that makes LiteRT apply its XNNPACK delegate: y = x + x on one float."""
    s = schema()
    model = s.ModelT()
    model.version, model.buffers = 3, [s.BufferT()]
    tensors = []
    for name in (b"x", b"y"):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1], s.TensorType.FLOAT32, 0
        tensors.append(t)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [1], [op]
    model.subgraphs, model.operatorCodes = [graph], [code]
    return write_model(model)


def signature_subgraphs(buf: bytes) -> dict[str, int]:
    """Each signature's subgraph index, read from the flatbuffer without unpacking it."""
    root = schema().Model.GetRootAs(buf, 0)
    return {root.SignatureDefs(i).SignatureKey().decode(): root.SignatureDefs(i).SubgraphIndex()
            for i in range(root.SignatureDefsLength())}


def op_names(model_t) -> list[str]:
    s = schema()
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    return [names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), str(oc.builtinCode)) for oc in model_t.operatorCodes]


def buffer_bytes(model_t, index: int, buf: bytes) -> np.ndarray | None:
    """A buffer's bytes, inline or (large models, ai-edge-quantizer's output) at an offset past the flatbuffer."""
    b = model_t.buffers[index]
    if b.data is not None:
        return np.asarray(b.data, dtype=np.uint8)
    if getattr(b, "offset", 0) > 1 and b.size:
        return np.frombuffer(buf, dtype=np.uint8, count=b.size, offset=b.offset)
    return None


def inline_buffers(model_t, buf: bytes) -> None:
    """Move the data a flatbuffer keeps past its end (offsets into `buf`) into its buffers, in place: what writing an
    edited `model_t` again needs, as the offsets change."""
    for i, b in enumerate(model_t.buffers):
        if getattr(b, "offset", 0) > 1:
            b.data, b.offset, b.size = buffer_bytes(model_t, i, buf), 0, 0


def write_signature_alone(buf, signature: str, dest: Path) -> bool:
    """Write to `dest` the file `buf` (bytes, or an mmap of a file) with `signature`'s subgraph as its only one: what a
    runtime that reports on its first subgraph only needs to report on another signature. The weights are not copied
    into a new flatbuffer: every buffer's data goes after it, found by offset (LiteRT's layout for files past 2 GB,
    which ai-edge-litert 2.3 reads from a file of any size: tested), so loading `dest` by path maps it instead of holding a second copy in memory.
    False, and nothing written, when the signature's subgraph is the first already."""
    index = signature_subgraphs(buf).get(signature)
    if index is None:
        raise EdgeqError(f"tflite: signature {signature!r} is not in the file")
    if index == 0:
        return False
    model_t = read_model(buf)
    model_t.subgraphs = [model_t.subgraphs[index]]
    model_t.signatureDefs = [d for d in model_t.signatureDefs if d.subgraphIndex == index]
    model_t.signatureDefs[0].subgraphIndex = 0
    chunks = [(b, buffer_bytes(model_t, i, buf)) for i, b in enumerate(model_t.buffers)]
    chunks = [(b, data) for b, data in chunks if data is not None and data.size]
    for b, data in chunks:  # offsets > 1 mean "past the flatbuffer"; any such value packs to the same length
        b.data, b.offset, b.size = None, 2, data.size
    start = end = _align(len(write_model(model_t)))
    for b, data in chunks:
        b.offset, end = end, _align(end + data.size)
    head = write_model(model_t)
    if len(head) > start:  # cannot happen while offsets are fixed-width fields; never write overlapping data
        raise EdgeqError(f"tflite: the flatbuffer grew to {len(head)} bytes when its offsets were set (planned {start})")
    with open(dest, "wb") as fh:
        fh.write(head)
        for b, data in chunks:
            fh.seek(b.offset)
            fh.write(memoryview(data))
        fh.truncate(end)
    return True


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to
