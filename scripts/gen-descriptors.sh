#!/usr/bin/env bash
# Regenerates envoy-json/descriptors/envoy-v3.bin: the protobuf descriptor set
# of Envoy's v3 API (plus cncf/xds and udpa), which ferry-xds uses to read and
# write Envoy's JSON/YAML form of any xDS message.
#
# Source: the Envoy API protos vendored in the npm package @grpc/grpc-js-xds
# (deps/envoy-api, deps/xds, deps/googleapis, deps/protoc-gen-validate).
# validate.proto comes from the PyPI package protoc-gen-validate (the npm copy
# predates rules such as `ignore_empty` that Envoy's protos use).
# Needs: npm, pip, protoc (Debian: protobuf-compiler).
set -euo pipefail
version="${1:-1.14.1}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "@grpc/grpc-js-xds@${version}" >/dev/null
tar xzf grpc-grpc-js-xds-*.tgz
deps="$work/package/deps"
pip download --quiet --no-deps -d "$work/pgv" protoc-gen-validate==1.3.3
mkdir -p "$work/pgv/validate"
python3 - "$work/pgv" <<'PY'
import glob, sys, zipfile
d = sys.argv[1]
z = zipfile.ZipFile(glob.glob(d + "/*.whl")[0])
name = next(n for n in z.namelist() if n.endswith("/validate.proto"))
open(d + "/validate/validate.proto", "wb").write(z.read(name))
PY
cd "$deps/envoy-api"
inc=(-I "$work/pgv" -I "$deps/envoy-api" -I "$deps/xds" -I "$deps/googleapis" -I "$deps/protoc-gen-validate")
# A few protos import third-party schemas the package does not carry
# (OpenCensus, OpenTelemetry): keep every file that compiles on its own.
files=()
while read -r f; do
  if protoc "${inc[@]}" -o /dev/null "$f" 2>/dev/null; then files+=("$f"); else echo "skipped $f" >&2; fi
done < <(find envoy -path '*/v3/*.proto' | sort)
files+=(udpa/type/v1/typed_struct.proto xds/type/v3/typed_struct.proto)
# Istio's own extension configs that istiod sends as plain `Any`s (from the
# shared Istio API protos, when checked out beside this repository).
istio="$repo/../shared/istio-api-protos"
istio_files=(
  envoy/extensions/stats/config.proto
  envoy/config/filter/network/metadata_exchange/metadata_exchange.proto
  envoy/config/filter/http/alpn/v2alpha1/config.proto
)
if [[ -d "$istio" ]]; then
  inc+=(-I "$istio" -I "$istio/istio-proxy")
  files+=("${istio_files[@]}" source/extensions/filters/http/peer_metadata/config.proto)
else
  echo "warning: $istio not found; Istio extension types left out" >&2
fi
protoc --include_imports "${inc[@]}" \
  --descriptor_set_out="$repo/envoy-json/descriptors/envoy-v3.bin" "${files[@]}"
ls -l "$repo/envoy-json/descriptors/envoy-v3.bin"
