#!/usr/bin/env bash
# Raspberry Pi OS (Bookworm, 64-bit): the common install plus access to vcgencmd for the Pi 5
# PMIC power meter (group `video` owns /dev/vcio) and throttling flags in the fingerprint.
# 32-bit Pi OS (armv7l) has no ai-edge-litert wheel: set EDGEQ_PIP_EXTRA=tflite-runtime or use ONNX only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
grep -q "Raspberry Pi" /proc/device-tree/model 2>/dev/null || echo "note: this does not look like a Raspberry Pi" >&2
apt-get update
apt-get install -y --no-install-recommends libraspberrypi-bin || true   # vcgencmd
# A fixed CPU governor makes latencies comparable; the fingerprint records whatever is set.
echo "hint: for stable numbers set the governor to performance: echo performance | tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor" >&2
EDGEQ_EXTRA_GROUPS="video ${EDGEQ_EXTRA_GROUPS:-}" exec "$here/../common/install-agent.sh"
