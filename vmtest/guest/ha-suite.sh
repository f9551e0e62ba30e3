#!/usr/bin/env bash
# Inside the test VM (core set, every kernel): HA sync (issue 13), a
# standby taking over live SAs under ESP traffic, proven by the kernels'
# own counters (tests/vm_sync.rs does the steps and the checks).
#
# The network and SAs are vmtest/guest/ha-net.sh's: P, A and S on a
# bridge, A and S with the same SAs (legacy and ESN, IPv4 and IPv6, one
# ESN SA crossing 2^32, one without ESN near 2^32 that must need a rekey),
# a sync link between A and S.
# Each run builds everything again (tests/vm_sync.rs says what each does):
#   clean    the library's engine in process, the link cut 1 s before A dies
#   overrun  the same, A's event socket overrunning again and again
#   daemon   two `xfrmsync sync` daemons over their encrypted link; forged,
#            corrupted and replayed packets thrown at it first
#   split    the daemons; S commits while A still runs, then the link heals
#   c-api    examples/ha_sync.c: the C API's active side on A for 3 s under
#            traffic, its records committed on S; S's numbers must be above
#            A's last, and S's lag by A's samples of every SA within the
#            margin
# Ends with "ha: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."

source vmtest/guest/ha-net.sh
series=${XFRMSYNC_VM_KERNEL:-$(uname -r)}
out=target/vmtest/ha-$series

source vmtest/guest/tap.sh ha
for bin in target/vmtest/vm_sync target/vmtest/udp-send target/release/xfrmsync target/ctest/ha_sync; do
    [[ -x $bin ]] || { not_ok "$bin missing: run scripts/test (it builds everything before booting)"; finish; }
done
rm -rf "$out"
mkdir -p "$out"
modprobe -a veth bridge xfrm_user esp4 esp6 authenc || { not_ok "modprobe"; finish; }
mkdir -p /run/netns

for mode in clean overrun daemon split; do
    if build_ha_net; then
        ok "$mode: namespaces hp ha hs, bridge, sync link, the same SAs in A and S"
    else
        not_ok "$mode: building the namespaces and SAs"
        continue
    fi
    if XFRMSYNC_HA_MODE=$mode XFRMSYNC_HA_PAIRS="$PAIRS" XFRMSYNC_VM_KERNEL=$series target/vmtest/vm_sync --ignored --nocapture --test-threads=1 \
        >"$out/$mode.log" 2>&1; then
        ok "$mode: failover under traffic (tests/vm_sync.rs)"
    else
        not_ok "$mode: failover under traffic (tests/vm_sync.rs)"
    fi
    sed 's/^/    /' "$out/$mode.log" | grep -v '^    $' | tail -n 60
done
# The C API, through examples/ha_sync.c.
oseq_of() { # netns spi -> the SA's outbound number
    ip -n "$1" -s xfrm state get src $SVC4 dst $P4 proto esp spi "$2" | sed -n 's/.*oseq \(0x[0-9a-f]*\).*/\1/p'
}
if build_ha_net; then
    ok "c-api: namespaces hp ha hs, bridge, sync link, the same SAs in A and S"
    pids=()
    for port in 9101 9102; do
        target/vmtest/udp-send --netns ha $P4 $port 1000000 64 10 2>/dev/null & pids+=($!)
        target/vmtest/udp-send --netns hp $SVC4 $port 1000000 64 10 2>/dev/null & pids+=($!)
    done
    target/ctest/ha_sync /run/netns/ha /run/netns/hs 3 >"$out/c-api.log" 2>&1
    rc=$?
    kill "${pids[@]}" 2>/dev/null
    wait "${pids[@]}" 2>/dev/null
    sed 's/^/    /' "$out/c-api.log" | grep -E "0x000010a1|0x000020a1|^    (active|standby|lag)"
    if ((rc == 0)) && grep -q "12 SAs, 12 written" "$out/c-api.log"; then
        ok "c-api: examples/ha_sync.c synced A and committed every SA on S"
    else
        not_ok "c-api: examples/ha_sync.c (status $rc; $out/c-api.log)"
    fi
    if grep -q "^lag: 12 SAs sampled, 12 compared, .* 0 over the margin" "$out/c-api.log"; then
        ok "c-api: the standby compared A's sample of every SA with its record, none behind by more than the margin"
    else
        not_ok "c-api: the standby's lag: $(grep '^lag' "$out/c-api.log")"
    fi
    for spi in 0x10a1 0x20a1; do
        a_last=$(oseq_of ha $spi) s_next=$(oseq_of hs $spi)
        if [[ -n $a_last && -n $s_next ]] && ((a_last > 0 && s_next > a_last)); then
            ok "c-api: SA $spi: S goes on from $((s_next)), above A's last $((a_last))"
        else
            not_ok "c-api: SA $spi: S at '$s_next', A's last '$a_last'"
        fi
    done
else
    not_ok "c-api: building the namespaces and SAs"
fi
for n in hp ha hs hsw; do ip netns del "$n" 2>/dev/null; done
finish
