#!/usr/bin/env bash
# Tests the OCF agent beside this script: ocf-tester's run, then what
# ocf-tester leaves out: monitor's codes in each role (stopped, standby,
# active, replaced, stale records), the promotion scores Pacemaker would be
# given, and the checks of validate-all. Two daemons, A and S, talk over
# 127.0.0.1 in a network namespace of the test's own, with no SA: this is
# about the agent, not about takeovers (vmtest does those).
#
#   cargo build --release -p xfrmsync-tool
#   sudo tools/xfrmsync/contrib/pacemaker/test-ocf.sh
#
# Needs root (network namespaces), resource-agents (ocf-tester,
# ocf-shellfuncs) and libxml2-utils (ocf-tester checks the meta-data with
# xmllint). A missing one fails the test: a skipped test would pass an agent
# nobody ran. XFRMSYNC names another binary than target/release/xfrmsync.
# Ends with "ocf: N passed, N failed"; exits non-zero on any failure.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../../.." && pwd)
AGENT=$HERE/xfrmsync
XFRMSYNC=${XFRMSYNC:-$REPO/target/release/xfrmsync}
NS=xfrmsync-ocf-test
export OCF_ROOT=/usr/lib/ocf

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
finish() {
    echo "ocf: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
    exit
}

missing=()
[ "$(id -u)" = 0 ] || missing+=("root: the test adds a network namespace")
command -v ocf-tester >/dev/null || missing+=("ocf-tester: install the package resource-agents")
[ -f $OCF_ROOT/lib/heartbeat/ocf-shellfuncs ] || missing+=("$OCF_ROOT/lib/heartbeat/ocf-shellfuncs: install resource-agents")
command -v xmllint >/dev/null || missing+=("xmllint, which ocf-tester validates the meta-data with: install libxml2-utils")
command -v ip >/dev/null || missing+=("ip: install iproute2")
[ -x "$XFRMSYNC" ] || missing+=("$XFRMSYNC: cargo build --release -p xfrmsync-tool")
if [ ${#missing[@]} -gt 0 ]; then
    for m in "${missing[@]}"; do not_ok "missing $m"; done
    finish
fi

TMP=$(mktemp -d /tmp/xfrmsync-ocf.XXXXXX)
cleanup() {
    local n
    for n in a s; do agent $n stop >/dev/null 2>&1; done
    ip netns pids $NS 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del $NS 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
# A run that was killed leaves its namespace and daemons behind.
ip netns pids $NS 2>/dev/null | xargs -r kill -9 2>/dev/null
ip netns del $NS 2>/dev/null
ip netns add $NS && ip -n $NS link set lo up || { not_ok "ip netns add $NS"; finish; }

"$XFRMSYNC" sync keygen "$TMP/key" >/dev/null || { not_ok "xfrmsync sync keygen"; finish; }
write_config() { # NODE LOCAL_PORT PEER_PORT HEARTBEAT_MS [TOP-LEVEL LINE]
    cat >"$TMP/$1.toml" <<EOF
${5:-}
control_socket = "$TMP/$1.sock"
state_file = "$TMP/$1.state"
[link]
local = "127.0.0.1:$2"
peer = "127.0.0.1:$3"
key_file = "$TMP/key"
heartbeat_ms = $4
EOF
}
# S's heartbeats are slow, so that A, promoted as soon as it started, has
# not heard S's epoch yet unless the agent waits for it.
write_config a 7920 7921 100
write_config s 7921 7920 2000
write_config active 7922 7923 100 'role = "active"'
write_config busy 7920 7921 100

# Pacemaker's crm_attribute and crm_master, which only note the score, so
# that the scores can be checked without a cluster.
mkdir "$TMP/sbin"
for tool in crm_attribute crm_master; do
    printf '#!/bin/sh\necho "$*" >>"$XS_SCORE_LOG"\n' >"$TMP/sbin/$tool"
    chmod 755 "$TMP/sbin/$tool"
done
# `status --json` from $TMP/fake-status when it exists: records of SAs,
# which this host (no ESP) cannot have.
cat >"$TMP/fake-xfrmsync" <<EOF
#!/bin/sh
case " \$* " in *" status --json "*) [ -e "$TMP/fake-status" ] && exec cat "$TMP/fake-status" ;; esac
exec "$XFRMSYNC" "\$@"
EOF
chmod 755 "$TMP/fake-xfrmsync"

# agent NODE ACTION [VAR=VALUE...]: the agent as Pacemaker runs it (a
# Pacemaker of feature set 3.10 or later: crm_attribute --promotion).
agent() {
    local node=$1 action=$2
    shift 2
    env OCF_RESOURCE_INSTANCE=xfrmsync-$node OCF_RESKEY_crm_feature_set=3.17.4 \
        OCF_RESKEY_config="$TMP/$node.toml" OCF_RESKEY_binary="$XFRMSYNC" OCF_RESKEY_netns=$NS \
        OCF_RESKEY_pidfile="$TMP/$node.pid" OCF_RESKEY_logfile="$TMP/$node.log" \
        HA_SBIN_DIR="$TMP/sbin" XS_SCORE_LOG="$TMP/$node.scores" "$@" \
        "$AGENT" "$action" >>"$TMP/agent-$node.log" 2>&1
}
# The last score the agent gave NODE: a number, or "none" (deleted, or
# never set).
score() {
    local last
    last=$(tail -n 1 "$TMP/$1.scores" 2>/dev/null)
    case $last in
    *-D*) echo none ;;
    *-v\ *) echo "${last##*-v }" ;;
    *) echo none ;;
    esac
}
# expect WHAT CODE NODE ACTION [VAR=VALUE...]: the action returns CODE.
expect() {
    local what=$1 want=$2 node=$3 action=$4 rc
    shift 4
    agent "$node" "$action" "$@"
    rc=$?
    if [ $rc -eq "$want" ]; then
        ok "$what: $action on $node returns $rc"
    else
        not_ok "$what: $action on $node returns $rc, not $want: $(tail -n 3 "$TMP/agent-$node.log" | tr '\n' ' ')"
    fi
}
expect_score() { # WHAT NODE SCORE
    local got
    got=$(score "$2")
    if [ "$got" = "$3" ]; then ok "$1: promotion score on $2 $got"; else not_ok "$1: promotion score on $2 $got, not $3"; fi
}
# until_score NODE SCORE: monitors NODE until its score is SCORE (10 s).
until_score() {
    local i
    for ((i = 0; i < 50; i++)); do
        agent "$1" monitor
        [ "$(score "$1")" = "$2" ] && return 0
        sleep 0.2
    done
    return 1
}
# The first "epoch" of the status is the node's own: the peer's comes
# later, whichever way the keys are ordered.
epoch() {
    "$XFRMSYNC" sync status --json --socket "$TMP/$1.sock" | grep -o '"epoch":[0-9]*' | head -n 1 | cut -d: -f2
}
until_code() { # NODE CODE: monitors NODE until it returns CODE (10 s)
    local i rc
    for ((i = 0; i < 50; i++)); do
        agent "$1" monitor
        rc=$?
        [ $rc -eq "$2" ] && return 0
        sleep 0.2
    done
    return 1
}

