#!/usr/bin/env python3
"""Side-by-side load harness: the same traffic direct, through Ferry and through Envoy.

One run interleaves the targets (direct, ferry, envoy, direct, ferry, envoy, ...)
for every scenario and round, so slow drift of the machine (thermal state, a
neighbour's build) lands on all targets alike instead of on whichever ran last.

Scenarios:
  http1  wrk, HTTP/1.1 keep-alive, 50 connections        -> listener "http1" -> cluster backend (HTTP/1.1)
  h2     h2load, h2c prior knowledge, 10 conns x 10 streams -> listener "h2" -> cluster backend_h2 (h2c)
  tcp    bench-tcp-client, 64-byte echo request/response   -> listener "tcp" (tcp_proxy) -> backend_tcp
  hbone  wrk as http1 -> client sidecar's listener "hbone_out" -> a service whose endpoint is an
         internal address to "connect_originate" -> HTTP/2 CONNECT over mutual TLS 1.3 to the
         server sidecar's "connect_terminate" -> internal listener "main_internal" -> backend
         (istiod's ambient shapes; CPU and RSS are the two sidecars' sum)
  observe  as http1, with tracing (OpenTelemetry over OTLP/gRPC, 1% random sampling, to a sink
         this harness serves) and a file access log (Envoy's default format) on the listener:
         compare its rps and CPU per request with http1's (both off) from the same run

Both proxies get the same Envoy v3 static bootstrap, are pinned to one core and
run one worker; the load generator and the backend share the other core. Every
(round, scenario, target) starts a fresh proxy, so "RSS idle" is measured on a
proxy that has served nothing and "RSS peak" (VmHWM) belongs to that scenario.

This is an instrument, not a test: it asserts nothing about speed.
Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("FERRY_TOOLS", REPO / "target" / "tools"))
SCENARIOS = ("http1", "h2", "tcp", "istio20", "mtls", "hbone", "handshake", "resume", "idle", "observe", "rate1k")
# Scenarios with two proxies: a client sidecar in front of a server sidecar.
TWO_PROXY = ("mtls", "hbone")
# Scenarios without a direct target (the backend speaks no TLS).
PROXY_ONLY = ("handshake", "resume", "idle")
# rate1k: the fixed request rate and the connections carrying it.
RATE_RPS = 1000
RATE_CLIENTS = 10
# What the idle scenario holds, one kind after the other.
IDLE_KINDS = ("http1", "h2", "tcp", "mtls", "hbone")
TARGETS = ("direct", "ferry", "envoy")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Background CPU (% of one core) above which a round is flagged: loopback softirq
# work the kernel does not charge to our processes stays below this on a quiet machine.
NOISY_PCT = 10
# What bench-backend answers; the preflight checks it came from there and not from the proxy.
BACKEND_BODY = b"hello from the ferry bench backend\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class HarnessError(Exception):
    """A failure the user must fix before numbers mean anything (missing tool, bad config)."""


# --------------------------------------------------------------------------- processes

_children: list[subprocess.Popen] = []


def spawn(argv: list[str], logfile: Path) -> subprocess.Popen:
    with open(logfile, "wb") as out:
        # Own session: a Ctrl-C in the terminal reaches only the harness, which then
        # stops its children in order instead of leaving a half-killed set behind.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(reversed(_children)):
        stop(proc, grace=2.0)


def _on_signal(signum, _frame):
    # SystemExit unwinds through the finally blocks and atexit, which stop the children.
    raise SystemExit(128 + signum)


_ISSUED: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n distinct free ports, none handed out before by this run: the
    sockets stay bound until all are chosen (a port let go at once may be
    the kernel's next answer), and a port issued earlier (its listener may
    not be up yet) is never issued again."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _ISSUED:
                _ISSUED.add(port)
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def wait_for_port(port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on :{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on :{port} within {timeout:.0f}s")


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def machine_busy_ticks() -> int:
    """All CPUs' busy time (everything but idle and iowait), in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: guest time is already in user.
    return sum(fields[:3]) + sum(fields[5:8])


