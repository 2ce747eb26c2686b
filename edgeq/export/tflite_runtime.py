"""Run a .tflite file with LiteRT's interpreter (XNNPACK), the way a board runs it.

Torch-free on purpose: the board agent and `edgeq eval FILE.tflite` import this with nothing but
numpy and a runtime. `ai_edge_litert` is preferred; `tflite_runtime` (its last release, 2.14, is
what older boards have) is the fallback. Inputs are positional, as for the PyTorch module the file
came from; outputs come back in signature order, logits first.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np

from ..console import chatter_dropped, native_chatter_dropped
from ..errors import EdgeqError

_delegate_announced = False


def interpreter_class():
    """LiteRT's `Interpreter`, from ai_edge_litert or else tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise EdgeqError("tflite: running .tflite files needs ai-edge-litert (pip install ai-edge-litert)") from None
    first_delegate_quietly(Interpreter)
    return Interpreter


def first_delegate_quietly(Interpreter=None) -> None:
    """LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." once per process, from native code,
    when the first interpreter applies its default delegate (at allocation: edgeq's runners and ai-edge-quantizer's
    calibration allocate in many places). Where the CLI keeps such lines out (`console.chatter_dropped`), that first
    time is a one-ADD file's, here, with descriptor 2 filtered (`console.native_chatter_dropped`)."""
    global _delegate_announced
    if _delegate_announced or not chatter_dropped():
        return
    _delegate_announced = True
    from .tflite_flatbuffer import one_add_model

    try:
        model = one_add_model()
        Interpreter = Interpreter or interpreter_class()
    except EdgeqError:  # tflite_runtime ships no schema module: its line stays
        return
    with native_chatter_dropped():
        Interpreter(model_content=model, num_threads=1).allocate_tensors()


def runtime_version() -> str:
    """`ai-edge-litert X` or `tflite-runtime X`: the runtime `TfliteRunner` uses."""
    try:
        import ai_edge_litert

        return f"ai-edge-litert {ai_edge_litert.__version__}"
    except ImportError:
        import tflite_runtime

        return f"tflite-runtime {tflite_runtime.__version__}"


def arg_order(name: str) -> tuple:
    """litert-torch names positional inputs args_0, args_1, ...: sort by that number, not as text."""
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def signature_io(runner) -> tuple | None:
    """(interpreter wrapper, subgraph index, input tensor indices by name, output tensor indices by name) of a LiteRT
    signature runner: what setting inputs once, invoking and reading outputs on the signature's subgraph needs,
    without the copies the runner's call makes of every input and output. Reaches into the runner (ai-edge-litert
    2.3, tested); None where a runtime's runner has no such wrapper."""
    try:
        return runner._interpreter_wrapper, runner._subgraph_index, dict(runner._inputs), dict(runner._outputs)
    except (AttributeError, TypeError, ValueError):
        return None


def node_count(interpreter) -> int | None:
    """The ops of an interpreter's first subgraph, before allocation applies its delegates (`delegate_coverage`
    needs the count from then); None where the runtime's interpreter has no node wrapper (ai-edge-litert 2.3 has)."""
    wrapper = getattr(interpreter, "_interpreter", None)
    if not all(hasattr(wrapper, f) for f in ("NumNodes", "NodeName", "NodeInputs", "NodeOutputs")):
        return None
    return int(wrapper.NumNodes())


