#!/usr/bin/env python3
"""Backends for Ferry's data-path tests. One process serves one mode on 127.0.0.1:

  http PORT NAME [--idle-close MS] [--drop-reused]
      Threaded HTTP/1.1 keep-alive server. Every answer is JSON
      {name, method, path, version, headers: [[raw-name, value], ...], body_len, body_sha256,
      conn_requests}
      after the whole request body was read (Content-Length or chunked, streamed, never held
      in memory). `Expect: 100-continue` gets its interim response. Paths:
        /status/NNN   answer with that status
        /sleep/MS     answer after MS milliseconds
        /bytes/N      stream N zero bytes (application/octet-stream) instead of JSON
        /close        answer with `Connection: close` and close
        /flaky/N/STATUS/...  the first N requests to this exact path answer STATUS, later ones 200
        /drop/N/...   the first N requests to this exact path get no answer: the connection closes
        /slowbody/MS  send the head (Content-Length: 10) at once and the 10-byte body MS later
        /grpc-status/N  answer 200 with the header `grpc-status: N` (a trailers-only gRPC answer)
        /call/HOST/PORT/PATH  the server itself requests GET http://HOST:PORT/PATH (HOST mapped to
                      an address by ECHO_HOSTS="name=ip,...", the Host header keeps the name; passing on
                      `end-user` and the trace headers, as bookinfo's services do) and answers 200
                      with the usual JSON plus "upstream": {"status": s, "name": n} (status 0 when
                      the call failed): one service calling the next, through its sidecar in a pod.
        /hits/PATH    {"hits": n, "host": h}: how many requests this server got for /PATH (every
                      path is counted, across connections) and the Host of the last one
      --status NNN     answer every request (but /hits) with status NNN: an endpoint that always fails.
      --idle-close MS  close a keep-alive connection that stayed idle MS milliseconds.
      --drop-reused    a connection's second request is read and the connection closed with no
                       answer: what a proxy sees when the server's keep-alive timeout fires
                       just as the proxy reuses the connection.
  extauthz PORT       Istio's ext-authz sample server (its HTTP check): a request with
                      `x-ext-authz: allow` gets 200 and `x-ext-authz-check-result: allowed`, any other
                      403, `x-ext-authz-check-result: denied` and the sample's denial text.
  ws PORT             WebSocket echo (text and binary).
  grpc PORT           gRPC server without generated code: /echo.Echo/Say (unary, echoes the
                      request bytes) and /echo.Echo/Count (server streaming: the request is a
                      decimal count N, answers N messages b"0".."N-1"); sets a trailing
                      metadata entry `x-echo-trailer: done`.
  tcp PORT            Echo. When the client half-closes, sends a last line b"bye\\n" and closes:
                      proves the FIN travelled through the proxy and the return path stayed open.
  prefix PORT WORD    Echo with "WORD " before each chunk (Istio's tcp-echo server: `one`, `two`).
  banner PORT         Server speaks first: b"220 ferry-test ready\\r\\n" on accept, then echoes.

The process prints `ready` on stdout once it accepts connections, and exits on SIGTERM.
"""

import hashlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ZEROS = bytes(1 << 20)
# Pods in network namespaces serve on every address; loopback tests keep 127.0.0.1.
BIND = os.environ.get("ECHO_BIND", "127.0.0.1")


def announce():
    print("ready", flush=True)


