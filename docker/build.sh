#!/usr/bin/env bash
# Builds the static `ferry` binary and the container images.
#   docker/build.sh            # binary + proxy image (buildah, FROM scratch)
#   docker/build.sh --init     # also the init image (needs a Debian base image)
# Uses buildah (Debian package `buildah`) with the vfs driver and chroot
# isolation, which work without a container daemon.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
target="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p ferry-proxy --target "$target"
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "target/$target/release/ferry" "$ctx/ferry"
buildah bud --storage-driver vfs --isolation chroot -f docker/Containerfile.proxy -t ferry/proxy:dev "$ctx"
if [[ "${1:-}" == "--init" ]]; then
    buildah bud --storage-driver vfs --isolation chroot -f docker/Containerfile.init -t ferry/init:dev "$ctx"
fi
