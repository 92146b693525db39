"""Sends one DNS question, as a pod's resolver library would.

Usage: dns_client.py SERVER_IP NAME udp|tcp [A|AAAA]

Prints `rcode=N aa=0|1 answers=TYPE:VALUE,...` (A, AAAA and CNAME records),
or `error=...` when nothing came back within 5 seconds.
"""

import random
import socket
import struct
import sys

server, name, proto = sys.argv[1], sys.argv[2], sys.argv[3]
qtype = {"A": 1, "AAAA": 28}[sys.argv[4] if len(sys.argv) > 4 else "A"]
qid = random.randrange(65536)
q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
for label in name.rstrip(".").split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\x00" + struct.pack("!HH", qtype, 1)


def read_name(msg, off):
    labels = []
    jumped = None
    while True:
        n = msg[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0 == 0xC0:
            ptr = struct.unpack("!H", msg[off:off + 2])[0] & 0x3FFF
            if jumped is None:
                jumped = off + 2
            off = ptr
            continue
        labels.append(msg[off + 1:off + 1 + n].decode())
        off += 1 + n
    return ".".join(labels) + ".", (jumped if jumped is not None else off)


try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(q, (server, 53))
        msg = s.recv(65535)
    else:
        s = socket.create_connection((server, 53), timeout=5)
        s.sendall(struct.pack("!H", len(q)) + q)
        n = struct.unpack("!H", s.recv(2))[0]
        msg = b""
        while len(msg) < n:
            msg += s.recv(n - len(msg))
except OSError as e:
    print(f"error={e}")
    sys.exit(0)

rid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
assert rid == qid, "id mismatch"
off = 12
for _ in range(qd):
    _, off = read_name(msg, off)
    off += 4
answers = []
for _ in range(an):
    _, off = read_name(msg, off)
    rtype, _, _, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
    off += 10
    data = msg[off:off + rdlen]
    if rtype == 1:
        answers.append("A:" + socket.inet_ntoa(data))
    elif rtype == 28:
        answers.append("AAAA:" + socket.inet_ntop(socket.AF_INET6, data))
    elif rtype == 5:
        answers.append("CNAME:" + read_name(msg, off)[0])
    off += rdlen
print(f"rcode={flags & 0xF} aa={(flags >> 10) & 1} answers={','.join(answers)}")
