#!/usr/bin/env bash
# Inside the test VM (vmtest/run-in-vm <kernel> vmtest/guest/kernel-suite.sh):
# builds the two-namespace scenario, runs the C API's real-kernel tests
# (c-tests/kernel_test.c, built with AddressSanitizer by scripts/build-c),
# then checks that both watch examples print live events as JSON lines, and
# last observes the kernel facts of the README's table: vmtest/guest/xfrm-probe
# (raw netlink: what the library never sends) and c-tests/sa_dir_test.c (the
# C API on SAs installed with a direction). Their "fact:" lines are written to
# target/vmtest/facts-<series>.txt (scripts/kernel-facts renders the table).
# Everything it needs was built on the host by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "kernel-suite: $*" >&2; exit 1; }
kernel=$(uname -r)
# The guest cannot see the host's kernel cache (/var is its own), so the host
# reads CONFIG_HZ from the booted kernel's config file and passes it in.
hz=${XFRMSYNC_EXPECTED_HZ:-}
[[ -n $hz ]] || fail "XFRMSYNC_EXPECTED_HZ not set: run through scripts/test"
for bin in target/ctest/kernel_test target/ctest/misuse_test target/ctest/watch target/release/examples/watch \
    target/vmtest/udp-send target/vmtest/vm_events target/ctest/sa_dir_test target/vmtest/xfrm-probe; do
    [[ -x $bin ]] || fail "$bin missing: run scripts/test (it builds everything before booting)"
done
echo "kernel-suite: kernel $kernel, CONFIG_HZ=$hz"
# This run's facts only: a run that stops early leaves none, not an old file.
series=${XFRMSYNC_VM_KERNEL:-$kernel}
rm -f "target/vmtest/facts-$series.txt"

vmtest/guest/net-setup.sh >/dev/null
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 target/ctest/kernel_test target/vmtest/udp-send "$hz"
# C API misuse with live events (c-tests/misuse_test.c, AddressSanitizer):
# re-entry, freeing a handle inside its callback, two threads, events left.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 target/ctest/misuse_test --vm
# The Rust API, and no allocation while dispatching (tests/vm_events.rs), on
# a fresh scenario: kernel_test leaves SA 0x5001 with a 10 s timer threshold
# and two packets not yet reported, so its timer event comes about 10 s after
# that test, which can be inside vm_events' counting window (seen on 5.10).
vmtest/guest/net-setup.sh >/dev/null
target/vmtest/vm_events --ignored --test-threads=1 --nocapture

# The examples, as a user runs them: each watches namespace b while 6 packets
# arrive on SA 0x1001, and must print the events as JSON lines. They run for
# 15 s; the traffic starts once both have joined the aevents group in b (a
# fixed second was too short on a loaded host: the C watcher missed the first
# events on 5.10). /proc/net/netlink of b lists each XFRM socket (protocol 6)
# with its groups; XFRMNLGRP_AEVENTS is 0x10.
out=target/vmtest/examples-$kernel
mkdir -p "$out"
target/ctest/watch --json --netns /run/netns/b --seconds 15 >"$out/c.jsonl" &
c_pid=$!
target/release/examples/watch --json --netns /run/netns/b --seconds 15 >"$out/rust.jsonl" &
rust_pid=$!
listeners_in_b() {
    local n=0 proto groups
    while read -r _ proto _ groups _; do
        if [[ $proto == 6 && $groups =~ ^[0-9a-f]{8}$ ]] && ((16#$groups & 0x10)); then n=$((n + 1)); fi
    done < <(nsenter --net=/run/netns/b cat /proc/net/netlink)
    echo "$n"
}
t0=$SECONDS
until (($(listeners_in_b) >= 2)) || ((SECONDS - t0 >= 12)); do sleep 0.2; done
echo "kernel-suite: the watch examples listen after $((SECONDS - t0)) s"
target/vmtest/udp-send --netns /run/netns/a 10.9.0.2 9001 6 64 100 2>/dev/null
wait "$c_pid" "$rust_pid"
passed=0 failed=0
for which in c rust; do
    if python3 - "$out/$which.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
mine = [e for e in lines if e["spi"] == 0x1001 and e["daddr"] == "10.9.0.2"]
assert len(mine) >= 3, f"{len(mine)} events of SA 0x1001 in {len(lines)} lines"
assert all(e["cause"] in ("replay", "timer") for e in mine), mine
assert mine[-1]["replay"]["seq"] >= 6, mine[-1]
PY
    then
        echo "ok - $which watch example printed $(wc -l <"$out/$which.jsonl") JSON event lines"
        passed=$((passed + 1))
    else
        echo "not ok - $which watch example output ($out/$which.jsonl):"; cat "$out/$which.jsonl"
        failed=$((failed + 1))
    fi
done
echo "examples: $passed passed, $failed failed"

# Kernel facts. Each program checks what it observes against what this
# kernel's version should do, and prints "fact:" lines.
log=target/vmtest/facts-$series.log
: >"$log"
facts_failed=()
target/vmtest/xfrm-probe facts "$hz" | tee -a "$log" || facts_failed+=("xfrm-probe facts")
target/vmtest/xfrm-probe dir-facts target/vmtest/udp-send | tee -a "$log" || facts_failed+=("xfrm-probe dir-facts")
dir=$(target/vmtest/xfrm-probe --netns b sa-dir 10.9.0.2 0x8001)
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 target/ctest/sa_dir_test target/vmtest/udp-send "$dir" "$hz" |
    tee -a "$log" || facts_failed+=("c-tests/sa_dir_test")
{
    echo "series: $series"
    echo "kernel: $kernel"
    echo "config_hz: $hz"
    sed -n 's/^fact: //p' "$log"
} >"target/vmtest/facts-$series.txt.tmp"
mv "target/vmtest/facts-$series.txt.tmp" "target/vmtest/facts-$series.txt"
echo "kernel-suite: facts of $kernel in target/vmtest/facts-$series.txt"
((${#facts_failed[@]} == 0)) || echo "kernel-suite: failed: ${facts_failed[*]}"
[[ $failed -eq 0 && ${#facts_failed[@]} -eq 0 ]]
