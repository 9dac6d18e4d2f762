#!/usr/bin/env python3
"""Micro-benchmarks of one directory: prints ops/s for each operation.

Usage: micro.py DIR [N]   (DIR is created; N operations per benchmark)
Operations are the ones a ccache hit and a publication are made of.
"""
import os
import sys
import time

d = os.path.join(sys.argv[1], "micro")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
os.makedirs(d, exist_ok=True)
body = b"x" * 5000
with open(f"{d}/f", "wb") as f:
    f.write(body)


def bench(name, fn):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"{name} {n / dt:.0f}")


def stat():
    for _ in range(n):
        os.stat(f"{d}/f")


def open_read_close():
    for _ in range(n):
        with open(f"{d}/f", "rb") as f:
            f.read()


def create_write_rename():
    for i in range(n):
        with open(f"{d}/t{i}.tmp", "wb") as f:
            f.write(body)
        os.rename(f"{d}/t{i}.tmp", f"{d}/{i:030d}R")


def touch():
    for _ in range(n):
        os.utime(f"{d}/f")


bench("stat", stat)
bench("open+read+close", open_read_close)
bench("create+write+rename", create_write_rename)
bench("utimensat", touch)
