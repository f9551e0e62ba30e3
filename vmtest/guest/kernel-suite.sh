#!/usr/bin/env bash
# Inside the test VM (vmtest/run-in-vm <kernel> vmtest/guest/kernel-suite.sh):
# builds the two-namespace scenario, runs the C API's real-kernel tests
# (c-tests/kernel_test.c, built with AddressSanitizer by scripts/build-c),
# then checks that both watch examples print live events as JSON lines.
# Everything it needs was built on the host by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "kernel-suite: $*" >&2; exit 1; }
kernel=$(uname -r)
# The guest cannot see the host's kernel cache (/var is its own), so the host
# reads CONFIG_HZ from the booted kernel's config file and passes it in.
hz=${XFRMSYNC_EXPECTED_HZ:-}
[[ -n $hz ]] || fail "XFRMSYNC_EXPECTED_HZ not set: run through scripts/test"
for bin in target/ctest/kernel_test target/ctest/misuse_test target/ctest/watch target/release/examples/watch target/vmtest/udp-send \
    target/vmtest/vm_events; do
    [[ -x $bin ]] || fail "$bin missing: run scripts/test (it builds everything before booting)"
done
echo "kernel-suite: kernel $kernel, CONFIG_HZ=$hz"

vmtest/guest/net-setup.sh >/dev/null
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 target/ctest/kernel_test target/vmtest/udp-send "$hz"
# C API misuse with live events (c-tests/misuse_test.c, AddressSanitizer):
# re-entry, freeing a handle inside its callback, two threads, events left.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 target/ctest/misuse_test --vm
# The Rust API, and no allocation while dispatching (tests/vm_events.rs).
target/vmtest/vm_events --ignored --test-threads=1 --nocapture

# The examples, as a user runs them: each watches namespace b while 6 packets
# arrive on SA 0x1001, and must print the events as JSON lines.
out=target/vmtest/examples-$kernel
mkdir -p "$out"
target/ctest/watch --json --netns /run/netns/b --seconds 5 >"$out/c.jsonl" &
c_pid=$!
target/release/examples/watch --json --netns /run/netns/b --seconds 5 >"$out/rust.jsonl" &
rust_pid=$!
sleep 1
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
[[ $failed -eq 0 ]]
