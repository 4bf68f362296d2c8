#!/usr/bin/env bash
# A self-signed certificate and key for trying the compose deployment over HTTPS on this
# machine (https://localhost:8443). Browsers warn about it once. For a real host, use a
# certificate from a CA and point TLS_CERT_FILE / TLS_KEY_FILE at it instead.
#
#   scripts/dev-cert.sh [DIR [NAME...]]   # default: deploy/tls, localhost
#
# Writes DIR/cert.pem and DIR/key.pem (valid for the names, 127.0.0.1 and ::1); an
# existing pair is kept unless FORCE=1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/deploy/tls}"
[ $# -gt 0 ] && shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost)

if [ -e "$dir/cert.pem" ] && [ -e "$dir/key.pem" ] && [ -z "${FORCE:-}" ]; then
  echo "$dir/cert.pem and key.pem exist (FORCE=1 makes new ones)"
  exit 0
fi
command -v openssl >/dev/null 2>&1 || { echo "dev-cert.sh needs openssl" >&2; exit 1; }

san=""
for n in "${names[@]}"; do san+="DNS:$n,"; done
san+="IP:127.0.0.1,IP:::1"

mkdir -p "$dir"
# The key is written with no group or world access.
(umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -days 397 -subj "/CN=${names[0]}" \
  -addext "subjectAltName=$san" \
  -addext "basicConstraints=critical,CA:FALSE" \
  -addext "keyUsage=critical,digitalSignature" \
  -addext "extendedKeyUsage=serverAuth" \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null)
chmod 644 "$dir/cert.pem"
echo "wrote $dir/cert.pem and $dir/key.pem for ${names[*]}, 127.0.0.1 and ::1"
