#!/usr/bin/env bash
# Inside the VM (scripts/demo): two namespaces with ESP SAs, the C watch
# example printing events of namespace b as text and the Rust one as JSON,
# while UDP traffic crosses a legacy SA and an ESN SA; then a failover of
# live SAs from an active node to a standby, through `xfrmsync sync`.
set -euo pipefail
cd "$(dirname "$0")/../.."

vmtest/guest/net-setup.sh >/dev/null
echo "demo: namespaces a (10.9.0.1) and b (10.9.0.2) with ESP SAs; watching b"
target/ctest/watch --netns /run/netns/b --seconds 7 | sed 's/^/[C watch]    /' &
target/release/examples/watch --json --netns /run/netns/b --seconds 7 | sed 's/^/[Rust watch] /' &
sleep 1.5
echo "demo: 8 packets a -> b on legacy SA 0x1001 (replay threshold 2: an event every 2 packets)"
target/vmtest/udp-send --netns /run/netns/a 10.9.0.2 9001 8 64 100 2>/dev/null
echo "demo: 6 packets a -> b on ESN SA 0x2001"
target/vmtest/udp-send --netns /run/netns/a 10.9.0.2 9002 6 200 100 2>/dev/null
wait
echo "demo: the kernel's view (ip -s xfrm state, namespace b, SPI 0x1001):"
ip -n b -s xfrm state get src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x1001 | sed -n '/anti-replay/p;/lifetime current/,+1p'

# --- part 2: a failover under traffic -------------------------------------
# P talks to a service address held by A; S stands by with the same SAs.
# `xfrmsync sync` daemons on A and S keep S's copy of every SA's counters
# current over their own encrypted link. A dies; S commits and takes the
# address; P must accept S's packets: nothing below A's last number, no
# replay refused.
source vmtest/guest/ha-net.sh
modprobe -a bridge esp6 >/dev/null 2>&1 || true
build_ha_net || { echo "demo: building the HA namespaces failed" >&2; exit 1; }
demo=/run/xfrmsync-demo
rm -rf "$demo" && mkdir -p "$demo"
xfrmsync=target/release/xfrmsync
$xfrmsync sync keygen "$demo/sync.key" >/dev/null
for node in a s; do
    if [[ $node == a ]]; then role=active local=10.99.0.1 peer=10.99.0.2; else role=standby local=10.99.0.2 peer=10.99.0.1; fi
    cat >"$demo/$node.toml" <<CONF
control_socket = "$demo/$node.sock"
state_file = "$demo/$node.state"
role = "$role"
[link]
local = "$local:7700"
peer = "$peer:7700"
key_file = "$demo/sync.key"
[active]
replay_packets = 32
timer_ms = 500
CONF
done
ip netns exec hs $xfrmsync sync --config "$demo/s.toml" >"$demo/s.log" 2>&1 &
s_daemon=$!
ip netns exec ha $xfrmsync sync --config "$demo/a.toml" >"$demo/a.log" 2>&1 &
a_daemon=$!
echo
echo "demo, part 2: P (10.30.0.2) <-> service 10.30.0.1 on A; S stands by; daemons on A and S"
for port in 9101 9102; do
    target/vmtest/udp-send --netns ha 10.30.0.2 $port 1000000 64 10 2>/dev/null &
    target/vmtest/udp-send --netns hp 10.30.0.1 $port 1000000 64 10 2>/dev/null &
done
sleep 4
echo "demo: S's view, 4 s into the traffic (xfrmsync sync status, first lines):"
$xfrmsync sync status --socket "$demo/s.sock" | sed -n "1,3p;/0x000010a1/p;/0x000010b1/p" | sed "s/^/    /"
echo "demo: A dies: its daemon killed, its senders stopped, its links down"
{ kill -9 "$a_daemon"; wait "$a_daemon"; } 2>/dev/null || true
pkill -f "udp-send --netns ha" || true
ip -n ha link set a0 down
ip -n ha link set y-a down
a_last=$(ip -n ha -s xfrm state get src 10.30.0.1 dst 10.30.0.2 proto esp spi 0x10a1 | sed -n 's/.*oseq \(0x[0-9a-f]*\).*/\1/p')
echo "demo: S takes the service address and commits (xfrmsync sync commit):"
ip -n hs addr add 10.30.0.1/24 dev s0
ip -n hs addr add fd00:30::1/64 dev s0 nodad
ip -n hp neigh flush dev p0
$xfrmsync sync commit --socket "$demo/s.sock" | grep -E "0x000010a1|0x000010b1|0x000020a1|commit:" | sed 's/^/    /'
for port in 9101 9102; do
    target/vmtest/udp-send --netns hs 10.30.0.2 $port 200 64 10 2>/dev/null &
done
sleep 3
pkill -f "udp-send --netns" || true
kill "$s_daemon"
wait 2>/dev/null || true
s_first=$(ip -n hs -s xfrm state get src 10.30.0.1 dst 10.30.0.2 proto esp spi 0x10a1 | sed -n 's/.*oseq \(0x[0-9a-f]*\).*/\1/p')
echo "demo: SA 0x10a1 (service -> P): A's last sequence number $((a_last)); S, after 200 packets, is at $((s_first))"
echo "demo: P's replay counters for it (ip -s xfrm state) and its namespace's (/proc/net/xfrm_stat):"
ip -n hp -s xfrm state get src 10.30.0.1 dst 10.30.0.2 proto esp spi 0x10a1 | sed -n '/replay-window/p;/lifetime current/,+1p' | sed 's/^/    /'
ip netns exec hp grep -E "XfrmInStateSeqError|XfrmInNoStates" /proc/net/xfrm_stat | sed 's/^/    /'
echo "demo: P refused none of S's packets as replays: S continued above A's last number."
