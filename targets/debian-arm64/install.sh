#!/usr/bin/env bash
# Generic Debian / Ubuntu arm64 board (Rock, Orange Pi, Odroid, ...): the common install.
# Power comes from a hwmon power/energy sensor if the board has one, else from an external meter:
# append " --power-meter command:/usr/local/bin/read-watts" to the EDGEQ_AGENT_ARGS line of
# /etc/edgeq/agent.env (the command must print watts; no spaces in it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
apt-get update
exec "$here/../common/install-agent.sh"
