#!/usr/bin/env bash
# Inside the test VM: every real-kernel suite of the project, in one boot
# (booting under TCG costs more than most suites). XFRMSYNC_VM_SET says
# which:
#   core  kernel-suite.sh (C and Rust API, examples, kernel facts),
#         route-based-suite.sh (64 SAs with a mark and an if_id, which a
#         GETAE for both thresholds panics 5.10 on), registry-suite.sh
#         (bursts of 5,000 SAs through `xfrmsync apply`) and
#         ha-suite.sh (HA sync: a standby takes over live SAs under ESP
#         traffic) and strongswan-suite.sh (charon with the plugin, a
#         route-based child among its children)
#   full  the same, plus tool-suite.sh (the xfrmsync command),
#         pfkey-suite.sh (racoon's path) and keepalived-suite.sh (a real
#         IKEv2 gateway pair failing over: keepalived, strongSwan's ha
#         plugin and `xfrmsync sync`) and corosync-suite.sh (three
#         nodes on Corosync, `xfrmsync sync` over CPG, driven through the
#         OCF agent as Pacemaker drives it)
# Each suite runs to its end even when one before it failed; the time each
# took is printed. Ends with `guest-suites: N passed, N failed`.
set -uo pipefail
cd "$(dirname "$0")/../.."

set_name=${XFRMSYNC_VM_SET:-full}
case $set_name in
    core) export XFRMSYNC_BURST=${XFRMSYNC_BURST:-5000}
          list=(kernel-suite.sh route-based-suite.sh registry-suite.sh ha-suite.sh strongswan-suite.sh) ;;
    full) export XFRMSYNC_BURST=${XFRMSYNC_BURST:-5000}
          list=(kernel-suite.sh route-based-suite.sh registry-suite.sh ha-suite.sh tool-suite.sh strongswan-suite.sh
              pfkey-suite.sh keepalived-suite.sh corosync-suite.sh) ;;
    *) echo "suites: XFRMSYNC_VM_SET is '$set_name', not core or full" >&2; exit 2 ;;
esac
echo "suites: $set_name set on $(uname -r): ${list[*]}"
# The kernel switches tc's ingress and egress paths on and off with static
# keys, patching its own code, whenever the first clsact qdisc of the
# machine appears or the last one goes: the suites rebuild namespaces that
# hold one (net-setup.sh, route-based-suite.sh, the daemon suites) while
# traffic flows. 6.12.118 once panicked there under TCG, with RIP in the
# middle of a 5-byte NOP (tc_run+0x44): one CPU ran the code another was
# patching. A clsact qdisc of its own, kept for the whole boot, holds the
# keys on, so no suite ever flips them.
modprobe sch_ingress 2>/dev/null
mkdir -p /run/netns
ip netns add tc-keys 2>/dev/null
if ip -n tc-keys link set lo up && tc -n tc-keys qdisc replace dev lo clsact; then
    echo "suites: tc's static keys held on by a clsact qdisc in netns tc-keys"
else
    echo "suites: could not hold tc's static keys on (netns tc-keys)" >&2
fi
passed=0 failed=0 failures=()
for suite in "${list[@]}"; do
    echo "=== suite $suite"
    t0=$SECONDS
    if bash "vmtest/guest/$suite"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); failures+=("$suite")
    fi
    echo "suite-time: $suite $((SECONDS - t0)) s"
done
((failed == 0)) || echo "suites: failed: ${failures[*]}"
echo "guest-suites: $passed passed, $failed failed"
((failed == 0))
