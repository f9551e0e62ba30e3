#!/usr/bin/env bash
# Inside the test VM (full set): three gateways on Corosync (issue 15,
# part 2): A active, S1 and S2 standby, `xfrmsync sync` between them over
# a CPG group, each node's daemon driven through the OCF resource agent
# (tools/xfrmsync/contrib/pacemaker/xfrmsync) the way Pacemaker drives a
# promotable clone: start everywhere, promote one, monitor, and after a
# node's death promote another. Pacemaker itself does not run here (under
# TCG its daemons on three nodes would cost minutes per boot); its part,
# deciding whom to promote once corosync has seen the death, is this
# script's.
#
#   netns cp: peer P        p0 10.30.0.2/24
#   netns ca, cs1, cs2      x0 on the service bridge (10.30.0.1/24, the
#                           service address, on the promoted node only),
#                           r0 10.98.0.1-3/24 on the ring bridge (corosync)
#   netns csw, crw          the two bridges
# A, S1 and S2 hold the same SAs (ha-net.sh's legacy4 and esn4 pairs),
# P their mirror; UDP both ways at 100 datagrams/s per SA.
#
# Checks: the agent's monitor codes per role; both standbys hold current
# records before the kill; after A dies (every process, corosync included,
# links down) and S1 is promoted: no packet lost, P's replay and failure
# counters 0, S1's numbers above A's last; S2 follows S1 (its epoch, its
# records). Prints the time corosync took to see the death, the longest a
# message of S1's waited in its CPG queue (the ring blocks while corosync
# detects a failure), the time from the death to P's first accepted
# datagram from S1, and margins. Then the same failover without xfrmsync
# (S1 takes the address without a promote): P must drop S1's packets.
# Ends with "corosync: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

source vmtest/guest/tap.sh corosync
exec 2> >(grep --line-buffered -v '^vmtest/guest/corosync-suite.sh: line [0-9]*: *[0-9]* Killed' >&2)
source vmtest/guest/ha-net.sh # PAIRS and ha_sa_batches
series=${XFRMSYNC_VM_KERNEL:-$(uname -r)}
OUT=$REPO/target/vmtest/corosync-$series
RUN=/tmp/xfrmsync-cs
XFRMSYNC=$REPO/target/release/xfrmsync
AGENT=$REPO/tools/xfrmsync/contrib/pacemaker/xfrmsync
VIP=10.30.0.1 P=10.30.0.2 PORTS=9101,9102 NS=c
NODES="a s1 s2"
declare -A RING=([a]=10.98.0.1 [s1]=10.98.0.2 [s2]=10.98.0.3) NODEID=([a]=1 [s1]=2 [s2]=3)

