"""Raspberry Pi 5 PMIC rails via `vcgencmd pmic_read_adc`.

The Pi 5 PMIC reports current (`NAME_A current(i)=...A`) and voltage (`NAME_V volt(j)=...V`) per
rail but has no energy counter and no input-current sense. Power is the sum over rails that have
both, which covers the SoC and on-board supplies but NOT USB peripherals or 5 V input losses: the
scope string says so. Sampling is slow (one process per read), so the rate is low.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .base import POWER, Meter

_LINE = re.compile(r"^\s*(\S+)_(A|V)\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Rail name -> watts from `vcgencmd pmic_read_adc` output (rails with both V and A)."""
    amps, volts = {}, {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}


class RaspberryPi5Pmic(Meter):
    name = "rpi5-pmic"
    kind = POWER
    rate_hz = 5.0
    scope = "sum of Raspberry Pi 5 PMIC rails (excludes USB peripherals and 5 V input losses)"

    def __init__(self, vcgencmd: str):
        self.vcgencmd = vcgencmd

    def read(self) -> float:
        out = subprocess.run([self.vcgencmd, "pmic_read_adc"], capture_output=True, text=True,
                             timeout=2, check=True).stdout
        rails = parse_pmic_adc(out)
        if not rails:
            raise RuntimeError("vcgencmd pmic_read_adc printed no rails")
        return sum(rails.values())

    @classmethod
    def detect(cls, root: Path) -> "RaspberryPi5Pmic | None":
        model = root / "proc/device-tree/model"
        try:
            if "Raspberry Pi 5" not in model.read_text(errors="replace"):
                return None
        except OSError:
            return None
        exe = shutil.which("vcgencmd")
        return cls(exe) if exe else None
