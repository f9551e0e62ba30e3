#!/usr/bin/env bash
# Inside the test VM (scripts/bench-vm --commit): HA sync's takeover
# (issue 13) on XFRMSYNC_COMMIT_SAS SAs (default 10,000), by
# `vm_bench commit`: the same SAs in namespaces ka (the active node, its
# SAs with traffic counted) and kb (the standby, freshly installed), half
# outbound and half inbound, one pair in four ESN; `Active` on ka until a
# `Standby` holds a record of each SA, then `Standby::commit` on kb, timed;
# every SA's outcome counted and its number read back from kb; the
# standby's bytes per SA (allocator totals).
#
# Figures only: no time is asserted. Ends with "commit-bench: N passed, N
# failed" for what is checked (every SA written, and holding the number
# written).
set -uo pipefail
cd "$(dirname "$0")/../.."

SAS=${XFRMSYNC_COMMIT_SAS:-10000}
BENCH=$PWD/benches/target/release/vm_bench
passed=0 failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
finish() {
    echo "commit-bench: $passed passed, $failed failed"
    ((failed == 0 && passed > 0))
    exit
}

[[ -x $BENCH ]] || { not_ok "$BENCH missing: scripts/bench-vm builds it"; finish; }
mkdir -p /run/netns
echo "commit-bench: kernel $(uname -r), $SAS SAs, $(nproc) CPUs, $(free -m | awk '/Mem:/ { print $2 }') MiB"
echo
if "$BENCH" commit "$SAS"; then
    echo
    ok "$SAS SAs committed, each written and read back with the number written"
else
    echo
    not_ok "vm_bench commit $SAS (its output above says what failed)"
fi
finish
