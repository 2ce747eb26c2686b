"""Power meters: the interface, the sampling thread and the energy arithmetic.

A meter reads either instantaneous power (watts) or a cumulative energy counter (joules, already
unwrapped). A `Sampler` reads it on a thread beside the benchmark at a recorded rate; energy over
a window is the trapezoid integral of power (or the counter difference, interpolated at the
window edges). Frozen readings (a sensor that stopped updating) are detected and reported, and
then no energy figure is given: nothing here estimates a number without saying so.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np

POWER, ENERGY = "power", "energy"


class Meter:
    """One power source. Subclasses set `name`, `kind`, `scope`, `rate_hz` and implement `read`."""

    name = "none"
    kind = POWER
    scope = ""
    rate_hz = 20.0

    def read(self) -> float:
        """Watts (kind == power) or cumulative joules (kind == energy)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"meter": self.name, "kind": self.kind, "scope": self.scope}


class FunctionMeter(Meter):
    """A meter over a plain function; for synthetic signals in tests and for composition."""

    def __init__(self, fn: Callable[[], float], kind: str = POWER, name: str = "function",
                 scope: str = "synthetic", rate_hz: float = 100.0):
        self._fn, self.kind, self.name, self.scope, self.rate_hz = fn, kind, name, scope, rate_hz

    def read(self) -> float:
        return float(self._fn())


class Sampler:
    """Reads a meter every 1/rate_hz seconds on a daemon thread; keeps (monotonic time, value)."""

    def __init__(self, meter: Meter, rate_hz: float | None = None):
        self.meter = meter
        self.rate_hz = float(rate_hz or meter.rate_hz)
        self.times: list[float] = []
        self.values: list[float] = []
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeq-power", daemon=True)

    def _loop(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                value = self.meter.read()
                t = time.monotonic()
                self.times.append(t)
                self.values.append(value)
            except Exception as exc:  # a sensor read can fail transiently; count it, keep going
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            next_t += period
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def achieved_rate_hz(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _interp(times: np.ndarray, values: np.ndarray, t: float) -> float:
    return float(np.interp(t, times, values))


def window_energy_j(times: Sequence[float], values: Sequence[float], kind: str,
                    t0: float, t1: float) -> float | None:
    """Energy (J) in [t0, t1]: trapezoid over power samples, or counter difference for energy.

    Values at t0 and t1 are linearly interpolated; None when the samples do not cover the window.
    """
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.size < 2 or t[0] > t0 or t[-1] < t1 or t1 <= t0:
        return None
    if kind == ENERGY:
        return _interp(t, v, t1) - _interp(t, v, t0)
    inside = (t > t0) & (t < t1)
    tt = np.concatenate([[t0], t[inside], [t1]])
    vv = np.concatenate([[_interp(t, v, t0)], v[inside], [_interp(t, v, t1)]])
    return float(np.sum((vv[1:] + vv[:-1]) * np.diff(tt)) / 2.0)


def frozen_reason(times: Sequence[float], values: Sequence[float], kind: str,
                  frozen_s: float = 2.0, min_samples: int = 10) -> str | None:
    """Why the readings look frozen, or None.

    Power: the same value repeated for >= `frozen_s` seconds and >= `min_samples` samples.
    Energy: the counter did not increase for that long (a running board always uses energy).
    """
    if len(values) < min_samples:
        return None
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    start = 0
    for i in range(1, len(v) + 1):
        if i == len(v) or v[i] != v[start]:
            if i - start >= min_samples and t[i - 1] - t[start] >= frozen_s:
                what = "power" if kind == POWER else "energy counter"
                return (f"{what} reading frozen at {v[start]:.6g} for {t[i - 1] - t[start]:.2f} s "
                        f"({i - start} samples): the sensor is not updating")
            start = i
    return None


def null_power(reason: str, meter: Meter | None = None) -> dict:
    """The power block when there is no usable figure: every number null, with the reason."""
    out = {"meter": meter.name if meter else None, "kind": meter.kind if meter else None,
           "scope": meter.scope if meter else None, "mean_w": None, "idle_w": None,
           "energy_j": None, "energy_per_inference_mj": None, "energy_per_inference_net_mj": None,
           "estimate": False, "reason": reason}
    return out


def power_report(sampler: Sampler, baseline: tuple[float, float] | None,
                 window: tuple[float, float], n_inferences: int,
                 frozen_s: float = 2.0) -> dict:
    """Energy per inference over `window`, raw and minus the idle power of `baseline`."""
    meter = sampler.meter
    times, values = list(sampler.times), list(sampler.values)
    base = {"rate_hz": sampler.rate_hz, "achieved_rate_hz": sampler.achieved_rate_hz(),
            "samples": len(values), "read_errors": sampler.errors,
            "window_s": window[1] - window[0],
            "baseline_s": None if baseline is None else baseline[1] - baseline[0]}
    if not values:
        return {**null_power(f"no readings from {meter.name}: {sampler.last_error}", meter), **base}
    reason = frozen_reason(times, values, meter.kind, frozen_s=frozen_s)
    if reason:
        return {**null_power(reason, meter), **base, "stale": True}
    energy = window_energy_j(times, values, meter.kind, *window)
    if energy is None:
        return {**null_power("the power samples do not cover the timed window", meter), **base}
    seconds = window[1] - window[0]
    mean_w = energy / seconds
    idle_w = None
    if baseline is not None:
        idle_e = window_energy_j(times, values, meter.kind, *baseline)
        idle_w = None if idle_e is None else idle_e / (baseline[1] - baseline[0])
    per_inf = energy / max(n_inferences, 1) * 1e3
    net = None if idle_w is None else (energy - idle_w * seconds) / max(n_inferences, 1) * 1e3
    return {**meter.describe(), **base, "stale": False, "mean_w": mean_w, "idle_w": idle_w,
            "energy_j": energy, "energy_per_inference_mj": per_inf,
            "energy_per_inference_net_mj": net, "estimate": False, "reason": None}
