#!/usr/bin/env python3
"""A stand-in for a container image `ferry-pilot demo` cannot run: an HTTP server on each port
given that answers every request with 200 and JSON naming the pod, the port, the method and
the path, so a user's own Deployments still have something behind their Services.

  standin.py PORT [PORT ...]      ($POD_NAME names the pod)

Prints `ready` once every port accepts connections; exits on SIGTERM.
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POD = os.environ.get("POD_NAME", "standin")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "standin"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {"pod": POD, "port": self.server.server_port, "method": self.command, "path": self.path}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = answer


def main():
    ports = [int(p) for p in sys.argv[1:]]
    if not ports:
        sys.exit("usage: standin.py PORT [PORT ...]")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    servers = [ThreadingHTTPServer(("0.0.0.0", p), Handler) for p in ports]
    for s in servers[1:]:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].daemon_threads = True
    print("ready", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
