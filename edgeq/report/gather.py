"""Gather what a report shows: stored results, their export metadata, quant.json and evaluations.

One `Column` is one measurement of one artifact on one board: the newest stored result for its
(model, artifact, device, runtime, runtime version, threads); older re-runs of the same key are
counted, not shown. Nothing here computes a comparison (that is `compare.py`) and nothing here
writes anything: it only reads the results database and the files the database points at.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any

from .. import store
from ..agent.inputs import asked_dims, dims_label
from ..errors import EdgeqError
from ..fileio import read_json, sha256_file

# task -> (primary metric, True if higher is better)
QUALITY_METRICS: dict[str, tuple[str, bool]] = {
    "ppl": ("ppl", False),
    "cosine": ("cosine_mean", True),
    "top1": ("top1_agree", True),
}
UNKNOWN_MODEL = "unknown model (no FILE.json)"


@dataclasses.dataclass(frozen=True)
class Quality:
    """The newest evaluation of one target (matched by sha256)."""

    eval_id: int
    task: str
    metric: str
    value: float | None
    higher_is_better: bool
    data: str | None
    metrics: dict
    setting: dict  # how it was measured (`eval_setting`): two qualities are compared only when these agree

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Column:
    """One (variant, board) measurement with everything the files and evals say about it."""

    result: store.ResultRecord
    model: str
    variant: str
    fmt: str
    bits: str                    # FP32 | INT8 | INT4 | mixed | W<b> | unknown
    bits_source: str             # quant.json | recipe name | variant name | FILE.json
    is_fp32: bool
    export: dict | None          # FILE.json as stored with the result
    quant: dict | None           # quant.json (from the source qdir, or stored JSON)
    quant_note: str              # where quant.json came from, or why it is not available
    quality: Quality | None
    superseded: int              # older runs of the same key, not shown
    label: str = ""              # how the report names it: variant, recipe, and the file name if needed

    @property
    def id(self) -> int:
        return self.result.id

    @property
    def device(self) -> str:
        return self.result.device

    @property
    def signature(self) -> str | None:
        """The TFLite signature timed (`decode`), or the ONNX export's graph (FILE.decode.onnx: `decode`); None for a
        file's default graph."""
        return signature_of(self.result)

    @property
    def dims(self) -> tuple:
        """The job's input dims that sized an input (`edgeq profile --dim`, e.g. a decode step's slots), sorted."""
        return dims_of(self.result)

    @property
    def sha(self) -> str:
        return self.result.artifact_sha256

    @property
    def size_bytes(self) -> int | None:
        return (self.export or {}).get("size_bytes") or self.result.size_bytes


def signature_of(rec: store.ResultRecord) -> str | None:
    """The step a run timed: the job's TFLite signature, or the `graph_role` of an ONNX export's decode graph (one
    step of the same model as its prefill graph, so the two are columns of one variant, like a TFLite file's two)."""
    return ((rec.result or {}).get("config") or {}).get("signature") or (rec.export_json or {}).get("graph_role")


def _graph_of(rec: store.ResultRecord) -> str | None:
    """The prefill graph's sha256 for an ONNX decode graph: its quality is the export's (the step computes the same
    model, its logits checked against the prefill graph's at export)."""
    return ((rec.export_json or {}).get("graph_of") or {}).get("sha256")


def dims_of(rec: store.ResultRecord) -> tuple:
    """The job's input dims (`edgeq profile --dim`) that sized an input (`agent.inputs.asked_dims`), sorted."""
    return tuple(asked_dims(rec.result or {}).items())


def parse_since(text: str | None) -> _dt.datetime | None:
    """An ISO-8601 date or time (UTC if no zone), e.g. 2026-11-23 or 2026-11-23T18:00."""
    if not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise EdgeqError(f"--since: {text!r} is not an ISO-8601 date or time (e.g. 2026-11-23 or "
                         "2026-11-23T18:00:00)") from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _created(rec: store.ResultRecord) -> _dt.datetime:
    t = _dt.datetime.fromisoformat(rec.created)
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def is_fp32_export(export: dict | None) -> bool:
    """FP32 = an export with no quantized source directory, or variant fp32."""
    if not export:
        return False
    return export.get("variant") == "fp32" or not (export.get("source") or {}).get("qdir")