def delegate_coverage(interpreter, nodes: int) -> dict:
    """How the delegates took an allocated interpreter's first subgraph of `nodes` ops (`node_count` before
    allocation): `nodes`, `partitions` (delegate nodes: 1 when XNNPACK runs everything it takes as one graph) and
    `builtin` (op type -> count of the ops left to LiteRT's built-in kernels). Every boundary between the two costs a
    hand-over, and an op XNNPACK leaves is one it had no kernel or options for in this runtime. Found by walking back
    from each delegate node's outputs to its inputs: the ops in between are the ones it replaced."""
    w = interpreter._interpreter
    producer = {int(t): i for i in range(nodes) for t in w.NodeOutputs(i)}
    delegated: set[int] = set()
    partitions = 0
    for d in range(nodes, w.NumNodes()):
        partitions += w.NodeName(d) == "DELEGATE"
        stop = {int(t) for t in w.NodeInputs(d)}
        todo = [int(t) for t in w.NodeOutputs(d)]
        while todo:
            op = producer.get(todo.pop())
            if op is None or op in delegated:
                continue
            delegated.add(op)
            todo += [int(t) for t in w.NodeInputs(op) if int(t) >= 0 and int(t) not in stop]
    builtin: dict[str, int] = {}
    for i in range(nodes):
        if i not in delegated:
            builtin[w.NodeName(i)] = builtin.get(w.NodeName(i), 0) + 1
    return {"nodes": nodes, "partitions": partitions, "builtin": dict(sorted(builtin.items()))}


