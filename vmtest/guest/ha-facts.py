#!/usr/bin/env python3
"""Reads what keepalived-suite.sh checks, from the kernel and ha-traffic.py.

    ha-facts.py sas NETNS SRC DST      one line per ESP SA from SRC to DST:
                                       "SPI PACKETS REPLAY FAILED OSEQ"
                                       (`ip -s xfrm state`; OSEQ with the
                                       ESN high half)
    ha-facts.py stat NETNS NAME        a /proc/net/xfrm_stat counter
    ha-facts.py sent FILE              datagrams ha-traffic.py sent, all ports
    ha-facts.py first-after FILE T     seconds from T (epoch seconds) to the
                                       first datagram that arrived after it,
                                       or "none"
"""
import json
import re
import subprocess
import sys


def sas(netns, src, dst):
    text = subprocess.run(["ip", "-n", netns, "-s", "xfrm", "state"], check=True,
                          capture_output=True, text=True).stdout
    # Each SA starts with an unindented "src ... dst ..." line.
    for block in re.split(r"(?m)^(?=src )", text):
        head = re.match(r"src (\S+) dst (\S+)", block)
        spi = re.search(r"proto esp spi (0x[0-9a-f]+)", block)
        if not head or not spi or head.group(1) != src or head.group(2) != dst:
            continue
        packets = re.search(r"(\d+)\(packets\)", block)
        stats = re.search(r"replay-window \d+ replay (\d+) failed (\d+)", block)
        oseq = re.search(r"\boseq (0x[0-9a-f]+)", block)
        oseq_hi = re.search(r"\boseq-hi (0x[0-9a-f]+)", block)
        number = int(oseq.group(1), 16) if oseq else 0
        if oseq_hi:
            number += int(oseq_hi.group(1), 16) << 32
        print(int(spi.group(1), 16), packets.group(1) if packets else 0,
              stats.group(1) if stats else 0, stats.group(2) if stats else 0, number)


def stat(netns, name):
    text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/xfrm_stat"], check=True,
                          capture_output=True, text=True).stdout
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            print(value.strip())
            return
    print(0)


def load(path):
    with open(path) as f:
        return json.load(f)["ports"]


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sas":
        sas(*args)
    elif cmd == "stat":
        stat(*args)
    elif cmd == "sent":
        print(sum(p["sent"] for p in load(args[0]).values()))
    elif cmd == "first-after":
        t = float(args[1])
        after = [x for p in load(args[0]).values() for x in p["rx"] if x > t]
        print(f"{min(after) - t:.3f}" if after else "none")
    else:
        sys.exit(f"ha-facts: unknown command {cmd}")


if __name__ == "__main__":
    main()
