#!/usr/bin/env bash
# The README's first command: set-up (idempotent), then the relay on loopback, with a shared secret generated once and kept in
# .venv/xdpturn-local.secret (reruns reuse it, so minted credentials stay valid).
# Extra arguments go to `xdpturn serve`, e.g. scripts/serve-local.sh --log-level DEBUG
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

xdpturn=.venv/bin/xdpturn
secret_file=.venv/xdpturn-local.secret
if [ ! -s "$secret_file" ]; then
    (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' >"$secret_file.tmp")
    mv "$secret_file.tmp" "$secret_file"
fi
secret=$(head -n 1 "$secret_file")

listen=(--listen 127.0.0.1:3478 --public-ipv4 127.0.0.1)
if [ -e /proc/net/if_inet6 ] && grep -q '^0\{31\}1 ' /proc/net/if_inet6; then
    listen+=(--listen '[::1]:3478' --public-ipv6 ::1)
fi

cat <<MSG
TURN server: turn:127.0.0.1:3478?transport=udp
Credentials (valid 24 h, minted with the secret in $secret_file):
$("$xdpturn" credentials --secret "$secret" --ttl 86400 | sed 's/^/  /')
Peers may be on 127.0.0.0/8 and ::1; a peer at the relay's own address is another allocation.
Stop with Ctrl-C.

MSG
exec "$xdpturn" serve "${listen[@]}" \
    --allow-peer 127.0.0.0/8 --allow-peer ::1/128 \
    --auth-secret-file "$secret_file" \
    --log-format text "$@"
