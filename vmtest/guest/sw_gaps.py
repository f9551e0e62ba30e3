#!/usr/bin/env python3
"""The gap between each SA's install and its thresholds, from
target/ctest/sa_monitor's timestamped notifications (for
vmtest/guest/strongswan-suite.sh).

  sw_gaps.py MONITOR[,MONITOR...] PHASES REQID...

For each SA of the REQIDs that the kernel announces as added or updated
(NEWSA/UPDSA), the time until the first update aevent (XFRM_AE_CU) of that
SA: when its thresholds were set. PHASES has lines "NAME START_EPOCH"; an
install belongs to the last phase started before it. Each MONITOR (one per
network namespace) is read on its own. Prints, per phase with installs:
count, median and worst gap; exits 1 if an SA of a phase never got its
thresholds while it existed (one deleted before is counted apart).
With several MONITORs it prints each one's lines (prefixed with its file
name) and then those of all of them together ("all:").
"""
import json
import sys

XFRM_AE_CU = 64


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith('{"t"')]


def median(values):
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def gaps_of(events, phase_of, reqids, result, missing, deleted):
    pending = {}  # (dst, spi) -> (install time, phase, event)
    lost = 0
    for e in events:
        ev = e["ev"]
        if ev == "lost":
            lost += 1
            continue
        key = (e["dst"], e["spi"])
        if ev in ("NEWSA", "UPDSA"):
            if e["reqid"] in reqids and e["spi"] != "0x00000000":
                pending[key] = (e["t"], phase_of(e["t"]), ev)
        elif ev == "DELSA":
            if key in pending:
                _, phase, _ = pending.pop(key)
                if phase:
                    deleted[phase] += 1
        elif ev == "AE" and e["flags"] & XFRM_AE_CU and key in pending:
            t0, phase, _ = pending.pop(key)
            if phase:
                result[phase].append((e["t"] - t0) * 1000)
    for key, (_, phase, ev) in pending.items():
        if phase:
            missing[phase].append(f"{ev} {key[1]} dst {key[0]}")
    return lost


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    monitors, phases_path, reqids = argv[1], argv[2], {int(r) for r in argv[3:]}
    phases = []
    with open(phases_path) as f:
        for line in f:
            if line.strip():
                name, start = line.split()
                phases.append((float(start), name))
    phases.sort()

    def phase_of(t):
        name = None
        for start, n in phases:
            if t >= start:
                name = n
        return name

    paths = monitors.split(",")
    events = {path: load(path) for path in paths}
    bad = 0
    groups = [([p], p.rsplit("/", 1)[-1].removesuffix(".jsonl") + ":") for p in paths] if len(paths) > 1 else []
    groups.append((paths, "all:" if len(paths) > 1 else ""))
    for group, label in groups:
        bad |= report(group, label, events, phases, phase_of, reqids)
    return bad


def report(paths, label, events, phases, phase_of, reqids):
    result = {name: [] for _, name in phases}
    missing = {name: [] for _, name in phases}
    deleted = {name: 0 for _, name in phases}
    lost = 0
    for path in paths:
        lost += gaps_of(events[path], phase_of, reqids, result, missing, deleted)
    bad = 0
    prefix = f"{label} " if label else ""
    for _, name in phases:
        g = result[name]
        if not (g or deleted[name] or missing[name]):
            continue
        line = f"{prefix}gap {name}: {len(g)} SAs"
        if g:
            line += f", median {median(g):.1f} ms, worst {max(g):.1f} ms"
        if deleted[name]:
            line += f", {deleted[name]} deleted before any thresholds"
        if missing[name]:
            line += f"; NEVER GOT THRESHOLDS: {', '.join(missing[name])}"
            bad = 1
        print(line)
    if lost:
        print(f"{prefix}gap: the monitor lost notifications {lost} times; gaps may be missing")
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv))
