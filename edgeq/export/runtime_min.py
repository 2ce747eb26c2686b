"""Which runtime an exported file needs (FILE.json `runtime_min`), and whether a given runtime is one.

Torch-free: the board agent holds a job's file against the runtime about to run it, `edgeq check` and
`edgeq export --target` against the runtime a board profile names. `runtime_min` maps a runtime's
distribution name to the release the file needs: "1.19" is a minimum (ONNX Runtime's opset-21 and blockwise INT4
kernels), "2.3 (tested)" the one release the export was tested with (older ones may run it), null a runtime that
cannot run it (tflite-runtime 2.14 runs hybrid INT8 and INT4 files, with wrong outputs); `note` says why.
"""

from __future__ import annotations

import re

RUNTIME_DISTS = ("onnxruntime", "ai-edge-litert", "tflite-runtime")  # the keys of runtime_min that name a runtime

# What each variant needs at run time. Measured here: every variant runs correctly in ai-edge-litert
# 2.3 with XNNPACK. In tflite-runtime 2.14 (its last release; run with numpy 1.26) fp32 and full-integer
# int8 files give the same outputs, while dynamic-int8 and int4 files (hybrid kernels) load and run but
# give wrong outputs (cosine < 0.9 vs ai-edge-litert on tiny-llama and a small CNN; through the board agent, tiny-llama's
# logits all zero, or the runtime crashing on an INT4 file: benchmarks/old_runtime_tflite_runtime_2_14.md): they need
# ai-edge-litert. Older ai-edge-litert releases were not tested.
TFLITE_RUNTIME_MIN = {
    "fp32": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": "2.14 (tested: same outputs)"},
    "int8": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": "2.14 (tested: same outputs up to integer rounding)"},
    "int16x8": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": "not tested",
                "note": "16x8 (int16 activations, int8 weights) runs on LiteRT's built-in kernels, not XNNPACK"},
    "dynamic-int8": {"ai-edge-litert": "2.3 (tested)",
                     "tflite-runtime": None, "note": "tflite-runtime 2.14 runs the file with wrong results (hybrid kernels)"},
    "int4": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": None,
             "note": "INT4 blockwise (BlockwiseQuantization, fp16 block scales): tflite-runtime 2.14 runs it with wrong results"},
}


def runtime_for(suffix: str, weight_cache: bool, versions: dict[str, str | None]) -> tuple[str, str | None]:
    """The runtime (distribution, version) an agent with these installed `versions` (its fingerprint's `runtimes`)
    runs a file with: ONNX Runtime, else ai-edge-litert, tflite-runtime only where ai-edge-litert is absent (and never
    for the weight cache, which is ai-edge-litert's)."""
    if suffix != ".tflite":
        return "onnxruntime", versions.get("onnxruntime")
    if weight_cache or versions.get("ai-edge-litert"):
        return "ai-edge-litert", versions.get("ai-edge-litert")
    return "tflite-runtime", versions.get("tflite-runtime")


def release(version: str) -> tuple[int, ...]:
    """"1.32.0" -> (1, 32, 0): enough to order the runtimes' releases (no pre-release tags in runtime_min)."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def runtime_verdict(meta: dict | None, dist: str, version: str | None) -> dict | None:
    """How `dist` at `version` runs the file FILE.json `meta` describes: {"support": "unsupported", "why", "fix"} for a
    runtime the export rules out or one older than a minimum, {"support": "untested", "why"} for one older than the
    release it was tested with, None where it runs the file or nothing says otherwise."""
    need = (meta or {}).get("runtime_min")
    if not isinstance(need, dict) or dist not in need or version is None:
        return None
    what = f"this {meta['variant']} file" if meta.get("variant") else "this file"
    spec = need[dist]
    if spec is None:
        others = " or ".join(f"{k} {need[k]}" for k in RUNTIME_DISTS if need.get(k) and k != dist)
        note = f": {need['note']}" if need.get("note") else ""
        return {"support": "unsupported", "why": f"{dist} {version} cannot run {what} (its FILE.json runtime_min{note})",
                "fix": f"install {others}" if others else "run it with another runtime"}
    least = re.match(r"\d+(\.\d+)*", str(spec))
    if least is None or release(version) >= release(least.group(0)):
        return None
    if "tested" in str(spec):
        return {"support": "untested", "why": f"{dist} {version} is older than {least.group(0)}, the release {what} was "
                                              "tested with (its FILE.json runtime_min)"}
    return {"support": "unsupported", "why": f"{dist} {version} is older than {least.group(0)}, which {what} needs (its "
                                             "FILE.json runtime_min)", "fix": f"pip install -U {dist}"}
