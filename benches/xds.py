#!/usr/bin/env python3
"""Configuration benchmark: how fast Ferry and Envoy take a large xDS configuration, and how
much memory they hold with it. Both proxies get the same resources from the same server
(`ferry-pilot replay`) in one run, interleaved.

Scenarios:
  istio-dump   the Istio 1.18 sidecar dump (../shared/istio-config-dumps/), with the extensions
               that only Istio's Envoy build has (istio.stats, metadata exchange, alpn, authn, Wasm)
               and the SDS-backed TLS settings removed, so that upstream Envoy accepts every
               resource; both proxies get this same stripped configuration.
  10k          generated: one listener, a route table with 1,000 virtual hosts, 10,000 EDS
               clusters with 10 endpoints each (100,000 endpoints).

Per proxy and round: start the proxy on an ADS bootstrap pointing at the server, wait until the
server's status shows it ACKed every type at the served version, report that time (process
start → everything ACKed), then RSS one second later and the peak (VmHWM). In `10k`, one
assignment then changes (the server reloads at SIGHUP and pushes EDS alone): the time from that
push to the proxy's ACK of it.

    python3 benches/xds.py [--rounds 3] [--delta] [--only istio-dump|10k]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DUMP = REPO.parent / "shared" / "istio-config-dumps" / "istio-1.18.2-sidecar-hotelreservation-geo.json"
TYPES = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
]
ISTIO_ONLY = (
    "stats.PluginConfig",
    "envoy.tcp.metadataexchange.config.MetadataExchange",
    "io.istio.network.authn.Config",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "envoy.extensions.filters.http.wasm.v3.Wasm",
    "io.istio.http.peer_metadata.Config",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def typed_name(cfg: dict) -> str:
    t = cfg.get("@type", "")
    if t.endswith("TypedStruct"):
        t = cfg.get("type_url", "")
    return t.rsplit("/", 1)[-1]


def strip_istio(dump: dict) -> dict:
    """Removes what upstream Envoy cannot run (see the module doc)."""
    for c in dump["configs"]:
        if "dynamic_listeners" in c:
            c["dynamic_listeners"] = [l for l in c["dynamic_listeners"] if "active_state" in l]
            for entry in c["dynamic_listeners"]:
                l = entry["active_state"]["listener"]
                chains = l.get("filter_chains", []) + ([l["default_filter_chain"]] if "default_filter_chain" in l else [])
                for fc in chains:
                    fc.pop("transport_socket", None)
                    fc["filters"] = [f for f in fc.get("filters", []) if typed_name(f.get("typed_config", {})) not in ISTIO_ONLY]
                    for f in fc["filters"]:
                        tc = f.get("typed_config", {})
                        tc.pop("tracing", None)
                        if "http_filters" in tc:
                            tc["http_filters"] = [h for h in tc["http_filters"] if typed_name(h.get("typed_config", {})) not in ISTIO_ONLY]
        for cl in c.get("dynamic_active_clusters", []):
            cl["cluster"].pop("filters", None)
            cl["cluster"].pop("transport_socket_matches", None)
            cl["cluster"].pop("transport_socket", None)
    return dump


def generated(clusters: int = 10_000, per_cluster: int = 10, vhosts: int = 1_000) -> dict:
    routes = {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "8080",
        "virtual_hosts": [
            {
                "name": f"svc-{v}",
                "domains": [f"svc-{v}.bench.svc.cluster.local", f"svc-{v}"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"outbound|8080||svc-{v * (clusters // vhosts)}"}}],
            }
            for v in range(vhosts)
        ],
    }
    listener = {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "0.0.0.0_18080",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "bench",
                "rds": {"route_config_name": "8080", "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            },
        }]}],
    }
    cls, clas = [], []
    for i in range(clusters):
        name = f"outbound|8080||svc-{i}"
        cls.append({"cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
                                "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}})
        eps = [{"endpoint": {"address": {"socket_address": {"address": f"127.{1 + i // 25000}.{(i // 100) % 250}.{1 + j}", "port_value": 10000 + i % 50000}}}}
               for j in range(per_cluster)]
        clas.append({"endpoint_config": {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}})
    return {"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": [{"name": listener["name"], "active_state": {"listener": listener}}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": cls},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [{"route_config": routes}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": clas},
    ]}


def bootstrap(xds: int, admin: int, delta: bool) -> str:
    return f"""node: {{id: "sidecar~127.0.0.1~bench.bench~bench.svc.cluster.local", cluster: bench}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config: {{api_type: {"DELTA_GRPC" if delta else "GRPC"}, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{max_concurrent_streams: 100}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds}}}}}}}}}]}}]
