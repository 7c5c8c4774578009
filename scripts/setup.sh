#!/usr/bin/env bash
# Idempotent set-up on Debian 12: system packages, the venv with pinned Python packages, and the
# compiled BPF object. Safe to run again: each step only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(clang-16 llvm-16 libbpf-dev bpftool iproute2 nftables ethtool coturn tcpdump make python3-venv chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
    .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
    echo "$want" >"$stamp"
fi

make -s -C src/xdpturn/fastpath/bpf
make -s -C src/xdpturn_lab/bench
