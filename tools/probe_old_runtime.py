"""Probe: a board whose only TFLite runtime is tflite-runtime 2.14 (its last release), profiled from this host. Not a test.

    .venv/bin/python tools/probe_old_runtime.py --venv /tmp/w/oldboard --work /tmp/w/oldrt \\
        --out benchmarks/old_runtime_tflite_runtime_2_14

Boards that only have tflite-runtime (older Raspberry Pi OS images, Jetson images that pin it) run edgeq's files
with it. The export's `runtime_min` (FILE.json) says which variants it runs; the board agent holds that against its
runtime before a file loads, and `edgeq profile` compares each board's outputs with this host's (ai-edge-litert)
run of the same file on the same inputs (`output_check`). This puts both to work against the real runtime: an agent
started from a venv of tflite-runtime 2.14 with numpy 1.26 (`--venv`, made with pip when missing: the runtime
needs numpy < 2, so it cannot share edgeq's venv), serving on loopback; tiny-llama exported as fp32, dynamic-int8
(w8), full-integer int8 (w8a8-static) and int4 (w4-g64-litert) TFLite files, each profiled twice: with its FILE.json,
and as a copy without one (a file from elsewhere, or an older export), which only the output check can judge.
Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = (("fp32", None, "fp32"), ("w8", "w8", "dynamic-int8"), ("w8a8-static", "w8a8-static", "int8"),
            ("w4-g64-litert", "w4-g64-litert", "int4"))


def make_venv(venv: Path) -> None:
    if (venv / "bin" / "python").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "numpy<2", "tflite-runtime==2.14.0", "psutil", "click", "platformdirs"], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)


def export_files(work: Path) -> list[Path]:
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    files = []
    for name, recipe, variant in VARIANTS:
        out = work / f"{name}.tflite"
        if not out.exists():
            source = "tiny-llama"
            if recipe is not None:
                bundle = load_model("tiny-llama")  # quantize_model swaps the bundle's layers: a fresh one each time
                rec = load_recipe(recipe)
                calib = calibration_batches(bundle, None, 8, 128) if rec.needs_calibration else None
                source = str(quantize_model(bundle, rec, calib).save(work / f"{name}.qdir"))
            export(source, "tflite", out, variant=variant)
        bare = work / f"{name}-nometa.tflite"
        shutil.copyfile(out, bare)
        files += [out, bare]
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    make_venv(args.venv)
    from edgeq.console import quiet_converters

    quiet_converters()  # the converters' chatter stays out, as in the CLI
    from edgeq.agent import host
    from edgeq.agent.client import AgentClient
    from edgeq.agent.protocol import check_config

    files = export_files(args.work)
    token = args.work / "token"
    token.write_text(secrets.token_urlsafe(32))
    token.chmod(0o600)
    data = args.work / "agent-data"
    shutil.rmtree(data, ignore_errors=True)
    proc = subprocess.Popen([str(args.venv / "bin" / "python"), "-m", "edgeq.cli.main", "agent", "serve", "--port", "0",
                             "--token-file", str(token), "--data-dir", str(data), "--power-meter", "none"],
                            stdout=subprocess.PIPE, stderr=open(args.work / "agent.log", "wb"), text=True)
    try:
        url = proc.stdout.readline().split()[1]
        dev = host.Device(name="tflite-runtime-2.14", url=url, token_file=str(token))
        info = AgentClient(url, token.read_text()).info()
        config = check_config({"runs": 50, "min_seconds": 1.0, "threads": 1})
        summaries = host.profile(files, [dev], config, str(args.work / "results.sqlite"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    variants = {name: variant for name, _, variant in VARIANTS}
    rows = []
    for s in summaries:
        r = s["result"] or {}
        meta_path = Path(s["artifact"] + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        check = r.get("output_check") or {}
        name = Path(s["artifact"]).name
        need = "no FILE.json" if meta is None else (meta.get("runtime_min") or {}).get("tflite-runtime", "absent")
        rows.append({"file": name, "variant": variants[name.removesuffix(".tflite").removesuffix("-nometa")],
                     "file_json": meta is not None, "runtime_min_tflite_runtime": "null: ruled out" if need is None else need,
                     "status": s["status"], "error": s["error"], "p50_ms": (r.get("latency_ms") or {}).get("p50"),
                     "output_check": {k: v for k, v in check.items() if k != "outputs"} or None,
                     "warnings": r.get("warnings") or []})
    doc = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
           "board_runtimes": info["fingerprint"]["runtimes"], "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# tiny-llama's TFLite files on a board with tflite-runtime 2.14 only (probe)", "",
             "```", f".venv/bin/python tools/probe_old_runtime.py --venv {args.venv} --work {args.work} --out {args.out}",
             "```", "",
             f"Created {doc['created']}. The agent ran from a venv with "
             + ", ".join(f"{k} {v}" for k, v in doc["board_runtimes"].items() if v) + " (ai-edge-litert and onnxruntime "
             "absent), on loopback on this host; this host's reference: ai-edge-litert with XNNPACK. Each file as "
             "exported (with FILE.json) and as a copy without it (`-nometa`). `outputs vs host`: the board's outputs "
             "against this host's on the same inputs (cosine of the sampled values, argmax agreement of the rows; `same` at "
             "cosine >= 0.99 and agreement >= 0.9). A copy without FILE.json runs on other inputs than its original (token "
             "ids 0-31 from the model's signature instead of FILE.json's range over the vocabulary), hence the int8 "
             "rows' slightly different cosines.", "",
             "| file | variant | FILE.json's tflite-runtime | status | p50 ms | outputs vs host | cosine | argmax agreement | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row["output_check"] or {}
        verdict = "-" if not c.get("compared") else ("same" if c["agrees"] else "DIFFER")
        fmt = lambda v, f="{:.4f}": "-" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {row['file']} | {row['variant']} | {row['runtime_min_tflite_runtime']} | "
                     f"{row['status']} | {fmt(row['p50_ms'], '{:.3f}')} | {verdict} | {fmt(c.get('cos_min'))} | "
                     f"{fmt(c.get('argmax_agree'))} | {(row['error'] or '-').replace('|', '/')} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
