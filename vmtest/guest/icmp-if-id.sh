#!/usr/bin/env bash
# Inside the test VM, by `vmtest/crash-repro --case icmp-if-id` only: NEVER
# part of the default run, since it can take the kernel down. One UDP
# datagram to a port nobody listens on, through an inbound ESP transport
# SA of each shape in turn: no mark or if_id, a mark, an if_id, both (no
# XFRM interface exists). The kernel answers each with an ICMP port
# unreachable; Debian's 7.2.13 was seen to panic doing so (inet_getpeer, from
# icmpv4_xrlim_allow, in xfrm_trans_reinject) in route-based-suite.sh. Each
# shape is announced ("asking: ...") before its datagram is sent, so the last
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
shapes=("no mark, no if_id:" "mark 0x7/0xff:mark 0x7 mask 0xff" "if_id 5:if_id 5" "mark 0x7/0xff + if_id 5:mark 0x7 mask 0xff if_id 5")
for i in "${!shapes[@]}"; do
    spi=$((0x7801 + i)) port=$((21001 + i)) extra=${shapes[$i]#*:}
    batch_a+="xfrm state add src 10.13.0.1 dst 10.13.0.2 proto esp spi $spi reqid $((i + 1)) mode transport $KEYS
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
for i in 1 3; do
    spi_hex=$(printf '0x%08x' $((0x7801 + i)))
    tc -n pb filter add dev ic-b ingress protocol ip prio 10 u32 match ip protocol 50 0xff \
        match u32 "$spi_hex" 0xffffffff at 20 action skbedit mark 7
done
echo "icmp-if-id: kernel $(uname -r), ${#shapes[@]} SAs"
for i in "${!shapes[@]}"; do
    echo "asking: ${shapes[$i]%%:*}"
    target/vmtest/udp-send --netns /run/netns/pa 10.13.0.2 $((21001 + i)) 1 32 0 >/dev/null
    sleep 2
    packets=$(ip -n pb -s xfrm state list spi $((0x7801 + i)) |
        awk '/lifetime current:/ {getline; gsub(/[(),]/, " "); print $3; exit}')
    echo "answered: ${shapes[$i]%%:*} (${packets:-?} packet through the SA)"
done
echo "icmp-if-id: all ${#shapes[@]} answered"
