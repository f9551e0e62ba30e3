#!/usr/bin/env bash
# Runs inside the test VM as root (vmtest/run-in-vm ... vmtest/guest/net-setup.sh).
#
# Builds the scenario of shared/corpus/linux-6.1/README.md, extended:
#   netns a: veth-a 10.9.0.1/24 fd00:9::1/64      netns b: veth-b 10.9.0.2/24 fd00:9::2/64
#   the same ESP transport-mode SAs (table below) in BOTH namespaces,
#   and in each namespace the policies for the traffic it sends (dir out) and
#   receives (dir in), UDP to the port of the SA's row, through the row's reqid.
# Re-running it tears the namespaces down and builds them again (a clean slate).
#
# Plus the SAs of DIR_SA_TABLE, installed with a direction (XFRMA_SA_DIR,
# Linux 6.10+) by target/vmtest/xfrm-probe, since iproute2 6.1 cannot: dir out
# in the sending namespace a, dir in in the receiving namespace b. Kernels
# before 6.10 ignore the attribute and keep them as ordinary SAs.
#
# Marked SAs: the sender's skb carries SO_MARK, but the mark does not cross the
# veth into the other namespace, and the receiver looks the SA up by the skb's
# mark. So in the receiving namespace a tc ingress filter on the veth sets the
# mark on ESP packets carrying that SPI, which lets the marked SA be found there.
set -euo pipefail

