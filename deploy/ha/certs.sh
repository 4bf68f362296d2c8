#!/bin/sh
# Makes a throwaway CA and one certificate for the `ha` compose profile's Redis nodes and
# Sentinels (names redis-primary, redis-replica, sentinel-1..3, localhost, 127.0.0.1),
# into deploy/ha/tls/ (or the directory given). Needs openssl. For production, use
# certificates from your own CA; Coven trusts the CA in SSL_CERT_FILE.
#   deploy/ha/certs.sh && docker compose --profile ha up -d
set -eu
dir=${1:-"$(dirname "$0")/tls"}
mkdir -p "$dir"
cd "$dir"
if [ -f ca.pem ] && [ -f server.pem ] && [ -f server.key ]; then
  echo "certificates already in $dir (delete them to make new ones)"
  exit 0
fi
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 825 \
  -subj "/CN=Coven Redis CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
  -subj "/CN=redis" 2>/dev/null
printf 'subjectAltName=%s\n' \
  "DNS:redis-primary,DNS:redis-replica,DNS:sentinel-1,DNS:sentinel-2,DNS:sentinel-3,DNS:localhost,IP:127.0.0.1" \
  > ext.cnf
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out server.pem -days 825 -extfile ext.cnf 2>/dev/null
rm -f server.csr ext.cnf ca.srl
# Read by redis-server, which runs as its own user in the container.
chmod 644 server.key
chmod 600 ca.key
echo "made ca.pem, server.pem and server.key in $dir"
