"""hwmon power meters: Jetson INA3221 (board total = input rail) and generic power/energy files.

Jetson boards expose an INA3221 with one channel per rail (`inN_label` e.g. VDD_IN,
VDD_CPU_GPU_CV, VDD_SOC). The rails other than VDD_IN are DOWNSTREAM of it, so the board total is
the input rail alone; summing the rails double-counts. Power = bus voltage (mV) x current (mA).
Generic hwmon devices give `powerN_input` (microwatts) or `energyN_input` (microjoules).
"""

from __future__ import annotations

from pathlib import Path

from .base import ENERGY, POWER, Meter

INPUT_RAIL_LABELS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VDD_5V_IN")


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def hwmon_dirs(root: Path) -> list[Path]:
    base = root / "sys/class/hwmon"
    return sorted(p for p in base.glob("hwmon*")) if base.is_dir() else []


def _name(d: Path) -> str:
    try:
        return (d / "name").read_text().strip()
    except OSError:
        return ""


class JetsonIna3221(Meter):
    """The input rail of a Jetson INA3221: the whole board's power."""

    name = "jetson-ina3221"
    kind = POWER
    rate_hz = 20.0

    def __init__(self, hwmon: Path, channel: int, label: str, rails: dict[int, str]):
        self.hwmon, self.channel, self.label, self.rails = hwmon, channel, label, rails
        self.scope = f"board input rail {label} (not the sum of rails {sorted(rails.values())})"

    def rail_watts(self, channel: int) -> float:
        mv = _read_int(self.hwmon / f"in{channel}_input")
        ma = _read_int(self.hwmon / f"curr{channel}_input")
        return mv * ma / 1e6

    def read(self) -> float:
        return self.rail_watts(self.channel)

    def describe(self) -> dict:
        return {**super().describe(), "rails": {v: k for k, v in self.rails.items()}}

    @classmethod
    def detect(cls, root: Path) -> "JetsonIna3221 | None":
        for d in hwmon_dirs(root):
            if _name(d) != "ina3221":
                continue
            rails = {}
            for label_file in sorted(d.glob("in*_label")):
                ch = int(label_file.name[2:-len("_label")])
                rails[ch] = label_file.read_text().strip()
            for ch, label in rails.items():
                if label.upper() in INPUT_RAIL_LABELS and (d / f"curr{ch}_input").exists():
                    return cls(d, ch, label, rails)
        return None


class HwmonMeter(Meter):
    """A generic hwmon `powerN_input` (uW) or `energyN_input` (uJ) file."""

    rate_hz = 20.0

    def __init__(self, path: Path, kind: str, device: str):
        self.path, self.kind = path, kind
        self.name = f"hwmon-{kind}"
        self.scope = f"hwmon device {device!r} {path.name}"

    def read(self) -> float:
        return _read_int(self.path) / 1e6

    @classmethod
    def detect(cls, root: Path) -> "HwmonMeter | None":
        for d in hwmon_dirs(root):
            if _name(d) == "ina3221":
                continue
            for pattern, kind in (("energy*_input", ENERGY), ("power*_input", POWER),
                                  ("power*_average", POWER)):
                for f in sorted(d.glob(pattern)):
                    try:
                        _read_int(f)
                    except (OSError, ValueError):
                        continue
                    return cls(f, kind, _name(d))
        return None