trap 'echo "net-setup: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
die() { echo "net-setup: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (inside the VM)"

AUTH_KEY=0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
ENC_KEY=0x0123456789abcdef0123456789abcdef

declare -A ADDR4=([a]=10.9.0.1 [b]=10.9.0.2)
declare -A ADDR6=([a]=fd00:9::1 [b]=fd00:9::2)
declare -A VETH=([a]=veth-a [b]=veth-b)

# One row per SA. replay: legacy:<window> or esn:<window>; mark: value/mask or -.
# Policies are derived: the namespace owning src sends (dir out), the one
# owning dst receives (dir in); both use proto udp dport <port>.
SA_TABLE='
# spi    src         dst         reqid  replay     mark      port
0x1001   10.9.0.1    10.9.0.2    1      legacy:32  -         9001
0x1002   10.9.0.2    10.9.0.1    1      legacy:32  -         9001
0x2001   10.9.0.1    10.9.0.2    2      esn:128    -         9002
0x2002   10.9.0.2    10.9.0.1    2      esn:128    -         9002
0x3001   fd00:9::1   fd00:9::2   3      legacy:32  -         9003
0x3002   fd00:9::2   fd00:9::1   3      legacy:32  -         9003
0x4001   10.9.0.1    10.9.0.2    4      legacy:32  0x7/0xff  9004
0x5001   10.9.0.1    10.9.0.2    5      legacy:32  -         9005
0x6001   10.9.0.1    10.9.0.2    6      legacy:32  -         9006
0x7001   10.9.0.1    10.9.0.2    7      esn:128    -         9007
0x7101   fd00:9::1   fd00:9::2   8      legacy:32  -         9008
'

# SAs with a direction: out in a (the sender), in in b (the receiver). The
# kernel (6.10+) wants no replay window on an out SA, and an out ESN SA with
# bmp_len 0; a kernel that ignores the direction wants an ESN window > 0, so
# there the out ESN SA gets the in SA's window. Policies as above.
DIR_SA_TABLE='
# spi    src         dst         reqid  replay     port
0x8001   10.9.0.1    10.9.0.2    9      legacy:32  9009
0x8101   10.9.0.1    10.9.0.2    10     esn:128    9010
'
PROBE=$(cd "$(dirname "$0")/../.." && pwd)/target/vmtest/xfrm-probe
[[ -x $PROBE ]] || die "$PROBE missing (vmtest/run-in-vm builds it: build_guest_tools in vmtest/lib.sh)"

ns_of() { # address -> a|b
    local n
    for n in a b; do
        [[ $1 == "${ADDR4[$n]}" || $1 == "${ADDR6[$n]}" ]] && { echo "$n"; return; }
    done
    die "address $1 belongs to neither namespace"
}

# --- modules -----------------------------------------------------------------
# Only what is not built in. Debian builds hmac, sha256, cbc and aes into the
# kernel; authenc, echainiv and seqiv are modules that the kernel requests by
# itself when the first SA is added (`ip xfrm state add` below is the check).
# aesni_intel is left alone on purpose: loading it runs its self-tests, which
# take ~15 s under TCG. One modprobe call: each exec costs ~0.3 s here.
need_marks=0
if grep -Ev '^[[:space:]]*(#|$)' <<<"$SA_TABLE" | awk '$6 != "-"' | grep -q .; then need_marks=1; fi
required=(veth xfrm_user esp4 esp6 authenc)
((need_marks)) && required+=(sch_ingress cls_u32 act_skbedit)
modprobe -a "${required[@]}" ||
    die "modprobe ${required[*]} failed (are the modules in /lib/modules/$(uname -r)? run scripts/setup-vm on the host)"

# --- /run/netns -------------------------------------------------------------
if ! { mkdir -p /run/netns && touch /run/netns/.w && rm -f /run/netns/.w; } 2>/dev/null; then
    mount -t tmpfs -o mode=0755 tmpfs /run || die "/run is read-only and a tmpfs cannot be mounted on it"
    mkdir -p /run/netns
fi

# --- namespaces, veth, addresses, SAs, policies --------------------------------
# Everything per namespace goes into one `ip -batch` (one exec per namespace).
for n in a b; do
    ip netns del "$n" 2>/dev/null || true
done
ip netns add a
ip netns add b
ip link add veth-a netns a type veth peer name veth-b netns b

declare -A BATCH TCBATCH
for n in a b; do
    BATCH[$n]="link set lo up
addr add ${ADDR4[$n]}/24 dev ${VETH[$n]}
addr add ${ADDR6[$n]}/64 dev ${VETH[$n]} nodad
link set ${VETH[$n]} up
"
    TCBATCH[$n]=""
done

n_sa=0 n_tc=0
declare -A N_POL=([a]=0 [b]=0)
while read -r spi src dst reqid replay mark port; do
    [[ -z ${spi:-} || $spi == \#* ]] && continue
    case $replay in
        legacy:*) replay_args="replay-window ${replay#legacy:}" ;;
        esn:*) replay_args="flag esn replay-window ${replay#esn:}" ;;
        *) die "bad replay spec '$replay' for SPI $spi" ;;
    esac
    mark_args=""
    [[ $mark == - ]] || mark_args="mark ${mark%/*} mask ${mark#*/}"
    for n in a b; do
        BATCH[$n]+="xfrm state add src $src dst $dst proto esp spi $spi reqid $reqid mode transport $replay_args $mark_args auth-trunc hmac(sha256) $AUTH_KEY 128 enc cbc(aes) $ENC_KEY
