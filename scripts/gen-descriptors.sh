#!/usr/bin/env bash
# Regenerates envoy-json/descriptors/envoy-v3.bin: the protobuf descriptor set
# of Envoy's v3 API (plus cncf/xds and udpa), which ferry-xds uses to read and
# write Envoy's JSON/YAML form of any xDS message.
#
# Source: the API protos the `envoy-types` crate ships (its `proto/` folder:
# data-plane-api, xds, googleapis, protoc-gen-validate, opentelemetry-proto,
# cel-spec, client_model), so the JSON schema is exactly the one the prost
# types were generated from. Needs: cargo, protoc (Debian: protobuf-compiler).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
manifest="$(cargo metadata --format-version 1 --locked 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="envoy-types"))')"
proto="$(dirname "$manifest")/proto"
inc=(-I "$proto/data-plane-api" -I "$proto/xds" -I "$proto/googleapis"
  -I "$proto/protoc-gen-validate" -I "$proto/opentelemetry-proto"
  -I "$proto/cel-spec/proto" -I "$proto/client_model")
files=()
cd "$proto/data-plane-api"
while read -r f; do
  if protoc "${inc[@]}" -o /dev/null "$f" 2>/dev/null; then files+=("$f"); else echo "skipped $f" >&2; fi
done < <(find envoy -path '*/v3/*.proto' | sort)
# cncf/xds types istiod sends as `Any`s (typed structs, the unified matcher's
# inputs and IP/trie matchers).
cd "$proto/xds"
while read -r f; do files+=("$f"); done < <(find xds/type -name '*.proto' | sort)
# The two TypedStructs (udpa's and xds's, which istiod and Istio's samples
# wrap extension configs in) are not in that copy: their schema is two
# fields, written here.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for pkg in udpa/type/v1 xds/type/v3; do
  mkdir -p "$work/$pkg"
  cat >"$work/$pkg/typed_struct.proto" <<PROTO
syntax = "proto3";
package ${pkg//\//.};
import "google/protobuf/struct.proto";
message TypedStruct {
  string type_url = 1;
  google.protobuf.Struct value = 2;
}
PROTO
  files+=("$pkg/typed_struct.proto")
done
# The unified matcher's IP trie (`xds.type.matcher.v3.IPMatcher`, which
# istiod puts in listeners' `filter_chain_matcher`) is not in that copy
# either: its schema (cncf/xds `xds/type/matcher/v3/ip.proto`), written here.
mkdir -p "$work/xds/type/matcher/v3"
cat >"$work/xds/type/matcher/v3/ip.proto" <<'PROTO'
syntax = "proto3";
package xds.type.matcher.v3;
import "xds/core/v3/cidr.proto";
import "xds/type/matcher/v3/matcher.proto";
message IPMatcher {
  message IPRangeMatcher {
    repeated xds.core.v3.CidrRange ranges = 1;
    Matcher.OnMatch on_match = 2;
    bool exclusive = 3;
  }
  repeated IPRangeMatcher range_matchers = 1;
}
PROTO
files+=("xds/type/matcher/v3/ip.proto")
inc+=(-I "$work")
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
