#!/usr/bin/env python3
"""A hostile HTTP/1.1 backend for Ferry's hostile-client suite (`tests/tests/hostile.rs`).

  badhttp.py PORT

Reads one request head at a time (a Content-Length body is read and discarded) and answers
according to the request's path, `/case/NAME`, with the raw bytes of case NAME below, exactly
as written (bad framing included); the cases ending in `-reset` then abort the connection with
a TCP RST, `-close` ones close it. Any other path gets a well-formed `200 ok` answer on a
keep-alive connection, so a proxy may pool the connection. `/seen` answers the list of request
lines received so far (JSON), so a test can prove that a request never reached the backend.

The process prints `ready` on stdout once it accepts connections, and exits on SIGTERM.
"""

import json
import signal
import socket
import struct
import sys
import threading

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Response bytes by case name; None closes (or resets) without a byte.
CASES = {
    # Framing a proxy must refuse (RFC 9112 6.1, 6.3).
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED",
    "te-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"0\r\n\r\n",
    "dup-cl-diff": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "dup-cl-same": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "cl-bad": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nokok",
    "te-chunked-identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "nul-header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "space-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "garbage": b"\x00\x01\x02 not http at all\r\n\r\n",
    # A well-framed answer followed by a second, unrequested one: response splitting. The
    # second must never reach a client.
    "split": OK + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED",
    # Every point at which a response can stop.
    "before-status-reset": None,
    "before-status-close": None,
    "mid-status-reset": b"HTTP/1.1 20",
    "mid-headers-reset": b"HTTP/1.1 200 OK\r\nContent-Le",
    "mid-headers-close": b"HTTP/1.1 200 OK\r\nContent-Le",
    "after-headers-reset": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "mid-body-reset": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
    "mid-body-close": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
    "mid-chunk-reset": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n01234",
    "mid-chunked-close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
}


def read_head(f):
    """The request line and headers (lower-case names), or None at EOF."""
    line = f.readline(65536)
    while line in (b"\r\n", b"\n"):
        line = f.readline(65536)
    if not line:
        return None
    headers = {}
    while True:
        h = f.readline(65536)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return line.decode("latin-1").rstrip("\r\n"), headers


def abort(conn):
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def serve_conn(conn, seen, lock):
    f = conn.makefile("rb")
    try:
        while True:
            head = read_head(f)
            if head is None:
                return
            line, headers = head
            with lock:
                seen.append(line)
            n = int(headers.get("content-length", "0") or 0)
            if n:
                f.read(n)
            parts = line.split(" ")
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/seen":
                with lock:
                    body = json.dumps(seen).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                continue
            name = path[len("/case/"):] if path.startswith("/case/") else None
            if name not in CASES:
                conn.sendall(OK)
                continue
            data = CASES[name]
            if data:
                conn.sendall(data)
            if name.endswith("-reset"):
                abort(conn)
                return
            if name.endswith("-close") or name in ("te-gzip", "garbage"):
                return
    except OSError:
        return
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main(argv):
    port = int(argv[1])
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    seen, lock = [], threading.Lock()
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve_conn, args=(conn, seen, lock), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv)
