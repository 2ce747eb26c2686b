"""edgeq's grids as ai-edge-quantizer instructions: one recipe entry and one min/max override per layer.

ai-edge-quantizer computes a symmetric scale as `bound / qmax` and an asymmetric one as
`(max - min) / (2^b - 1)` in float64. Handing it `bound = qmax * scale` (exact in float64 for a
float32 scale) therefore gives back edgeq's scale bit for bit, and the integers it rounds from the
dequantized float weight `q * scale` are edgeq's integers. Static activation grids go the same way
(uint8 zero point z -> int8 z - 128, the same real grid). Only FC / conv layers edgeq quantized are
named in the recipe; every other op stays float (never the "quantize everything" trap).
The read-back in `tflite_check` is what proves the result; nothing here is trusted without it.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import numpy as np

from ..console import progress_shown
from ..errors import EdgeqError
from .tflite_flatbuffer import buffer_bytes, inline_buffers, op_names, read_model, schema, write_model
from .tflite_runtime import first_delegate_quietly

ALGORITHM = "min_max_uniform_quantize"
BLOCK_SIZES = (32, 64, 128, 256)  # ai-edge-quantizer's BLOCKWISE_* granularities (LiteRT blockwise kernels)


def _granularity(decision) -> str:
    w = decision.weight
    if w.granularity == "group":
        return f"BLOCKWISE_{w.group_size}"
    return "CHANNELWISE" if w.granularity == "channel" else "TENSORWISE"


def op_config(decision, static: bool) -> dict:
    """The ai-edge-quantizer op config rendering one edgeq layer decision."""
    w = decision.weight
    cfg = {
        "weight_tensor_config": {"num_bits": w.bits, "symmetric": True, "granularity": _granularity(decision), "dtype": "INT"},
        "compute_precision": "INTEGER",
        "explicit_dequantize": False,
        "skip_checks": False,
        "min_weight_elements": 0,
    }
    if static:
        a = decision.activation  # 8-bit asymmetric (int8) or 16-bit symmetric (LiteRT's 16x8 mode)
        cfg["activation_tensor_config"] = {"num_bits": a.bits, "symmetric": a.symmetric, "granularity": "TENSORWISE", "dtype": "INT"}
    return cfg


def recipe(layers: dict, ops: dict[str, str], static: bool) -> list[dict]:
    """One entry per quantized layer, matched by the op scope `edgeq/<layer>;` (its output name; `edgeq/<layer>@1;`
    in a second signature's subgraph)."""
    return [{"regex": f"^edgeq/{re.escape(name)}(@\\d+)?;$", "operation": ops[name], "algorithm_key": ALGORITHM,
             "op_config": op_config(m.decision, static)} for name, m in layers.items()]


def weight_override(module, op: str, tfl_shape: tuple, scale) -> dict:
    """min/max for a weight such that ai-edge-quantizer derives `scale` (the layer's rendered scales) exactly."""
    d = module.decision
    qmax = 2 ** (d.weight.bits - 1) - 1
    # [out, n_groups]; exact in float64. A folded BatchNorm with a negative gain gives a negative
    # rendered scale: TFLite keeps |scale| and the quantizer negates that channel's integers.
    bound = np.abs(scale.detach().double().numpy()) * qmax
    if d.weight.granularity == "group":
        shape = bound.shape  # [out, in / block] = ai-edge-quantizer's blockwise min/max shape for FC
    elif d.weight.granularity == "tensor":
        bound = bound[:1, :1]
        shape = (1,) * len(tfl_shape)
    elif op == "DEPTHWISE_CONV_2D":
        shape = (1, 1, 1, tfl_shape[3])
    else:
        shape = (tfl_shape[0],) + (1,) * (len(tfl_shape) - 1)
    bound = bound.reshape(shape)
    return {"min": -bound, "max": bound}


def act_override(module) -> dict:
    """min/max for a static input grid: uint8 (scale s, zero point z) is int8 (s, z - 128); a symmetric
    16-bit grid is +-32767 s (ai-edge-quantizer divides the bound by 32767, exactly in float64)."""
    s = float(module.act_scale)
    a = module.decision.activation
    if a.symmetric:
        bound = (2 ** (a.bits - 1) - 1) * s
        return {"min": np.array(-bound, dtype=np.float64), "max": np.array(bound, dtype=np.float64)}
    z = int(module.act_zero_point)
    return {"min": np.array(-z * s, dtype=np.float64), "max": np.array((255 - z) * s, dtype=np.float64)}


def weight_overrides(placed: dict[str, list[tuple]], layers: dict, ops: dict[str, str], scales: dict) -> dict:
    """min/max for every weight tensor of every layer (`placed`: `tflite_graph.layer_ops`): one per subgraph, all
    on one buffer; a tied head's is its embedding table's, the same override twice."""
    out = {}
    for name, found in placed.items():
        for sg, op in found:
            wt = sg.tensors[op.inputs[1]]
            out[wt.name.decode()] = weight_override(layers[name], ops[name], tuple(int(x) for x in wt.shape), scales[name])
    return out


def quantize(float_buf: bytes, layers: dict, ops: dict[str, str], static: bool, calibration: dict[str, list[dict]] | None,
             scales: dict, output_calibration: str = "minmax") -> bytes:
    """Apply edgeq's grids to the labelled float graph with ai-edge-quantizer; returns the flatbuffer.

    `calibration` (static only) holds feeds per signature; `scales` are the weight scales each layer is
    rendered with (edgeq's, or times a folded BatchNorm factor).
    """
    from ai_edge_quantizer import quantizer

    from .tflite_graph import layer_ops

    entries = recipe(layers, ops, static)
    qt = quantizer.Quantizer(bytearray(float_buf))
    qt.load_quantization_recipe(entries)
    placed = layer_ops(read_model(float_buf), layers)
    qsvs: dict = {}
    if static:
        with _quantizer_output():
            qsvs = calibrate(float_buf, entries, calibration or {"serving_default": []}, output_calibration)
        share_output_grids(qsvs, placed)
        for name, m in layers.items():
            grid = act_override(m)
            for sg, op in placed[name]:  # the op's activation input, in each subgraph
                tensor = sg.tensors[op.inputs[0]].name.decode()
                prev = qsvs.get(tensor, {}).get("_edgeq")
                if prev is not None and prev != name and not _same(qsvs[tensor], grid):
                    raise EdgeqError(f"tflite: layers {prev!r} and {name!r} read the same tensor with different static grids; "
                                     "TFLite holds one grid per tensor (re-quantize with one activation grid for them)")
                qsvs[tensor] = {**grid, "_edgeq": name}
    qsvs.update(weight_overrides(placed, layers, ops, scales))
    qsvs = {k: {kk: vv for kk, vv in v.items() if kk != "_edgeq"} for k, v in qsvs.items()}
    try:
        with _duplicates_named_in_bytes(), _quantizer_output():
            result = qt.quantize(qsvs, enable_progress_bar=False, enable_progress_report=False)
    except (ValueError, RuntimeError) as exc:
        raise EdgeqError(f"tflite: ai-edge-quantizer refused edgeq's grids: {str(exc).splitlines()[0]}") from None
    return bytes(result.quantized_model)


OUTPUT_CALIBRATIONS = ("minmax", "moving-average")  # how a full-integer layer's output range is taken from its inputs


def calibrate(float_buf: bytes, entries: list[dict], calibration: dict[str, list[dict]], method: str = "minmax") -> dict:
    """{tensor: {"min", "max"}} of the tensors the recipe `entries` quantize, from the `calibration` inputs (per
    signature): with "minmax" the lowest and highest value each took over all of them (ONNX Runtime's MinMax
    calibration; what edgeq's simulation of output grids assumes, `edgeq qat --output-grids`); with "moving-average",
    ai-edge-quantizer's own default, each input moves the range so far 5% of the way to its own (0.95 old + 0.05 new),
    so the first input's range dominates and a later input's larger outputs barely widen it."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    update = {"minmax": qsv_utils.min_max_update, "moving-average": qsv_utils.moving_average_update}[method]
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(entries)
    calib = calibrator.Calibrator(bytes(float_buf), num_threads=1, qsv_update_func=update)
    calib.calibrate(calibration, manager)
    return dict(calib.get_model_qsvs())


@contextlib.contextmanager
def _quantizer_output():
    """ai-edge-quantizer (0.10.0) draws its progress bars ("Running Calibration:", "Applying Transformations to
    tensors:") on stderr whatever `enable_progress_bar` says; in the block they follow edgeq's rule (a terminal, or
    EDGEQ_PROGRESS). Its calibration interpreter keeps every tensor, which calibration needs, and warns that this is for
    debugging; that warning is dropped. Its interpreters are LiteRT's: the first in a process announces its delegate,
    which `first_delegate_quietly` has done already where the CLI keeps such lines out."""
    from ai_edge_quantizer.utils import progress_utils

    first_delegate_quietly()

    original = progress_utils.ProgressBar.__init__
    shown = progress_shown()

    def init(self, total_steps, description="", disappear_on_finish=False, enable=None):
        original(self, total_steps, description, disappear_on_finish, enable=enable if shown else False)

    progress_utils.ProgressBar.__init__ = init
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors", category=UserWarning)
            yield
    finally:
        progress_utils.ProgressBar.__init__ = original


@contextlib.contextmanager
def _duplicates_named_in_bytes():
    """ai-edge-quantizer (0.10.0) gives a weight it duplicates (one two ops read with their own quantization) a str
    name, and its blockwise quantization then appends bytes to that name: a TypeError. ELECTRA's and ALBERT's
    embedding projection meets it: the converter leaves it as two identical FULLY_CONNECTEDs on one weight. In the
    block the duplicate's name is bytes, as every other tensor name."""
    from ai_edge_quantizer.transformations import duplicate_tensor as module

    original = module.duplicate_tensor

    def duplicate(transformation_input):
        info = original(transformation_input)
        new = transformation_input.subgraph.tensors[-1]  # (appended by the duplication)
        if isinstance(new.name, str):
            new.name = new.name.encode()
        return info

    module.duplicate_tensor = duplicate
    try:
        yield
    finally:
        module.duplicate_tensor = original


def share_output_grids(qsvs: dict, placed: dict[str, list[tuple]]) -> None:
    """One output grid per layer across signatures: the union of each subgraph's calibrated range.

    A decode signature is calibrated on a few single-token steps, the prefill on every token of its inputs, so
    the step alone would miss the rare tokens whose outputs carry the residual stream's outliers and clip them
    (SmolLM2: a decode-only grid 0.72x the prefill's on a down-projection). The layer computes the same function
    in both signatures, so both get the range of everything calibration showed it."""
    for found in placed.values():
        names = [sg.tensors[op.outputs[0]].name.decode() for sg, op in found]
        names = [n for n in names if n in qsvs]
        if len(names) < 2:
            continue
        lo = min(float(np.min(qsvs[n]["min"])) for n in names)  # per-tensor grids; each keeps its own array shape
        hi = max(float(np.max(qsvs[n]["max"])) for n in names)
        for n in names:
            qsvs[n] = {**qsvs[n], "min": np.full_like(qsvs[n]["min"], lo), "max": np.full_like(qsvs[n]["max"], hi)}


def _same(a: dict, b: dict) -> bool:
    return np.array_equal(a["min"], b["min"]) and np.array_equal(a["max"], b["max"])


ACCUMULATOR_LIMIT = 2**31  # LiteRT's optimized 16x8 FULLY_CONNECTED sums int16 x int8 products in int32


def int32_biases_16x8(buf: bytes) -> tuple[bytes, dict | None]:
    """Store each 16x8 FULLY_CONNECTED's int64 bias as int32 where no input can overflow 32 bits; returns the file and
    what was done (None without 16x8 layers).

    ai-edge-quantizer quantizes a bias to 32 bits and, for a 16-bit input, stores it as int64 ("safe to cast back to
    int32" for an int32 accumulator, it says). LiteRT runs a FULLY_CONNECTED with an int64 bias on its reference kernel
    and one with an int32 bias (or none) on its optimized kernel, which accumulates in int32: MiniLM-L6's six 16-bit
    FC2s took 82 of a 64-token batch's 84 ms, 4.6 ms in all with int32 biases. The values are the same integers. The
    cast is made only where the worst case over every possible input, 32768 * max over rows of sum |w| + max |b|, stays
    below 2^31; a layer above keeps int64 (reference kernel, exact). The optimized kernel requantizes its outputs with
    its own fixed-point rounding: on MiniLM's first FC2, 2 of 24,576 int16 outputs one step from the reference kernel's,
    which matched the definition exactly. A layer without a bias runs the optimized kernel in any case; its bound is
    recorded too (`over_limit` lists layers whose worst case could overflow there)."""
    s = schema()
    model_t = read_model(buf)
    names = op_names(model_t)
    found: dict[int, list] = {}  # bias buffer -> the bias tensors reading it (one per signature)
    bounds: dict[str, float] = {}
    kept, unbiased = [], []
    for sg in model_t.subgraphs:
        for op in sg.operators:
            if names[op.opcodeIndex] != "FULLY_CONNECTED" or sg.tensors[op.inputs[0]].type != s.TensorType.INT16:
                continue
            w = sg.tensors[op.inputs[1]]
            layer = w.name.decode().removeprefix("edgeq/").removesuffix("/weight")
            q = buffer_bytes(model_t, w.buffer, buf)
            if q is None or w.type != s.TensorType.INT8:
                continue
            row_sums = np.abs(q.view(np.int8).astype(np.int64).reshape(int(w.shape[0]), -1)).sum(1)
            bias = sg.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            b = buffer_bytes(model_t, bias.buffer, buf) if bias is not None else None
            b = np.zeros(1, np.int64) if b is None else b.view(np.int64 if bias.type == s.TensorType.INT64 else np.int32)
            bounds[layer] = float(32768 * row_sums.max() + np.abs(b.astype(np.int64)).max()) / ACCUMULATOR_LIMIT
            if bias is None:
                unbiased.append(layer)
            elif bias.type == s.TensorType.INT64:
                if bounds[layer] < 1:
                    found.setdefault(bias.buffer, []).append(bias)
                else:
                    kept.append(layer)
    if not bounds:
        return buf, None
    if found:
        inline_buffers(model_t, buf)
        for index, tensors in found.items():
            data = np.asarray(model_t.buffers[index].data, dtype=np.uint8).view(np.int64)
            model_t.buffers[index].data = np.frombuffer(data.astype(np.int32).tobytes(), dtype=np.uint8)
            for t in tensors:
                t.type = s.TensorType.INT32
        buf = write_model(model_t)
    return buf, {"layers": len(bounds), "int32_biases": len(found), "int64_biases_kept": sorted(set(kept)),
                 "without_bias": len(set(unbiased)),
                 "accumulator_bound_max": round(max(bounds.values()), 4),
                 "over_limit": sorted(n for n, r in bounds.items() if r >= 1),
                 "note": "worst-case |sum of int16 x int8 products + bias| over every input, as a fraction of 2^31, "
                         "the int32 accumulator of LiteRT's optimized 16x8 kernel; int64 biases (reference kernel) "
                         "stay where it is 1 or more"}