pids=()
source vmtest/guest/ha-lib.sh
cleanup() {
    local n
    for n in cp ca cs1 cs2; do ip netns pids $n 2>/dev/null | xargs -r kill -9 2>/dev/null; done
    for n in cp ca cs1 cs2 csw crw; do ip netns del $n 2>/dev/null; done
    # Only the suite's own processes: a bare wait would also wait for the
    # stderr filter's process substitution, which never ends.
    ((${#pids[@]} == 0)) || wait "${pids[@]}" 2>/dev/null
    pids=()
}
fatal() { not_ok "$*"; cleanup; finish; }

for f in "$XFRMSYNC" "$AGENT" /usr/sbin/corosync /usr/sbin/corosync-quorumtool /usr/lib/ocf/lib/heartbeat/ocf-shellfuncs \
    /usr/bin/arping; do
    [[ -x $f || -f $f ]] || { not_ok "$f missing: scripts/setup installs corosync and resource-agents, scripts/test builds xfrmsync"; finish; }
done
rm -rf "$OUT" "$RUN"
mkdir -p "$OUT" "$RUN"
modprobe -a veth bridge xfrm_user esp4 authenc 2>/dev/null || { not_ok "modprobe veth bridge xfrm_user esp4 authenc"; finish; }
mkdir -p /run/netns
head -c 256 /dev/urandom >"$RUN/authkey" && chmod 0400 "$RUN/authkey"
echo "corosync-suite: $(uname -r), corosync $(dpkg-query -W -f='${Version}' corosync)"

build_net() {
    cleanup
    local n
    for n in cp ca cs1 cs2 csw crw; do ip netns add $n || return 1; done
    for n in csw crw; do ip -n $n link add br0 type bridge && ip -n $n link set br0 up || return 1; done
    ip link add p0 netns cp type veth peer name sw-p netns csw && ip -n csw link set sw-p master br0 up &&
        ip -n cp link set lo up && ip -n cp link set p0 up && ip -n cp addr add $P/24 dev p0 || return 1
    for n in $NODES; do
        ip link add x0 netns c$n type veth peer name sw-$n netns csw && ip -n csw link set sw-$n master br0 up &&
            ip link add r0 netns c$n type veth peer name rw-$n netns crw && ip -n crw link set rw-$n master br0 up &&
            ip -n c$n link set lo up && ip -n c$n link set x0 up && ip -n c$n link set r0 up &&
            ip -n c$n addr add "${RING[$n]}/24" dev r0 || return 1
        mkdir -p "$RUN/$n/run"
    done
    ha_sa_batches legacy4 esn4
    ip -n cp -batch - <<<"$SA_BATCH_PEER" || return 1
    for n in $NODES; do ip -n c$n -batch - <<<"$SA_BATCH_NODE" || return 1; done
}

write_conf() { # NODE
    local n=$1 dir=$RUN/$1 m
    {
        cat <<EOF
totem {
    version: 2
    cluster_name: xfrmsync
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
    keyfile: $RUN/authkey
    # Failure detection in about 3.4 s (corosync-cpg.md); the default
    # token (3000 ms for 3 nodes) takes about 8 s.
    token: 1000
}
quorum {
    provider: corosync_votequorum
}
logging {
    to_stderr: yes
    to_syslog: no
    timestamp: hires
    # Its 8 MB file in /dev/shm, three times over, in a 1 GiB guest.
    blackbox: off
}
nodelist {
EOF
        for m in $NODES; do
            printf '    node {\n        ring0_addr: %s\n        nodeid: %s\n        name: %s\n    }\n' "${RING[$m]}" "${NODEID[$m]}" "$m"
        done
        echo "}"
    } >"$dir/corosync.conf"
    cat >"$dir/sync.toml" <<EOF
control_socket = "$dir/sync.sock"
state_file = "$dir/sync.state"
role = "standby"
[link]
transport = "cpg"
group = "xfrmsync"
[active]
# Every SA sampled each second, for the standbys' replication lag.
lag_sample_ms = 1000
[standby]
# corosync's detection (token 1000) and the promotion after it
detection_ms = 5000
EOF
}

start_corosync() { # NODE
    in_node "$1" "$OUT/corosync-$1.log" corosync -f -c "$RUN/$1/corosync.conf"
}
members() { # NODE: how many nodes its corosync sees
    ip netns exec c$1 corosync-quorumtool -s 2>/dev/null | awk '/^Total votes:/ {print $3}'
}
until_members() { # NODE COUNT TIMEOUT_S
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        [[ $(members "$1") == "$2" ]] && return 0
        sleep 0.1
    done
    return 1
}
# agent NODE ACTION: the OCF agent as Pacemaker calls it
agent() {
    OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=xfrmsync OCF_RESKEY_config=$RUN/$1/sync.toml \
        OCF_RESKEY_binary=$XFRMSYNC OCF_RESKEY_netns=c$1 OCF_RESKEY_pidfile=$RUN/$1/sync.pid \
        "$AGENT" "$2" >>"$OUT/agent-$1.log" 2>&1
}
check_monitor() { # NODE EXPECTED_CODE WHAT
    local rc
    agent "$1" monitor
    rc=$?
    if ((rc == $2)); then ok "agent monitor on $1: $rc ($3)"; else not_ok "agent monitor on $1: $rc, expected $2 ($3)"; fi
}
status_json() { "$XFRMSYNC" sync status --json --socket "$RUN/$1/sync.sock"; }
current_records() { # NODE: SAs whose record is under 3 s old
    status_json "$1" | $PY -c 'import json, sys
d = json.load(sys.stdin)
print(sum(1 for s in d["sas"] if s["record_age_ms"] is not None and s["record_age_ms"] < 3000))'
}
take_address() { # NODE: what IPaddr2 does
    ip -n c$1 addr add $VIP/24 dev x0 && ip netns exec c$1 arping -q -U -c 1 -I x0 $VIP >/dev/null 2>&1 &
}
# run MODE (sync|nosync)
run() {
    local mode=$1 n t_death t_seen a_sent s1_sent p_after loss first a_last s1_low errors
    build_net || fatal "$mode: building the namespaces and SAs"
    for n in $NODES; do write_conf $n; start_corosync $n; done
    for n in $NODES; do until_members $n 3 60 || fatal "$mode: corosync on $n does not see 3 nodes: $(tail -3 "$OUT/corosync-$n.log")"; done
    ok "$mode: corosync ring of 3 nodes (knet, aes256/sha256, token 1000)"
    if [[ $mode == sync ]]; then
        for n in $NODES; do agent $n start || fatal "agent start on $n: $(tail -3 "$OUT/agent-$n.log")"; done
        check_monitor s1 0 "standby"
        agent a promote || fatal "agent promote on A: $(tail -3 "$OUT/agent-a.log")"
        check_monitor a 8 "promoted: active"
    fi
    take_address a
    local p_out=$OUT/traffic-p-$mode.json
    traffic p "$p_out"
    local p_traffic=$TRAFFIC_PID
    traffic a "$OUT/traffic-a-$mode.json"
    sleep 5
    if [[ $mode == sync ]]; then
        for n in s1 s2; do
            local held
            held=$(current_records $n)
            if ((held == 4)); then ok "sync: $n holds current records (under 3 s) of all 4 SAs before the kill"
            else not_ok "sync: $n holds $held current records of 4"; fi
            local compared over greatest
            read -r compared over greatest < <(status_json $n | lag_summary)
            if ((compared > 0 && over == 0)); then
                ok "sync: $n compared $compared of A's samples with its records, none behind by more than the margin (greatest in the last: $greatest packets)"
            else not_ok "sync: $n's replication lag: $compared samples compared, $over over the margin"; fi
        done
    fi
    traffic s1 "$OUT/traffic-s1-$mode.json" --count 500 --wait-bind-s 60
    local sender=$TRAFFIC_PID
    sleep 2
    t_death=$(kill_node a x0 r0)
    a_sent=$(packets a) a_last=$(highest_oseq a)
    until_members s1 2 30 || not_ok "$mode: S1's corosync still sees 3 nodes 30 s after A's death"
    t_seen=$(now)
    local t_promote
    t_promote=$(now)
    if [[ $mode == sync ]]; then
        agent s1 promote && ok "sync: agent promote on S1 (xfrmsync sync commit)" || not_ok "sync: agent promote on S1: $(tail -5 "$OUT/agent-s1.log")"
    fi
    take_address s1
    wait "$sender"
    s1_sent=$($FACTS sent "$OUT/traffic-s1-$mode.json")
    p_after=$(p_accepted "$p_traffic")
    loss=$((a_sent + s1_sent - p_after))
    first=$($FACTS first-after "$p_out" "$t_death")
    errors=$(p_errors)
    local seen
    seen=$(awk -v a="$t_death" -v b="$t_seen" 'BEGIN {printf "%.2f", b - a}')
    echo "    $mode: A sent $a_sent, S1 sent $s1_sent, P accepted $p_after: lost $loss; P's counters (replay failed SeqError ProtoError): $errors"
    echo "    $mode: corosync saw A's death after $seen s; P's first datagram from S1 $first s after the death"
    if [[ $mode == nosync ]]; then
        if ((loss > 0)) && [[ $errors != "0 0 0 0" ]]; then
            ok "nosync: without xfrmsync P dropped $loss of S1's packets"
        else
            not_ok "nosync: P was expected to drop S1's packets: lost $loss, counters $errors"
        fi
        NOSYNC="loss $loss, corosync detection $seen s"
        return
    fi
    if ((loss == 0)); then ok "sync: no packet lost (A -> S1)"; else not_ok "sync: $loss packets lost"; fi
    if [[ $errors == "0 0 0 0" ]]; then ok "sync: P's replay and failure counters and XfrmInStateSeqError/ProtoError all 0"
    else not_ok "sync: P's counters: $errors"; fi
    s1_low=$(($(highest_oseq s1) - 500))
    if ((s1_low > a_last)); then ok "sync: S1's outbound numbers start above A's last ($s1_low > $a_last)"
    else not_ok "sync: S1's outbound numbers from $s1_low, A's last $a_last"; fi
    check_monitor s1 8 "promoted after A's death"
    check_monitor s2 0 "still standby"
    local s1_status s2_status margins wait_ms
    s1_status=$(status_json s1)
    margins=$($PY -c 'import json, sys
d = json.loads(sys.argv[1])
print(" ".join(str(s["last_commit"]["margin"]) for s in d["sas"] if s.get("last_commit") and s["last_commit"]["margin"] is not None))' "$s1_status")
    wait_ms=$($PY -c 'import json, sys
d = json.loads(sys.argv[1])
l = d["link"]
print("queue %s ms, ring %s ms, try-again %s" % (l.get("queue_wait_longest_ms"), l.get("ring_wait_longest_ms"), l.get("try_again")))' "$s1_status")
    echo "    sync: S1's margins: $margins; the longest its CPG messages waited: $wait_ms"
    sleep 3
    s2_status=$(status_json s2)
    # S2 must hold S1's epoch and, for every SA, a record that arrived
    # after S1's promotion (S1 sends every SA when it turns active; an SA
    # without traffic since has no newer one).
    local follows
    follows=$($PY -c 'import json, sys, time
s1, s2, promoted = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
since_ms = (time.time() - promoted) * 1000
fresh = sum(1 for s in s2["sas"] if s["record_age_ms"] is not None and s["record_age_ms"] < since_ms)
print(s1["epoch"], s2["epoch"], fresh)' "$s1_status" "$s2_status" "$t_promote")
    read -r e1 e2 fresh <<<"$follows"
    if [[ $e1 == "$e2" ]] && ((fresh == 4)); then
        ok "sync: S2 follows S1 (epoch $e1, a record from S1 for each of the 4 SAs)"
    else
        not_ok "sync: S2 after the failover: epochs (S1 S2) $e1 $e2, records since S1's promotion $fresh of 4"
    fi
    SYNC="loss $loss, corosync detection $seen s, first accepted after $first s, margins $margins, longest CPG waits: $wait_ms"

    # S1 -> S2: S1 was promoted before it had the service address, as
    # Pacemaker orders it, so its SAs learnt their directions only once the
    # address came; S2's commit needs them. S1 sends 3 s more, then dies.
    traffic s1 "$OUT/traffic-s1-more.json" --count 300
    wait "$TRAFFIC_PID"
    traffic s2 "$OUT/traffic-s2-$mode.json" --count 500 --wait-bind-s 60
    sender=$TRAFFIC_PID
    sleep 1
    local s1_more s1_last s2_sent
    s1_more=$($FACTS sent "$OUT/traffic-s1-more.json")
    t_death=$(kill_node s1 x0 r0)
    s1_last=$(highest_oseq s1)
    until_members s2 1 30 || not_ok "$mode: S2's corosync still sees S1 30 s after its death"
    agent s2 promote && ok "sync: agent promote on S2 after S1's death" || not_ok "sync: agent promote on S2: $(tail -5 "$OUT/agent-s2.log")"
    take_address s2
    wait "$sender"
    s2_sent=$($FACTS sent "$OUT/traffic-s2-$mode.json")
    p_after=$(p_accepted "$p_traffic")
    loss=$((a_sent + s1_sent + s1_more + s2_sent - p_after))
    errors=$(p_errors)
    first=$($FACTS first-after "$p_out" "$t_death")
    echo "    sync: S1 -> S2: S1 sent $s1_more more, S2 sent $s2_sent, P accepted $p_after in all: lost $loss; P's counters: $errors; first from S2 after $first s"
    if ((loss == 0)) && [[ $errors == "0 0 0 0" ]]; then
        ok "sync: S1 -> S2: no packet lost, P's replay and failure counters all 0"
    else
        not_ok "sync: S1 -> S2: lost $loss, P's counters $errors"
    fi
    local s2_low
    s2_low=$(($(highest_oseq s2) - 500))
    if ((s2_low > s1_last)); then ok "sync: S2's outbound numbers start above S1's last ($s2_low > $s1_last)"
    else not_ok "sync: S2's outbound numbers from $s2_low, S1's last $s1_last"; fi
    SYNC2="loss $loss, first accepted after $first s"
    agent s2 stop
}

run sync
run nosync
cleanup
echo "corosync: A -> S1 with xfrmsync:    ${SYNC:-?}"
echo "corosync: S1 -> S2 with xfrmsync:   ${SYNC2:-?}"
echo "corosync: A -> S1 without xfrmsync: ${NOSYNC:-?}"
finish
