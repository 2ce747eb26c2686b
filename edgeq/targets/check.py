"""`check`: how a target runs an artifact or a plan, op by op; `gate_export`: refuse or record.

`check(thing, profile)` reads an .onnx / .tflite file, a quantized-model directory (its
quant.json) or a list of `OpUse`s, classifies every op with the profile's runtime and aggregates
by (op, dtype signature) with counts and node names. `gate_export` turns a report into a decision
for `edgeq export --target`: it raises `EdgeqError` naming the nearest recipe that works when
something is unsupported (or falls back without `allow_fallback`), and otherwise returns what to
record in the export metadata. Never silent: every fallback is in the result.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..errors import EdgeqError
from ..export.runtime_min import TFLITE_RUNTIME_MIN, runtime_verdict
from ..fileio import read_json, sha256_file
from .profile import Runtime, TargetProfile, Verdict, load_profile
from .uses import CANDIDATE_GROUP_SIZES, OpUse, recipe_name

_ORDER = {"unsupported": 0, "fallback": 1, "native": 2}
_CLASS_ATTR = re.compile(r"^_*[A-Z][A-Za-z0-9]*(?:_(.+))?$")  # a converter's scope: ModuleClass_attribute


def short_node(name: str) -> str:
    """A node name as `render` prints it. litert-torch names an op `SUBGRAPH:INDEX:` and, for each source op fused into
    it, `SCOPES;N`, each scope a module's qualified class and attribute (`0:6:pkg._Encoder/transformers.models.bert.
    modeling_bert.BertModel_m/...BertEmbeddings_embeddings/..._LayerNorm_LayerNorm;4`); printed, those are module paths
    (`0:6:m.embeddings.LayerNorm`, fused ones joined by " + "; an op of the top module alone is its class, `KVDecode`;
    ai-edge-quantizer's `_quantized` suffix stays). Other names (edgeq's `edgeq/LAYER` labels, ONNX's
    `/model/layers.0/...`) print as they are; the JSON keeps every name whole."""
    prefix = re.match(r"^(\d+:\d+:)?", name).group(0)
    tail = re.search(r";\d*(_[a-z]+)$", name)  # a suffix after the last scope: ai-edge-quantizer's `_quantized`
    suffix = tail.group(1) if tail else ""
    paths: list[str] = []
    for entry in re.findall(r"([^;]+)(?:;\d*|$)", name[len(prefix):len(name) - len(suffix)]):
        parts, changed = [], False
        for scope in entry.split("/"):
            found = _CLASS_ATTR.match(scope.rpartition(".")[2]) if "." in scope else None
            changed |= found is not None
            if found is None or found.group(1):
                parts.append(scope if found is None else found.group(1))
        if not changed:
            return name
        path = ".".join(parts) or entry.rpartition(".")[2]  # an op of the wrapper itself: its class
        if path not in paths:
            paths.append(path)
    return prefix + " + ".join(paths) + suffix if paths else name


@dataclass
class Row:
    """One (op, dtype signature) with its verdict, how often it occurs and where."""

    op: str
    signature: str
    verdict: Verdict
    count: int = 0
    nodes: list[str] = field(default_factory=list)
    suggestion: str = ""

    def to_dict(self) -> dict:
        return {"op": self.op, "signature": self.signature, "count": self.count, "nodes": self.nodes,
                **self.verdict.to_dict(), **({"suggestion": self.suggestion} if self.suggestion else {})}


@dataclass
class CheckReport:
    target: str
    runtime: str
    format: str
    artifact: str
    rows: list[Row]
    runtime_min: dict | None = None  # the file's FILE.json runtime_min on this runtime's release, where it has a say

    @property
    def status(self) -> str:
        """The worst verdict: native / fallback / unsupported (the file's runtime_min ruling the release out, too)."""
        worst = min((r.verdict.support for r in self.rows), key=_ORDER.__getitem__, default="native")
        return "unsupported" if (self.runtime_min or {}).get("support") == "unsupported" else worst

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "native" else 1

    def counts(self) -> dict[str, int]:
        out = {"native": 0, "fallback": 0, "unsupported": 0}
        for r in self.rows:
            out[r.verdict.support] += r.count
        return out

    def to_dict(self) -> dict:
        return {"target": self.target, "runtime": self.runtime, "format": self.format, "artifact": self.artifact,
                "status": self.status, "counts": self.counts(), "runtime_min": self.runtime_min,
                "ops": [r.to_dict() for r in self.rows]}

    def render(self, max_nodes: int = 3) -> str:
        """A plain-text table, worst rows first."""
        c = self.counts()
        lines = [f"{self.artifact} on {self.target} / {self.runtime} ({self.format}): {self.status.upper()} "
                 f"({c['native']} native, {c['fallback']} fallback, {c['unsupported']} unsupported ops)"]
        if self.runtime_min:
            lines.append(f"  {self.runtime_min['support']:<11} {self.runtime_min['why']}")
        width = max((len(r.op) for r in self.rows), default=2)
        swidth = max((len(r.signature) for r in self.rows), default=2)
        for r in self.rows:
            nodes = ", ".join(map(short_node, r.nodes[:max_nodes])) + (f", +{len(r.nodes) - max_nodes}" if len(r.nodes) > max_nodes else "")
            line = f"  {r.verdict.support:<11} {r.op:<{width}}  {r.signature:<{swidth}}  x{r.count:<4}"
            if r.verdict.support == "native":
                line += f" {r.verdict.kernel}".rstrip()
            else:
                if r.verdict.fallback_to:
                    line += f" -> {r.verdict.fallback_to};"
                line += f" {r.verdict.why}"
                if r.suggestion:
                    line += f" [nearest working: {r.suggestion}]"
            lines.append(line.rstrip())
            lines.append(f"  {'':<11} nodes: {nodes}")
        return "\n".join(lines)


def detect_format(path: Path, fmt: str | None = None) -> str:
    """onnx | tflite | qdir, from the path's suffix (`fmt` names a file's format, e.g. a temp file)."""
    if path.is_dir():
        return "qdir"
    if fmt in ("onnx", "tflite") and path.name != "quant.json":
        return fmt
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".tflite":
        return "tflite"
    if path.name == "quant.json":
        return "qdir"
    raise EdgeqError(f"{path}: not an .onnx or .tflite file or a quantized-model directory")


def uses_of(thing: str | os.PathLike, fmt: str | None = None, accuracy_level: int = 0,
            engine: str | None = None) -> tuple[str, list[OpUse]]:
    """(format, op uses) of a file or QDIR; a QDIR needs the format it is checked for, and is read as
    edgeq's export renders it (ONNX: at MatMulNBits `accuracy_level`; a file's own level is in its FILE.json).
    `engine`: the runtime package whose QDQ fusion rules read an ONNX file (default ONNX Runtime's)."""
    path = Path(thing)
    if not path.exists():
        raise EdgeqError(f"{path}: no such file or directory")
    kind = detect_format(path, fmt)
    if kind == "onnx":
        from .onnx_graph import onnx_uses

        return "onnx", onnx_uses(path, engine=engine or "onnxruntime")
    if kind == "tflite":
        from .tflite_graph import tflite_uses

        return "tflite", tflite_uses(path)
    from .plan import plan_uses

    if fmt is None:
        raise EdgeqError(f"{path}: checking a quantized-model directory needs a format or a runtime")
    return fmt, plan_uses(path, fmt, accuracy_level)


def classify(uses: Iterable[OpUse], rt: Runtime) -> list[Row]:
    """Aggregate uses by (op, signature), worst verdict first, each with a suggestion if not native."""
    rows: dict[tuple[str, str], Row] = {}
    for use in uses:
        key = (use.op, use.signature)
        if key not in rows:
            verdict = rt.classify(use)
            rows[key] = Row(use.op, use.signature, verdict,
                            suggestion="" if verdict.support == "native" else nearest(use, rt))
        rows[key].count += 1
        rows[key].nodes.append(use.node)
    return sorted(rows.values(), key=lambda r: (_ORDER[r.verdict.support], r.op, r.signature))


def check(thing, profile: str | TargetProfile, runtime: str | None = None, fmt: str | None = None,
          accuracy_level: int = 0) -> CheckReport:
    """Check an .onnx / .tflite file, a QDIR (or quant.json) or a list of `OpUse`s against a profile
    (a QDIR exported to ONNX at MatMulNBits `accuracy_level`)."""
    prof = load_profile(profile)
    if isinstance(thing, (list, tuple)):
        rt = prof.runtime(runtime, fmt)
        return CheckReport(prof.name, rt.name, rt.format, "<plan>", classify(thing, rt))
    path = Path(thing)
    kind = detect_format(path, fmt) if path.exists() else None
    if fmt is None and kind == "qdir" and runtime is not None:
        fmt = prof.runtime(runtime).format
    elif kind not in (None, "qdir"):
        fmt = kind
    rt = prof.runtime(runtime, fmt) if fmt is not None else None  # a file is read with its runtime's fusion rules
    fmt, uses = uses_of(path, fmt, accuracy_level, engine=rt.package if rt is not None else None)
    rt = rt or prof.runtime(runtime, fmt)
    return CheckReport(prof.name, rt.name, fmt, str(path), classify(uses, rt),
                       _runtime_min(path, rt) if fmt == kind else None)


def _runtime_min(path: Path, rt: Runtime) -> dict | None:
    """What the file's FILE.json `runtime_min` (when written for these bytes) says of the runtime's release: a runtime
    the export rules out (tflite-runtime 2.14 for hybrid INT8 and INT4 files) or older than the file's minimum runs no
    op of it right, whatever the op rows say."""
    meta_path = Path(str(path) + ".json")
    try:
        meta = read_json(meta_path) if meta_path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != sha256_file(path):
        return None
    verdict = runtime_verdict(meta, rt.package, rt.version)
    return None if verdict is None else {**verdict, "package": rt.package, "version": rt.version}


# For each requested activation mode, the others in order of closeness.
_ACT_NEAR = {"uint8": ("uint8", "int8", "dynamic", "fp32"), "int8": ("int8", "uint8", "dynamic", "fp32"),
             "dynamic": ("dynamic", "fp32", "uint8", "int8"), "fp32": ("fp32", "dynamic", "uint8", "int8")}


def nearest(use: OpUse, rt: Runtime) -> str:
    """The nearest form the runtime runs natively, as a recipe name (`w8`, `w4-g32`, `w8a8`...).

    First the same quantization rendered as another op of the same layer kind (e.g. MatMulNBits
    instead of DequantizeLinear + MatMul); then: keep the activations if possible, prefer more bits
    over fewer, then the closest group size, then per-channel; then other activation modes; else
    keep the op in float.
    """
    def native(u: OpUse) -> bool:
        return rt.classify(u).support == "native"

    as_float = replace(use, act="fp32", weight="none" if use.weight == "none" else "fp32",
                       granularity=None, group_size=None)
    if use.weight in ("none", "fp32", "fp16", "bf16") or not _is_layer(use.op, rt.format):
        # Not a quantized layer (Add, Softmax, a Q/DQ...): other activations, else keep it float.
        for act in _ACT_NEAR.get(use.act, ())[1:]:
            if act not in ("fp32", "dynamic") and native(replace(use, act=act)):
                return f"{act} activations"
        return "float" if native(as_float) else ""
    if rt.format == "onnx" and use.act == "dynamic" and use.granularity == "group" and use.op in ("MatMul", "MatMulNBits"):
        if native(replace(use, act="fp32")):  # the same file at MatMulNBits accuracy level 0
            return f"{recipe_name(use.weight, use.granularity, use.group_size, 'fp32', 'onnx')} with accuracy_level 0"
    for alt in _alternative_ops(use.op, rt.format):
        if rt.classify(replace(use, op=alt)).support == "native":
            return f"{recipe_name(use.weight, use.granularity, use.group_size, use.act, rt.format)} as {alt}" + (
                " (accuracy_level 0)" if alt == "MatMulNBits" and use.act == "fp32" else "")
    bits = use.weight_bits
    signed = not use.weight.startswith("u")
    acts = _ACT_NEAR.get(use.act, (use.act, "fp32", "dynamic", "uint8", "int8"))
    best = None
    for ai, act in enumerate(acts):
        for dbits in (2, 4, 8):
            for dtype in ((f"int{dbits}", f"uint{dbits}") if signed else (f"uint{dbits}", f"int{dbits}")):
                for gran, group in [("group", g) for g in CANDIDATE_GROUP_SIZES] + [("channel", None), ("tensor", None)]:
                    cand = replace(use, act=act, weight=dtype, granularity=gran, group_size=group)
                    if cand == use or not native(cand):
                        continue
                    cost = (ai * 1000 + (0 if dbits == bits else (10 if dbits > bits else 100) * abs(dbits - bits))
                            + (0 if dtype.startswith("u") != signed else 1)
                            + _gran_cost(use, gran, group))
                    if best is None or cost < best[0]:
                        best = (cost, cand)
    if best is None:
        return "float" if native(as_float) else ""
    c = best[1]
    name = recipe_name(c.weight, c.granularity, c.group_size, c.act, rt.format)
    if rt.format == "onnx" and use.op == "Conv" and use.act == "fp32" and c.act in ("uint8", "int8"):
        # ORT fuses a static Conv only with a quantized output: one a float op also reads needs its own grid
        name += " with --output-grids"
    return name


# Weight-bearing ops besides the layer renderings of KIND_OPS: a recipe's bits apply to them.
_OTHER_LAYER_OPS = {
    "onnx": {"Gemm", "ConvTranspose", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Attention", "LSTM", "GRU"},
    "tflite": {"DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D", "BATCH_MATMUL", "EMBEDDING_LOOKUP",
               "UNIDIRECTIONAL_SEQUENCE_LSTM", "LSTM"},
}


def _is_layer(op: str, fmt: str) -> bool:
    from .profile import KIND_OPS

    return op in _OTHER_LAYER_OPS.get(fmt, ()) or any(op in ops for ops in KIND_OPS.get(fmt, {}).values())


def _alternative_ops(op: str, fmt: str) -> list[str]:
    """The other ops the same layer kind renders as (MatMul <-> MatMulNBits)."""
    from .profile import KIND_OPS

    for ops in KIND_OPS.get(fmt, {}).values():
        if op in ops:
            return [o for o in ops if o != op]
    return []


def _gran_cost(use: OpUse, gran: str, group: int | None) -> int:
    if gran == use.granularity and group == use.group_size:
        return 0
    if gran == "group" and use.granularity == "group" and group and use.group_size:
        return 1 + abs((group.bit_length()) - (use.group_size.bit_length()))
    return {"channel": 5, "group": 6, "tensor": 8}[gran]


@dataclass
class GateResult:
    """What an export gated by a target records in its metadata (`FILE.json`)."""

    target: str
    runtime: str
    format: str
    status: str
    fallbacks: list[dict]

    def to_metadata(self) -> dict:
        return {"target": {"name": self.target, "runtime": self.runtime, "format": self.format,
                           "status": self.status}, "fallbacks": self.fallbacks}


def gate_export(artifact_or_plan, profile: str | TargetProfile, allow_fallback: bool = False,
                runtime: str | None = None, fmt: str | None = None, accuracy_level: int = 0) -> GateResult:
    """Refuse an export a target cannot run natively, or return what to record about it.

    `artifact_or_plan`: an exported .onnx/.tflite, a QDIR / quant.json / parsed quant.json dict
    (then `fmt` or `runtime` says which format is being exported), a list of `OpUse`s, or a
    `CheckReport`; a plan is read as exported to ONNX at MatMulNBits `accuracy_level`. Raises
    `EdgeqError` when an op is unsupported, or falls back and `allow_fallback` is false; the
    message names the ops, the runtime, the target and the nearest recipe that works.
    """
    if isinstance(artifact_or_plan, CheckReport):
        report = artifact_or_plan
    elif isinstance(artifact_or_plan, dict):
        from .plan import plan_uses

        prof = load_profile(profile)
        rt = prof.runtime(runtime, fmt)
        report = check(plan_uses(artifact_or_plan, rt.format, accuracy_level), prof, rt.name, rt.format)
    else:
        report = check(artifact_or_plan, profile, runtime, fmt, accuracy_level)
    if (report.runtime_min or {}).get("support") == "unsupported":
        raise EdgeqError(_runtime_refusal(report))
    bad = [r for r in report.rows if r.verdict.support == "unsupported"]
    falls = [r for r in report.rows if r.verdict.support == "fallback"]
    if bad or (falls and not allow_fallback):
        raise EdgeqError(_refusal(report, bad or falls, bool(bad)))
    return GateResult(report.target, report.runtime, report.format, report.status,
                      [_fallback_record(r) for r in falls])


def _fallback_record(row: Row, max_nodes: int = 20) -> dict:
    """A fallback row as export metadata: no sources, at most `max_nodes` node names."""
    rec = {k: v for k, v in row.to_dict().items() if k != "source"}
    if len(row.nodes) > max_nodes:
        rec["nodes"] = row.nodes[:max_nodes] + [f"... {len(row.nodes) - max_nodes} more"]
    return rec


def _refusal(report: CheckReport, rows: list[Row], unsupported: bool) -> str:
    parts = []
    for r in rows:
        what = "has no kernel" if unsupported else f"falls back to {r.verdict.fallback_to}"
        parts.append(f"{r.op} [{r.signature}] x{r.count} {what} in {report.runtime} on {report.target} "
                     f"({r.verdict.why})")
    suggestions = sorted({r.suggestion for r in rows if r.suggestion}, key=_strictness)
    hint = f"; nearest working recipe: {suggestions[-1]}" if suggestions else "; no quantized form of it runs natively: keep it float"
    tail = "" if unsupported else " (or pass --allow-fallback to export anyway and record the fallback)"
    return "; ".join(parts) + hint + tail


def _runtime_refusal(report: CheckReport) -> str:
    """A file its board's runtime release cannot run, with the TFLite variants that release runs."""
    need = report.runtime_min
    text = f"{report.artifact} on {report.target} / {report.runtime}: {need['why']}; {need['fix']} on the board"
    if report.format != "tflite":
        return text
    runs = [v for v, spec in TFLITE_RUNTIME_MIN.items()  # a release named for it ("not tested" names none)
            if re.match(r"\d", spec.get(need["package"]) or "")
            and runtime_verdict({"runtime_min": spec}, need["package"], need["version"]) is None]
    return text + (f", or export a variant {need['package']} {need['version']} runs: {', '.join(runs)} (--variant)"
                   if runs else "")


def _strictness(name: str) -> tuple:
    """Order recipe names so the most conservative (most bits) comes last."""
    m = re.match(r"w(\d+)", name)
    return (int(m.group(1)) if m else 99, name)
