#!/usr/bin/env bash
# Make a small private CA, a server certificate for the agent and a client certificate for the host.
# Usage: make-certs.sh OUT_DIR SERVER_NAME_OR_IP [MORE_NAMES_OR_IPS...]
#   e.g. make-certs.sh ./certs pi5.local 192.168.1.23
# Produces: ca.pem ca.key (keep ca.key offline), server.pem server.key (copy to the board),
#           client.pem client.key (stay on the host). Keys are P-256, certificates valid 825 days.
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR NAME_OR_IP...}
shift
[ $# -ge 1 ] || { echo "give at least one server name or IP" >&2; exit 2; }
mkdir -p "$out"
cd "$out"
umask 077
san=""
for n in "$@"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
days=${EDGEQ_CERT_DAYS:-825}
[ -f ca.key ] || openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days "$days" -subj "/CN=edgeq agent CA" 2>/dev/null
openssl req "${ec[@]}" -keyout server.key -out server.csr -subj "/CN=$1" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days "$days" \
  -extfile server.ext 2>/dev/null
openssl req "${ec[@]}" -keyout client.key -out client.csr -subj "/CN=edgeq host" 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days "$days" \
  -extfile client.ext 2>/dev/null
rm -f server.csr client.csr server.ext client.ext
chmod 644 ca.pem server.pem client.pem
echo "made in $out: ca.pem, server.pem/server.key (board), client.pem/client.key (host); SAN $san"
