#!/usr/bin/env bash
# Inside the test VM, after kernel-suite.sh (it needs net-setup's namespaces
# for the HZ tests): thresholds for SAs as they appear (tests/vm_registry.rs:
# rules and their precedence, rule changes, a burst of XFRMSYNC_BURST SAs
# installed while the `xfrmsync apply` binary ($XFRMSYNC_TOOL, by default
# target/release/xfrmsync) runs, with a large and with a tiny notification
# buffer), HZ learnt without a live SA
# (tests/vm_hz.rs), and examples/install_sa.c, which installs an SA carrying
# its thresholds in its NEWSA. Ends with `registry-suite: N passed, N failed`.
set -uo pipefail
cd "$(dirname "$0")/../.."

for bin in target/vmtest/vm_registry target/vmtest/vm_hz target/ctest/install_sa target/ctest/rule_apply \
    "${XFRMSYNC_TOOL:-target/release/xfrmsync}"; do
    [[ -x $bin ]] || { echo "registry-suite: $bin missing: run scripts/test" >&2; exit 1; }
done
passed=0 failed=0
run() { # name command...
    local name=$1; shift
    if "$@"; then
        echo "ok - $name"; passed=$((passed + 1))
    else
        echo "not ok - $name"; failed=$((failed + 1))
    fi
}
echo "registry-suite: kernel $(uname -r), bursts of ${XFRMSYNC_BURST:-5000} SAs"
run "rules and bursts (tests/vm_registry.rs)" target/vmtest/vm_registry --ignored --test-threads=1 --nocapture
# A separate process: it starts from "HZ unknown".
run "HZ without a live SA (tests/vm_hz.rs)" target/vmtest/vm_hz --ignored --test-threads=1 --nocapture

# The C API's rules (c-tests/rule_apply.c): each application names the rule
# that gave it (xfrmsync_on_applied_rule).
c_rules() {
    ip netns del crules 2>/dev/null || true
    ip netns add crules && ip -n crules link set lo up || return 1
    ip -n crules xfrm state add src 10.67.0.1 dst 10.67.0.2 proto esp spi 0x7001 reqid 71 mode transport \
        enc 'ecb(cipher_null)' '' || return 1
    ip -n crules xfrm state add src 10.67.0.1 dst 10.67.0.3 proto esp spi 0x7002 reqid 72 mode transport \
        enc 'ecb(cipher_null)' '' || return 1
    local out
    out=$(ip netns exec crules target/ctest/rule_apply --seconds 1 \
        wide:dst=10.67.0.0/16,replay=6,timer=600 narrow:reqid=72,replay=9,timer=900 2>&1)
    ip netns del crules
    echo "$out" | sed 's/^/#   /'
    grep -q 'applied spi=0x00007001 .*replay=6 timer=600 result=0 rule=wide$' <<<"$out" &&
        grep -q 'applied spi=0x00007002 .*replay=9 timer=900 result=0 rule=narrow$' <<<"$out"
}
run "C API: rules, and the rule each application came from (rule_apply)" c_rules

# install_sa learns HZ by itself (no XFRMSYNC_EXPECTED_HZ reaches the library).
ip netns del inst 2>/dev/null || true
ip netns add inst && ip -n inst link set lo up && ip -n inst addr add 10.66.0.1/32 dev lo
run "examples/install_sa: an SA with its thresholds in its NEWSA" \
    ip netns exec inst target/ctest/install_sa 10.66.0.1 10.66.0.2 0x9001 9 23 2300
ip netns del inst

echo "registry-suite: $passed passed, $failed failed"
((failed == 0))
