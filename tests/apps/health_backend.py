"""A backend for active health checks, whose health a file switches.

Usage: health_backend.py MODE PORT NAME CTL_FILE [HEALTH_HOST] [HEALTH_PORT]

While CTL_FILE exists the backend fails its health checks; while CTL_FILE.immediate
exists an HTTP check is answered 503 with `x-envoy-immediate-health-check-fail: true`
(an Envoy draining).

  http  HTTP/1.1: GET /healthz answers 200, or 503 while failing (and 421
        when HEALTH_HOST is given and the Host header differs); any other
        path answers 200 with the body NAME. With HEALTH_PORT, /healthz is
        answered there, and /healthz on PORT always fails (503), so a check
        that ignores the port override fails. GET /drain answers 200 with the body NAME
        and `x-envoy-immediate-health-check-fail: true`.
  tcp   each line "PING" is answered "PONG" (the connection is closed
        instead while failing); any other line is answered NAME.
  grpc  grpc.health.v1.Health/Check answers SERVING, or NOT_SERVING while
        failing; /test.Who/Name answers NAME (raw bytes).

Every health check is printed.
"""

import os
import socketserver
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode, port, name, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
health_host = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
health_port = int(sys.argv[6]) if len(sys.argv) > 6 else None


def failing():
    return os.path.exists(ctl)


def http_handler(is_health_port):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body, immediate=False):
            data = body.encode()
            self.send_response(status)
            if immediate:
                self.send_header("x-envoy-immediate-health-check-fail", "true")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/healthz":
                host = self.headers.get("Host")
                print(f"health check host={host} ua={self.headers.get('User-Agent')} "
                      f"x-hc={self.headers.get('x-hc')} port={'health' if is_health_port else 'data'}",
                      flush=True)
                if os.path.exists(ctl + ".immediate"):
                    self.answer(503, "draining", immediate=True)
                elif health_port is not None and not is_health_port:
                    self.answer(503, "checks go to the health port")
                elif failing():
                    self.answer(503, "failing")
                elif health_host is not None and host != health_host:
                    self.answer(421, f"expected host {health_host}")
                else:
                    self.answer(200, "ok")
                return
            self.answer(200, name, immediate=self.path == "/drain")

        def log_message(self, *args):
            pass

    return Handler


class TcpHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            if line.strip() == b"PING":
                print("health check PING", flush=True)
                if failing():
                    return
                self.wfile.write(b"PONG\n")
            else:
                self.wfile.write(name.encode() + b"\n")
            self.wfile.flush()


class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve_grpc():
    import grpc

    def check(request, context):
        print(f"health check {request!r}", flush=True)
        return b"\x08\x02" if failing() else b"\x08\x01"

    def who(request, context):
        return name.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}),
        grpc.method_handlers_generic_handler(
            "test.Who", {"Name": grpc.unary_unary_rpc_method_handler(who)}),
    ))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"grpc {name} on {port}", flush=True)
    server.wait_for_termination()


if mode == "http":
    if health_port is not None:
        hs = ThreadingHTTPServer(("127.0.0.1", health_port), http_handler(True))
        threading.Thread(target=hs.serve_forever, daemon=True).start()
    print(f"http {name} on {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), http_handler(False)).serve_forever()
elif mode == "tcp":
    print(f"tcp {name} on {port}", flush=True)
    TcpServer(("127.0.0.1", port), TcpHandler).serve_forever()
elif mode == "grpc":
    serve_grpc()
else:
    sys.exit(f"unknown mode {mode}")
