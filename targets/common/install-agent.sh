#!/usr/bin/env bash
# Install the edgeq agent on a Debian-family arm64/armhf/x86_64 board: a service user, a venv with
# "edgeq[agent]" (numpy, onnxruntime, ai-edge-litert, psutil; no torch), a token, and the systemd unit.
# Run as root. Environment knobs:
#   EDGEQ_SPEC      what pip installs (default: edgeq[agent]; a wheel path also works: ./edgeq-0.1.0-py3-none-any.whl[agent])
#   EDGEQ_HOST      listen address (default 0.0.0.0)        EDGEQ_PORT   (default 8765)
#   EDGEQ_TLS_DIR   directory holding server.pem/server.key [and ca.pem for client certs]
#   EDGEQ_MTLS=1    require client certificates signed by EDGEQ_TLS_DIR/ca.pem
#   EDGEQ_EXTRA_GROUPS  extra groups for the service user (e.g. video for vcgencmd on a Pi)
#   EDGEQ_PIP_EXTRA extra packages for pip (e.g. tflite-runtime on boards without ai-edge-litert wheels)
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
spec=${EDGEQ_SPEC:-edgeq[agent]}
host=${EDGEQ_HOST:-0.0.0.0}
port=${EDGEQ_PORT:-8765}

apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates openssl
id edgeq >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edgeq --shell /usr/sbin/nologin edgeq
for g in ${EDGEQ_EXTRA_GROUPS:-}; do getent group "$g" >/dev/null && usermod -aG "$g" edgeq; done

install -d -m 0755 /opt/edgeq
[ -x /opt/edgeq/venv/bin/python ] || python3 -m venv /opt/edgeq/venv
/opt/edgeq/venv/bin/pip install --upgrade pip
# shellcheck disable=SC2086
/opt/edgeq/venv/bin/pip install "$spec" ${EDGEQ_PIP_EXTRA:-}
cp -r "$here/.." /opt/edgeq/targets 2>/dev/null || true

install -d -m 0750 -o root -g edgeq /etc/edgeq
if [ ! -s /etc/edgeq/token ]; then
  # 256 random bits; readable by the service only. Copy it to the host over a trusted channel (ssh).
  umask 077
  /opt/edgeq/venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' > /etc/edgeq/token
fi
chown root:edgeq /etc/edgeq/token
chmod 0640 /etc/edgeq/token

args="--host $host --port $port"
if [ -n "${EDGEQ_TLS_DIR:-}" ]; then
  install -m 0644 "$EDGEQ_TLS_DIR/server.pem" /etc/edgeq/server.pem
  install -m 0640 -g edgeq "$EDGEQ_TLS_DIR/server.key" /etc/edgeq/server.key
  args+=" --tls-cert /etc/edgeq/server.pem --tls-key /etc/edgeq/server.key"
  if [ "${EDGEQ_MTLS:-0}" = 1 ]; then
    install -m 0644 "$EDGEQ_TLS_DIR/ca.pem" /etc/edgeq/client-ca.pem
    args+=" --client-ca /etc/edgeq/client-ca.pem"
  fi
elif [ "$host" != 127.0.0.1 ]; then
  echo "WARNING: no TLS; the token crosses the network in clear text. See targets/README.md." >&2
fi
printf 'EDGEQ_AGENT_ARGS=%s\n' "$args" > /etc/edgeq/agent.env

install -m 0644 "$here/../systemd/edgeq-agent.service" /etc/systemd/system/edgeq-agent.service
systemctl daemon-reload
systemctl enable --now edgeq-agent.service
systemctl --no-pager --lines=5 status edgeq-agent.service || true
echo "edgeq agent installed. Token: /etc/edgeq/token (copy to the host, chmod 600)."