echo "# meta-data: OCF 1.1's schema (ocf-tester checks the older DTD)"
if "$AGENT" meta-data | xmllint --noout --relaxng /usr/share/resource-agents/metadata.rng - 2>"$TMP/rng.err"; then
    ok "meta-data valid under resource-agents' OCF 1.1 metadata.rng"
else
    not_ok "meta-data against metadata.rng: $(cat "$TMP/rng.err")"
fi

echo "# ocf-tester"
ocf_out=$(ocf-tester -n xfrmsync-s -o config="$TMP/s.toml" -o binary="$XFRMSYNC" -o netns=$NS \
    -o pidfile="$TMP/s.pid" -o logfile="$TMP/s.log" "$AGENT" 2>&1)
ocf_rc=$?
printf '%s\n' "$ocf_out" | sed 's/^/    /'
if [ $ocf_rc -eq 0 ] && printf '%s\n' "$ocf_out" | grep -q 'passed all tests'; then
    ok "ocf-tester passed"
else
    not_ok "ocf-tester failed (status $ocf_rc)"
fi
agent s stop

echo "# validate-all"
expect "a config that says role = \"active\"" 5 active validate-all
expect "max_record_age_ms not a number" 6 s validate-all OCF_RESKEY_max_record_age_ms=30s
expect "promoted-max 2" 6 s validate-all OCF_RESKEY_CRM_meta_promoted_max=2
expect "a namespace that does not exist" 5 s validate-all OCF_RESKEY_netns=xfrmsync-ocf-test-none
expect "the socket the config names" 0 s validate-all OCF_RESKEY_socket="$TMP/s.sock"
expect "another socket than the config's" 6 s validate-all OCF_RESKEY_socket="$TMP/other.sock"

echo "# the roles"
: >"$TMP/s.scores"
expect "stopped" 7 s monitor
expect_score "stopped" s none
expect "S alone" 0 s start
expect "S alone, just started" 0 s monitor
expect_score "S just started, no peer heard yet" s none
expect "A" 0 a start
# ocf-tester's promotions left S at a higher epoch than A's new state file:
# A must hear it before it commits, or it commits below it.
s_epoch=$(epoch s)
expect "A" 0 a promote
if [ "$(epoch a)" = $((s_epoch + 1)) ]; then ok "A, just started, committed above S's epoch $s_epoch"
else not_ok "A committed at epoch $(epoch a), S was at $s_epoch"; fi
expect "A promoted" 8 a monitor
expect_score "A active" a 1000
expect "promoting A again" 0 a promote
if until_score s 100; then
    ok "S standby: score 100 once it holds a whole snapshot from active A"
else
    not_ok "S standby: score $(score s) 10 s after A's promotion, not 100: $(tail -n 3 "$TMP/agent-s.log" | tr '\n' ' ')"