def load_quant(export: dict | None) -> tuple[dict | None, str]:
    """quant.json from the export's source qdir (checked against its recorded sha256), or stored JSON."""
    if not export:
        return None, "no FILE.json stored with the result"
    source = export.get("source") or {}
    qdir, want = source.get("qdir"), source.get("quant_json_sha256")
    if not qdir:
        return None, "FP32 export (no quantized-model directory)"
    path = Path(qdir) / "quant.json"
    note = f"{path} no longer exists"
    if path.is_file():
        got = sha256_file(path)
        if want and got != want:
            note = f"{path} changed since export (sha256 {got[:12]} != recorded {want[:12]})"
        else:
            try:
                return read_json(path), f"read from {path}"
            except (OSError, ValueError) as exc:
                note = f"{path}: unreadable ({exc})"
    if isinstance(export.get("quant"), dict):
        return export["quant"], f"stored JSON in FILE.json ({note})"
    return None, f"not available: {note}"


def bit_class(export: dict | None, quant: dict | None) -> tuple[str, str]:
    """(FP32 / INT8 / INT4 / mixed / W<b> / unknown, where that came from).

    From quant.json's per-layer weight bits; without it, from the recipe name (`w4...`) or the
    export variant, which cannot see mixed precision: the source says so.
    """
    if is_fp32_export(export):
        return "FP32", "FILE.json"
    if quant and quant.get("layers"):
        bits = {int((layer.get("weight") or {}).get("bits", 0)) for layer in quant["layers"]}
        return ("mixed" if len(bits) > 1 else _bits_name(bits.pop())), "quant.json"
    recipe = str((export or {}).get("recipe") or "")
    m = re.match(r"^w(\d+)", recipe.lower())
    if m:
        return _bits_name(int(m.group(1))), "recipe name"
    variant = (export or {}).get("variant")
    if variant == "int4":
        return "INT4", "variant name"
    if variant in ("int8", "dynamic-int8"):
        return "INT8", "variant name"
    return "unknown", "no quant.json, recipe or variant says"


def _bits_name(bits: int) -> str:
    return {8: "INT8", 4: "INT4", 32: "FP32"}.get(bits, f"W{bits}")


def eval_setting(ev: store.EvalRecord) -> dict:
    """Everything besides the target that moves an evaluation's number: task, data, window length (perplexity) and
    how many windows / sentences / images were read."""
    samples = next((ev.metrics[k] for k in ("windows", "sentences", "images") if k in ev.metrics), None)
    return {"task": ev.task, "data": ev.data, "seq_len": (ev.meta or {}).get("seq_len"), "samples": samples}


def describe_setting(setting: dict) -> str:
    text = f"{setting['task']} on {setting['data']}"
    if setting.get("seq_len"):
        text += f", {setting['seq_len']}-token windows"
    return text + (f", {setting['samples']} samples" if setting.get("samples") is not None else "")


def quality_of(evals: list[store.EvalRecord], like: dict | None = None) -> Quality | None:
    """The newest evaluation in `evals` (newest first) whose task has a known primary metric (and, with `like`, whose
    `eval_setting` is that one)."""
    for ev in evals:
        if ev.task in QUALITY_METRICS and (like is None or eval_setting(ev) == like):
            metric, higher = QUALITY_METRICS[ev.task]
            value = ev.metrics.get(metric)
            return Quality(ev.id, ev.task, metric, None if value is None else float(value), higher,
                           ev.data, ev.metrics, eval_setting(ev))
    return None


@dataclasses.dataclass(frozen=True)
class Gathered:
    db_path: str
    columns: list[Column]
    skipped: list[dict]                       # failed / aborted / damaged runs: not shown, listed with the error
    evals_by_sha: dict[str, list[store.EvalRecord]]


