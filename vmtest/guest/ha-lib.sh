# Sourced by the cluster suites (keepalived-suite.sh, corosync-suite.sh):
# traffic through the service address and what the kernels' counters say
# of it. The suite sets REPO, VIP (the service address), P (the peer's
# address), PORTS (ha-traffic.py's), NS (the prefix of its namespaces: the
# peer's is ${NS}p, a node's ${NS}<node>), RUN (a node's own /run is
# $RUN/<node>/run), a pids array and fatal().

# The interpreter itself: pyenv's shim costs seconds per start under TCG.
PY=$(python3 -c 'import sys; print(sys.executable)')
FACTS="$PY $REPO/vmtest/guest/ha-facts.py"
TRAFFIC="$PY $REPO/vmtest/guest/ha-traffic.py"

now() { date +%s.%N; }

# in_node NODE LOG CMD...: CMD in the background in the node's namespace,
# with $RUN/NODE/run bound over /run: pid files (charon's, corosync's,
# keepalived's) and charon's ha FIFO are fixed paths there, one per node.
in_node() {
    local node=$1 log=$2; shift 2
    ip netns exec "$NS$node" sh -c 'mount --bind "$0/run" /run && exec "$@"' "$RUN/$node" "$@" >"$log" 2>&1 &
    pids+=($!)
}

# traffic NODE FILE ARGS...: ha-traffic.py in the background, from the
# service address to P (from P to the service address for NODE p); waits
# until it has bound its ports (it writes FILE then) unless ARGS has
# --wait-bind-s. Sets TRAFFIC_PID.
traffic() {
    local node=$1 file=$2 from=$VIP to=$P i; shift 2
    [[ $node == p ]] && from=$P to=$VIP
    rm -f "$file"
    ip netns exec "$NS$node" $TRAFFIC --bind $from --to $to --ports $PORTS --out "$file" "$@" 2>"$file.err" &
    TRAFFIC_PID=$!
    pids+=($TRAFFIC_PID)
    [[ " $* " == *" --wait-bind-s "* ]] && return 0
    for ((i = 0; i < 300; i++)); do [[ -s $file ]] && return 0; sleep 0.1; done
    fatal "ha-traffic.py on $node did not start: $(cat "$file.err")"
}

# kill_node NODE IFACE...: a death without a goodbye: every process in the
# node's namespace killed, the links down; prints the time.
kill_node() {
    local node=$1 link; shift
    ip netns pids "$NS$node" | xargs -r kill -9
    for link; do ip -n "$NS$node" link set "$link" down; done
    now
}

# packets NODE: the packets its outbound SAs (service -> P) counted, summed
packets() { $FACTS sas "$NS$1" $VIP $P | awk '{s += $2} END {print s + 0}'; }
# highest_oseq NODE: the highest outbound number of its SAs to P
highest_oseq() { $FACTS sas "$NS$1" $VIP $P | awk '$5 > m {m = $5} END {print m + 0}'; }
# p_accepted P_TRAFFIC_PID: what P's SAs from the service accepted, once
# P's ha-traffic.py has written a snapshot of its arrivals
p_accepted() {
    sleep 0.3
    kill -USR1 "$1"
    sleep 0.5
    packets p
}
# P's replay and failure counters over its SAs from the service, then its
# namespace's XfrmInStateSeqError and XfrmInStateProtoError: "0 0 0 0" when
# P refused nothing.
p_errors() {
    local sa
    sa=$($FACTS sas "${NS}p" $VIP $P | awk '{r += $3; f += $4} END {print r + 0, f + 0}')
    echo "$sa $($FACTS stat "${NS}p" XfrmInStateSeqError) $($FACTS stat "${NS}p" XfrmInStateProtoError)"
}
# lag_summary: from `xfrmsync sync status --json` on stdin, the node's
# replication lag by the active node's samples: how many it compared, how
# many were behind by more than the margin, the greatest lag of the last
lag_summary() {
    $PY -c 'import json, sys
lag = json.load(sys.stdin)["lag"]
print(lag["compared"], lag["over_margin"], (lag["last"] or {}).get("max_packets", "none"))'
}
