"""Linux RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`): CPU package energy counters.

The counter wraps at `max_energy_range_uj`; each read is unwrapped against the previous one, so
the returned joules increase monotonically as long as reads are more frequent than one wrap
(minutes at typical package power). A wrap adds `max_energy_range_uj`, as the kernel
documents the counter range and powercap tools (powerstat, turbostat) do. Only top-level package zones are summed (sub-zones such as
`core` are inside their package). Scope: CPU packages (and DRAM where exposed), not the board.
"""

from __future__ import annotations

from pathlib import Path

from .base import ENERGY, Meter


class RaplMeter(Meter):
    name = "rapl"
    kind = ENERGY
    rate_hz = 20.0

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.max_uj = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self._last = [None] * len(zones)
        self._wraps = [0] * len(zones)
        names = [(z / "name").read_text().strip() if (z / "name").exists() else z.name for z in zones]
        self.scope = f"RAPL zones {names} (CPU package energy, not the whole board)"

    def read(self) -> float:
        total_uj = 0
        for i, zone in enumerate(self.zones):
            raw = int((zone / "energy_uj").read_text())
            last = self._last[i]
            if last is not None and raw < last:
                self._wraps[i] += 1
            self._last[i] = raw
            total_uj += raw + self._wraps[i] * self.max_uj[i]
        return total_uj / 1e6

    @classmethod
    def detect(cls, root: Path) -> "RaplMeter | None":
        base = root / "sys/class/powercap"
        if not base.is_dir():
            return None
        zones = []
        for z in sorted(base.glob("intel-rapl:*")):
            if z.name.count(":") != 1:
                continue  # sub-zone (intel-rapl:0:0), already inside its package
            try:
                int((z / "energy_uj").read_text())
                int((z / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue  # energy_uj is root-only on recent kernels
            zones.append(z)
        return cls(zones) if zones else None
