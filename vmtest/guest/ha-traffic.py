#!/usr/bin/env python3
"""Two-way UDP traffic for the keepalived suite, one process per node.

    ha-traffic.py --bind ADDR --to ADDR --ports 9201,9202 --out FILE
                  [--interval-ms 10] [--count N] [--wait-bind-s 10]

Binds ADDR:PORT for each port (both ends of a CHILD_SA whose traffic
selectors name the port on both sides), sends one datagram to TO:PORT per
port every interval, and receives what arrives. The counts and every
arrival time (CLOCK_REALTIME, comparable across namespaces) go to FILE as
JSON on SIGUSR1 (a snapshot), and on SIGTERM, SIGINT or after COUNT
datagrams per port (then it exits). The bind waits for ADDR to appear (a
service address that moves with the takeover).
"""
import argparse
import errno
import json
import os
import select
import signal
import socket
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--ports", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval-ms", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--wait-bind-s", type=float, default=10.0)
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET

    socks = {}
    deadline = time.monotonic() + args.wait_bind_s
    for port in ports:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:
            try:
                s.bind((args.bind, port))
                break
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
                    sys.exit(f"ha-traffic: bind {args.bind}:{port}: {e}")
                time.sleep(0.01)
        s.setblocking(False)
        socks[port] = s

    stats = {p: {"sent": 0, "send_errors": 0, "received": 0, "rx": []} for p in ports}
    started = time.time()
    state = {"stop": False, "dump": False}

    def dump():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"started": started, "ports": {str(p): v for p, v in stats.items()}}, f)
        os.replace(tmp, args.out)

    signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: state.update(stop=True))
    signal.signal(signal.SIGUSR1, lambda *_: state.update(dump=True))
    dump()  # tells the caller the ports are bound
    payload = b"x" * 64
    interval = args.interval_ms / 1000.0
    next_send = time.monotonic()
    by_fd = {s.fileno(): (p, s) for p, s in socks.items()}
    while not state["stop"]:
        if state["dump"]:
            state["dump"] = False
            dump()
        now = time.monotonic()
        if now >= next_send:
            if args.count and all(stats[p]["sent"] >= args.count for p in ports):
                break
            for port, s in socks.items():
                try:
                    s.sendto(payload, (args.to, port))
                    stats[port]["sent"] += 1
                except OSError:
                    stats[port]["send_errors"] += 1
            next_send += interval
            if next_send < now:
                next_send = now + interval
        timeout = max(0.0, next_send - time.monotonic())
        try:
            ready, _, _ = select.select(list(by_fd), [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            port, s = by_fd[fd]
            while True:
                try:
                    s.recvfrom(2048)
                except BlockingIOError:
                    break
                except OSError:
                    break
                stats[port]["received"] += 1
                stats[port]["rx"].append(time.time())
    dump()


if __name__ == "__main__":
    main()
