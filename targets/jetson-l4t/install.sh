#!/usr/bin/env bash
# NVIDIA Jetson (L4T / JetPack 5-6, Ubuntu arm64): the common install. Power is read from the
# INA3221 hwmon (board total = the VDD_IN input rail), which is world-readable: no extra groups.
# onnxruntime from PyPI is CPU-only here; the agent records the provider it actually used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ -f /etc/nv_tegra_release ] || echo "note: /etc/nv_tegra_release missing; is this a Jetson?" >&2
apt-get update
# Record the power mode with the results: nvpmodel -q and jetson_clocks --show are informative.
command -v nvpmodel >/dev/null && nvpmodel -q || true
echo "hint: fix clocks for stable numbers: sudo jetson_clocks (the fingerprint records governors and frequencies)" >&2
exec "$here/../common/install-agent.sh"
