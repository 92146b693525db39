#!/usr/bin/env python3
"""Control-plane benchmark: what ferry-pilot costs for a large mesh, alone and with many proxies.

The mesh is generated Kubernetes YAML in one namespace: `--services` Services, each selecting
`--endpoints` Pods (one port, 8080). For each client count (`--clients`, default 1 and 100) a
fresh `ferry-pilot serve` reads it, then `bench-xds-clients` opens that many delta ADS streams
(as istio-agent's bootstrap does), each the sidecar of one of the mesh's pods, subscribing to
every cluster and listener and then to their endpoints and routes, ACKing everything.

Measured per client count: the time from ferry-pilot's start until its ADS port listens (the
mesh read and translated), its RSS then; the time until every client holds all four types,
the CPU seconds ferry-pilot spent on it and its RSS and peak afterwards; then one Pod is added
to a Service and the time until every client received a push is measured. That last figure
includes the configuration directory's poll interval (500 ms), since it runs from the file
write.

With `--scope K`, the client counts run again with a namespace-wide Sidecar resource importing
only K of the Services: what each proxy is sent (and so holds) follows what it uses.

    python3 benches/pilot.py [--services 10000] [--endpoints 10] [--clients 1 --clients 100] [--scope 10]

Needs `cargo build --release -p ferry-pilot -p ferry-benches --bins`. There is no Envoy side:
the figures are ferry-pilot's own.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xds import free_port, kib

REPO = Path(__file__).resolve().parent.parent


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ferry-pilot exited before it listened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"port {port} never listened")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pod_ip(i: int) -> str:
    return f"10.{1 + i // 62500}.{(i // 250) % 250}.{1 + i % 250}"


def mesh(dir: Path, services: int, endpoints: int) -> list[str]:
    """Writes the mesh's YAML into `dir`; returns the node ids of one pod per service."""
    nodes = []
    with open(dir / "mesh.yaml", "w") as f:
        f.write("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio-injection: enabled}}\n")
        n = 0
        for s in range(services):
            f.write(f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: bench}}\n"
                    f"spec: {{selector: {{app: svc-{s}}}, ports: [{{name: http, port: 8080}}]}}\n")
            for e in range(endpoints):
                ip = pod_ip(n)
                n += 1
                f.write(f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{s}-{e}, namespace: bench, labels: {{app: svc-{s}}}}}\n"
                        f"spec: {{containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: {ip}}}\n")
                if e == 0:
                    nodes.append(f"sidecar~{ip}~svc-{s}-{e}.bench~bench.svc.cluster.local")
    return nodes


def scope(dir: Path, services: int | None) -> None:
    """A namespace-wide Sidecar importing only the first `services` Services (None: none)."""
    f = dir / "sidecar.yaml"
    if services is None:
        f.unlink(missing_ok=True)
        return
    hosts = ", ".join(f'"./svc-{i}.bench.svc.cluster.local"' for i in range(services))
    f.write_text("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: bench}\n"
                 f"spec: {{egress: [{{hosts: [{hosts}]}}]}}\n")


def one_run(args, dir: Path, nodes_file: Path, clients: int, work: Path) -> dict:
    xds = free_port()
    log = open(work / f"pilot-{clients}.log", "w")
    t0 = time.monotonic()
    pilot = subprocess.Popen(["taskset", "-c", "1", str(args.pilot), "serve", "--config", str(dir),
                              "--listen", f"127.0.0.1:{xds}", "--status-addr", f"127.0.0.1:{free_port()}", "--log-level", "warn"],
                             stdout=log, stderr=subprocess.STDOUT)
    bench = None
    extra = dir / "extra.yaml"
    try:
        wait_port(xds, pilot, 600)
        ready_ms = (time.monotonic() - t0) * 1000
        time.sleep(0.5)
        out = {"ready_ms": ready_ms, "ready_rss": kib(pilot.pid, "VmRSS") / 1024}
        cpu0 = cpu_seconds(pilot.pid)
        bench = subprocess.Popen(["taskset", "-c", "0", str(args.clients_bin), "--addr", f"127.0.0.1:{xds}",
                                  "--nodes", str(nodes_file), "-c", str(clients)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = bench.stdout.readline()
        if not line:
            raise RuntimeError(f"bench-xds-clients ended: {(work / f'pilot-{clients}.log').read_text()[-2000:]}")
        sync = json.loads(line)
        out.update(sync_ms=sync["ms"], sync_mib=sync["mib"], sync_cpu=cpu_seconds(pilot.pid) - cpu0,
                   rss=kib(pilot.pid, "VmRSS") / 1024, peak=kib(pilot.pid, "VmHWM") / 1024)
        # One more Pod behind svc-0: every sidecar gets the new endpoint.
        cpu1 = cpu_seconds(pilot.pid)
        extra.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: svc-0-extra, namespace: bench, labels: {app: svc-0}}\n"
                         "spec: {containers: [{name: app, image: app}]}\nstatus: {podIP: 10.250.250.250}\n")
        bench.stdin.write("changed\n")
        bench.stdin.flush()
        upd = json.loads(bench.stdout.readline())
        out.update(update_ms=upd["ms"], update_cpu=cpu_seconds(pilot.pid) - cpu1)
        return out
    finally:
        extra.unlink(missing_ok=True)
        for p in (bench, pilot):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--clients", type=int, action="append")
    ap.add_argument("--scope", type=int, help="also run with a Sidecar importing only this many services")
    ap.add_argument("--pilot", type=Path, default=REPO / "target/release/ferry-pilot")
    ap.add_argument("--clients-bin", type=Path, default=REPO / "target/release/bench-xds-clients")
    args = ap.parse_args()
    for b in (args.pilot, args.clients_bin):
        if not b.exists():
            print(f"missing {b}: cargo build --release -p ferry-pilot -p ferry-benches --bins", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="ferry-pilot-bench-"))
    dir = work / "config"
    dir.mkdir()
    nodes = mesh(dir, args.services, args.endpoints)
    nodes_file = work / "nodes.txt"
    nodes_file.write_text("\n".join(nodes) + "\n")
    rows = []
    runs = [(c, None) for c in args.clients or [1, 100]]
    if args.scope:
        runs += [(c, args.scope) for c in args.clients or [100]]
    for c, scoped in runs:
        scope(dir, scoped)
        r = one_run(args, dir, nodes_file, c, work)
        label = f"{c}" + (f", Sidecar imports {scoped} services" if scoped else "")
        print(f"{label} clients: {json.dumps({k: round(v, 1) for k, v in r.items()})}", flush=True)
        rows.append((label, r))
    print(f"\nmesh: {args.services} services x {args.endpoints} endpoints ({args.services * args.endpoints} pods)")
    print("| proxies | ready ms / RSS MiB | all synced ms | pilot CPU s | pushed MiB | RSS / peak MiB | one Pod added: all pushed ms / CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c, r in rows:
        print(f"| {c} | {r['ready_ms']:.0f} / {r['ready_rss']:.1f} | {r['sync_ms']:.0f} | {r['sync_cpu']:.2f} | {r['sync_mib']:.1f} | "
              f"{r['rss']:.1f} / {r['peak']:.1f} | {r['update_ms']:.0f} / {r['update_cpu']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