# ----------------------------------------------------------------------------- http


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo"
    sys_version = ""

    def setup(self):
        super().setup()
        self.conn_requests = 0
        idle = self.server.idle_close_ms
        if idle:
            # BaseHTTPRequestHandler treats a read timeout between requests as the end
            # of the connection: this is the server's keep-alive timeout.
            self.connection.settimeout(idle / 1000)

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def read_body(self):
        """Reads and discards the request body, returning its length; its SHA-256 is kept
        in `self.body_sha256`."""
        digest = hashlib.sha256()
        self.body_sha256 = digest.hexdigest()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    self.body_sha256 = digest.hexdigest()
                    # Trailers, then the empty line.
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                left = size
                while left:
                    got = self.rfile.read(min(left, 1 << 20))
                    if not got:
                        raise ConnectionError("eof in chunk")
                    digest.update(got)
                    left -= len(got)
                total += size
                self.rfile.readline(16)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        left = length
        while left:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                raise ConnectionError("eof in body")
            digest.update(got)
            left -= len(got)
        self.body_sha256 = digest.hexdigest()
        return length

    def handle_one_request(self):
        # A read timeout while waiting for a request is the idle close; in the middle of
        # one it is an error either way.
        try:
            super().handle_one_request()
        except (TimeoutError, socket.timeout):
            self.close_connection = True

    def count_hit(self):
        with self.server.hits_lock:
            n = self.server.hits.get(self.path, (0, ""))[0] + 1
            self.server.hits[self.path] = (n, self.headers.get("Host", ""))
            return n

    def answer(self):
        self.conn_requests += 1
        if self.server.drop_reused and self.conn_requests > 1:
            self.close_connection = True
            return
        if self.connection.gettimeout() is not None:
            # Body reads are not idle time.
            self.connection.settimeout(None)
        body_len = self.read_body()
        path = self.path
        status = 200
        close = False
        extra = []
        if path.startswith("/hits/"):
            with self.server.hits_lock:
                n, host = self.server.hits.get(path[len("/hits"):], (0, ""))
            self.send_json(200, {"hits": n, "host": host})
            return
        hit = self.count_hit()
        if self.server.force_status:
            status = self.server.force_status
        if path.startswith("/flaky/"):
            parts = path.split("/")
            if hit <= int(parts[2]):
                status = int(parts[3])
        elif path.startswith("/drop/"):
            if hit <= int(path.split("/")[2]):
                self.close_connection = True
                return
        elif path.startswith("/slowbody/"):
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.flush()
            time.sleep(int(path.split("/")[2]) / 1000)
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            return
        elif path.startswith("/grpc-status/"):
            extra.append(("grpc-status", path.split("/")[2]))
        elif self.server.force_status:
            pass
        elif path.startswith("/status/"):
            status = int(path.split("/")[2])
        elif path.startswith("/sleep/"):
            time.sleep(int(path.split("/")[2]) / 1000)
        elif path.startswith("/close"):
            close = True
        elif path.startswith("/bytes/"):
            self.send_bytes(int(path.split("/")[2]))
            self.restore_idle_timeout()
            return
        upstream = None
        if path.startswith("/call/"):
            upstream = self.call(path)
        doc = {
            "name": self.server.name,
            "method": self.command,
            "path": path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": body_len,
            "body_sha256": self.body_sha256,
            "conn_requests": self.conn_requests,
        }
        if upstream is not None:
            doc["upstream"] = upstream
        out = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        for k, v in extra:
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)
        self.wfile.flush()
        self.restore_idle_timeout()

    def call(self, path):
        import http.client

        _, _, host, port, rest = path.split("/", 4)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() in ("end-user", "x-request-id", "traceparent", "x-b3-traceid")
        }
        # Pods have no cluster DNS: ECHO_HOSTS="ratings=10.96.0.30,..." maps
        # service names to their cluster IPs; the Host header keeps the name.
        hosts = dict(
            kv.split("=", 1) for kv in os.environ.get("ECHO_HOSTS", "").split(",") if "=" in kv
        )
        headers["Host"] = "%s:%s" % (host, port)
        try:
            c = http.client.HTTPConnection(hosts.get(host, host), int(port), timeout=15)
            c.request("GET", "/" + rest, headers=headers)
            r = c.getresponse()
            body = r.read()
            c.close()
            try:
                name = json.loads(body).get("name")
            except ValueError:
                name = None
            return {"status": r.status, "name": name}
        except OSError as e:
            return {"status": 0, "name": None, "error": str(e)}

    def send_json(self, status, doc):
        out = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        self.wfile.flush()
        self.restore_idle_timeout()

    def restore_idle_timeout(self):
        idle = self.server.idle_close_ms
        if idle:
            self.connection.settimeout(idle / 1000)

    def send_bytes(self, n):
        # The body was read by `answer`.
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        left = n
        while left:
            chunk = ZEROS[: min(left, len(ZEROS))]
            self.wfile.write(chunk)
            left -= len(chunk)
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = answer


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


