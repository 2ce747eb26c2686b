"""Power meters on recorded (fake) sysfs trees and synthetic signals."""

import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from edgeq.agent import meters
from edgeq.agent.meters.base import (ENERGY, POWER, FunctionMeter, Sampler, frozen_reason,
                                     power_report, window_energy_j)
from edgeq.agent.meters.rpi import parse_pmic_adc

TREES = Path(__file__).parent / "fixtures" / "sysfs"


def test_square_wave_energy_within_one_percent():
    # 2 W / 8 W square wave, period 0.3719 s (incommensurate with the ~100 Hz sampling, which has
    # jitter like a real sampling thread), integrated over 9 s; exact value on a 10 us grid
    period = 0.3719
    wave = lambda x: np.where((x % period) < period / 2, 2.0, 8.0)  # noqa: E731
    t = np.cumsum(np.random.default_rng(0).uniform(0.008, 0.012, 1100))
    p = wave(t)
    fine = np.arange(0.5, 9.5, 1e-5) + 0.5e-5
    exact = wave(fine).sum() * 1e-5
    got = window_energy_j(t, p, POWER, 0.5, 9.5)
    assert abs(got - exact) / exact < 0.01


def test_sampler_thread_square_wave_within_one_percent():
    t_start = time.monotonic()
    meter = FunctionMeter(lambda: 2.0 if ((time.monotonic() - t_start) % 0.2) < 0.1 else 6.0, rate_hz=200)
    sampler = Sampler(meter).start()
    time.sleep(0.05)
    t0 = time.monotonic()
    time.sleep(1.0)
    t1 = time.monotonic()
    time.sleep(0.05)
    sampler.stop()
    report = power_report(sampler, None, (t0, t1), n_inferences=100)
    # the mean of the square wave is 4 W whatever the phase, to within one edge per period
    assert report["mean_w"] == pytest.approx(4.0, rel=0.05)
    assert report["achieved_rate_hz"] > 50
    assert report["energy_per_inference_mj"] == pytest.approx(report["energy_j"] * 10, rel=1e-9)


def test_energy_and_idle_baseline_arithmetic():
    t = np.arange(0.0, 4.01, 0.01)
    # idle 1 W, then 3 W while running; a +-1 mW zero-mean wiggle as real sensors show
    p = np.where(t < 2.0, 1.0, 3.0) + np.where(np.arange(t.size) % 2 == 0, 1e-3, -1e-3)
    sampler = Sampler(FunctionMeter(lambda: 0.0))
    sampler.times, sampler.values = list(t), list(p)
    rep = power_report(sampler, (0.5, 1.5), (2.5, 3.5), n_inferences=10)
    assert rep["energy_j"] == pytest.approx(3.0, abs=1e-4)
    assert rep["idle_w"] == pytest.approx(1.0, abs=1e-4)
    assert rep["energy_per_inference_mj"] == pytest.approx(300.0, abs=0.01)
    assert rep["energy_per_inference_net_mj"] == pytest.approx(200.0, abs=0.02)


def test_frozen_reader_detected_and_energy_nulled():
    t = list(np.arange(0.0, 3.0, 0.05))
    sampler = Sampler(FunctionMeter(lambda: 5.0))
    sampler.times, sampler.values = t, [5.0] * len(t)
    rep = power_report(sampler, None, (0.5, 2.5), n_inferences=10)
    assert rep["stale"] is True and rep["energy_j"] is None and "frozen" in rep["reason"]
    # an energy counter that stops increasing is frozen too; a moving one is not
    assert frozen_reason(t, [100.0] * len(t), ENERGY)
    assert frozen_reason(t, list(np.linspace(0, 10, len(t))), ENERGY) is None
    noisy = list(5.0 + np.random.default_rng(0).normal(0, 0.01, len(t)))
    assert frozen_reason(t, noisy, POWER) is None


def test_jetson_total_is_input_rail_not_sum():
    meter, why = meters.detect("auto", TREES / "jetson-orin-nx")
    assert meter.name == "jetson-ina3221", why
    vdd_in = 5072 * 1456 / 1e6
    assert meter.read() == pytest.approx(vdd_in)
    rail_sum = sum(meter.rail_watts(ch) for ch in meter.rails)
    assert rail_sum > vdd_in * 1.2  # summing would have double-counted
    assert "VDD_IN" in meter.scope


def test_rapl_wraparound_exact(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(TREES / "rapl-x86", root)
    meter, _ = meters.detect("rapl", root)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]  # no sub-zone
    pkg0 = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    pkg1 = root / "sys/class/powercap/intel-rapl:1/energy_uj"
    max0 = 262143328850
    e0 = meter.read()
    assert e0 == (262143000000 + 5000000) / 1e6
    pkg0.write_text("100000\n")   # wrapped: 328850 uJ to the top, then 100000 more
    pkg1.write_text("5000300\n")
    e1 = meter.read()
    expected_uj = (max0 - 262143000000) + 100000 + 300
    assert round((e1 - e0) * 1e6) == expected_uj
    pkg0.write_text("200000\n")
    assert round((meter.read() - e1) * 1e6) == 100000


def test_generic_hwmon_power():
    meter, _ = meters.detect("auto", TREES / "hwmon-generic")
    assert meter.name == "hwmon-power" and meter.read() == pytest.approx(2.5)


def test_rpi5_pmic_parse_and_read(tmp_path, monkeypatch):
    text = (TREES / "rpi5" / "pmic_read_adc.txt").read_text()
    rails = parse_pmic_adc(text)
    assert "EXT5V" not in rails and "BATT" not in rails  # voltage only: no power
    assert rails["VDD_CORE"] == pytest.approx(0.67920000 * 0.72036140)
    fake = tmp_path / "bin" / "vcgencmd"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat {TREES / 'rpi5' / 'pmic_read_adc.txt'}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    meter, why = meters.detect("auto", TREES / "rpi5")
    assert meter.name == "rpi5-pmic", why
    assert meter.read() == pytest.approx(sum(rails.values()))
    assert "excludes" in meter.scope


def test_no_sensor_gives_null_with_reason():
    meter, why = meters.detect("auto", TREES / "empty-x86")
    assert meter is None and "no power sensor" in why
    block = meters.null_power(why)
    assert block["energy_per_inference_mj"] is None and block["reason"] == why
    assert meters.detect("none")[0] is None


def test_command_meter(tmp_path):
    import sys

    meter, _ = meters.detect(f"command:{sys.executable} -c \"print('P=3.25 W')\"")
    assert meter.read() == pytest.approx(3.25)
