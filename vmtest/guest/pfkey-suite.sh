#!/usr/bin/env bash
# Inside the test VM (vmtest/run-in-vm <kernel> vmtest/guest/pfkey-suite.sh):
# racoon's path. In a network namespace of its own (pfk), a rule applier
# runs as a separate process, the way `xfrmsync apply` runs beside racoon
# (`xfrmsync apply`, target/release/xfrmsync, with a rules file);
# c-tests/pfkey_test.c then installs SAs through a PF_KEY socket
# (module af_key) with SADB_ADD, and with SADB_GETSPI + SADB_UPDATE as racoon
# does for inbound SAs, and checks that each gets its rule's thresholds (and
# an SA no rule matches keeps the namespace defaults).
# Needs target/ctest/{rule_apply,pfkey_test} (scripts/build-daemon-tests).
# Ends with "pfkey: N passed, N failed" (pfkey_test's own line, or this
# script's when the setup failed); exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=target/vmtest/pfkey-$(uname -r)
fail() { echo "not ok - $*"; echo "pfkey: 0 passed, 1 failed"; exit 1; }
for f in target/release/xfrmsync target/ctest/pfkey_test; do
    [[ -x $f ]] || fail "$f missing: run scripts/build-daemon-tests on the host"
done
rm -rf "$OUT" && mkdir -p "$OUT"
modprobe -a af_key xfrm_user esp4 authenc || fail "modprobe af_key xfrm_user esp4 authenc"
mkdir -p /run/netns
ip netns del pfk 2>/dev/null
ip netns add pfk || fail "ip netns add pfk"
ip -n pfk link set lo up
echo "# namespace pfk: net.core.xfrm_aevent_etime=$(ip netns exec pfk cat /proc/sys/net/core/xfrm_aevent_etime)" \
    "net.core.xfrm_aevent_rseqth=$(ip netns exec pfk cat /proc/sys/net/core/xfrm_aevent_rseqth)"

# `xfrmsync apply` beside racoon, as a racoon user deploys it.
printf '%s\n' '[[rule]]' 'name = "racoon-reqid"' 'reqid = 71' 'replay_packets = 16' 'timer_ms = 1500' '' \
    '[[rule]]' 'name = "racoon-peers"' 'dst = "10.20.9.0/24"' 'replay_packets = 8' 'timer_ms = 700' >"$OUT/rules.toml"
target/release/xfrmsync apply --netns pfk "$OUT/rules.toml" >"$OUT/rule-apply.log" 2>&1 &
applier=$!
for ((i = 0; i < 300; i++)); do grep -q ready "$OUT/rule-apply.log" && break; sleep 0.1; done
grep -q ready "$OUT/rule-apply.log" || { kill $applier; fail "rule_apply did not start: $(cat "$OUT/rule-apply.log")"; }

ip netns exec pfk target/ctest/pfkey_test
rc=$?
kill $applier
wait $applier
echo "# the applier's log:"
sed 's/^/#   /' "$OUT/rule-apply.log"
ip netns del pfk
exit $rc