class Background:
    """How much CPU something other than the harness used during a measurement.

    The machine is shared (builds, other jobs); a run that had a neighbour on the
    proxy's core is slower for reasons that are not the proxy's. The harness cannot
    prevent that, but it can say so next to the number.
    """

    def __init__(self, pids: list[int]):
        self.pids = pids

    def _ours(self) -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        ticks = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                ticks += cpu_ticks(pid)
        return ticks / CLK_TCK + children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime

    def __enter__(self) -> Background:
        self.busy0, self.ours0, self.t0 = machine_busy_ticks(), self._ours(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy = (machine_busy_ticks() - self.busy0) / CLK_TCK
        ours = self._ours() - self.ours0
        # Percent of one core; kernel network work done outside our processes' accounting
        # shows up here too, so a few percent is the floor, not a neighbour.
        self.pct = max(0.0, busy - ours) / (time.monotonic() - self.t0) * 100


def wait_until_quiet(max_wait: float) -> None:
    """Waits (at most max_wait seconds) for a second in which the machine is idle.

    Only the backend is running here and it is idle, so whatever is busy belongs to
    someone else. A neighbour that is still busy after max_wait is measured through,
    and the background column of that round says so.
    """
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        before = machine_busy_ticks()
        time.sleep(1.0)
        busy_pct = (machine_busy_ticks() - before) * 100 / CLK_TCK
        if busy_pct <= NOISY_PCT:
            return
        if time.monotonic() >= deadline:
            log(f"  machine still {busy_pct:.0f}% busy after {max_wait:.0f}s; measuring anyway")
            return
        if not announced:
            log(f"  machine {busy_pct:.0f}% busy with other work; waiting up to {max_wait:.0f}s for it to quiet down")
            announced = True


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


# --------------------------------------------------------------------------- config


@dataclass
class Ports:
    admin: int
    http1: int
    h2: int
    tcp: int
    istio20: int
    mtls: int
    mtls_out: int
    observe: int
    hbone: int
    hbone_out: int
    hbone_tcp: int
    # Where the client sidecar's mTLS cluster points: the server sidecar's mTLS
    # listener (its own when the process plays both roles).
    mtls_peer: int = 0
    # Where the client sidecar's connect_originate cluster tunnels to: the server
    # sidecar's connect_terminate listener (istiod's port 15008).
    hbone_peer: int = 0

    @staticmethod
    def fresh() -> Ports:
        p = Ports(*free_ports(11))
        p.mtls_peer = p.mtls
        p.hbone_peer = p.hbone
        return p

    def for_scenario(self, scenario: str) -> int:
        return {
            "http1": self.http1,
            "rate1k": self.http1,
            "observe": self.observe,
            "h2": self.h2,
            "tcp": self.tcp,
            "istio20": self.istio20,
            "mtls": self.mtls_out,
            "hbone": self.hbone_out,
            "handshake": self.mtls,
            "resume": self.mtls,
        }[scenario]


@dataclass
class Certs:
    """Istio-shaped workload certificates: one CA, a server and a client leaf
    with SPIFFE URI SANs (the server's also has a DNS name for clients that
    check one). Both proxies get the same files."""

    dir: Path
    key: str

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def cert(self, role: str) -> Path:
        return self.dir / f"{role}.pem"

    def keyfile(self, role: str) -> Path:
        return self.dir / f"{role}.key"


SPIFFE = "spiffe://cluster.local/ns/bench/sa/{role}"
SERVER_DNS = "server.bench.local"


def make_certs(dir: Path, key: str) -> Certs:
    """RSA 2048 (Istio's default workload key) or ECDSA P-256, with openssl."""
    if shutil.which("openssl") is None:
        raise HarnessError("openssl not found (install: apt-get install -y openssl)")
    dir.mkdir(parents=True, exist_ok=True)
    newkey = ["-newkey", "rsa:2048"] if key == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]

    def run(argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=dir)
        if done.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} failed:\n{done.stderr}")

    run(["openssl", "req", "-x509", *newkey, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
         "-subj", "/O=ferry-bench/CN=ferry-bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])  # fmt: skip
    for role in ("server", "client"):
        san = f"URI:{SPIFFE.format(role=role)}" + (f",DNS:{SERVER_DNS}" if role == "server" else "")
        (dir / f"{role}.ext").write_text(
            f"subjectAltName=critical,{san}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        run(["openssl", "req", *newkey, "-nodes", "-keyout", f"{role}.key", "-out", f"{role}.csr",
             "-subj", "/O=ferry-bench"])  # fmt: skip
        run(["openssl", "x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{role}.pem", "-days", "30", "-extfile", f"{role}.ext"])  # fmt: skip
    return Certs(dir, key)


# Where the HTTP/2 (h2c) upstream listens when it is not the HTTP/1.1 port: nginx
# serves h2c prior knowledge on a port of its own; bench-backend serves both on one.
UPSTREAM: dict[str, int | None] = {"h2_port": None}


# Where the observe scenario's spans go (an OTLP/gRPC sink in this process) and its
# access log file; set by run() before any proxy starts.
OBSERVE = {"otlp_port": 0, "access_log": "/dev/null"}


def observe_block() -> str:
    """Tracing at 1% to the OTLP sink and a file access log, as istiod would set them
    (Telemetry API, OpenTelemetry provider, randomSamplingPercentage: 1)."""
    return f"""\
          tracing:
            random_sampling: {{ value: 1 }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {{ envoy_grpc: {{ cluster_name: otlp }}, timeout: 1s }}
                service_name: ferry-bench
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {OBSERVE["access_log"]}
"""


def http_listener(name: str, port: int, cluster: str, observed: bool = False) -> str:
    return f"""\
  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
{observe_block() if observed else ""}          route_config:
            name: {name}_routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


ISTIO_HOST = "reviews.default.svc.cluster.local"


def tcp_listener(name: str, port: int, cluster: str) -> str:
    return f"""\
  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"""


def istio_listener(name: str, port: int, cluster: str) -> str:
    """An HTTP listener whose route table looks like what istiod makes of a
    VirtualService with 20 matches: header, prefix and regex matches tried in
    order before the default route, Istio's retry policy and domains."""
    routes = []
    for i in range(19):
        if i % 3 == 0:
            m = f'{{ prefix: "/", headers: [{{ name: end-user, string_match: {{ exact: "user{i}" }} }}] }}'
        elif i % 3 == 1:
            m = f'{{ prefix: "/api/v{i}/" }}'
        else:
            m = f'{{ safe_regex: {{ regex: "/shard-{i}/[0-9]+" }} }}'
        routes.append(f"""\
              - match: {m}
                route: {{ cluster: {cluster}, timeout: 0s }}
""")
    retry = """retry_policy: { retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", num_retries: 2, retry_host_predicate: [{ name: envoy.retry_host_predicates.previous_hosts, typed_config: { "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate } }], host_selection_retry_max_attempts: "5" }"""
    return f"""\
  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            name: "9080"
            ignore_port_in_host_matching: true
            validate_clusters: false
            virtual_hosts:
            - name: {ISTIO_HOST}:9080
              domains: ["{ISTIO_HOST}", "reviews", "reviews.default", "reviews.default.svc", "10.96.0.20"]
              routes:
""" + "".join(routes) + f"""\
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s, {retry} }}
            - name: allow_any
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def tls_files(certs: Certs, role: str, indent: int) -> str:
    pad = " " * indent
    return (
        f"{pad}tls_certificates:\n"
        f"{pad}- certificate_chain: {{ filename: {certs.cert(role)} }}\n"
        f"{pad}  private_key: {{ filename: {certs.keyfile(role)} }}\n"
        f"{pad}validation_context:\n"
        f"{pad}  trusted_ca: {{ filename: {certs.ca} }}\n"
        f"{pad}  match_typed_subject_alt_names:\n"
        f"{pad}  - san_type: URI\n"
    )


def mtls_listeners(ports: Ports, certs: Certs) -> str:
    """The two ends of Istio's mutual TLS between sidecars.

    "mtls" is the server sidecar's inbound listener: TLS that requires a client
    certificate from the mesh CA with a SPIFFE identity, then the HTTP connection
    manager to the backend. "mtls_out" is the client sidecar's outbound
    listener: plaintext HTTP from the app, routed to the cluster "mtls_server",
    which originates mTLS to the server sidecar and checks its SPIFFE identity.
    """
    return f"""\
  - name: mtls
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {ports.mtls} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
{tls_files(certs, "server", 12)}\
                matcher: {{ prefix: "spiffe://cluster.local/" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          codec_type: AUTO
          route_config:
            name: mtls_routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
""" + http_listener("mtls_out", ports.mtls_out, "mtls_server")


def mtls_cluster(ports: Ports, certs: Certs) -> str:
    return f"""\
  - name: mtls_server
    type: STATIC
    connect_timeout: 1s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.8080_._.server.bench.svc.cluster.local
        common_tls_context:
          alpn_protocols: ["istio-http/1.1", "istio", "http/1.1"]
{tls_files(certs, "client", 10)}\
              matcher: {{ exact: "{SPIFFE.format(role="server")}" }}
    load_assignment:
      cluster_name: mtls_server
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {ports.mtls_peer} }}
"""


def static_cluster(name: str, port: int, extra: str = "") -> str:
    return f"""\
  - name: {name}
    type: STATIC
    connect_timeout: 1s
{extra}    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"""


H2_UPSTREAM = """\
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
"""

# The idle scenario holds more proxied TCP connections, each with its own upstream
# connection, than the default circuit breaker's 1024 upstream connections.
MANY_CONNECTIONS = """\
    circuit_breakers:
      thresholds:
      - { max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000 }
"""


def raw_buffer(indent: int) -> str:
    pad = " " * indent
    return (
        f"{pad}name: envoy.transport_sockets.raw_buffer\n"
        f"{pad}typed_config:\n"
        f'{pad}  "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer\n'
    )


def hbone_listeners(ports: Ports, certs: Certs, backend_http: int, backend_echo: int) -> str:
    """istiod's ambient shapes for a sidecar with ENABLE_HBONE, both roles.

    Client role: "hbone_out" (HTTP, as the app's outbound listener) and "hbone_tcp"
    (TCP) route to service clusters whose endpoints are internal addresses to the
    "connect_originate" internal listener, which tunnels to the pod address in the
    endpoint's metadata with HTTP/2 CONNECT. Server role: "connect_terminate" takes
    CONNECT over mutual TLS 1.3, hands the authority and the caller to "main_internal"
    through filter state, whose chains (limited to the pod's IP and port) carry the
    stream to the backend: HTTP through a connection manager, TCP through tcp_proxy.
    """
    sfs = lambda key, fmt: (  # noqa: E731
        f"""\
                - object_key: {key}
                  format_string: {{ text_format_source: {{ inline_string: "{fmt}" }} }}
                  shared_with_upstream: ONCE
"""
    )
    return (
        http_listener("hbone_out", ports.hbone_out, "hbone_service")
        + tcp_listener("hbone_tcp", ports.hbone_tcp, "hbone_service_tcp")
        + f"""\
  - name: connect_originate
    internal_listener: {{}}
    use_original_dst: false
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
      - name: tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: connect_originate
          cluster: connect_originate
          tunneling_config: {{ hostname: "%DOWNSTREAM_LOCAL_ADDRESS%" }}
  - name: connect_terminate
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {ports.hbone} }}
    filter_chains:
    - transport_socket:
        name: tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
            alpn_protocols: ["h2"]
{tls_files(certs, "server", 12)}\
                matcher: {{ prefix: "spiffe://cluster.local/" }}
      filters:
      - name: connect_terminate
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect_terminate
          http2_protocol_options: {{ allow_connect: true, max_concurrent_streams: 100 }}
          upgrade_configs: [{{ upgrade_type: CONNECT }}]
          stream_idle_timeout: 0s
          use_remote_address: false
          route_config:
            name: default
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route:
                  cluster: main_internal
                  upgrade_configs: [{{ upgrade_type: CONNECT, connect_config: {{}} }}]
          http_filters:
          - name: connect_authority
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
              on_request_headers:
"""
        + sfs("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%")
        + sfs("envoy.filters.listener.original_dst.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%")
        + f"""\
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: main_internal
    internal_listener: {{}}
    traffic_direction: INBOUND
    continue_on_listener_filters_timeout: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - name: inbound_http
      filter_chain_match:
        destination_port: {backend_http}
        prefix_ranges: [{{ address_prefix: 127.0.0.1, prefix_len: 32 }}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_http
          route_config:
            name: inbound
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: inbound_tcp
      filter_chain_match:
        destination_port: {backend_echo}
        prefix_ranges: [{{ address_prefix: 127.0.0.1, prefix_len: 32 }}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound_tcp
          cluster: backend_tcp
"""
    )


def hbone_service_cluster(name: str, pod_port: int) -> str:
    """A service whose one endpoint is an ambient pod, as EDS gives it (endpoint_builder.go):
    an internal address to connect_originate, the pod address as original_dst metadata,
    and istiod's transport socket matches (cluster_tls.go)."""
    return f"""\
  - name: {name}
    type: STATIC
    connect_timeout: 2s
{MANY_CONNECTIONS}\
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{ server_listener_name: connect_originate, endpoint_id: "127.0.0.1:{pod_port}" }}
          metadata:
            filter_metadata:
              envoy.filters.listener.original_dst: {{ local: "127.0.0.1:{pod_port}" }}
              envoy.transport_socket_match: {{ tunnel: http }}
    transport_socket_matches:
    - name: hbone
      match: {{ tunnel: http }}
      transport_socket:
        name: internal_upstream
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
          passthrough_metadata:
          - {{ kind: {{ host: {{}} }}, name: envoy.filters.listener.original_dst }}
          transport_socket:
{raw_buffer(12)}\
    - name: tlsMode-disabled
      match: {{}}
      transport_socket:
{raw_buffer(8)}\
"""


def hbone_clusters(ports: Ports, certs: Certs, backend_http: int, backend_echo: int) -> str:
    return (
        hbone_service_cluster("hbone_service", backend_http)
        + hbone_service_cluster("hbone_service_tcp", backend_echo)
        + f"""\
  - name: connect_originate
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    cleanup_interval: 60s
{MANY_CONNECTIONS}\
    original_dst_lb_config:
      upstream_port_override: {ports.hbone_peer}
      metadata_key: {{ key: envoy.filters.listener.original_dst, path: [{{ key: waypoint }}] }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{ idle_timeout: 3600s }}
        explicit_http_config:
          http2_protocol_options: {{ allow_connect: true }}
    transport_socket:
      name: tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
          alpn_protocols: ["h2"]
{tls_files(certs, "client", 10)}\
              matcher: {{ prefix: "spiffe://cluster.local/" }}
  - name: main_internal
    type: STATIC
    connect_timeout: 2s
{MANY_CONNECTIONS}\
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              envoy_internal_address: {{ server_listener_name: main_internal }}
    transport_socket:
      name: internal_upstream
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
        transport_socket:
{raw_buffer(10)}\
"""
    )


# Internal listeners need this bootstrap extension in Envoy (Ferry accepts it).
INTERNAL_LISTENER_EXTENSION = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
    value: { buffer_size_kb: 64 }
"""


def bootstrap_yaml(ports: Ports, backend_http: int, backend_echo: int, certs: Certs, hbone: bool = False) -> str:
    """Plain Envoy v3 static bootstrap; deliberately nothing Envoy-only beyond defaults.
    With hbone, also istiod's ambient listeners and clusters (only then, so the other
    scenarios' memory figures stay those of a plain bootstrap)."""
    return (
        f"""\
# Generated by benches/load.py: the same file is given to Envoy and to Ferry.
node:
  id: ferry-bench
  cluster: ferry-bench
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {ports.admin} }}
static_resources:
  listeners:
"""
        + http_listener("http1", ports.http1, "backend")
        + http_listener("h2", ports.h2, "backend_h2")
        + http_listener("observe", ports.observe, "backend", observed=True)
        + istio_listener("istio20", ports.istio20, "backend")
        + mtls_listeners(ports, certs)
        + (hbone_listeners(ports, certs, backend_http, backend_echo) if hbone else "")
        + tcp_listener("tcp", ports.tcp, "backend_tcp")
        + """\
  clusters:
"""
        + static_cluster("backend", backend_http)
        + static_cluster("backend_h2", UPSTREAM["h2_port"] or backend_http, H2_UPSTREAM)
        + static_cluster("backend_tcp", backend_echo, MANY_CONNECTIONS)
        + static_cluster("otlp", OBSERVE["otlp_port"], H2_UPSTREAM)
        + mtls_cluster(ports, certs)
        + (hbone_clusters(ports, certs, backend_http, backend_echo) + INTERNAL_LISTENER_EXTENSION if hbone else "")
    )


# --------------------------------------------------------------------------- load tools


@dataclass
class LoadResult:
    requests: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk_latency_ms(text: str, pct: str) -> float | None:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else None


def parse_wrk(text: str) -> LoadResult:
    reqs = re.search(r"^\s*(\d+) requests in", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not reqs or not rps:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    return LoadResult(
        requests=int(reqs.group(1)),
        rps=float(rps.group(1)),
        p50_ms=_wrk_latency_ms(text, "50"),
        p99_ms=_wrk_latency_ms(text, "99"),
        errors=errors,
    )


def nearest_rank(sorted_values: list[int], pct: float) -> int | None:
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), -(-int(pct * len(sorted_values)) // 100)))
    return sorted_values[rank - 1]


def parse_h2load(text: str, log_file: Path) -> LoadResult:
    # h2load prints no percentiles; its per-request log has the durations.
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not m or not fin or not codes:
        raise RuntimeError(f"unexpected h2load output:\n{text}")
    durations: list[int] = []
    with open(log_file) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] != "-1":
                durations.append(int(parts[2]))
    durations.sort()
    p50 = nearest_rank(durations, 50)
    p99 = nearest_rank(durations, 99)
    errors = int(m.group(3)) + int(m.group(4)) + int(codes.group(3)) + int(codes.group(4))
    return LoadResult(
        requests=int(m.group(2)),
        rps=float(fin.group(2)),
        p50_ms=p50 / 1000 if p50 is not None else None,
        p99_ms=p99 / 1000 if p99 is not None else None,
        errors=errors,
    )


def parse_tcp_client(text: str) -> LoadResult:
    line = next((ln for ln in text.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"unexpected bench-tcp-client output:\n{text}")
    r = json.loads(line)
    ms = lambda us: us / 1000 if us is not None else None  # noqa: E731
    return LoadResult(r["requests"], r["rps"], ms(r["p50_us"]), ms(r["p99_us"]), r["errors"])


@dataclass
class Settings:
    duration: int
    warmup: int
    load_cpu: str
    wrk_connections: int
    h2_clients: int
    h2_streams: int
    tcp_connections: int
    tcp_size: int
    tcp_client: Path
    tls_client: Path
    tls_connections: int
    tmp: Path
    quiet_wait: float
    certs: Certs
    idle_conns: int
    idle_tcp_conns: int
    idle_concurrency: int
    backend_pids: list[int] = field(default_factory=list)


def run_load(s: Settings, scenario: str, port: int, seconds: int, measure: bool) -> LoadResult | None:
    if seconds == 0:
        return None
    pin = ["taskset", "-c", s.load_cpu]
    url = f"http://127.0.0.1:{port}/"
    if scenario in ("http1", "mtls", "hbone", "observe"):
        argv = pin + ["wrk", "-t1", f"-c{s.wrk_connections}", f"-d{seconds}s", "--latency", url]
    elif scenario == "istio20":
        argv = pin + ["wrk", "-t1", f"-c{s.wrk_connections}", f"-d{seconds}s", "--latency",
                      "-H", f"Host: {ISTIO_HOST}:9080", "-H", "end-user: anonymous", url + "reviews/1"]
    elif scenario == "h2":
        log_file = s.tmp / "h2load.log"
        argv = pin + ["h2load", "-t1", f"-c{s.h2_clients}", f"-m{s.h2_streams}", "-D", str(seconds)]
        if measure:
            argv += ["--log-file", str(log_file)]
        argv.append(url)
    elif scenario == "rate1k":
        # A fixed rate far below saturation: what a proxy adds to each request's latency.
        log_file = s.tmp / "h2load.log"
        argv = pin + ["h2load", "--h1", "-t1", f"-c{RATE_CLIENTS}", f"--rps={RATE_RPS // RATE_CLIENTS}",
                      "-D", str(seconds)]
        if measure:
            argv += ["--log-file", str(log_file)]
        argv.append(url)
    elif scenario in ("handshake", "resume"):
        c = s.certs
        argv = pin + [
            str(s.tls_client),
            "--addr", f"127.0.0.1:{port}",
            "--ca", str(c.ca), "--cert", str(c.cert("client")), "--key", str(c.keyfile("client")),
            "--server-name", SERVER_DNS,
            "--connections", str(s.tls_connections),
            "--duration", f"{seconds}s",
        ] + (["--resume"] if scenario == "resume" else [])  # fmt: skip
    else:
        argv = pin + [
            str(s.tcp_client),
            "--addr", f"127.0.0.1:{port}",
            "--connections", str(s.tcp_connections),
            "--size", str(s.tcp_size),
            "--duration", f"{seconds}s",
        ]  # fmt: skip
    # Generous timeout: a load tool hanging on a wedged proxy must not hang the run.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if not measure:
        return None
    out = done.stdout + done.stderr
    if scenario in ("http1", "istio20", "mtls", "hbone", "observe"):
        return parse_wrk(out)
    if scenario in ("h2", "rate1k"):
        try:
            return parse_h2load(out, log_file)
        finally:
            log_file.unlink(missing_ok=True)
    return parse_tcp_client(out)


def preflight(scenario: str, port: int, certs: Certs | None = None) -> None:
    """One request through the listener, so a proxy answering 503 fast is not benchmarked."""
    if scenario in ("handshake", "resume"):
        import ssl

        assert certs is not None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with idle_tls_context(certs).wrap_socket(raw, server_hostname=SERVER_DNS) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                    if BACKEND_BODY in got:
                        break
        if not got.startswith(b"HTTP/1.1 200") or BACKEND_BODY not in got:
            raise RuntimeError(f"mTLS listener :{port} answered {got[:80]!r}, not the backend's body")
        del ssl
        return
    if scenario == "tcp":
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping")
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    break
                got += chunk
        if got != b"ping":
            raise RuntimeError(f"tcp listener :{port} echoed {got!r}, expected b'ping'")
        return
    # Over HTTP/1.1 also for the h2 listener (codec AUTO): it checks the route and
    # the h2 upstream; h2load's status counts check the h2c downstream side.
    req = urllib.request.Request(f"http://127.0.0.1:{port}/reviews/1")  # mtls, hbone: via both sidecars
    if scenario == "istio20":
        req.add_header("Host", f"{ISTIO_HOST}:9080")
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
        if resp.status != 200 or body != BACKEND_BODY:
            raise RuntimeError(
                f"{scenario} listener :{port} answered {resp.status} {body[:80]!r}, not the backend's body"
            )


# --------------------------------------------------------------------------- idle connections

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


async def _read_http1_response(reader) -> bool:
    """One Content-Length framed HTTP/1.1 response; True if it is a 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")


async def _h2_exchange(reader, writer) -> bool:
    """Preface, SETTINGS, one GET on stream 1 (HPACK: :method GET, :scheme http,
    :path /, :authority literal), frames read until stream 1 ends; SETTINGS are
    acknowledged as a client must."""
    block = b"\x82\x86\x84\x01" + bytes([len(b"bench")]) + b"bench"
    writer.write(H2_PREFACE + h2_frame(0x4, 0, 0) + h2_frame(0x1, 0x5, 1, block))
    ok = False
    while True:
        head = await reader.readexactly(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
        payload = await reader.readexactly(length)
        if kind == 0x4 and not flags & 0x1:
            writer.write(h2_frame(0x4, 0x1, 0))
        elif kind in (0x3, 0x7):  # RST_STREAM, GOAWAY
            return False
        elif kind == 0x1 and stream == 1:
            # ":status 200" is static table entry 8, sent indexed.
            ok = payload[:1] == b"\x88"
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            await writer.drain()
            return ok


async def _open_idle(kind: str, port: int, n: int, concurrency: int, tls_ctx) -> tuple[list, int]:
    """Opens n connections of `kind`, one exchange on each, and keeps them open."""
    import asyncio

    held: list = []
    failures = 0
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal failures
        async with sem:
            try:
                if kind == "mtls":
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=tls_ctx, server_hostname=SERVER_DNS
                    )
                else:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if kind in ("http1", "mtls"):
                    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                    ok = await _read_http1_response(reader)
                elif kind == "h2":
                    ok = await _h2_exchange(reader, writer)
                else:
                    writer.write(b"ping")
                    ok = await reader.readexactly(4) == b"ping"
                held.append((reader, writer))
                if not ok:
                    failures += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                failures += 1

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=600)
    return held, failures


def idle_tls_context(certs: Certs):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.load_cert_chain(str(certs.cert("client")), str(certs.keyfile("client")))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass
class IdleSample:
    kind: str
    conns: int
    failures: int
    rss_before_kib: int
    rss_after_kib: int

    @property
    def kib_per_conn(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.conns


def measure_idle(s: Settings, kind: str, target: str, proxy: Proxy, backend_http: int, backend_echo: int,
                 round_no: int, proxy_cpu: str) -> IdleSample:
    """RSS growth of a fresh proxy while it holds s.idle_conns idle connections of
    one kind, each after one exchange: HTTP/1.1 keep-alive, h2c, TCP proxied to the
    echo backend (so with its upstream), mTLS HTTP/1.1 (the server sidecar's inbound),
    hbone: TCP through a client sidecar, tunnelled as an HTTP/2 CONNECT stream to a
    server sidecar and on to the echo backend (the two sidecars' RSS summed)."""
    import asyncio

    wait_until_quiet(s.quiet_wait)
    ports = Ports.fresh()
    hbone = kind == "hbone"
    procs: list[tuple[subprocess.Popen, list[str], Path]] = []
    port = {"http1": ports.http1, "h2": ports.h2, "tcp": ports.tcp, "mtls": ports.mtls, "hbone": ports.hbone_tcp}[kind]
    tls_ctx = idle_tls_context(s.certs) if kind == "mtls" else None
    try:
        if hbone:
            server_ports = Ports.fresh()
            procs.append(start_proxy(s, proxy, f"{target}-idle-{kind}-server-r{round_no}", server_ports,
                                     backend_http, backend_echo, proxy_cpu, server_ports.hbone, hbone))
            ports.hbone_peer = server_ports.hbone
        procs.append(start_proxy(s, proxy, f"{target}-idle-{kind}-r{round_no}", ports, backend_http, backend_echo,
                                 proxy_cpu, port, hbone))
        time.sleep(0.5)
        pids = [p.pid for p, _, _ in procs]
        logs = lambda: "\n".join(f"  log {lf}:\n{tail(lf)}" for _, _, lf in procs)  # noqa: E731
        rss = lambda: sum(status_kib(pid, "VmRSS") for pid in pids)  # noqa: E731

        async def session() -> IdleSample:
            # A few connections first, held for the whole measurement: the first
            # connection's one-off allocations (upstream pool, TLS session cache,
            # thread-local arenas) are not per-connection costs.
            warm, warm_fail = await _open_idle(kind, port, 16, 16, tls_ctx)
            if warm_fail:
                raise RuntimeError(f"{target} {kind}: {warm_fail} of 16 warm-up exchanges failed\n{logs()}")
            await asyncio.sleep(1.0)
            before = rss()
            n = s.idle_tcp_conns if kind in ("tcp", "hbone") else s.idle_conns
            held, failures = await _open_idle(kind, port, n, s.idle_concurrency, tls_ctx)
            # Let deferred work settle (Envoy's deferred deletes, timers).
            await asyncio.sleep(2.0)
            after = rss()
            alive = sum(1 for _, w in held if not w.is_closing())
            for _, w in held + warm:
                w.close()
            if any(p.poll() is not None for p, _, _ in procs):
                raise RuntimeError(f"{target} exited while holding idle connections\n{logs()}")
            return IdleSample(kind, alive, failures + (len(held) - alive), before, after)

        return asyncio.run(session())
    finally:
        for p, _, _ in reversed(procs):
            stop(p)


# --------------------------------------------------------------------------- one measurement


@dataclass
class Sample:
    load: LoadResult
    background_pct: float
    cpu_ms_per_1k: float | None = None
    rss_idle_kib: int | None = None
    rss_peak_kib: int | None = None


@dataclass
class Proxy:
    name: str
    argv: list[str]  # with {config} standing for the bootstrap path
    disabled: dict[str, str] = field(default_factory=dict)  # scenario -> reason


def start_proxy(s: Settings, proxy: Proxy, name: str, ports: Ports, backend_http: int, backend_echo: int,
                proxy_cpu: str, wait_port: int, hbone: bool = False) -> tuple[subprocess.Popen, list[str], Path]:
    config = s.tmp / f"{name}.yaml"
    config.write_text(bootstrap_yaml(ports, backend_http, backend_echo, s.certs, hbone))
    logfile = config.with_suffix(".log")
    argv = ["taskset", "-c", proxy_cpu] + [a.replace("{config}", str(config)) for a in proxy.argv]
    proc = spawn(argv, logfile)
    try:
        wait_for_port(wait_port, proc, 20, proxy.name)
    except Exception as err:
        stop(proc)
        raise RuntimeError(f"{err}\n  command: {' '.join(argv)}\n  log {logfile}:\n{tail(logfile)}") from err
    return proc, argv, logfile


def measure(
    s: Settings,
    scenario: str,
    target: str,
    proxy: Proxy | None,
    backend_http: int,
    backend_echo: int,
    round_no: int,
    proxy_cpu: str,
) -> Sample:
    direct_port = {"tcp": backend_echo, "h2": UPSTREAM["h2_port"] or backend_http}.get(scenario, backend_http)
    wait_until_quiet(s.quiet_wait)
    if proxy is None:
        run_load(s, scenario, direct_port, s.warmup, measure=False)
        with Background(s.backend_pids) as bg:
            result = run_load(s, scenario, direct_port, s.duration, measure=True)
        assert result is not None
        return Sample(result, bg.pct)

    # Fresh ports per start: no TIME_WAIT interplay with the previous proxy's sockets.
    ports = Ports.fresh()
    procs: list[tuple[subprocess.Popen, list[str], Path]] = []
    try:
        hbone = scenario == "hbone"
        if scenario in TWO_PROXY:
            # The server sidecar first, then the client sidecar whose mTLS (or HBONE)
            # cluster points at it; both on the proxy CPU, so CPU is the pair's.
            server_ports = Ports.fresh()
            server_port = server_ports.hbone if hbone else server_ports.mtls
            procs.append(start_proxy(s, proxy, f"{target}-{scenario}-server-r{round_no}", server_ports,
                                     backend_http, backend_echo, proxy_cpu, server_port, hbone))
            ports.mtls_peer = server_ports.mtls
            ports.hbone_peer = server_ports.hbone
        port = ports.for_scenario(scenario)
        procs.append(start_proxy(s, proxy, f"{target}-{scenario}-r{round_no}", ports, backend_http,
                                 backend_echo, proxy_cpu, port, hbone))
        pids = [p.pid for p, _, _ in procs]
        try:
            # Let the startup burst (config parsing, worker spawn) settle before RSS.
            time.sleep(0.5)
            rss_idle = sum(status_kib(pid, "VmRSS") for pid in pids)
            preflight(scenario, port, s.certs)
        except Exception as err:
            logs = "\n".join(f"  log {lf}:\n{tail(lf)}" for _, _, lf in procs)
            raise RuntimeError(f"{err}\n  command: {' '.join(procs[-1][1])}\n{logs}") from err
        run_load(s, scenario, port, s.warmup, measure=False)
        with Background(s.backend_pids + pids) as bg:
            before = sum(cpu_ticks(pid) for pid in pids)
            result = run_load(s, scenario, port, s.duration, measure=True)
            after = sum(cpu_ticks(pid) for pid in pids)
        assert result is not None
        for p, _, lf in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{target} exited during the run\n  log {lf}:\n{tail(lf)}")
        # The kernel folds the current RSS into VmHWM only lazily, so it can read a little
        # below a VmRSS seen earlier; the peak is at least every RSS this run observed.
        peak = max(sum(status_kib(pid, "VmHWM") for pid in pids), sum(status_kib(pid, "VmRSS") for pid in pids),
                   rss_idle)
        cpu_ms = (after - before) * 1000 / CLK_TCK
        per_1k = cpu_ms / (result.requests / 1000) if result.requests else None
        return Sample(result, bg.pct, per_1k, rss_idle, peak)
    finally:
        for p, _, _ in reversed(procs):
            stop(p)


# --------------------------------------------------------------------------- report


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


@dataclass
class Summary:
    rps: float | None
    p50: float | None
    p99: float | None
    cpu: float | None
    idle_mib: float | None
    peak_mib: float | None
    errors: int
    background: float | None
    rounds: int
    rps_all: list[str]


def summarize(all_samples: list[Sample]) -> Summary | None:
    if not all_samples:
        return None
    # A round in which a neighbour took CPU measures the neighbour as much as the proxy;
    # when the run has clean rounds, those alone make the numbers.
    clean = [x for x in all_samples if x.background_pct <= NOISY_PCT]
    samples = clean or all_samples
    mib = lambda kib: kib / 1024 if kib is not None else None  # noqa: E731
    peaks = [x.rss_peak_kib for x in samples if x.rss_peak_kib is not None]
    return Summary(
        rps=med([x.load.rps for x in samples]),
        p50=med([x.load.p50_ms for x in samples]),
        p99=med([x.load.p99_ms for x in samples]),
        cpu=med([x.cpu_ms_per_1k for x in samples]),
        idle_mib=mib(med([x.rss_idle_kib for x in samples])),
        # The highest high-water mark: peak memory is a worst case, not a typical one.
        peak_mib=mib(max(peaks)) if peaks else None,
        errors=sum(x.load.errors for x in all_samples),
        background=max(x.background_pct for x in all_samples),
        rounds=len(samples),
        rps_all=[f"{x.load.rps:,.0f}" + ("*" if x.background_pct > NOISY_PCT else "") for x in all_samples],
    )


SCENARIO_TITLE = {
    "http1": "HTTP/1.1 keep-alive (wrk, {wrk} connections)",
    "h2": "HTTP/2 h2c (h2load, {h2c} connections × {h2m} streams, h2 upstream)",
    "tcp": "TCP echo request/response (bench-tcp-client, {tcpc} connections, {tcps}-byte messages)",
    "istio20": "HTTP/1.1 through an Istio-shaped route table of 20 matches (wrk, {wrk} connections, default route)",
    "mtls": "HTTP/1.1 over Istio mTLS between two sidecars (wrk, {wrk} connections → client sidecar → mTLS → "
    "server sidecar → backend; CPU and RSS are the two proxies' sum)",
    "hbone": "HTTP/1.1 over HBONE between two sidecars (wrk, {wrk} connections → client sidecar → internal listener"
    " connect_originate → HTTP/2 CONNECT in mutual TLS 1.3 → server sidecar's connect_terminate → internal listener"
    " main_internal → backend; CPU and RSS are the two proxies' sum)",
    "handshake": "new mTLS connections (bench-tls-client, {tlsc} in flight: full handshake with client certificate, "
    "one request, close; rps = handshakes/s, CPU per 1k handshakes)",
    "resume": "resumed mTLS connections (as handshake, offering the server's session tickets again)",
    "observe": "HTTP/1.1 as http1 with tracing at 1% (OpenTelemetry, OTLP/gRPC to a sink) and a file access log "
    "(wrk, {wrk} connections; compare with http1 of the same run)",
    "rate1k": "HTTP/1.1 keep-alive at a fixed 1,000 requests per second (h2load --h1, 10 connections × 100 rps); "
    "the latency a proxy adds is its p50/p99 minus direct's",
}


def render_idle(s: Settings, samples: dict[str, dict[str, list[IdleSample]]], targets: list[str]) -> list[str]:
    lines = [
        f"## idle: memory per idle connection ({s.idle_conns:,} connections held per kind, one exchange each)",
        "",
        "RSS growth of a fresh proxy from before to 2 s after opening the connections (16 warm-up connections"
        " held throughout), divided by the connections still open; median over rounds."
        " tcp counts the upstream connection each proxied connection holds; mtls is the server sidecar's"
        " inbound (TLS with a client certificate, HTTP/1.1 to the backend); hbone is a TCP connection tunnelled"
        " from a client sidecar to a server sidecar as one HTTP/2 CONNECT stream (istiod's ambient shapes, at most"
        " 100 streams per mutual-TLS connection) and on to the echo backend, the two sidecars' RSS summed.",
        "",
        "| kind | " + " | ".join(f"{t} KiB/conn" for t in targets) + " | "
        + " | ".join(f"{t} RSS before → after MiB" for t in targets) + " | failures |"
        + (" ferry/envoy |" if "ferry" in targets and "envoy" in targets else ""),
        "| --- | " + " | ".join("---:" for _ in targets) + " | " + " | ".join("---" for _ in targets) + " | ---: |"
        + (" ---: |" if "ferry" in targets and "envoy" in targets else ""),
    ]
    for kind in IDLE_KINDS:
        if kind not in samples:
            continue
        per = {t: samples[kind].get(t, []) for t in targets}
        kib = {t: med([x.kib_per_conn for x in per[t]]) for t in targets}
        rss = {
            t: (f"{med([x.rss_before_kib for x in per[t]]) / 1024:.1f} → {med([x.rss_after_kib for x in per[t]]) / 1024:.1f}"
                if per[t] else "—")
            for t in targets
        }
        fails = sum(x.failures for t in targets for x in per[t])
        row = f"| {kind} | " + " | ".join(fmt(kib[t], 1) for t in targets) + " | " + " | ".join(rss[t] for t in targets)
        row += f" | {fails} |"
        if "ferry" in targets and "envoy" in targets:
            row += f" {ratio(kib['ferry'], kib['envoy'])} |"
        lines.append(row)
    lines.append("")
    return lines


def tool_version(argv: list[str], strict: bool = False) -> str:
    """First line a tool prints about its version; with strict, only if it exits 0.

    wrk has no version flag and exits non-zero while printing it, so only the
    binaries whose --version is known to succeed are held to it.
    """
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    if strict and out.returncode != 0:
        return "? (--version failed)"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def render(
    args,
    s: Settings,
    results: dict[str, dict[str, list[Sample]]],
    idle: dict[str, dict[str, list[IdleSample]]],
    notes: list[str],
    versions: dict[str, str],
    started: dt.datetime,
) -> str:
    lines = [
        f"# Load harness results — {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}",
        f"- proxy pinned to CPU {args.proxy_cpu} with one worker; load generator and backend on CPU {args.load_cpu}",
        f"- {args.rounds} round(s) × {s.duration} s per measurement (+{s.warmup} s warm-up), targets interleaved;"
        " values are medians over the rounds not marked * (over all rounds if every one is), RSS peak is the"
        " highest VmHWM among them",
        "- " + ", ".join(f"{k}: {v}" for k, v in versions.items()),
        "",
        "Latency in ms; CPU is the proxy's user+system time per 1,000 requests; RSS in MiB;"
        " background CPU is the most any round saw used outside the harness (% of one core);"
        f" a round marked * had more than {NOISY_PCT}%: a neighbour competed, its rps and latency are pessimistic.",
        "",
    ]
    for scenario in args.only:
        if scenario == "idle":
            lines += render_idle(s, idle, [t for t in args.targets if t != "direct"])
            continue
        title = SCENARIO_TITLE[scenario].format(
            wrk=s.wrk_connections, h2c=s.h2_clients, h2m=s.h2_streams, tcpc=s.tcp_connections, tcps=s.tcp_size,
            tlsc=s.tls_connections,
        )
        lines += [f"## {scenario}: {title}", ""]
        lines += [
            "| target | rps | p50 | p99 | CPU ms / 1k req | RSS idle | RSS peak | errors | rps per round "
            "| background CPU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        targets = [t for t in args.targets if not (t == "direct" and scenario in PROXY_ONLY)]
        sums = {t: summarize(results[scenario].get(t, [])) for t in targets}
        for t in targets:
            sm = sums[t]
            if sm is None:
                lines.append(f"| {t} | failed, see notes | | | | | | | | |")
                continue
            lines.append(
                f"| {t} | {fmt(sm.rps)} | {fmt(sm.p50, 3)} | {fmt(sm.p99, 3)} | {fmt(sm.cpu)} "
                f"| {fmt(sm.idle_mib, 1)} | {fmt(sm.peak_mib, 1)} | {sm.errors} "
                f"| {', '.join(sm.rps_all)} | {sm.background:.0f}% |"
            )
        lines.append("")
        pairs = [("ferry", "envoy"), ("ferry", "direct"), ("envoy", "direct")]
        pairs = [(a, b) for a, b in pairs if a in targets and b in targets]
        if pairs:
            lines += [
                "| ratio | rps | p50 | p99 | CPU / 1k req | RSS idle | RSS peak |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for a, b in pairs:
                sa, sb = sums[a], sums[b]
                g = lambda sm, k: getattr(sm, k) if sm else None  # noqa: E731
                lines.append(
                    f"| {a}/{b} | {ratio(g(sa, 'rps'), g(sb, 'rps'))} | {ratio(g(sa, 'p50'), g(sb, 'p50'))} "
                    f"| {ratio(g(sa, 'p99'), g(sb, 'p99'))} | {ratio(g(sa, 'cpu'), g(sb, 'cpu'))} "
                    f"| {ratio(g(sa, 'idle_mib'), g(sb, 'idle_mib'))} | {ratio(g(sa, 'peak_mib'), g(sb, 'peak_mib'))} |"
                )
            lines.append("")
        if scenario == "rate1k" and all(t in targets for t in ("direct", "ferry", "envoy")):
            d, f, e = sums["direct"], sums["ferry"], sums["envoy"]
            if d and f and e:
                lines += ["| added over direct | p50 | p99 |", "| --- | ---: | ---: |"]
                added = {}
                for name, sm in (("ferry", f), ("envoy", e)):
                    added[name] = {k: getattr(sm, k) - getattr(d, k) for k in ("p50", "p99")
                                   if getattr(sm, k) is not None and getattr(d, k) is not None}
                    lines.append(f"| {name} | {fmt(added[name].get('p50'), 3)} | {fmt(added[name].get('p99'), 3)} |")
                lines.append(f"| ferry/envoy | {ratio(added['ferry'].get('p50'), added['envoy'].get('p50'))} "
                             f"| {ratio(added['ferry'].get('p99'), added['envoy'].get('p99'))} |")
                lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [f"Command: `{' '.join(['benches/load.py'] + sys.argv[1:])}`", ""]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run direct, Ferry and Envoy side by side under the same load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario")
    p.add_argument("--duration", type=int, default=10, help="seconds of measured load per run")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each run")
    p.add_argument(
        "--only", action="append", choices=SCENARIOS, help="run only this scenario (repeatable); default: all"
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of direct,ferry,envoy, in run order",
    )
    p.add_argument("--ferry", type=Path, default=REPO / "target" / "release" / "ferry", help="ferry binary")
    p.add_argument("--envoy", type=Path, default=TOOLS / "envoy", help="envoy binary")
    p.add_argument(
        "--bin-dir",
        type=Path,
        default=REPO / "target" / "release",
        help="where bench-backend and bench-tcp-client are",
    )
    p.add_argument(
        "--upstream",
        choices=("bench-backend", "nginx"),
        default="bench-backend",
        help="the HTTP upstream: the project's own backend, or nginx (HTTP/1.1 and h2c on ports of their own)",
    )
    p.add_argument("--proxy-cpu", default="1", help="CPU list the proxy is pinned to")
    p.add_argument("--load-cpu", default="0", help="CPU list for the load generator and the backend")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (http1)")
    p.add_argument("--h2-clients", type=int, default=10, help="h2load connections (h2)")
    p.add_argument("--h2-streams", type=int, default=10, help="h2load concurrent streams per connection (h2)")
    p.add_argument("--tcp-connections", type=int, default=50, help="bench-tcp-client connections (tcp)")
    p.add_argument("--tcp-size", type=int, default=64, help="bytes per TCP request (tcp)")
    p.add_argument("--tls-connections", type=int, default=10, help="bench-tls-client connections in flight (handshake, resume)")
    p.add_argument("--tls-key", choices=("rsa", "ec"), default="rsa",
                   help="workload key type: RSA 2048 (Istio's default) or ECDSA P-256")
    p.add_argument(
        "--idle-kind", action="append", choices=IDLE_KINDS, help="hold only this kind in idle (repeatable); default: all"
    )
    p.add_argument("--idle-conns", type=int, default=10000, help="idle connections held per kind (idle)")
    p.add_argument("--idle-concurrency", type=int, default=50, help="idle connections being opened at once (idle)")
    p.add_argument("--out", type=Path, default=REPO / "benches" / "results" / "latest.md", help="markdown report")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        help="before each measurement, wait up to this many seconds for other work on the machine to stop",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the generated configs and proxy logs")
    args = p.parse_args(argv)
    args.only = list(dict.fromkeys(args.only or SCENARIOS))
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        p.error(f"--targets takes a subset of {','.join(TARGETS)}; got {unknown or 'nothing'}")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--rounds and --duration must be >= 1, --warmup >= 0")
    return args


def check_tools(args) -> list[str]:
    """Fails on what the run cannot do without; returns notes on what it will skip."""
    notes: list[str] = []
    missing = []
    need = {"taskset": "apt-get install -y util-linux"}
    if any(sc in args.only for sc in ("http1", "istio20", "mtls", "hbone", "observe")):
        need["wrk"] = "apt-get install -y wrk"
    if "h2" in args.only:
        need["h2load"] = "apt-get install -y nghttp2-client"
    need["openssl"] = "apt-get install -y openssl"
    for tool, hint in need.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} not found (install: {hint})")
    for name in ("bench-backend", "bench-tcp-client", "bench-tls-client"):
        if not (args.bin_dir / name).is_file():
            missing.append(f"{args.bin_dir / name} not found (build: cargo build -p ferry-benches --release)")
    if "envoy" in args.targets and not os.access(args.envoy, os.X_OK):
        missing.append(f"envoy not found at {args.envoy} (install: scripts/install-envoy.sh, or pass --envoy PATH)")
    if missing:
        raise HarnessError("cannot run:\n  " + "\n  ".join(missing))
    if "ferry" in args.targets and not os.access(args.ferry, os.X_OK):
        note = (
            f"Ferry skipped: no binary at {args.ferry} "
            "(build: cargo build -p ferry-proxy --release, or pass --ferry PATH)"
        )
        log(note)
        notes.append(note)
        args.targets.remove("ferry")
    return notes


def validate_envoy_config(args, tmp: Path, certs: Certs) -> None:
    """Envoy's own validation of the generated bootstrap, so a config bug is named as one."""
    for hbone in (False, True):
        config = tmp / ("validate-hbone.yaml" if hbone else "validate.yaml")
        config.write_text(bootstrap_yaml(Ports.fresh(), 1, 2, certs, hbone))
        done = subprocess.run(
            [str(args.envoy), "--mode", "validate", "-c", str(config), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise HarnessError(f"envoy rejects the generated bootstrap {config}:\n{done.stdout}{done.stderr}")


def run_idle(s: Settings, args, proxies: dict[str, Proxy | None], idle: dict[str, dict[str, list[IdleSample]]],
             notes: list[str], backend_http: int, backend_echo: int, round_no: int) -> None:
    for kind in args.idle_kind or IDLE_KINDS:
        for target in args.targets:
            proxy = proxies[target]
            key = f"idle-{kind}"
            if proxy is None or key in proxy.disabled:
                continue
            try:
                x = measure_idle(s, kind, target, proxy, backend_http, backend_echo, round_no, args.proxy_cpu)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, TimeoutError) as err:
                proxy.disabled[key] = str(err).splitlines()[0]
                log(f"[{round_no}/{args.rounds}] idle {kind:5} {target:6} FAILED, skipped from now on: {err}")
                notes.append(f"{target} idle {kind} failed in round {round_no}: {proxy.disabled[key]}")
                continue
            idle.setdefault(kind, {}).setdefault(target, []).append(x)
            log(
                f"[{round_no}/{args.rounds}] idle {kind:5} {target:6} {x.kib_per_conn:6.1f} KiB/conn"
                f"  rss {x.rss_before_kib / 1024:.1f}->{x.rss_after_kib / 1024:.1f} MiB  {x.conns} held"
                + (f"  FAILURES {x.failures}" if x.failures else "")
            )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    atexit.register(stop_all)
    started = dt.datetime.now(dt.UTC)

    notes = check_tools(args)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    try:
        return run(args, tmp, notes, started)
    finally:
        stop_all()
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


NGINX_CONF = """\
# Generated by benches/load.py: the HTTP upstream, in place of bench-backend.
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 65536; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type text/plain;
    sendfile on;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    http2_max_requests 100000000;
    root {tmp}/www;
    server {{
        listen 127.0.0.1:{h1};
        location / {{ try_files /body.txt =404; }}
    }}
    server {{
        listen 127.0.0.1:{h2} http2;
        location / {{ try_files /body.txt =404; }}
    }}
}}
"""


def start_nginx(tmp: Path, pin: list[str]) -> tuple[int, int, list[int]]:
    """nginx (one worker, on the load CPU) serving the backend's body over HTTP/1.1 and
    over h2c prior knowledge, each on a port of its own, with keep-alive effectively
    unbounded (nginx would otherwise close a connection after 1,000 requests, which
    neither bench-backend nor a proxy's pool expects). Returns the two ports and the
    master's and worker's pids."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise HarnessError("nginx not found (install: apt-get install -y nginx-light)")
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "body.txt").write_bytes(BACKEND_BODY)
    h1, h2 = free_port(), free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, h1=h1, h2=h2))
    proc = spawn(pin + [nginx, "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log")
    wait_for_port(h1, proc, 10, "nginx")
    wait_for_port(h2, proc, 10, "nginx")
    workers = [
        int(d.name)
        for d in Path("/proc").iterdir()
        if d.name.isdigit() and _ppid(int(d.name)) == proc.pid
    ]
    return h1, h2, [proc.pid] + workers


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def otlp_sink() -> int:
    """An OTLP/gRPC trace collector that takes every export and keeps nothing (grpcio,
    generic handler: no generated code). Its CPU is the harness's, not the proxy's."""
    import concurrent.futures

    import grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(lambda _req, _ctx: b"")},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    atexit.register(server.stop, None)
    return port


def run(args, tmp: Path, notes: list[str], started: dt.datetime) -> int:
    OBSERVE["otlp_port"] = otlp_sink()
    OBSERVE["access_log"] = str(tmp / "observe-access.log")
    certs = make_certs(tmp / "certs", args.tls_key)
    if "envoy" in args.targets:
        validate_envoy_config(args, tmp, certs)
    idle_tcp_conns = args.idle_conns
    if "idle" in args.only:
        # Each idle TCP connection is two sockets in the proxy, one in the client and one
        # in the backend; the limit is inherited by every process started from here.
        # Where the hard limit is lower (and cannot be raised), tcp holds what fits.
        spare = 1024
        want = 2 * args.idle_conns + spare
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
            except (ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                if hard < args.idle_conns + spare:
                    raise HarnessError(f"idle needs {args.idle_conns + spare} open files; the hard limit is {hard}")
                idle_tcp_conns = (hard - spare) // 2
                notes.append(
                    f"idle tcp held {idle_tcp_conns:,} connections, not {args.idle_conns:,}: two sockets each in"
                    f" the proxy, and the open-file hard limit here is {hard:,}"
                )

    s = Settings(
        duration=args.duration,
        warmup=args.warmup,
        load_cpu=args.load_cpu,
        wrk_connections=args.connections,
        h2_clients=args.h2_clients,
        h2_streams=args.h2_streams,
        tcp_connections=args.tcp_connections,
        tcp_size=args.tcp_size,
        tcp_client=args.bin_dir / "bench-tcp-client",
        tls_client=args.bin_dir / "bench-tls-client",
        tls_connections=args.tls_connections,
        tmp=tmp,
        quiet_wait=args.quiet_wait,
        certs=certs,
        idle_conns=args.idle_conns,
        idle_tcp_conns=idle_tcp_conns,
        idle_concurrency=args.idle_concurrency,
    )
    proxies: dict[str, Proxy | None] = {"direct": None}
    versions = {}
    if "envoy" in args.targets:
        # --disable-hot-restart: no shared-memory region, so back-to-back starts never collide.
        proxies["envoy"] = Proxy(
            "envoy",
            [str(args.envoy), "-c", "{config}", "--concurrency", "1"]
            + ["--disable-hot-restart", "--log-level", "warn"],
        )
        versions["envoy"] = tool_version([str(args.envoy), "--version"], strict=True).split(" ")[-1]
    if "ferry" in args.targets:
        # --ready-addr off: readiness is the agent's job in the Envoy setup (pilot-agent), and
        # its fixed port 15021 would collide with any other sidecar running on the machine;
        # the same goes for Istio's Prometheus port 15090 (scrapes go to the admin port here).
        proxies["ferry"] = Proxy(
            "ferry",
            [str(args.ferry), "sidecar", "--config", "{config}", "--concurrency", "1", "--ready-addr", "off", "--prometheus-addr", "off", "--status-addr", "off"],
        )
        versions["ferry"] = tool_version([str(args.ferry), "--version"], strict=True)
    if any(sc in args.only for sc in ("http1", "istio20", "mtls", "hbone")):
        versions["wrk"] = tool_version(["wrk", "-v"]).split(" [")[0]
    if any(sc in args.only for sc in ("mtls", "hbone", "handshake", "resume", "idle")):
        versions["workload keys"] = "RSA 2048" if args.tls_key == "rsa" else "ECDSA P-256"
    if "h2" in args.only:
        versions["h2load"] = tool_version(["h2load", "--version"])

    # The backend lives for the whole run: it is the fixed point every target is measured against.
    backend_http, backend_echo = free_port(), free_port()
    pin = ["taskset", "-c", args.load_cpu]
    modes = [("echo", backend_echo)]
    if args.upstream == "nginx":
        backend_http, UPSTREAM["h2_port"], pids = start_nginx(tmp, pin)
        s.backend_pids.extend(pids)
        versions["upstream"] = tool_version(["nginx", "-v"]).replace("nginx version: ", "")
    else:
        modes.insert(0, ("http", backend_http))
        versions["upstream"] = "bench-backend"
    for mode, port in modes:
        proc = spawn(
            pin + [str(args.bin_dir / "bench-backend"), "--mode", mode, "--addr", f"127.0.0.1:{port}"],
            tmp / f"backend-{mode}.log",
        )
        wait_for_port(port, proc, 10, f"bench-backend --mode {mode}")
        s.backend_pids.append(proc.pid)

    results: dict[str, dict[str, list[Sample]]] = {sc: {} for sc in args.only}
    idle: dict[str, dict[str, list[IdleSample]]] = {}
    for round_no in range(1, args.rounds + 1):
        for scenario in args.only:
            if scenario == "idle":
                run_idle(s, args, proxies, idle, notes, backend_http, backend_echo, round_no)
                continue
            for target in args.targets:
                proxy = proxies[target]
                if proxy is None and scenario in PROXY_ONLY:
                    continue
                if proxy is not None and scenario in proxy.disabled:
                    continue
                try:
                    sample = measure(s, scenario, target, proxy, backend_http, backend_echo, round_no, args.proxy_cpu)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
                    if proxy is None:
                        raise HarnessError(f"direct {scenario} run failed: {err}") from err
                    # A proxy that cannot do one scenario yet still gets measured on the others.
                    proxy.disabled[scenario] = str(err).splitlines()[0]
                    log(f"[{round_no}/{args.rounds}] {scenario:5} {target:6} FAILED, skipped from now on: {err}")
                    notes.append(f"{target} {scenario} failed in round {round_no}: {proxy.disabled[scenario]}")
                    continue
                results[scenario].setdefault(target, []).append(sample)
                r = sample.load
                cpu = f" cpu {sample.cpu_ms_per_1k:.2f} ms/1k" if sample.cpu_ms_per_1k is not None else ""
                rss = (
                    f" rss {sample.rss_idle_kib / 1024:.1f}->{sample.rss_peak_kib / 1024:.1f} MiB"
                    if sample.rss_idle_kib is not None and sample.rss_peak_kib is not None
                    else ""
                )
                log(
                    f"[{round_no}/{args.rounds}] {scenario:5} {target:6} {r.rps:>10,.0f} rps"
                    f"  p50 {fmt(r.p50_ms, 3)} ms  p99 {fmt(r.p99_ms, 3)} ms{cpu}{rss}"
                    + f"  bg {sample.background_pct:.0f}%"
                    + (f"  ERRORS {r.errors}" if r.errors else "")
                )

    report = render(args, s, results, idle, notes, versions, started)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except HarnessError as err:
        log(f"load.py: {err}")
        sys.exit(2)
