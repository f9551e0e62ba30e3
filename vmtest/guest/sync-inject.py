#!/usr/bin/env python3
"""Throws bad packets at a standby's sync link (for tests/vm_sync.rs, mode
daemon). Run in the active node's namespace:

    sync-inject.py DEV ACTIVE_ADDR STANDBY_ADDR PORT

Captures one packet the active daemon sends on DEV (a heartbeat comes every
200 ms), then sends towards the standby, from DEV:
  - the captured packet 3 times as it is: replays, which the standby must
    refuse as `replayed`;
  - the frame with one byte of its ciphertext changed: `auth_failed`;
  - the frame's header with a fresh packet number and random bytes for the
    ciphertext, as someone without the key would forge it: `auth_failed`;
  - the captured payload from another port of the active's address:
    `not_from_peer`.
Prints what it sent. IPv4 only; UDP checksums of changed frames are set to 0
(none), which IPv4 allows.
"""
import os
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def main():
    dev, active, standby, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    raw.bind((dev, 0))
    raw.settimeout(0.5)
    deadline = time.monotonic() + 10
    frame = None
    while frame is None and time.monotonic() < deadline:
        try:
            data, addr = raw.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] != socket.PACKET_OUTGOING or len(data) < 14 + 20 + 8 or data[12:14] != b"\x08\x00":
            continue
        ip = data[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != active or socket.inet_ntoa(ip[16:20]) != standby:
            continue
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
        if sport == port and dport == port:
            frame = data
    if frame is None:
        sys.exit("sync-inject: no packet of the active daemon seen on %s in 10 s" % dev)
    udp = 14 + (frame[14] & 15) * 4
    payload = udp + 8

    # A frame captured on its way out may carry a partial checksum (the
    # device would finish it): 0, "no checksum", is valid for IPv4 UDP.
    replay = bytearray(frame)
    replay[udp + 6:udp + 8] = b"\0\0"
    for _ in range(3):
        raw.send(bytes(replay))

    corrupted = bytearray(frame)
    corrupted[udp + 6:udp + 8] = b"\0\0"
    corrupted[min(payload + 50, len(frame) - 1)] ^= 0xFF
    raw.send(bytes(corrupted))

    forged = bytearray(frame)
    forged[udp + 6:udp + 8] = b"\0\0"
    # Header: magic 4, version, kind, flags, 0, session 16, start 8, number 8.
    forged[payload + 32:payload + 40] = struct.pack("!Q", 1 << 40)
    forged[payload + 48:] = os.urandom(len(frame) - payload - 48)
    raw.send(bytes(forged))

    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind((active, port + 1))
    other.sendto(frame[payload:], (standby, port))
    print("sent 3 replays, 1 corrupted, 1 forged, 1 from port %d" % (port + 1))


main()
