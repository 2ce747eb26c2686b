"""ONNX export: one quantized model (or a float model) in, one .onnx file + FILE.onnx.json out.

Variants (the default follows the source):
- `fp32`: the float model (source is a model reference, no quantized directory);
- `int8`: static QDQ, uint8 activations on each layer's calibrated grid, 8-bit weights (stored as
  uint8 = int8 + 128 by default, see `int8_weights`: exact in ORT's integer kernels on every CPU);
- `int16x8`: static QDQ with int16 (symmetric, zero point 0) activations on each layer's calibrated
  grid and 8-bit weights (recipe w8a16-static). ONNX Runtime has no int16 integer kernels: it computes
  these layers in float on exactly the grid's values (the format is for LiteRT's 16x8 kernels; in
  ONNX the file states and checks the same numbers);
- `dynamic-int8`: activations quantized per call (ORT quantize_dynamic's graph structure);
- `weight-only`: DequantizeLinear weights (INT8 per channel, or opset-21 blocked INT4/UINT4 that
  ONNX Runtime fuses into MatMulNBits; 2-3 bit values live in 4-bit containers), float activations.
Decoder LMs get two graphs: FILE.onnx (prefill: input_ids -> logits + present key/values) and
FILE.decode.onnx (one token + past key/values -> logits + presents). When layers quantize their
inputs per token, the decode graph takes batch 1 (`decode_batch` in the JSON): each layer input is
then one row, whose grid is the tensor's, and ONNX Runtime runs its fused per-tensor kernels. With
external data (big models) both graphs read one FILE.onnx.data holding each distinct tensor once.

The graphs are saved after ONNX Runtime's basic graph optimizations (ONNX operators only; see
onnx_files.OFFLINE_OPTIMIZATION_SKIPS), which ORT's quant_pre_process also runs before its quantizers.
Every export reads its integers back from the written file and compares them bitwise with the
quantized model (`exact`), and runs the file in ONNX Runtime against the PyTorch simulation on
held-back inputs (`parity`). Files are written into a temporary directory beside the output and
renamed into place only when everything succeeded; the JSON goes last.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from ..errors import EdgeqError, choice_error
from ..models.hf import decoder_attention
from . import decode_graph_name, register_exporter
from .batchnorm import bn_folds, folded_integers, rendered_scale
from .meta import add_quality_context, held_back_inputs, parity_metrics, write_export_meta
from .onnx_files import put_in_place, write_graphs
from .onnx_graph import OPSET, PREFIX, dequantized, export_graph, graph_specs, torch_outputs
from .onnx_quant import LayerQ, int32_biases, quantize_graph
from .onnx_readback import read_back
from .onnx_runtime import ACCURACY_LEVEL_KEY, OnnxRunner
from .verdict import tolerance_verdict
from ..quantize.qmodel import is_qdir

VARIANTS = ("fp32", "int8", "int16x8", "dynamic-int8", "weight-only")
# Minimum ONNX Runtime versions: opset 21 (ONNX 1.16) came with ORT 1.18 (PR #19745); INT4/UINT4
# DequantizeLinear (PR #20362), blocked DequantizeLinear (PR #20901) and blocked QuantizeLinear (PR #20977, per-token
# dynamic grids) with ORT 1.19.
RUNTIME_MIN_OPSET21 = "1.18"
RUNTIME_MIN_INT4_BLOCKED = "1.19"
# GatherBlockQuantized on uint8 (packed 4-bit) data, a packed embedding table's lookup: ORT 1.22 (PR #24239). Measured:
# 1.21.1 refuses the graph (uint8 is not a type of its `data`), 1.22.0 and 1.32.0 run it exactly.
RUNTIME_MIN_PACKED_TABLE = "1.22"
OUTPUT_CALIB_SAMPLES = 8  # calibration inputs of `output_grids` (as the TFLite int8 files' output grids)
# The decode step against the prefill at the same position where both compute the same (`_verdict`): float
# reassociation only (0.0 to 2.4e-6 on tiny-llama, 0.0 on SmolLM2 in `make demo`).
DECODE_MAX_ABS = 1e-3


def default_variant(qm) -> str:
    """The variant a source implies: fp32 without quantization, else from its activation modes."""
    if qm is None:
        return "fp32"
    acts = [m.decision.activation for m in qm.layers().values()]
    modes = {a.mode for a in acts}
    if "static" in modes:
        return "int16x8" if any(a.mode == "static" and a.bits == 16 for a in acts) else "int8"
    if "dynamic" in modes:
        return "dynamic-int8"
    return "weight-only"


def _runtime_min(rendered: list, four_bit: bool) -> str:
    """The oldest ONNX Runtime that runs what the layers were rendered as."""
    ops = {r.op for rs in rendered for r in rs}
    if ops & {"GatherBlockQuantized", "MatMulNBits"}:
        return RUNTIME_MIN_PACKED_TABLE
    if four_bit or any(r.blocked or r.activation == "dynamic-token" for rs in rendered for r in rs):
        return RUNTIME_MIN_INT4_BLOCKED
    return RUNTIME_MIN_OPSET21


def _check_variant(variant: str | None, qm) -> str:
    implied = default_variant(qm)
    variant = variant or implied
    if variant not in VARIANTS:
        raise choice_error("variant", variant, VARIANTS)
    if variant != implied:
        what = "a model reference (no quantized directory)" if qm is None else f"recipe {qm.recipe.name!r}"
        raise EdgeqError(f"variant: {variant!r} does not match {what}, which exports as {implied!r} "
                         "(the file must compute what the quantized model computes)")
    return variant


@register_exporter("onnx", ".onnx")
def export_onnx(qm=None, bundle=None, source: str = "", out: Path = Path("model.onnx"), variant: str | None = None, *,
                decode: bool = True, accuracy_level: int | None = 0, external_data: bool | None = None,
                int8_weights: str = "uint8", graph_cache: bool = True, optimize: bool = True,
                output_grids: bool = False, calib_samples: int | None = None,
                parity_samples: int | None = None, parity_seq_len: int = 64, threads: int = 1) -> dict:
    """Export to `out` (.onnx); returns the metadata written to `out`.json.

    Options: `decode` (decoder LMs: also write the KV-cache decode-step graph), `accuracy_level`
    (ONNX Runtime's MatMulNBits accuracy level recorded for 4-bit files and used for parity; 0 =
    float activations, exact; None = the runtime's default), `external_data` (None: automatic
    above onnx_files.EXTERNAL_DATA_BYTES of tensors in all graphs), `int8_weights` ("uint8", the default: 8-bit
    weights of layers with quantized activations stored as edgeq's int8 + 128 with zero point 128, the
    same real values, which ONNX Runtime's u8u8 integer kernels compute exactly on every CPU; "int8": as
    ORT's own quantizer writes them, but its u8s8 kernels saturate int16 pair sums on x86 CPUs without
    VNNI, which wrecked SmolLM2's logits on this host),
    `output_grids` (int8 files of image models: also quantize each Conv / Gemm / residual Add output that a float op
    reads besides the next layer's input quantization, on a uint8 grid calibrated on `calib_samples` calibration inputs
    (default 8) or on that next layer's grid, and pool with GlobalAveragePool, so ONNX Runtime runs those ops on integer
    kernels too; not part of the simulation, see onnx_outgrids.py),
    `graph_cache` (False: trace the float graph even when this process or the user cache holds it), `optimize`
    (False: write the graph as rendered, without ONNX Runtime's basic graph optimizations, see
    onnx_files.OFFLINE_OPTIMIZATION_SKIPS, and with float biases, as TensorRT's parser needs them; True: static Convs' and Gemms'
    biases int32, as ONNX Runtime's integer kernels take them, see onnx_quant.int32_biases),
    `parity_samples` / `parity_seq_len` (held-back inputs; by default `meta.parity_samples`), `threads` (for parity).
    """
    out = Path(out)
    if int8_weights not in ("int8", "uint8"):
        raise choice_error("int8_weights", int8_weights, ("int8", "uint8"))
    variant = _check_variant(variant, qm)
    bundle = qm.bundle if qm is not None else bundle
    if output_grids and (variant != "int8" or bundle.kind != "image"):
        raise EdgeqError(f"export: output_grids applies to int8 ONNX files of image models (their Convs / Gemms), not a "
                         f"{variant} file of a model of kind {bundle.kind}")
    if calib_samples is not None and not output_grids:
        raise EdgeqError("export: calib_samples applies with output_grids (an ONNX layer's output is float otherwise: "
                         "no grid to calibrate)")
    if calib_samples is not None and (isinstance(calib_samples, bool) or not isinstance(calib_samples, int) or calib_samples < 1):
        raise EdgeqError(f"export: calib_samples must be a whole number >= 1, not {calib_samples!r}")
    modules = qm.layers() if qm is not None else {}
    # a BatchNorm after a quantized conv is folded into it on edgeq's grid, as in TFLite: ONNX Runtime fuses a QDQ Conv
    # only with its output quantized, never with a BatchNormalization in between (batchnorm.py)
    folds = bn_folds(bundle.module, tuple(bundle.example_inputs)) if modules and bundle.example_inputs else {}
    layers = [_folded(lq, modules[lq.name], folds[lq.name]) if lq.name in folds else lq for lq in LayerQ.from_model(modules)]
    t0 = time.perf_counter()
    specs = graph_specs(bundle, with_decode=decode)
    attention = decoder_attention(bundle.module) if bundle.kind == "causal-lm" else contextlib.nullcontext()
    with dequantized(bundle.module, folds), attention:
        graphs = [export_graph(s, cache=graph_cache) for s in specs]
    protos = [p for p, _ in graphs]
    # a decode step's per-token grids are one row each when its batch is 1: rendered per tensor (ORT's fused kernels)
    batch_one = any(lq.act_mode == "dynamic" and lq.act_granularity == "token" for lq in layers)
    results = [quantize_graph(p, layers, PREFIX, int8_weights, single_row=batch_one and s.role == "decode")
               for s, p in zip(specs, protos)]
    rendered = [r for r, _ in results]
    grids_meta = _output_grids(bundle, specs, protos, calib_samples or OUTPUT_CALIB_SAMPLES) if output_grids else None
    if optimize:  # TensorRT's parser refuses int32 DequantizeLinear: --no-optimize keeps the biases float
        bias_errors = {k: v for p in protos for k, v in int32_biases(p).items()}
        for r in (r for rs in rendered for r in rs if r.nodes):
            r.bias_error = bias_errors.get(r.nodes[0])
    for r in (r for rs in rendered for r in rs if r.layer in folds):
        r.rescaled_channels = folds[r.layer].dead_channels()
    unused = sorted(set.intersection(*[set(a) for _, a in results])) if results else []
    names = {"prefill": out.name, "decode": decode_graph_name(out), "model": out.name}
    four_bit = any(r.container in ("int4", "uint4") for rs in rendered for r in rs)
    # ONNX Runtime fuses DequantizeLinear -> MatMul with a float input into MatMulNBits (4-bit blocks, and 8-bit per
    # channel too), whose default accuracy level quantizes that input again, on its own blockwise int8 grid: the level
    # is pinned wherever that can happen, weight-only layers and layers whose dynamic grid edgeq renders as float ops
    # before the MatMul (per-token asymmetric, fewer than 8 bits). Unpinned, a tiny-llama w4-g128-litert file (per-token
    # asymmetric int8 inputs) was 0.035 from its simulation in the median row, 0.24 in the worst, where 1e-6 of input
    # noise moves the simulation 0.027 in its worst; pinned, 0.009.
    nbits_input = any(r.op == "DequantizeLinear" and r.activation in ("none", "dynamic") for rs in rendered for r in rs)
    session_config = {ACCURACY_LEVEL_KEY: str(accuracy_level)} if nbits_input and accuracy_level is not None else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = [tmp / names[s.role] for s in specs]
        use_external, graph_optimization, shared = write_graphs(protos, written, external_data, optimize, session_config)
        export_s = time.perf_counter() - t0
        layer_checks = []
        for spec, path, rs in zip(specs, written, rendered):
            checks = read_back(onnx.load(str(path)), rs, layers)
            for c in checks:
                c["graph"] = spec.role
            layer_checks += checks
        # a folded BatchNorm keeps edgeq's integers but scales its scales: read back bitwise as such, not exact
        exact = all(c["exact"] for c in layer_checks) and not folds if qm is not None else None
        parity = _parity(bundle, specs, written, session_config, threads, parity_samples, parity_seq_len)
        parity.update(_verdict(parity, variant, qm is not None, layers, threads, bundle.kind))
        if nbits_input and accuracy_level != 0:
            parity["accuracy_level_note"] = (
                f"MatMulNBits at accuracy level {accuracy_level if accuracy_level is not None else 'default (4)'} "
                "quantizes its float input to int8 on ONNX Runtime's own blockwise grid, which the simulation does not "
                "(accuracy_level=0 keeps it float, exact)")
        main = tmp / out.name
        companions = [p for p in sorted(tmp.iterdir()) if p != main]
        extra = {
            "opset": OPSET,
            "graph": {s.role: names[s.role] for s in specs} if bundle.kind == "causal-lm" else None,
            "decode_graph": bool(decode) if bundle.kind == "causal-lm" else None,
            # 1: the decode graph takes one sequence (its per-token grids are rendered per tensor); None: any batch
            "decode_batch": 1 if batch_one and any(s.role == "decode" for s in specs) else None,
            "runtime_min": {"onnxruntime": _runtime_min(rendered, four_bit)},
            "session_config": session_config,
            "external_data": use_external,
            "external_data_shared": shared,  # the graphs read one FILE.onnx.data: each weight stored once
            "layers": layer_checks,
            "layers_exact": sum(c["exact"] for c in layer_checks),
            "layers_not_in_graph": unused,  # quantized, but nothing the graph returns uses them
            "containers": _container_notes(qm, rendered[0]) if qm is not None else None,
            "export_s": round(export_s, 3),
            "float_graph": {s.role: source for s, (_, source) in zip(specs, graphs)},  # traced | process | disk (cache)
            "int8_weights": int8_weights,
            "graph_optimization": graph_optimization,
            "host_note": host_note() if variant in ("int8", "dynamic-int8") and int8_weights == "int8" else None,
            "bn_folded": {n: f.norm for n, f in folds.items()} or None,
            "output_grids": grids_meta,
        }
        if folds:
            extra["scale_note"] = ("each BatchNorm after a quantized conv is folded on edgeq's grid, so the file holds edgeq's "
                                   "integers with scales fp32(scale * gamma / sqrt(var + eps)) (read back bitwise as such) "
                                   "and the norm's shift in the conv's bias; exact is false because the scales are not edgeq's")
        meta = write_export_meta(main, fmt="onnx", variant=variant, model=bundle.reference,
                                 qdir=source if qm is not None and is_qdir(source) else None, recipe=qm.recipe.name if qm is not None else None,
                                 exact=exact, parity=parity, inputs=_inputs_meta(bundle, written[0]), extra=extra,
                                 files=companions)
        put_in_place(main, companions, out)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_grids(bundle, specs, protos, samples: int) -> dict:
    """Quantize the tensors float ops read (onnx_outgrids.py) in each graph, on grids calibrated by running it on
    `samples` calibration inputs or on the next layer's input grid, and pool on integers; what was done, for FILE.json."""
    from ..models.inputs import calibration_batches
    from .onnx_outgrids import calibrate, global_pools, insert, outputs_needing_grids, share_quantized

    batches = calibration_batches(bundle, None, samples, 0)
    tensors = pools = shared = 0
    for spec, proto in zip(specs, protos):
        feeds = [dict(zip(spec.input_names, (t.numpy() for t in batch))) for batch in batches]
        while True:  # each round's grids dequantize inputs of the ops after them (a residual Add): the next round's
            found = outputs_needing_grids(proto)
            if found:
                insert(proto, calibrate(proto, found, feeds))
            shares = share_quantized(proto)
            tensors, shared = tensors + len(found), shared + shares
            if not found and not shares:
                break
        pools += global_pools(proto)
    return {"note": (f"each Conv / Gemm / residual Add output that a float op reads besides the next layer's input "
                     f"quantization (a residual Add, a pooling) is quantized to uint8 (int8 with zero point 0 where the "
                     f"layer's input grid is symmetric) on a min/max grid calibrated on {samples} calibration inputs; "
                     "the other readers of a tensor that a layer's input grid quantizes read it through that grid (a "
                     "residual Add's output, read by the next Add); a mean over the spatial axes is a GlobalAveragePool. "
                     "So ONNX Runtime runs the Convs, Gemms, Adds and pooling on integer kernels (QLinearConv, QGemm, "
                     "QLinearAdd, QLinearGlobalAveragePool). Not part of the edgeq simulation: parity measures the "
                     "departure"),
            "calib_samples": samples, "tensors": tensors, "shared_grids": shared, "global_pools": pools}


def _folded(lq: LayerQ, module, fold) -> LayerQ:
    """A conv's integers and scales as the file holds them once a BatchNorm is folded into it (`batchnorm.rendered_scale`
    and `folded_integers`, the TFLite export's: edgeq's integers, a dead channel's zeros); a per-tensor grid becomes per
    channel."""
    scale = rendered_scale(module, fold).numpy()
    q = folded_integers(module, fold).cpu().numpy()
    return replace(lq, q=q, scale=scale, zero_point=np.ascontiguousarray(np.broadcast_to(lq.zero_point, scale.shape)))


def host_note() -> str | None:
    """Why INT8-activation parity can be lower on this host than on the board."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    if "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "avx512vnni"}:
        return ("host CPU has AVX2 without VNNI: ONNX Runtime's u8s8 integer kernels saturate int16 pair sums here, "
                "so parity is measured lower than the file's arithmetic; int8_weights='uint8' avoids it")
    return None


def _container_notes(qm, rendered) -> dict:
    """bits -> how the values are stored, so nobody mistakes a 4-bit container for 4-bit values."""
    notes = {}
    by_name = {r.layer: r for r in rendered}
    for name, m in qm.layers().items():
        r = by_name.get(name)
        bits = m.decision.weight.bits
        if r is not None:
            notes.setdefault(str(bits), set()).add(r.container)
    return {bits: sorted(c) for bits, c in notes.items()}


def _inputs_meta(bundle, path: Path) -> list[dict]:
    model = onnx.load(str(path), load_external_data=False)
    vocab = None
    if bundle.kind in ("causal-lm", "encoder"):
        config = getattr(bundle.module, "config", None)
        vocab = getattr(config, "vocab_size", None) or getattr(bundle.tokenizer, "vocab_size", None)
    result = []
    for inp in model.graph.input:
        t = inp.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name  # numpy's name, which the agent feeds
        entry = {"name": inp.name, "dtype": dtype, "shape": shape}
        if inp.name == "input_ids" and vocab:
            entry["range"] = [0, int(vocab)]
        if inp.name == "attention_mask":
            entry["range"] = [0, 2]
        result.append(entry)
    return result


def _verdict(parity: dict, variant: str, quantized: bool, layers: list[LayerQ], threads: int, kind: str) -> dict:
    """What `parity` was measured against and its verdict (`verdict.tolerance_verdict`, as TFLite files have it), with
    the decode step held to its prefill where the two compute the same by design: not with a per-tensor dynamic
    grid, which the step takes from one token's range and the prefill from all of them."""
    import onnxruntime

    per_call = any(lq.act_mode == "dynamic" and lq.act_granularity == "tensor" for lq in layers)
    step = parity.get("decode_vs_prefill_max_abs")
    held = step is not None and not per_call
    missed = [f"decode_vs_prefill_max_abs {step:.3g} > {DECODE_MAX_ABS}"] if held and step > DECODE_MAX_ABS else []
    out = {"reference": "PyTorch simulation" if quantized else "PyTorch fp32",
           "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, {threads} thread"
                      f"{'s' if threads > 1 else ''}", **tolerance_verdict(parity, variant, missed, kind)}
    if step is not None:
        out["decode_vs_prefill_bound"] = DECODE_MAX_ABS if held else None
    return out


def _parity(bundle, specs, paths, session_config, threads, samples, seq_len) -> dict:
    """ONNX Runtime vs the PyTorch simulation on held-back inputs (first output: logits / embeddings)."""
    inputs = held_back_inputs(bundle, count=samples, seq_len=seq_len)
    main = OnnxRunner(paths[0], threads=threads, session_config=session_config)
    ref, got = [], []
    for sample in inputs:
        ref.append(torch_outputs(specs[0], sample)[0])
        got.append(main(*[t.numpy() for t in sample])[0])
    parity = parity_metrics(ref, got)
    add_quality_context(parity, specs[0].wrapper, lambda x: torch_outputs(specs[0], x)[0], inputs, ref, got,
                        bundle.kind == "causal-lm")
    parity["inputs"] = f"{len(inputs)} held-back samples from the evaluation split" + (
        f", {seq_len} tokens each" if bundle.kind == "causal-lm" else "")
    parity["session_config"] = session_config
    if len(specs) > 1 and specs[1].role == "decode":
        # the decode step must give what the prefill graph gives for the same position
        dec = OnnxRunner(paths[1], threads=threads, session_config=session_config)
        worst = 0.0
        for sample in inputs[:2]:
            ids = sample[0].numpy()
            full = main(ids)[0][:, -1]
            prefix = main(ids[:, :-1])
            step = dec(ids[:, -1:], *prefix[1:])[0][:, -1]
            worst = max(worst, float(np.max(np.abs(step - full))))
        parity["decode_vs_prefill_max_abs"] = worst
    return parity
