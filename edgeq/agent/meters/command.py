"""An external meter: a command, configured on the agent only, that prints watts on stdout.

Each read runs the command once (no shell) and parses the last number it prints. This is for
USB power meters and lab supplies with their own tool. The host can never choose the command.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from ...errors import EdgeqError
from .base import POWER, Meter

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class CommandMeter(Meter):
    name = "command"
    kind = POWER
    rate_hz = 5.0

    def __init__(self, command: str, rate_hz: float = 5.0):
        self.argv = shlex.split(command)
        if not self.argv:
            raise EdgeqError("power meter command: empty command")
        self.rate_hz = rate_hz
        self.scope = f"external meter command {self.argv[0]!r} (whatever it measures)"

    def read(self) -> float:
        out = subprocess.run(self.argv, capture_output=True, text=True, timeout=5, check=True).stdout
        numbers = _NUMBER.findall(out)
        if not numbers:
            raise RuntimeError(f"meter command printed no number: {out[:80]!r}")
        return float(numbers[-1])
