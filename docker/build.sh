#!/usr/bin/env bash
# Builds the static binaries and the four images with buildah (Debian package `buildah`;
# vfs storage and chroot isolation, no daemon, no base image to pull):
#   docker/build.sh            # release binaries (fat LTO: slow), images tagged :latest
#   docker/build.sh --debug    # debug binaries (what tests/tests/images.rs uses)
# FERRY_IMAGE_TAG sets the tag (default `latest`, what `ferry-pilot inject` and
# manifests/kubernetes/ferry-pilot.yaml name); buildah's storage follows the usual
# containers-storage settings (CONTAINERS_STORAGE_CONF). Prints each image's size.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
profile=release
if [[ "${1:-}" == "--debug" ]]; then
    profile=debug
elif [[ -n "${1:-}" ]]; then
    echo "usage: docker/build.sh [--debug]" >&2
    exit 2
fi
tag="${FERRY_IMAGE_TAG:-latest}"
command -v buildah >/dev/null || { echo "docker/build.sh: buildah is needed (apt-get install buildah)" >&2; exit 1; }

# Static glibc binaries (`+crt-static` on the gnu target: the only target installed here).
# Since glibc 2.34 its `files` and `dns` name services are built in, so getaddrinfo (the
# proxy's STRICT_DNS/LOGICAL_DNS resolution, through tokio's lookup_host) works in an image
# that has nothing but /etc/resolv.conf. With an explicit --target the flag does not reach
# build scripts and proc macros, which stay dynamic.
target="$(rustc -vV | sed -n 's/^host: //p')"
args=(build --target "$target" -p ferry-proxy -p ferry-pilot --bins)
[[ "$profile" == release ]] && args+=(--release)
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" cargo "${args[@]}"
out="${CARGO_TARGET_DIR:-target}/$target/$profile"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
for bin in ferry ferry-pilot; do
    install -m 0755 "$out/$bin" "$ctx/$bin"
    strip "$ctx/$bin"
done

# The init image's iptables: Debian's nft backend, its libraries and extension modules.
xtables="$(readlink -f "$(command -v xtables-nft-multi || echo /usr/sbin/xtables-nft-multi)")"
[[ -x "$xtables" ]] || { echo "docker/build.sh: xtables-nft-multi is needed (apt-get install iptables)" >&2; exit 1; }
root="$ctx/init-root"
mkdir -p "$root/usr/sbin" "$root/etc"
cp "$xtables" "$root/usr/sbin/xtables-nft-multi"
for name in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save \
    iptables-nft iptables-nft-restore iptables-nft-save ip6tables-nft ip6tables-nft-restore ip6tables-nft-save; do
    ln -s xtables-nft-multi "$root/usr/sbin/$name"
done
# Its extension modules sit where libxtables was built to look: /usr/lib/<multiarch>/xtables.
multiarch="$(basename "$(dirname "$(ldd "$xtables" | awk '/libxtables/ {print $3}')")")"
modules="/usr/lib/$multiarch/xtables"
objects=("$xtables")
if [[ -d "$modules" ]]; then
    mkdir -p "$root$modules"
    cp -a "$modules/." "$root$modules/"
    objects+=("$modules"/*.so)
fi
# Every shared library those objects need, at the path the loader looks for it.
ldd "${objects[@]}" 2>/dev/null | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u |
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
# iptables names protocols (`-p tcp`) through /etc/protocols.
cp /etc/protocols "$root/etc/protocols"
[[ -f /etc/services ]] && cp /etc/services "$root/etc/services"

build() {
    buildah bud -q --isolation chroot --layers=false -f "docker/Containerfile.$1" -t "$2:$tag" "$ctx" >/dev/null
    echo "$2:$tag $(buildah images --format '{{.Size}}' "$2:$tag")"
}
build proxy ferry-proxy
build gateway ferry-gateway
build init ferry-init
build pilot ferry-pilot