def gather(db: str | os.PathLike | None, *, model: str | None = None, device: str | None = None,
           since: str | None = None) -> Gathered:
    """Read the database and build one Column per newest (model, artifact, device, runtime, threads)."""
    path = store.require_db(db)
    t0 = parse_since(since)
    results = store.list_results(path, device=device)
    evals: dict[str, list[store.EvalRecord]] = {}
    for ev in store.list_evals(path):  # newest first, kept in that order; a damaged row is left out
        if not ev.damaged:
            evals.setdefault(ev.target_sha256, []).append(ev)
    columns: dict[tuple, Column] = {}
    counts: dict[tuple, int] = {}
    skipped = []
    for rec in results:  # newest first: the first of a key wins
        rec_model = rec.model_ref or UNKNOWN_MODEL
        if model and rec_model != model:
            continue
        if t0 and _created(rec) < t0:
            continue
        if rec.status in ("failed", "aborted") or rec.damaged:
            skipped.append(_skipped(rec))
            continue
        signature, dims = signature_of(rec), dims_of(rec)  # a TFLite file's decode step, other input sizes: own columns
        key = (rec_model, rec.artifact_sha256, rec.device, rec.runtime, rec.runtime_version, rec.threads, signature, dims)
        counts[key] = counts.get(key, 0) + 1
        if key in columns:
            continue
        quant, note = load_quant(rec.export_json)
        bits, bits_source = bit_class(rec.export_json, quant)
        name = Path(rec.artifact_path).name if rec.artifact_path else rec.artifact_sha256[:12]
        columns[key] = Column(
            result=rec, model=rec_model, variant=(rec.variant or name) + (f" [{signature}]" if signature else "")
            + dims_label(dict(dims))
            + (" [weight cache]" if rec.runtime == "litert-compiledmodel" else ""),
            fmt=rec.artifact_format or "?", bits=bits, bits_source=bits_source,
            is_fp32=is_fp32_export(rec.export_json), export=rec.export_json, quant=quant, quant_note=note,
            quality=quality_of(evals.get(rec.artifact_sha256) or evals.get(_graph_of(rec), [])), superseded=0)
    cols = _labelled([dataclasses.replace(c, superseded=counts[k] - 1) for k, c in columns.items()])
    cols.sort(key=lambda c: (c.model, c.device, not c.is_fp32, c.bits, c.variant, c.id))
    return Gathered(str(path), cols, skipped, evals)


def _skipped(rec: store.ResultRecord) -> dict:
    """A run the report leaves out: failed or aborted (with the board's error), or damaged (what does not read)."""
    if rec.damaged:
        status, err = "damaged", store.damage_note(rec)
    else:
        status, err = rec.status, (rec.result or {}).get("error")
    return {"id": rec.id, "device": rec.device, "artifact_sha256": rec.artifact_sha256, "variant": rec.variant,
            "status": status, "error": err}


def _labelled(cols: list[Column]) -> list[Column]:
    """Label = variant (+ recipe); the artifact's file name is added where that is still ambiguous."""
    def base(c: Column) -> str:
        recipe = (c.export or {}).get("recipe")
        return f"{c.variant} {recipe}" if recipe else c.variant

    shas: dict[tuple[str, str], set] = {}
    for c in cols:
        shas.setdefault((c.model, base(c)), set()).add(c.sha)
    out = []
    for c in cols:
        label = base(c)
        if len(shas[(c.model, label)]) > 1:
            name = Path(c.result.artifact_path).name if c.result.artifact_path else c.sha[:12]
            label = f"{label} ({name})"
        out.append(dataclasses.replace(c, label=label))
    return out


def reference_quality(gathered: Gathered, model: str, fmt: str, like: dict | None = None) -> tuple[Quality | None, str]:
    """The FP32 quality of `model`: the FP32 export's eval (same format, then any), else the float reference's; with
    `like`, an evaluation measured that way first (a variant's perplexity on 64-token windows is compared with FP32's on
    64-token windows), and only then the newest of any setting."""
    fp32 = [c for c in gathered.columns if c.model == model and c.is_fp32]
    for setting in ([like] if like is not None else []) + [None]:
        for want_fmt in (fmt, None):
            for c in fp32:
                q = quality_of(gathered.evals_by_sha.get(c.sha, []), setting)
                if (want_fmt is None or c.fmt == want_fmt) and q is not None:
                    return q, f"eval #{q.eval_id} of the FP32 {c.fmt} file {c.sha[:12]}"
        q = quality_of(gathered.evals_by_sha.get(store.reference_sha256(model), []), setting)
        if q is not None:
            return q, f"eval #{q.eval_id} of the float model reference {model!r}"
    return None, f"no evaluation of an FP32 file or of the float reference {model!r} in the database"