def xnnpack_coverage(model: bytes | Path, signature: str, workdir: Path | None = None) -> dict | None:
    """How LiteRT's default XNNPACK delegate takes a signature of `model` (a file's bytes or path; `delegate_coverage`:
    nodes, partitions, the op types left to the built-in kernels; a SLICE of size -1 once cut SmolLM2's decode step
    into 31 partitions), in a one-thread interpreter of its own. The interpreter lists the nodes of a file's first
    subgraph only, so another signature's subgraph is written alone to a file in `workdir` (a temporary directory by
    default; `tflite_flatbuffer.write_signature_alone`, its weights mapped, not copied) and loaded from there. Reaches
    into ai-edge-litert's interpreter wrapper (`NumNodes`, `NodeName`, `NodeInputs`, `NodeOutputs`; 2.3, tested):
    None where a runtime's interpreter has no such wrapper."""
    import mmap
    import tempfile

    from .tflite_flatbuffer import write_signature_alone

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        alone = Path(tmp) / "signature.tflite"
        with contextlib.ExitStack() as source:  # the file mapped while it is copied, unmapped before the load
            buf = model
            if isinstance(model, Path):
                fh = source.enter_context(open(model, "rb"))
                buf = source.enter_context(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
            written = write_signature_alone(buf, signature, alone)
        if written:
            kwargs = {"model_path": str(alone)}
        else:
            kwargs = {"model_path": str(model)} if isinstance(model, Path) else {"model_content": bytes(model)}
        interpreter = interpreter_class()(num_threads=1, **kwargs)
        nodes = node_count(interpreter)  # before the delegate is applied (at allocation)
        if nodes is None:
            return None
        interpreter.allocate_tensors()
        return delegate_coverage(interpreter, nodes)


class TfliteRunner:
    """One signature of a .tflite file, called like the PyTorch module: `runner(*arrays) -> [outputs]`."""

    def __init__(self, path: str | Path | bytes, threads: int = 1, signature: str | None = None, xnnpack: bool = True):
        """`xnnpack=False`: LiteRT's built-in (reference) kernels, without the default XNNPACK delegate."""
        Interpreter = interpreter_class()
        kwargs = {"model_content": bytes(path)} if isinstance(path, (bytes, bytearray)) else {"model_path": str(path)}
        if not xnnpack:
            from importlib import import_module

            resolver = import_module(Interpreter.__module__).OpResolverType
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interpreter = Interpreter(num_threads=threads, **kwargs)
        except ValueError as exc:
            raise EdgeqError(f"tflite: cannot load {path if not isinstance(path, (bytes, bytearray)) else 'model'}: {exc}") from None
        signatures = self.interpreter.get_signature_list()
        if not signatures:
            raise EdgeqError("tflite: the file has no signature (export it with edgeq or litert-torch)")
        if signature is None:
            signature = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
        if signature not in signatures:
            raise EdgeqError(f"tflite: signature {signature!r} is not one of: {', '.join(sorted(signatures))}")
        self.signature = signature
        self.runner = self.interpreter.get_signature_runner(signature)
        details = self.runner.get_input_details()
        self.input_names = sorted(details, key=arg_order)
        self.inputs = [details[n] for n in self.input_names]
        outs = self.runner.get_output_details()
        self.output_names = sorted(outs, key=arg_order)
        self.threads = threads

    def input_specs(self) -> list[dict]:
        """name, dtype and shape of each positional input."""
        return [{"name": n, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]]}
                for n, d in zip(self.input_names, self.inputs)]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise EdgeqError(f"tflite: the model takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        feed = {}
        for name, d, x in zip(self.input_names, self.inputs, inputs):
            x = np.asarray(x)
            want = tuple(int(s) for s in d["shape"])
            if x.shape != want:
                raise EdgeqError(f"tflite: input {name} has shape {list(x.shape)}; the file was exported for {list(want)}")
            feed[name] = x.astype(d["dtype"], copy=False)
        out = self.runner(**feed)
        return [np.asarray(out[n]) for n in self.output_names]


def slot_axis(j: int) -> int:
    """The slot axis of the decode signature's input j >= 2: the mask (2) and the values (4, 6, ...) hold their slots
    last, the keys (3, 5, ...) on axis 1."""
    return 1 if j % 2 else 2


def slot_range(cache: np.ndarray, j: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """A view of slots start:stop of cache j (the decode signature's input 3 + j)."""
    index = [slice(None)] * cache.ndim
    index[slot_axis(3 + j)] = slice(start, stop)
    return cache[tuple(index)]


def write_row(cache: np.ndarray, j: int, pos: int, new: np.ndarray) -> None:
    """Write a decode step's new key or value `[kv_heads, 1, head_dim]` (output j after the logits: keys at even
    j, values at odd) into slot `pos` of its cache: keys `[kv_heads, cache_len, head_dim]`, values stored
    transposed, `[kv_heads, head_dim, cache_len]` (edgeq.export.tflite_decode says why)."""
    if j % 2 == 0:
        cache[:, pos, :] = new[:, 0, :]
    else:
        cache[:, :, pos] = new[:, 0, :]


class DecodeSession:
    """A decoder LM's `decode` signature run the way a generation loop on a board runs it: the KV caches live
    in the interpreter's own input buffers, and each step sets the token, its position and the mask, invokes, and
    writes the step's new keys and values into slot `pos` of those buffers in place. Nothing the size of a
    cache is copied (the signature runner's call copies every input in and every output out).

    `slots`: the cache slots to hold (default: the file's declared cache_len). In a file whose slot count is the
    runtime's choice (FILE.json `graph.decode.dynamic_slots`), any count: each step attends over that many slots, so
    fewer cost less (SmolLM2's attention over 64 slots takes a third of its time over 256). `grow`: a position
    past the slots doubles them (keeping the cached rows) instead of being refused.

    Uses the signature runner's interpreter wrapper (`signature_io`); a runtime without it gets a clear error.
    """

    def __init__(self, path: str | Path | bytes, threads: int = 1, slots: int | None = None, grow: bool = False):
        self.runner = TfliteRunner(path, threads=threads, signature="decode")
        io = signature_io(self.runner.runner)
        if io is None:
            raise EdgeqError("tflite: this LiteRT runtime's signature runner has no interpreter wrapper to run the decode "
                             "signature in place; use TfliteRunner(path, signature='decode')")
        self._w, self._sg, inputs, outputs = io
        self._in = [inputs[n] for n in self.runner.input_names]
        self._out = [outputs[n] for n in self.runner.output_names]
        details = self.runner.runner.get_input_details()
        mask = details[self.runner.input_names[2]]
        if len(mask["shape"]) != 3 or list(mask["shape"][:2]) != [1, 1] or len(self.runner.input_names) < 5:
            raise EdgeqError("tflite: this file's decode signature has no mask input (input_ids, input_pos, mask, caches): "
                             "it was exported before edgeq's decode step took one; re-export it")
        self.dynamic = int(list(mask.get("shape_signature", mask["shape"]))[-1]) == -1
        self._shapes = [[int(x) for x in details[n]["shape"]] for n in self.runner.input_names]
        self._dtypes = [np.dtype(d["dtype"]) for d in self.runner.inputs[:2]]
        self.grow = grow
        self.cache_len = self._shapes[3][1]  # keys [kv_heads, slots, head_dim]
        self._w.AllocateTensors(self._sg)
        if slots is not None and slots != self.cache_len:
            self.resize(slots)

    def _input(self, j: int) -> np.ndarray:
        """A view of input j (a fresh view each time: LiteRT may move buffers when it allocates)."""
        return self._w.tensor(self._w, self._in[j], self._sg)

    def _cache(self, j: int) -> np.ndarray:
        return self._input(3 + j)

    def resize(self, slots: int) -> None:
        """Hold `slots` cache slots, keeping the rows already cached in the first min(old, new) slots."""
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise EdgeqError(f"tflite: slots must be a whole number >= 1, not {slots!r}")
        if not self.dynamic:
            raise EdgeqError(f"tflite: this file's decode signature has a fixed {self.cache_len} cache slots (FILE.json "
                             "graph.decode.slots_note says why); re-export it with edgeq for a run-time slot count")
        kept = [np.array(slot_range(self._cache(j), j, stop=slots)) for j in range(len(self._in) - 3)]
        for j in range(2, len(self._in)):
            self._shapes[j][slot_axis(j)] = slots
            self._w.ResizeInputTensor(self._in[j], np.array(self._shapes[j], dtype=np.int32), True, self._sg)
        self._w.AllocateTensors(self._sg)
        self.cache_len = slots
        self.reset(kept)

    def reset(self, caches: list[np.ndarray] | None = None) -> None:
        """Zero the caches, or load `caches` (e.g. the prefill signature's outputs after the logits: their first
        min(theirs, the session's) slots, zeros after)."""
        for j in range(len(self._in) - 3):
            cache = self._cache(j)
            cache[...] = 0.0
            if caches is not None:
                src = slot_range(np.asarray(caches[j]), j, stop=self.cache_len)
                slot_range(cache, j, stop=src.shape[slot_axis(3 + j)])[...] = src

    def step(self, token: int, pos: int) -> np.ndarray:
        """Run token `token` at position `pos` (its key and value go to slot `pos`); returns its logits [vocab]."""
        if pos >= self.cache_len and self.grow:
            self.resize(max(2 * self.cache_len, pos + 1))
        if not 0 <= pos < self.cache_len:
            raise EdgeqError(f"tflite: position {pos} is outside the decode signature's {self.cache_len} cache slots"
                             + (" (DecodeSession(..., grow=True) grows them)" if self.dynamic else ""))
        self._w.SetTensor(self._in[0], np.array([[token]], dtype=self._dtypes[0]), self._sg)
        self._w.SetTensor(self._in[1], np.array([pos], dtype=self._dtypes[1]), self._sg)
        attention_mask(pos, self.cache_len, out=self._input(2))
        self._w.Invoke(self._sg)
        for j, index in enumerate(self._out[1:]):
            write_row(self._cache(j), j, pos, self._w.GetTensor(index, self._sg))
        return self._w.GetTensor(self._out[0], self._sg).reshape(-1)


def attention_mask(pos: int, slots: int, out: np.ndarray | None = None) -> np.ndarray:
    """The decode step's mask input [1, 1, slots]: 0 for the cached slots 0..pos-1 it attends over, float32's lowest
    value for the rest (in `out` if given)."""
    out = np.empty((1, 1, slots), dtype=np.float32) if out is None else out
    out[..., :pos] = 0.0
    out[..., pos:] = np.finfo(np.float32).min
    return out
