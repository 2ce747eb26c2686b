"""What machine a benchmark ran on, for its JSON (benchmarks from different hosts are not comparable in ms), and how a
benchmark writes its OUT.json and OUT.md."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "vaes", "asimddp", "i8mm", "sve")  # what int8 / int4 kernels use


def cpu_isa() -> list[str]:
    """Which of the instruction-set extensions the int8 / int4 kernels pick by the CPU has (x86 and ARM flags from
    /proc/cpuinfo): hosts named alike ("AMD EPYC") differ in them, and so do their kernels' speeds."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    return [f for f in ISA if f in flags]


def machine() -> dict:
    return {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row (cells as str())."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def write_result(out: str | Path, result: dict, text: str) -> None:
    """A benchmark's OUT.json (`result`) and OUT.md (`text`), each written atomically; the Markdown is printed too."""
    from edgeq.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(Path(f"{out}.json"), result)
    write_text_atomic(Path(f"{out}.md"), text)
    print(text)


def probe_record(script: str, source: str = "") -> dict:
    """What a probe's OUT.json starts with: the command that made it (`script` under tools/ and this process's
    arguments), when, on what machine, and how its inputs were made (`source`)."""
    return {"command": f"tools/{script} " + " ".join(map(shlex.quote, sys.argv[1:])),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": machine(), "source": source}


def probe_heading(title: str, result: dict, what: str) -> list[str]:
    """A probe's OUT.md up to its tables: the title, the command, when and where, its inputs, and `what` it measures."""
    return [f"# {title}", "", "```", f".venv/bin/python {result['command']}", "```", "",
            f"Created {result['created']} on {result['host'].get('cpu', '?')}."
            + (f" The QDIRs: {result['source']}." if result.get("source") else "") + f" {what}", ""]