fi
expect "S standby, current" 0 s monitor
expect "S" 0 s promote
expect "S promoted" 8 s monitor
if until_code a 9; then
    ok "A replaced by S's commit: monitor returns 9 (failed promoted)"
else
    not_ok "A's monitor did not return 9 after S's commit: $(tail -n 3 "$TMP/agent-a.log" | tr '\n' ' ')"
fi
expect_score "A replaced" a none
expect "A replaced" 0 a demote
expect "A demoted" 0 a monitor
if until_score a 100; then ok "A demoted: score 100 once S sent it a snapshot"; else not_ok "A demoted: score $(score a), not 100"; fi
# S's count of snapshots goes on from its standby days: after its demote
# it holds nothing, and with no active peer to send any, it is "alone".
expect "S" 0 s demote
expect "S demoted" 0 s monitor
expect_score "S demoted, no active peer: nothing held, not current" s 5
expect "A" 0 a promote
if until_score s 100; then ok "S: score 100 again once A (active again) sent a snapshot"; else not_ok "S: score $(score s), not 100"; fi
expect "demoting S, a standby" 0 s demote

echo "# records (a canned status: this host has no SA)"
canned() { # PEER_HEARD_MS_AGO AGE1 AGE2
    printf '{"commits":0,"epoch":7,"peer":{"epoch":7,"heard_ms_ago":%s,"role":"active"},"records":{"held":2,"received":9},"replaced_by":null,"resyncs":{"asked":1,"completed":1,"served":0},"role":"standby","sas":[{"direction":"out","record_age_ms":%s,"sa":"esp:0x100@10.0.0.1","records":{"held":1,"rejected":{"lower_epoch":0,"older":0}}},{"direction":"in","record_age_ms":%s,"sa":"esp:0x101@10.0.0.2"},{"direction":"dir?","record_age_ms":null,"sa":"esp:0x102@10.0.0.3"}]}\n' "$@" >"$TMP/fake-status"
}
canned 120 2000 45000
expect "a record 45 s old, the active peer heard 120 ms ago" 1 s monitor OCF_RESKEY_binary="$TMP/fake-xfrmsync"
if grep -q 'esp:0x101@10.0.0.2 (45000 ms)' "$TMP/agent-s.log" && ! grep -q 'esp:0x100@10.0.0.1 (' "$TMP/agent-s.log"; then
    ok "the stale SA, and only it, named in the exit reason"
else
    not_ok "the exit reason: $(grep 'ocf-exit-reason' "$TMP/agent-s.log" | tail -n 1)"
fi
expect_score "stale records" s none
expect "max_record_age_ms=0 turns the check off" 0 s monitor OCF_RESKEY_binary="$TMP/fake-xfrmsync" OCF_RESKEY_max_record_age_ms=0
canned 40000 2000 45000
expect "records aging because the active peer went silent 40 s ago" 0 s monitor OCF_RESKEY_binary="$TMP/fake-xfrmsync"
canned 120 2000 29000
expect "records within max_record_age_ms" 0 s monitor OCF_RESKEY_binary="$TMP/fake-xfrmsync"
# A group of three: "peer" is whichever was heard last, here the other
# standby; the active one is in "peers".
printf '{"epoch":7,"peer":{"epoch":7,"heard_ms_ago":10,"role":"standby"},"peers":[{"epoch":7,"heard_ms_ago":10,"id":"cpg:3","role":"standby"},{"epoch":7,"heard_ms_ago":150,"id":"cpg:1","role":"active"}],"resyncs":{"completed":1},"role":"standby","sas":[{"record_age_ms":45000,"sa":"esp:0x100@10.0.0.1"}]}\n' >"$TMP/fake-status"
expect "three nodes: a stale record, the active peer not the one heard last" 1 s monitor OCF_RESKEY_binary="$TMP/fake-xfrmsync"
rm -f "$TMP/fake-status"

echo "# a daemon that exits as it starts (A has its UDP port)"
expect "a port in use" 1 busy start
if grep -q 'exited as it started.*7920' "$TMP/agent-busy.log"; then ok "the exit reason names the daemon's last words"
else not_ok "the exit reason: $(grep 'ocf-exit-reason' "$TMP/agent-busy.log" | tail -n 1)"; fi
expect "after a failed start" 7 busy monitor
expect "after a failed start" 0 busy stop

echo "# stop"
expect "S" 0 s stop
expect "S stopped" 7 s monitor
expect_score "S stopped" s none
expect "A" 0 a stop
expect "A stopped" 7 a monitor
expect "stopping a stopped A" 0 a stop

echo "# a daemon the agent did not start"
ip netns exec $NS "$XFRMSYNC" sync --config "$TMP/s.toml" >"$TMP/foreign.log" 2>&1 &
foreign=$!
for ((i = 0; i < 50; i++)); do
    "$XFRMSYNC" sync status --socket "$TMP/s.sock" >/dev/null 2>&1 && break
    sleep 0.1
done
expect "a daemon on S's socket without its pid file" 1 s monitor
expect "a daemon on S's socket without its pid file" 1 s start
kill $foreign
wait $foreign 2>/dev/null

finish