"""


def kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} never listened")


def synced(status_port: int) -> tuple[bool, int]:
    """(every type ACKed at the sent version, NACK count) for the first stream."""
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/debug/syncz", timeout=2) as r:
        streams = json.load(r)
    if not streams:
        return False, 0
    types = streams[-1]["types"]
    nacks = sum(t.get("nacks", 0) for t in types.values())
    done = all(t in types and types[t].get("state") == "SYNCED" for t in TYPES)
    return done, nacks


def eds_status(status_port: int) -> dict:
    # The server answers late while it reloads a 10k dump on a busy machine.
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/debug/syncz", timeout=30) as r:
        streams = json.load(r)
    return streams[-1]["types"].get(TYPES[1], {}) if streams else {}


def eds_update(pilot_p: subprocess.Popen, status: int, served: Path, updated: Path) -> float:
    """Swaps the served dump for `updated` (one assignment changed), has the
    server reload it, and returns the milliseconds from the server's EDS push
    to the proxy's ACK of it, as the server timed them (`ack_latency_us`):
    polling the status from here would add up to a poll's round trip."""
    before = eds_status(status).get("sent_version")
    os.replace(updated, served)
    pilot_p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    sent_at = None
    while time.monotonic() < deadline:
        t = eds_status(status)
        now = time.monotonic()
        v = t.get("sent_version")
        if v != before:
            if sent_at is None:
                sent_at = now
            if t.get("acked_version") == v and t.get("state") == "SYNCED":
                return t["ack_latency_us"] / 1000
            if t.get("state") == "NACKED":
                raise RuntimeError(f"EDS update NACKed: {t.get('last_nack')}")
        time.sleep(0.001)
    raise RuntimeError("the EDS update was not ACKed in 120 s")


