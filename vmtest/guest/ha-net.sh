# Sourced (vmtest/guest/ha-suite.sh, vmtest/guest/demo.sh): the HA test
# network, three nodes and a switch, and the SAs of PAIRS.
#
#   netns hp: peer P      p0 10.30.0.2/24 fd00:30::2/64
#   netns ha: active A    a0 10.30.0.1/24 fd00:30::1/64 (the service address)
#                         y-a 10.99.0.1/30 (the sync link)
#   netns hs: standby S   s0 (no address until takeover)
#                         y-s 10.99.0.2/30
#   netns hsw: bridge br0 joining p0, a0 and s0
#
# A and S hold the same SAs (same SPIs and keys), as an HA product installs
# them; P holds their mirror. One pair (out: service -> P, in: P ->
# service) per row, each with policies for UDP to the row's port, reqid
# port - 9100:
#   legacy4 legacy6  window 32, no ESN
#   esn4 esn6        ESN, window 128
#   wrap4            ESN (tests/vm_sync.rs starts it 200 below 2^32)
#   rekey4           no ESN, window 64 (started 300 below 2^32)

AUTH="auth-trunc hmac(sha256) 0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 128"
ENC="enc cbc(aes) 0x0123456789abcdef0123456789abcdef"
SVC4=10.30.0.1 P4=10.30.0.2 SVC6=fd00:30::1 P6=fd00:30::2
# name spi_out spi_in family esn window port
PAIRS='
legacy4 0x10a1 0x10b1 4 0 32  9101
esn4    0x20a1 0x20b1 4 1 128 9102
legacy6 0x30a1 0x30b1 6 0 32  9103
esn6    0x40a1 0x40b1 6 1 128 9104
wrap4   0x50a1 0x50b1 4 1 128 9105
rekey4  0x60a1 0x60b1 4 0 64  9106
'
# ha_sa_batches [NAME...]: the `ip -batch` input for the SAs and policies
# of those rows of PAIRS (every row without names): SA_BATCH_NODE for a
# node holding the service address, SA_BATCH_PEER for P.
ha_sa_batches() {
    local name out in family esn window port svc p replay reqid
    SA_BATCH_NODE="" SA_BATCH_PEER=""
    while read -r name out in family esn window port; do
        [[ -n $name ]] || continue
        (($# == 0)) || [[ " $* " == *" $name "* ]] || continue
        if [[ $family == 4 ]]; then svc=$SVC4 p=$P4; else svc=$SVC6 p=$P6; fi
        reqid=$((port - 9100))
        replay="replay-window $window"
        [[ $esn == 1 ]] && replay="$replay flag esn"
        # The node: out (service -> P) and in (P -> service).
        SA_BATCH_NODE+="xfrm state add src $svc dst $p proto esp spi $out reqid $reqid mode transport $replay $AUTH $ENC
xfrm state add src $p dst $svc proto esp spi $in reqid $reqid mode transport $replay $AUTH $ENC
xfrm policy add src $svc dst $p proto udp dport $port dir out tmpl src $svc dst $p proto esp reqid $reqid mode transport
xfrm policy add src $p dst $svc proto udp dport $port dir in tmpl src $p dst $svc proto esp reqid $reqid mode transport
"
        SA_BATCH_PEER+="xfrm state add src $svc dst $p proto esp spi $out reqid $reqid mode transport $replay $AUTH $ENC
xfrm state add src $p dst $svc proto esp spi $in reqid $reqid mode transport $replay $AUTH $ENC
xfrm policy add src $p dst $svc proto udp dport $port dir out tmpl src $p dst $svc proto esp reqid $reqid mode transport
xfrm policy add src $svc dst $p proto udp dport $port dir in tmpl src $svc dst $p proto esp reqid $reqid mode transport
"
    done <<<"$PAIRS"
}

# The namespaces, links and SAs of the header, from nothing.
build_ha_net() {
    local n
    for n in hp ha hs hsw; do ip netns del "$n" 2>/dev/null; done
    for n in hp ha hs hsw; do ip netns add "$n" || return 1; done
    ip -n hsw link add br0 type bridge && ip -n hsw link set br0 up || return 1
    for n in p a s; do
        ip link add "${n}0" netns "h$n" type veth peer name "sw-$n" netns hsw &&
            ip -n hsw link set "sw-$n" master br0 up && ip -n "h$n" link set lo up && ip -n "h$n" link set "${n}0" up ||
            return 1
    done
    ip -n hp addr add $P4/24 dev p0 && ip -n hp addr add $P6/64 dev p0 nodad &&
        ip -n ha addr add $SVC4/24 dev a0 && ip -n ha addr add $SVC6/64 dev a0 nodad || return 1
    ip link add y-a netns ha type veth peer name y-s netns hs &&
        ip -n ha addr add 10.99.0.1/30 dev y-a && ip -n ha link set y-a up &&
        ip -n hs addr add 10.99.0.2/30 dev y-s && ip -n hs link set y-s up || return 1
    ha_sa_batches
    ip -n ha -batch - <<<"$SA_BATCH_NODE" && ip -n hs -batch - <<<"$SA_BATCH_NODE" && ip -n hp -batch - <<<"$SA_BATCH_PEER"
}

