#!/usr/bin/env python3
"""A TCP forwarder that adds a fixed delay to each direction: a stand-in
for a network link with latency (this kernel has no netem).

Usage: delay-proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS

Every chunk read from one side is written to the other side ONE_WAY_MS
after it arrived, in order, so a request/response round trip takes
2 * ONE_WAY_MS more than without the proxy, while bytes keep streaming
(bandwidth is not limited). Runs until killed; one thread pair per
connection. Used by tests/bench/latency (it runs this in a network
namespace of its own, in front of redis-server).
"""

import collections
import socket
import sys
import threading
import time

CHUNK_BYTES = 256 * 1024


def pump(src, dst, delay_s):
    """Reads from src, delivers to dst `delay_s` after each chunk arrived."""
    queue = collections.deque()
    cond = threading.Condition()

    def reader():
        try:
            while True:
                data = src.recv(CHUNK_BYTES)
                with cond:
                    queue.append((time.monotonic() + delay_s, data))
                    cond.notify()
                if not data:
                    return
        except OSError:
            with cond:
                queue.append((time.monotonic() + delay_s, b""))
                cond.notify()

    def writer():
        try:
            while True:
                with cond:
                    while not queue:
                        cond.wait()
                    due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def parse(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    listen, target, one_way_ms = parse(sys.argv[1]), parse(sys.argv[2]), float(sys.argv[3])
    delay_s = one_way_ms / 1000.0
    server = socket.create_server(listen, reuse_port=False, backlog=512)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(target)
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pump(client, upstream, delay_s)
        pump(upstream, client, delay_s)


if __name__ == "__main__":
    main()
