"""One benchmark job, measured in its own process: `python -m edgeq.agent.runner JOB_DIR`.

The agent starts this process with an address-space limit (RLIMIT_AS), a CPU-time limit and a
wall-clock watchdog, in the job's own directory, through `sandbox.py` where the kernel allows it
(then it sees no network, no other process and nothing of the agent's data but its job); it dies with
the agent (PR_SET_PDEATHSIG).
It reads JOB_DIR/job.json, writes JOB_DIR/progress.json while it works and JOB_DIR/result.json
(atomically) at the end. Order of measurement: artifact size; ONNX external data vetted; cold
load (fresh process; the OS page cache is not dropped); first inference; warm-up until the median
of a window of 5 is within `warmup_tolerance` of the previous window; idle power baseline of the
planned length; timed runs until BOTH `runs` and `min_seconds` are met (or `max_seconds` passes,
which makes the run INVALID). The statistics are over every timed run; the result keeps at most
`MAX_RAW_LATENCIES` raw latencies (evenly spaced over the runs past that, `latency_ms.raw_note` says so),
so a million runs cannot make a result of megabytes. A power meter, when there is one, is
sampled on a thread of this process (about 20 reads a second; its small cost is inside the
timed numbers, the same for every model). Last, what the runtime made of the file, from a second
load: the ops ONNX Runtime's optimized graph runs (`runtime.kernels`), or the nodes XNNPACK took
of a TFLite signature that is not the file's first (the first's are read at load). It never loads
torch.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ..errors import EdgeqError
from ..fileio import write_json_atomic
from . import fingerprint as fp
from . import stats
from .inputs import asked_dims, make_inputs
from .outputs import digest
from .protocol import DEFAULT_DIMS
from .runtimes import WEIGHT_OPS, check_runtime_min, load, runtime_dist

WARMUP_WINDOW = 5
MAX_RAW_LATENCIES = 10_000


class _Progress:
    def __init__(self, job_dir: Path):
        self.path = job_dir / "progress.json"
        self._last = 0.0

    def __call__(self, phase: str, done: int = 0, force: bool = True) -> None:
        now = time.monotonic()
        if force or now - self._last > 0.5:
            self._last = now
            write_json_atomic(self.path, {"phase": phase, "runs": done})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _threads() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _time_once(model) -> float:
    t = time.perf_counter_ns()
    model.run()
    return (time.perf_counter_ns() - t) / 1e6


def _warmup(model, cfg: dict, progress) -> dict:
    lat: list[float] = []
    stable = False
    deadline = time.monotonic() + cfg["max_seconds"] / 2
    while len(lat) < cfg["warmup_max"] and time.monotonic() < deadline:
        lat.append(_time_once(model))
        progress("warmup", len(lat), force=False)
        n = len(lat)
        if n >= max(cfg["warmup_min"], 2 * WARMUP_WINDOW) and n % WARMUP_WINDOW == 0:
            if stats.is_stable(lat[-WARMUP_WINDOW:], lat[-2 * WARMUP_WINDOW:-WARMUP_WINDOW],
                               cfg["warmup_tolerance"]):
                stable = True
                break
    return {"runs": len(lat), "stable": stable, "tolerance": cfg["warmup_tolerance"],
            "last_median_ms": float(np.median(lat[-WARMUP_WINDOW:])) if lat else None}


def _timed(model, cfg: dict, progress) -> tuple[list[float], float, float, float]:
    lat: list[float] = []
    t0 = time.monotonic()
    limit = t0 + cfg["max_seconds"]
    now = t0
    while (len(lat) < cfg["runs"] or now - t0 < cfg["min_seconds"]) and now < limit:
        lat.append(_time_once(model))
        now = time.monotonic()
        progress("timed", len(lat), force=False)
    return lat, t0, now, now - t0


def _power_setup(job: dict):
    from . import meters

    if not job["config"].get("power", True):
        return None, meters.null_power("power measurement not requested (config power=false)")
    meter, reason = meters.detect(job.get("power_meter", "auto"), job.get("sysfs_root", "/"))
    if meter is None:
        return None, meters.null_power(reason)
    return meter, None


def _counted(ops: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in ops.items())


def measure(job_dir: Path) -> dict:
    """Run the job described by JOB_DIR/job.json and return the result document."""
    job = json.loads((job_dir / "job.json").read_text())
    cfg = job["config"]
    progress = _Progress(job_dir)
    progress("starting")
    artifact = job_dir / job["artifact"]["name"]
    files = [job_dir / f["name"] for f in job.get("files", [])]
    result: dict = {"artifact_sha256": job["artifact"]["sha256"],
                    "format": artifact.suffix.lstrip("."),
                    "size_bytes": artifact.stat().st_size + sum(f.stat().st_size for f in files),
                    "threads": cfg["threads"], "config": cfg,
                    "fingerprint": fp.fingerprint(), "conditions": {"before": fp.conditions()}}
    if artifact.suffix == ".onnx":
        from .onnxcheck import check_external_data

        result["external_data"] = check_external_data(artifact, job_dir)
    meta = job.get("metadata") or {}
    mine = meta if meta.get("sha256") == job["artifact"]["sha256"] else None  # a FILE.json of other bytes says nothing
    warnings = check_runtime_min(mine, *runtime_dist(artifact, cfg.get("weight_cache", False)))
    progress("loading")
    t = time.perf_counter_ns()
    model = load(artifact, cfg["threads"], cfg.get("signature"), cfg.get("weight_cache", False))
    result["signature"] = cfg.get("signature")
    result["load_ms"] = (time.perf_counter_ns() - t) / 1e6
    result["runtime"] = model.runtime
    result["rss_after_load_mb"] = _peak_rss_mb()
    spec = meta.get("inputs")
    if spec:
        for item in spec:
            item.setdefault("from", "metadata")
    else:
        spec = [{**s, "from": "model signature"} for s in model.signature()]
    feeds, result["inputs"] = make_inputs(spec, cfg["dims"], cfg["seed"])
    model.prepare(feeds)
    progress("first inference")
    result["first_inference_ms"] = _time_once(model)
    result["warmup"] = _warmup(model, cfg, progress)
    if not result["warmup"]["stable"]:
        warnings.append(f"warm-up did not stabilise within {result['warmup']['runs']} runs")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus and cfg["threads"] > cpus:
        warnings.append(f"threads {cfg['threads']} exceed the {cpus} CPUs this job may run on: its threads share cores, "
                        "and the latency measures that contention")
    unused = sorted(set(cfg["dims"]) - set(asked_dims(result)) - set(DEFAULT_DIMS))  # batch / sequence also size unnamed dims
    if unused:  # e.g. slots=64 on a file whose metadata predates symbolic cache slots
        warnings.append(f"dims {', '.join(unused)}: no input of this model has a dim of that name; they changed nothing")
    meter, power = _power_setup(job)
    sampler = baseline = None
    if meter is not None:
        from .meters import Sampler

        sampler = Sampler(meter).start()
        planned = min(max(cfg["min_seconds"], cfg["runs"] * (result["warmup"]["last_median_ms"] or 1) / 1e3),
                      cfg["max_seconds"])
        progress("idle baseline")
        time.sleep(0.2)  # let the sampler get readings before the baseline starts
        b0 = time.monotonic()
        time.sleep(planned)
        baseline = (b0, time.monotonic())
    progress("timed")
    lat, t0, t1, seconds = _timed(model, cfg, progress)
    if sampler is not None:
        time.sleep(2.0 / sampler.rate_hz)  # a reading after the window so its end is covered
        sampler.stop()
        from .meters import power_report

        power = power_report(sampler, baseline, (t0, t1), len(lat))
    result["power"] = power
    result["peak_rss_mb"] = _peak_rss_mb()
    progress("outputs", len(lat))
    try:  # what this board computed, for the host to compare with its own; the timings stand without it
        result["outputs"] = digest(model.outputs(), feeds)
    except Exception as exc:  # a runtime's errors are plain Exceptions (a memory limit met by the extra outputs)
        warnings.append(f"outputs not digested ({type(exc).__name__}: {str(exc)[:200]})")
    if getattr(model, "coverage_pending", False):  # ONNX, or a signature past a TFLite file's first subgraph: a second load
        progress("kernel coverage", len(lat))
        model.runtime.update(model.deferred_coverage())
    left = {op: n for op, n in ((model.runtime.get("xnnpack") or {}).get("builtin") or {}).items() if op in WEIGHT_OPS}
    if left:  # e.g. INT4 blocks an older runtime's XNNPACK has no kernel for: they run, far slower
        warnings.append(f"XNNPACK in this runtime left {_counted(left)} to LiteRT's built-in kernels")
    left = (model.runtime.get("kernels") or {}).get("float_on_dequantized")
    if left:  # a quantized layer this runtime did not fuse (or a weight-only file's, by design)
        warnings.append(f"ONNX Runtime here runs {_counted(left)} on float kernels over dequantized tensors "
                        "(not fused into integer kernels)")
    result["os_threads"] = _threads()
    result["latency_ms"] = {**stats.summarize(lat), "seconds": seconds, **_raw(lat)}
    reasons = stats.validity(len(lat), seconds, cfg["runs"], cfg["min_seconds"])
    result["invalid_reasons"] = reasons
    result["status"] = "invalid" if reasons else "valid"
    result["warnings"] = warnings
    result["conditions"]["after"] = fp.conditions()
    progress("done", len(lat))
    return result


def _raw(lat: list[float]) -> dict:
    """The raw latencies a result keeps: all of them, or MAX_RAW_LATENCIES evenly spaced ones, saying so."""
    if len(lat) <= MAX_RAW_LATENCIES:
        return {"raw": lat}
    keep = np.linspace(0, len(lat) - 1, MAX_RAW_LATENCIES).round().astype(np.int64)
    return {"raw": [lat[i] for i in keep],
            "raw_note": f"{MAX_RAW_LATENCIES} of the {len(lat)} raw latencies kept, evenly spaced in run order; the "
                        "statistics are over all of them"}


def _limit_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "bad_alloc" in text or "Failed to allocate" in text:
        return f"memory limit exceeded ({text[:300]})"
    return text[:2000]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_dir = Path(argv[0]).resolve()
    try:
        result = measure(job_dir)
        code = 0
    except EdgeqError as exc:
        result = {"status": "failed", "error": str(exc)}
        code = 3
    except BaseException as exc:  # anything the model does to a runtime ends as a failed job
        result = {"status": "failed", "error": _limit_reason(exc),
                  "traceback": traceback.format_exc()[-4000:]}
        code = 3
    write_json_atomic(job_dir / "result.json", result)
    return code


if __name__ == "__main__":
    sys.exit(main())