def serve_http(port, name, opts):
    srv = EchoServer((BIND, port), EchoHandler)
    srv.name = name
    srv.hits = {}
    srv.force_status = int(opts[opts.index("--status") + 1]) if "--status" in opts else 0
    srv.hits_lock = threading.Lock()
    srv.idle_close_ms = 0
    srv.drop_reused = "--drop-reused" in opts
    if "--idle-close" in opts:
        srv.idle_close_ms = int(opts[opts.index("--idle-close") + 1])
    announce()
    srv.serve_forever()


# ----------------------------------------------------------------------------- ext-authz


class ExtAuthzHandler(BaseHTTPRequestHandler):
    """Istio's ext-authz sample server, HTTP check: a request carrying
    `x-ext-authz: allow` is allowed (200, `x-ext-authz-check-result: allowed`),
    any other is denied (403 with the sample's body and
    `x-ext-authz-check-result: denied`)."""

    protocol_version = "HTTP/1.1"
    server_version = "ext-authz"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def check(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        allowed = self.headers.get("x-ext-authz", "") == "allow"
        body = b"" if allowed else b"denied by ext_authz for not found header `x-ext-authz: allow` in the request"
        self.send_response(200 if allowed else 403)
        self.send_header("x-ext-authz-check-result", "allowed" if allowed else "denied")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = check


def serve_extauthz(port):
    srv = ThreadingHTTPServer((BIND, port), ExtAuthzHandler)
    srv.daemon_threads = True
    announce()
    srv.serve_forever()


# ----------------------------------------------------------------------------- ws


def serve_ws(port):
    import asyncio

    from websockets.asyncio.server import serve

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async def main():
        async with serve(echo, BIND, port, max_size=1 << 24):
            announce()
            await asyncio.Future()

    asyncio.run(main())


# ----------------------------------------------------------------------------- grpc


def serve_grpc(port):
    from concurrent import futures

    import grpc

    def say(request, context):
        context.set_trailing_metadata((("x-echo-trailer", "done"),))
        return request

    def count(request, context):
        context.set_trailing_metadata((("x-echo-trailer", "done"),))
        for i in range(int(request.decode() or "0")):
            yield str(i).encode()

    ident = lambda b: b  # noqa: E731 - raw bytes in and out, no generated code
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say, ident, ident),
        "Count": grpc.unary_stream_rpc_method_handler(count, ident, ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    server.add_insecure_port(f"{BIND}:{port}")
    server.start()
    announce()
    server.wait_for_termination()


# ----------------------------------------------------------------------------- tcp


class TcpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        if self.server.banner:
            s.sendall(b"220 ferry-test ready\r\n")
        prefix = self.server.prefix
        while True:
            data = s.recv(65536)
            if not data:
                break
            s.sendall(prefix + data)
        try:
            if not self.server.banner:
                # The client's FIN arrived; our direction is still open.
                s.sendall(b"bye\n")
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone entirely (a readiness probe, say)
        s.close()


class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_tcp(port, banner, prefix=b""):
    srv = TcpServer((BIND, port), TcpEcho)
    srv.banner = banner
    srv.prefix = prefix
    announce()
    srv.serve_forever()


# ----------------------------------------------------------------------------- main


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    mode, port = argv[0], int(argv[1])
    if mode == "http":
        serve_http(port, argv[2] if len(argv) > 2 else "echo", argv[3:])
    elif mode == "extauthz":
        serve_extauthz(port)
    elif mode == "ws":
        serve_ws(port)
    elif mode == "grpc":
        serve_grpc(port)
    elif mode == "tcp":
        serve_tcp(port, banner=False)
    elif mode == "banner":
        serve_tcp(port, banner=True)
    elif mode == "prefix":
        serve_tcp(port, banner=False, prefix=(argv[2] + " ").encode())
    else:
        sys.exit(f"unknown mode {mode!r}\n{__doc__}")


if __name__ == "__main__":
    threading.current_thread().name = "echo"
    main(sys.argv[1:])
