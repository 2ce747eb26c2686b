"""Pluggable power meters, auto-detected in a fixed order of trust.

`detect(spec, root)` returns `(meter or None, reason)`. Specs: `auto` (Jetson INA3221 input rail,
Raspberry Pi 5 PMIC, generic hwmon power/energy, RAPL, else none), `none`, one of the names in
`METERS`, or `command:<command line>`. The spec is agent configuration (`edgeq agent serve
--power-meter`), never something a host can send.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import choice_error
from .base import Meter, Sampler, null_power, power_report
from .command import CommandMeter
from .hwmon import HwmonMeter, JetsonIna3221
from .rapl import RaplMeter
from .rpi import RaspberryPi5Pmic

# name -> detector(root) -> Meter | None, in auto-detection order
METERS = {
    "jetson-ina3221": JetsonIna3221.detect,
    "rpi5-pmic": RaspberryPi5Pmic.detect,
    "hwmon": HwmonMeter.detect,
    "rapl": RaplMeter.detect,
}

__all__ = ["Meter", "Sampler", "detect", "null_power", "power_report", "METERS"]


def detect(spec: str = "auto", root: str | Path = "/") -> tuple[Meter | None, str]:
    """The meter for `spec` under filesystem `root` (tests pass a recorded sysfs tree)."""
    root = Path(root)
    if spec == "none":
        return None, "power metering disabled on this agent (--power-meter none)"
    if spec.startswith("command:"):
        meter = CommandMeter(spec[len("command:"):])
        return meter, f"external command {meter.argv[0]}"
    if spec == "auto":
        for name, find in METERS.items():
            meter = find(root)
            if meter is not None:
                return meter, f"auto-detected {name}"
        return None, ("no power sensor found (looked for Jetson INA3221, Raspberry Pi 5 PMIC, "
                      "hwmon power/energy, readable RAPL)")
    if spec not in METERS:
        raise choice_error("power meter", spec, ["auto", "none", "command:<cmd>", *METERS])
    meter = METERS[spec](root)
    if meter is None:
        return None, f"power meter {spec!r} was requested but not found on this board"
    return meter, spec
