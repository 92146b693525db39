"""A tiny authoritative DNS server for tests: the pod's "upstream resolver".

Usage: dns_server.py PORT NAME=IP [NAME=IP ...]

Answers A questions for the given names (case-insensitive, trailing dot
optional) over UDP and TCP, NXDOMAIN for any other name. Prints one line per
query: `query PROTO NAME TYPE from PEER_IP`.
"""

import socket
import struct
import sys
import threading

port = int(sys.argv[1])
records = {}
for arg in sys.argv[2:]:
    name, ip = arg.split("=", 1)
    records[name.lower().rstrip(".") + "."] = ip


def parse_name(msg, off):
    labels = []
    while True:
        n = msg[off]
        if n == 0:
            return ".".join(labels) + ".", off + 1
        labels.append(msg[off + 1:off + 1 + n].decode())
        off += 1 + n


def answer(msg):
    qid, flags = struct.unpack("!HH", msg[:4])
    name, off = parse_name(msg, 12)
    qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
    question = msg[12:off + 4]
    ip = records.get(name.lower())
    rd = flags & 0x0100
    if ip is None:
        head = struct.pack("!HHHHHH", qid, 0x8403 | rd, 1, 0, 0, 0)
        return head + question, name, qtype
    if qtype != 1:
        head = struct.pack("!HHHHHH", qid, 0x8400 | rd, 1, 0, 0, 0)
        return head + question, name, qtype
    head = struct.pack("!HHHHHH", qid, 0x8400 | rd, 1, 1, 0, 0)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return head + question + rr, name, qtype


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        msg, peer = s.recvfrom(4096)
        resp, name, qtype = answer(msg)
        print(f"query udp {name} {qtype} from {peer[0]}", flush=True)
        s.sendto(resp, peer)


def tcp_conn(c, peer):
    with c:
        while True:
            head = c.recv(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            msg = b""
            while len(msg) < n:
                chunk = c.recv(n - len(msg))
                if not chunk:
                    return
                msg += chunk
            resp, name, qtype = answer(msg)
            print(f"query tcp {name} {qtype} from {peer[0]}", flush=True)
            c.sendall(struct.pack("!H", len(resp)) + resp)


def tcp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, peer = s.accept()
        threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()


threading.Thread(target=tcp, daemon=True).start()
print(f"dns listening {port}", flush=True)
udp()