"
    done
    n_sa=$((n_sa + 1))
    sender=$(ns_of "$src")
    receiver=$(ns_of "$dst")
    [[ $sender != "$receiver" ]] || die "SPI $spi: src and dst in the same namespace"
    for pol in "$sender:out" "$receiver:in"; do
        pns=${pol%:*} dir=${pol#*:}
        BATCH[$pns]+="xfrm policy add src $src dst $dst proto udp dport $port dir $dir $mark_args tmpl src $src dst $dst proto esp reqid $reqid mode transport
"
        N_POL[$pns]=$((N_POL[$pns] + 1))
    done
    if [[ $mark != - ]]; then
        dev=${VETH[$receiver]}
        [[ -n ${TCBATCH[$receiver]} ]] || TCBATCH[$receiver]="qdisc add dev $dev clsact
"
        spi_hex=$(printf '0x%08x' "$spi")
        if [[ $src == *:* ]]; then
            TCBATCH[$receiver]+="filter add dev $dev ingress protocol ipv6 prio 10 u32 match ip6 protocol 50 0xff match u32 $spi_hex 0xffffffff at 40 action skbedit mark ${mark%/*}
"
        else
            TCBATCH[$receiver]+="filter add dev $dev ingress protocol ip prio 10 u32 match ip protocol 50 0xff match u32 $spi_hex 0xffffffff at 20 action skbedit mark ${mark%/*}
"
        fi
        n_tc=$((n_tc + 1))
    fi
done <<<"$SA_TABLE"

dir_sas=()
while read -r spi src dst reqid replay port; do
    [[ -z ${spi:-} || $spi == \#* ]] && continue
    BATCH[a]+="xfrm policy add src $src dst $dst proto udp dport $port dir out tmpl src $src dst $dst proto esp reqid $reqid mode transport
"
    BATCH[b]+="xfrm policy add src $src dst $dst proto udp dport $port dir in tmpl src $src dst $dst proto esp reqid $reqid mode transport
"
    N_POL[a]=$((N_POL[a] + 1)) N_POL[b]=$((N_POL[b] + 1))
    dir_sas+=("$spi $src $dst $reqid $replay")
    n_sa=$((n_sa + 1))
done <<<"$DIR_SA_TABLE"

for n in a b; do
    printf '%s' "${BATCH[$n]}" | ip -n "$n" -batch - ||
        die "ip -n $n -batch failed on the line it names above; the batch was:
${BATCH[$n]}"
    if [[ -n ${TCBATCH[$n]} ]]; then
        printf '%s' "${TCBATCH[$n]}" | tc -n "$n" -batch - ||
            die "tc -batch in netns $n failed; the batch was:
${TCBATCH[$n]}"
    fi
done

# Legacy SAs first: whether the kernel kept their direction decides the out
# ESN SA's replay window.
dir_kept=
for sa in "${dir_sas[@]}"; do
    read -r spi src dst reqid replay <<<"$sa"
    case $replay in
        legacy:*) out=legacy:0 in=$replay ;;
        esn:*) out=esn:0:0 in=$replay:$(((${replay#esn:} + 31) / 32)) ;;
        *) die "bad replay spec '$replay' for SPI $spi" ;;
    esac
    if [[ $replay == esn:* ]]; then
        [[ -n $dir_kept ]] || die "DIR_SA_TABLE: list a legacy SA before the ESN ones"
        [[ $dir_kept == out ]] || out=$in
    fi
    "$PROBE" --netns a add-sa "$src" "$dst" "$spi" "$reqid" out "$out" || die "adding SA $spi (dir out) in a failed"
    "$PROBE" --netns b add-sa "$src" "$dst" "$spi" "$reqid" in "$in" || die "adding SA $spi (dir in) in b failed"
    [[ -n $dir_kept ]] || dir_kept=$("$PROBE" --netns a sa-dir "$dst" "$spi")
done

# --- checks ------------------------------------------------------------------
for n in a b; do
    got=$(ip -n "$n" xfrm state list | grep -c '^src ' || true)
    [[ $got -eq $n_sa ]] || die "namespace $n has $got SAs, expected $n_sa"
    got=$(ip -n "$n" xfrm policy list | grep -c '^src ' || true)
    [[ $got -eq ${N_POL[$n]} ]] || die "namespace $n has $got policies, expected ${N_POL[$n]}"
done
if command -v ping >/dev/null 2>&1; then ping4=(ping -4) ping6=(ping -6); else ping4=(busybox ping) ping6=(busybox ping6); fi
ip netns exec a "${ping4[@]}" -c 1 -W 2 10.9.0.2 >/dev/null || die "no IPv4 connectivity a -> b over the veth"
ip netns exec a "${ping6[@]}" -c 1 -W 2 fd00:9::2 >/dev/null || die "no IPv6 connectivity a -> b over the veth"

echo "net-setup: kernel $(uname -r): netns a (${ADDR4[a]}, ${ADDR6[a]}) <-> b (${ADDR4[b]}, ${ADDR6[b]});" \
    "$n_sa SAs in each (${#dir_sas[@]} installed with a direction, which the kernel $([[ $dir_kept == out ]] && echo kept || echo ignored)), ${N_POL[a]}+${N_POL[b]} policies, $n_tc ingress mark filters"