def one_run(proxy: str, binary: Path, dump_file: Path, pilot: Path, delta: bool, work: Path,
            updated: dict | None = None) -> dict:
    xds, status, admin = free_port(), free_port(), free_port()
    plog = open(work / f"pilot-{proxy}.log", "w")
    if updated is not None:
        # A copy the server reloads from once the update is written over it.
        served = work / f"served-{proxy}.json"
        served.write_bytes(dump_file.read_bytes())
        dump_file = served
    pilot_p = subprocess.Popen([str(pilot), "replay", "--dynamic-only", "--dump", str(dump_file),
                                "--listen", f"127.0.0.1:{xds}", "--status-addr", f"127.0.0.1:{status}"],
                               stdout=plog, stderr=subprocess.STDOUT)
    proc = None
    try:
        wait_port(status, 120)
        wait_port(xds, 120)
        cfg = work / f"bootstrap-{proxy}.yaml"
        cfg.write_text(bootstrap(xds, admin, delta))
        if proxy == "ferry":
            argv = ["taskset", "-c", "1", str(binary), "sidecar", "--config", str(cfg), "--concurrency", "1", "--ready-addr", "off", "--prometheus-addr", "off", "--status-addr", "off", "--log-level", "warn"]
        else:
            argv = ["taskset", "-c", "1", str(binary), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
        log = open(work / f"{proxy}.log", "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        nacks = 0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proxy} exited: {(work / f'{proxy}.log').read_text()[-2000:]}")
            try:
                done, nacks = synced(status)
            except OSError:
                done = False
            if done:
                break
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"{proxy} did not sync in 300 s")
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        out = {"ms": elapsed * 1000, "rss": kib(proc.pid, "VmRSS") / 1024, "peak": kib(proc.pid, "VmHWM") / 1024, "nacks": nacks}
        if updated is not None:
            next_file = work / f"updated-{proxy}.json"
            next_file.write_text(json.dumps(updated))
            out["eds_ms"] = eds_update(pilot_p, status, dump_file, next_file)
        return out
    finally:
        for p in (proc, pilot_p):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delta", action="store_true", help="DELTA_GRPC instead of GRPC")
    ap.add_argument("--only", action="append", choices=["istio-dump", "10k"])
    ap.add_argument("--ferry", type=Path, default=REPO / "target/release/ferry")
    ap.add_argument("--pilot", type=Path, default=REPO / "target/release/ferry-pilot")
    ap.add_argument("--envoy", type=Path, default=Path(os.environ.get("FERRY_TOOLS", REPO / "target/tools")) / "envoy")
    args = ap.parse_args()
    for b in (args.ferry, args.pilot, args.envoy):
        if not b.exists():
            print(f"missing {b}: cargo build --release -p ferry-proxy -p ferry-pilot; scripts/install-envoy.sh", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="ferry-xds-bench-"))
    scenarios = args.only or ["istio-dump", "10k"]
    rows = []
    for sc in scenarios:
        if sc == "istio-dump":
            if not DUMP.exists():
                print(f"{DUMP} not present; istio-dump skipped", file=sys.stderr)
                continue
            data = strip_istio(json.loads(DUMP.read_text()))
        else:
            data = generated()
        f = work / f"{sc}.json"
        f.write_text(json.dumps(data))
        # 10k: then one endpoint assignment changes (an EDS-only push).
        updated = endpoint_moved(data) if sc == "10k" else None
        results = {"ferry": [], "envoy": []}
        for r in range(args.rounds):
            for proxy, binary in (("ferry", args.ferry), ("envoy", args.envoy)):
                res = one_run(proxy, binary, f, args.pilot, args.delta, work, updated)
                eds = f", EDS update {res['eds_ms']:.1f} ms" if "eds_ms" in res else ""
                print(f"{sc} round {r + 1} {proxy}: {res['ms']:.0f} ms, RSS {res['rss']:.1f} MiB, peak {res['peak']:.1f} MiB, NACKs {res['nacks']}{eds}", flush=True)
                results[proxy].append(res)
        keys = ("ms", "rss", "peak", "nacks") + (("eds_ms",) if updated is not None else ())
        med = {p: {k: statistics.median(x[k] for x in v) for k in keys} for p, v in results.items()}
        rows.append((sc, med))
    proto = "delta" if args.delta else "SotW"
    print(f"\n| scenario ({proto}) | Ferry: all ACKed ms / RSS MiB / peak MiB | Envoy: all ACKed ms / RSS MiB / peak MiB | time ratio | RSS ratio | NACKs F/E |")
    print("| --- | --- | --- | --- | --- | --- |")
    for sc, m in rows:
        f, e = m["ferry"], m["envoy"]
        print(f"| {sc} | {f['ms']:.0f} / {f['rss']:.1f} / {f['peak']:.1f} | {e['ms']:.0f} / {e['rss']:.1f} / {e['peak']:.1f} | "
              f"{f['ms'] / e['ms']:.2f}x | {f['rss'] / e['rss']:.2f}x | {f['nacks']:.0f}/{e['nacks']:.0f} |")
    eds_rows = [(sc, m) for sc, m in rows if "eds_ms" in m["ferry"]]
    if eds_rows:
        print(f"\n| scenario ({proto}) | EDS-only update, push to ACK: Ferry ms | Envoy ms | ratio |")
        print("| --- | --- | --- | --- |")
        for sc, m in eds_rows:
            f, e = m["ferry"]["eds_ms"], m["envoy"]["eds_ms"]
            print(f"| {sc}, one of 10,000 assignments changed | {f:.1f} | {e:.1f} | {f / e:.2f}x |")
    return 0


def endpoint_moved(dump: dict) -> dict:
    """`dump` with the first endpoint of the first assignment on another port."""
    out = json.loads(json.dumps(dump))
    for c in out["configs"]:
        if "dynamic_endpoint_configs" in c:
            ep = c["dynamic_endpoint_configs"][0]["endpoint_config"]["endpoints"][0]["lb_endpoints"][0]
            ep["endpoint"]["address"]["socket_address"]["port_value"] += 1
            return out
    raise RuntimeError("the dump has no endpoint assignment")


if __name__ == "__main__":
    sys.exit(main())
