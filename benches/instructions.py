#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: Ferry and Envoy alike.

Wall-clock figures on a shared 2-core machine drift by more than the changes
being measured; the number of instructions a proxy executes per request does
not. Each proxy runs under `valgrind --tool=callgrind` with one worker in front
of nginx serving a 1 KiB file; h2load sends N requests (HTTP/1.1 keep-alive over
10 connections, or h2c with 10 connections x 10 streams); the proxy is stopped
with SIGTERM. The figure is (instructions at N=3000 - at N=1000) / 2000, which
cancels start-up, configuration and exit.

User-space instructions only: the socket calls' kernel time is not counted, and
it is the same work for both proxies.

    python3 benches/instructions.py [--ferry F] [--envoy E] [--only h1|h2]

Needs valgrind, nginx and h2load (Debian: valgrind, nginx-light, nghttp2-client).
This is an instrument, not a test: it asserts nothing about speed.
Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("FERRY_TOOLS", REPO / "target" / "tools"))
PROXY_PORT = 18180
NGINX_PORT = 18181
ADMIN_PORT = 18190
COUNTS = (1000, 3000)

BOOTSTRAP = f"""static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {PROXY_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: nginx}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: nginx
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: nginx
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {NGINX_PORT}}}}}}}}}]}}]
"""


def nginx_conf(d: Path) -> str:
    return f"""worker_processes 1;
daemon on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;
  uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{NGINX_PORT}; location / {{ root {d}; try_files /body.txt =404; }} }}
}}
"""


def wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port} after {timeout:.0f} s")


def instructions(cmd: list[str], mode: str, n: int, d: Path, tag: str) -> int:
    """Total instructions of one proxy run serving `n` requests."""
    log = d / f"{tag}-{mode}-{n}.log"
    env = dict(os.environ, MIMALLOC_ARENA_EAGER_COMMIT="0")
    with open(log, "w") as out:
        p = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/{tag}-{mode}-{n}.out", *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_port(PROXY_PORT, 120)
            load = ["h2load", "-n", str(n), "-c", "10"]
            load += ["--h1"] if mode == "h1" else ["-m", "10"]
            r = subprocess.run([*load, f"http://127.0.0.1:{PROXY_PORT}/"], capture_output=True, text=True)
            done = re.search(r"(\d+) succeeded", r.stdout)
            if r.returncode != 0 or not done or int(done.group(1)) != n:
                raise SystemExit(f"{tag} {mode}: h2load did not complete {n} requests:\n{r.stdout}{r.stderr}")
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
    m = re.search(r"I\s+refs:\s+([\d,]+)", log.read_text())
    if not m:
        raise SystemExit(f"{tag} {mode}: no instruction count in {log}")
    return int(m.group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ferry", type=Path, default=REPO / "target" / "release" / "ferry")
    p.add_argument("--envoy", type=Path, default=TOOLS / "envoy")
    p.add_argument("--only", action="append", choices=("h1", "h2"))
    p.add_argument("--targets", default="ferry,envoy", help="comma-separated subset of ferry,envoy")
    a = p.parse_args()
    for tool in ("valgrind", "nginx", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    d = Path(tempfile.mkdtemp(prefix="ferry-instructions-"))
    for sub in "bpfus":
        (d / sub).mkdir()
    (d / "body.txt").write_bytes(b"x" * 1024)
    (d / "boot.yaml").write_text(BOOTSTRAP)
    (d / "nginx.conf").write_text(nginx_conf(d))
    # nginx's workers run as nobody: they must reach the body.
    os.chmod(d, 0o755)
    subprocess.run(["nginx", "-c", str(d / "nginx.conf")], check=True)
    commands = {
        "ferry": [
            str(a.ferry), "gateway", "--config", str(d / "boot.yaml"), "--concurrency", "1",
            "--drain-timeout", "100ms", "--admin-addr", f"127.0.0.1:{ADMIN_PORT}",
            "--ready-addr", "off", "--prometheus-addr", "off", "--status-addr", "off",
        ],
        "envoy": [
            str(a.envoy), "-c", str(d / "boot.yaml"), "--concurrency", "1",
            "--admin-address-path", "/dev/null", "-l", "error",
        ],
    }
    targets = [t for t in a.targets.split(",") if t]
    rows = []
    try:
        for mode in a.only or ["h1", "h2"]:
            per = {}
            for t in targets:
                low, high = (instructions(commands[t], mode, n, d, t) for n in COUNTS)
                per[t] = (high - low) / (COUNTS[1] - COUNTS[0])
                print(f"{mode} {t}: {per[t]:,.0f} instructions per request", file=sys.stderr)
            rows.append((mode, per))
    finally:
        with open(d / "nginx.pid") as f:
            os.kill(int(f.read().strip()), signal.SIGQUIT)
    print("| protocol | " + " | ".join(targets) + (" | ferry/envoy |" if len(targets) == 2 else " |"))
    print("| --- |" + " ---: |" * (len(targets) + (1 if len(targets) == 2 else 0)))
    for mode, per in rows:
        cells = [f"{per[t]:,.0f}" for t in targets]
        if len(targets) == 2:
            cells.append(f"{per['ferry'] / per['envoy']:.2f}×")
        name = "HTTP/1.1 keep-alive" if mode == "h1" else "h2c, 10 streams per connection"
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nCommand: `benches/instructions.py {' '.join(sys.argv[1:])}`; work files in {d}")


if __name__ == "__main__":
    main()
