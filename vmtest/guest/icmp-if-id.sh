#!/usr/bin/env bash
# Inside the test VM, by `vmtest/crash-repro --case icmp-if-id` only: NEVER
# part of the default run, since it can take the kernel down. A burst of
# UDP datagrams (one, then BURST back to back) to a port nobody listens on,
# through an inbound ESP transport SA of each shape in turn: no mark or
# if_id, a mark, an if_id, both (no XFRM interface exists). The kernel
# answers with ICMP port unreachables (rate-limited); Debian's 7.2.13 was
# seen to panic doing so (inet_getpeer, from icmpv4_xrlim_allow, in
# xfrm_trans_reinject) in route-based-suite.sh, under 320 datagrams in a
# burst through 64 SAs with a mark and an if_id. Each try is announced ("asking: ...") before its datagram is sent, so the last
# such line names the one a panic answered. Ends with "icmp-if-id: all N
# answered".
set -euo pipefail
cd "$(dirname "$0")/../.."
KEYS="auth-trunc hmac(sha256) 0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 128 enc cbc(aes) 0x0123456789abcdef0123456789abcdef"
modprobe -a veth xfrm_user esp4 authenc sch_ingress cls_u32 act_skbedit
mkdir -p /run/netns
for n in pa pb; do ip netns del "$n" 2>/dev/null || true; done
ip netns add pa
ip netns add pb
ip link add ic-a netns pa type veth peer name ic-b netns pb
batch_a="link set lo up
addr add 10.13.0.1/24 dev ic-a
link set ic-a up
" batch_b="link set lo up
addr add 10.13.0.2/24 dev ic-b
link set ic-b up
"
shapes=("no mark, no if_id:" "mark 0x7/0xff:mark 0x7 mask 0xff" "if_id 5:if_id 5" "mark 0x7/0xff + if_id 5:mark 0x7 mask 0xff if_id 5"
    "ESN 256, no mark, no if_id:flag esn replay-window 256" "ESN 256, mark 0x7/0xff + if_id 5:flag esn replay-window 256 mark 0x7 mask 0xff if_id 5")
for i in "${!shapes[@]}"; do
    spi=$((0x7801 + i)) port=$((21001 + i)) extra=${shapes[$i]#*:}
    esn=""
    [[ $extra == *esn* ]] && esn="flag esn replay-window 256"
    batch_a+="xfrm state add src 10.13.0.1 dst 10.13.0.2 proto esp spi $spi reqid $((i + 1)) mode transport $esn $KEYS
xfrm policy add src 10.13.0.1 dst 10.13.0.2 proto udp dport $port dir out tmpl src 10.13.0.1 dst 10.13.0.2 proto esp reqid $((i + 1)) mode transport
"
    batch_b+="xfrm state add src 10.13.0.1 dst 10.13.0.2 proto esp spi $spi reqid $((i + 1)) mode transport $extra $KEYS
"
done
printf '%s' "$batch_a" | ip -n pa -batch -
printf '%s' "$batch_b" | ip -n pb -batch -
# The kernel finds an inbound SA by the skb's mark; the sender's does not
# cross the veth.
tc -n pb qdisc add dev ic-b clsact
for i in 1 3 5; do
    spi_hex=$(printf '0x%08x' $((0x7801 + i)))
    tc -n pb filter add dev ic-b ingress protocol ip prio 10 u32 match ip protocol 50 0xff \
        match u32 "$spi_hex" 0xffffffff at 20 action skbedit mark 7
done
echo "icmp-if-id: kernel $(uname -r), ${#shapes[@]} SAs"
BURST=${BURST:-400}
for count in 1 "$BURST"; do
    for i in "${!shapes[@]}"; do
        echo "asking: ${shapes[$i]%%:*}, $count datagram(s)"
        target/vmtest/udp-send --netns /run/netns/pa 10.13.0.2 $((21001 + i)) "$count" 32 0 2>/dev/null
        sleep 2
        packets=$(ip -n pb -s xfrm state list spi $((0x7801 + i)) |
            awk '/lifetime current:/ {getline; gsub(/[(),]/, " "); print $3; exit}')
        echo "answered: ${shapes[$i]%%:*}, $count datagram(s) (${packets:-?} packets through the SA so far)"
    done
done
# Last, the pattern of route-based-suite.sh that 7.2.13 panicked under: 64
# SAs with mark 0x7/0xff and if_id 5 (ESN windows 32-1024, the same without
# ESN), 5 rounds of a datagram to each SA's port, no listener.
batch_a="" batch_b="" ports=()
for esn in 1 0; do
    for ((j = 1; j <= 32; j++)); do
        n=$((${#ports[@]} + 1)) spi=$(((esn ? 0x7a00 : 0x7b00) + j)) flags="replay-window $((32 * j))"
        ((esn)) && flags="flag esn $flags"
        ports+=($((22000 + n)))
        batch_a+="xfrm state add src 10.13.0.1 dst 10.13.0.2 proto esp spi $spi reqid $((100 + n)) mode transport $flags $KEYS
xfrm policy add src 10.13.0.1 dst 10.13.0.2 proto udp dport $((22000 + n)) dir out tmpl src 10.13.0.1 dst 10.13.0.2 proto esp reqid $((100 + n)) mode transport
"
        batch_b+="xfrm state add src 10.13.0.1 dst 10.13.0.2 proto esp spi $spi reqid $((100 + n)) mode transport $flags mark 0x7 mask 0xff if_id 5 $KEYS
"
    done
done
printf '%s' "$batch_a" | ip -n pa -batch -
printf '%s' "$batch_b" | ip -n pb -batch -
tc -n pb filter add dev ic-b ingress protocol ip prio 20 u32 match ip protocol 50 0xff action skbedit mark 7
echo "asking: 64 SAs with mark + if_id (32 ESN), 5 rounds of a datagram to each"
ip netns exec pa python3 - "${ports[@]}" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    for port in sys.argv[1:]:
        s.sendto(b"x" * 32, ("10.13.0.2", int(port)))
    time.sleep(0.02)
PY
sleep 3
echo "answered: 64 SAs with mark + if_id (32 ESN), 5 rounds of a datagram to each"
echo "icmp-if-id: all $((2 * ${#shapes[@]} + 1)) answered"
