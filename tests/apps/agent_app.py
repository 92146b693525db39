"""An application with what istio-agent's status server probes and scrapes.

Usage: agent_app.py HTTP_PORT GRPC_PORT CTL_DIR

HTTP (plain, on all addresses):
  /ready      200 "ready"
  /unready    503 "not ready"
  /elsewhere  302 to another host (the agent answers such probes 200)
  /hop        302 to /ready on the same host (followed)
  /metrics    Prometheus text: app_requests_total and an app gauge; 500
              while CTL_DIR/metrics-broken exists
gRPC grpc.health.v1.Health/Check: SERVING, or NOT_SERVING while
CTL_DIR/grpc-unhealthy exists. With CTL_DIR/tls.crt and tls.key, the same
HTTP paths over HTTPS on HTTP_PORT + 363 (8443 for 8080). Every request is
printed.
"""

import os
import ssl
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

http_port, grpc_port, ctl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
served = {"n": 0}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body, ctype="text/plain", extra=None):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            served["n"] += 1
            n = served["n"]
        print(f"GET {self.path} from {self.client_address[0]} host={self.headers.get('Host')} "
              f"x-probe={self.headers.get('x-probe')}", flush=True)
        if self.path == "/ready":
            self.answer(200, "ready")
        elif self.path == "/unready":
            self.answer(503, "not ready")
        elif self.path == "/elsewhere":
            self.answer(302, "", extra={"Location": "http://192.0.2.1/away"})
        elif self.path == "/hop":
            self.answer(302, "", extra={"Location": "/ready"})
        elif self.path == "/metrics":
            if os.path.exists(os.path.join(ctl, "metrics-broken")):
                self.answer(500, "broken")
                return
            body = (
                "# HELP app_requests_total Requests the app served.\n"
                "# TYPE app_requests_total counter\n"
                f"app_requests_total{{path=\"all\"}} {n}\n"
                "# HELP app_temperature_celsius A gauge of the app.\n"
                "# TYPE app_temperature_celsius gauge\n"
                "app_temperature_celsius 21.5\n"
            )
            self.answer(200, body, "text/plain; version=0.0.4; charset=utf-8")
        else:
            self.answer(404, "no such path")

    def log_message(self, *args):
        pass


def health_check(request, context):
    print(f"grpc health check {request!r}", flush=True)
    if os.path.exists(os.path.join(ctl, "grpc-unhealthy")):
        return b"\x08\x02"  # NOT_SERVING
    return b"\x08\x01"  # SERVING


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "grpc.health.v1.Health",
    {"Check": grpc.unary_unary_rpc_method_handler(health_check)},
),))
server.add_insecure_port(f"0.0.0.0:{grpc_port}")
server.start()
crt, key = os.path.join(ctl, "tls.crt"), os.path.join(ctl, "tls.key")
if os.path.exists(crt):
    httpsd = ThreadingHTTPServer(("0.0.0.0", http_port + 363), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(crt, key)
    httpsd.socket = tls.wrap_socket(httpsd.socket, server_side=True)
    threading.Thread(target=httpsd.serve_forever, daemon=True).start()
httpd = ThreadingHTTPServer(("0.0.0.0", http_port), Handler)
print(f"listening http {http_port} grpc {grpc_port}", flush=True)
httpd.serve_forever()
