#!/usr/bin/env bash
# Runs Ferry's whole test suite on a fresh Debian machine: installs what the
# tests exercise for real (iptables, iproute2, curl, h2load, wrk, Python's
# grpcio and websockets, the Envoy reference binary), then checks formatting
# and lints and runs every test with nextest. Needs root (network namespaces
# and iptables); under CI=true a missing privilege fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test.sh: $*" >&2; }

packages=(iptables iproute2 curl nghttp2-client wrk procps util-linux netcat-openbsd)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import grpc, websockets' 2>/dev/null; then
    log "installing grpcio and websockets"
    python3 -m pip install --quiet --disable-pip-version-check grpcio websockets
fi

FERRY_ENVOY="$(scripts/install-envoy.sh)"
export FERRY_ENVOY
log "envoy: $FERRY_ENVOY"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests start the workspace's binaries; build them first.
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
