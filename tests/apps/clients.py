#!/usr/bin/env python3
"""Clients for Ferry's data-path tests. Each prints one JSON line with what it observed and
exits 0 when the exchange itself worked (the test asserts on the details):

  grpc HOST:PORT    /echo.Echo/Say (unary) and /echo.Echo/Count (server streaming, 5 messages);
                    reports codes, payloads and trailing metadata of both calls.
  ws URL            opens a WebSocket, sends a text and a 100 KiB binary message, reports
                    what came back.

One more keeps a connection open and prints a line per event instead:

  hold HOST:PORT DIR NAME
                    one long-lived TCP connection to an echo server: sends "NAME start" and
                    prints `echoed start` once it came back; then, for K = 1, 2, ..., waits for
                    the file DIR/NAME.K to appear, sends "NAME K" and prints `echoed K` once it
                    came back. When the connection closes or fails it prints
                    `closed UNIX_TIME` (seconds, the moment it noticed) and exits 1.
"""

import json
import os
import select
import socket
import sys
import time


def grpc_client(target):
    import grpc

    ident = lambda b: b  # noqa: E731 - raw bytes, no generated code
    out = {}
    with grpc.insecure_channel(target) as ch:
        say = ch.unary_unary("/echo.Echo/Say", request_serializer=ident, response_deserializer=ident)
        reply, call = say.with_call(b"hello through ferry", timeout=10)
        out["unary"] = {
            "code": call.code().name,
            "reply": reply.decode(),
            "trailers": dict(call.trailing_metadata() or ()),
        }
        count = ch.unary_stream("/echo.Echo/Count", request_serializer=ident, response_deserializer=ident)
        stream = count(b"5", timeout=10)
        messages = [m.decode() for m in stream]
        out["stream"] = {
            "code": stream.code().name,
            "messages": messages,
            "trailers": dict(stream.trailing_metadata() or ()),
        }
    print(json.dumps(out), flush=True)


def ws_client(url):
    from websockets.sync.client import connect

    with connect(url, open_timeout=10, close_timeout=5, max_size=1 << 24) as ws:
        ws.send("hello through ferry")
        text = ws.recv(timeout=10)
        blob = bytes(range(256)) * 400
        ws.send(blob)
        back = ws.recv(timeout=10)
    print(json.dumps({"text": text, "binary_ok": back == blob, "binary_len": len(back)}), flush=True)


def hold(target, ctl, name):
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)

    def closed():
        print(f"closed {time.time():.3f}", flush=True)
        sys.exit(1)

    def exchange(word):
        line = f"{name} {word}\n".encode()
        try:
            s.sendall(line)
            got = b""
            while not got.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    closed()
                got += chunk
        except OSError:
            closed()
        if got != line:
            print(f"unexpected {got!r}", flush=True)
            sys.exit(2)
        print(f"echoed {word}", flush=True)

    exchange("start")
    k = 1
    while True:
        if os.path.exists(os.path.join(ctl, f"{name}.{k}")):
            exchange(str(k))
            k += 1
            continue
        try:
            readable, _, _ = select.select([s], [], [], 0.02)
            if readable and not s.recv(4096):
                closed()
        except OSError:
            closed()


def main(argv):
    if len(argv) == 4 and argv[0] == "hold":
        hold(argv[1], argv[2], argv[3])
        return
    if len(argv) != 2:
        sys.exit(__doc__)
    if argv[0] == "grpc":
        grpc_client(argv[1])
    elif argv[0] == "ws":
        ws_client(argv[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
