#!/usr/bin/env bash
# Inside the test VM (scripts/bench-vm --concentrator): charon as a VPN
# concentrator (issue 14). Namespace ccb holds OTHER_SAS other SAs (default
# 100,000), and `xfrmsync apply` flips their thresholds every few seconds
# (each flip lists every SA and sends a NEWAE to each: an aevent storm of
# update events). There, charon b answers CHILDREN CHILD_SAs (default
# 2,000) that charon a in namespace cca initiates, 8 IKE_SAs of CHILDREN/8
# children each, all at once when its configuration loads. Two runs: b
# without the plugin, then with it (its SA notification buffer set small,
# so that lost notifications make it list all SAs again during the run).
#
# XFRMSYNC_CC_OTHER_SAS, XFRMSYNC_CC_CHILDREN, XFRMSYNC_CC_BUFFER (the
# plugin's receive_buffer, default 16384) and XFRMSYNC_CC_MODES ("noplugin
# plugin") change the defaults.
#
# Prints, per run, the time until every CHILD_SA is established, the ratio
# between the runs, every CHILD_SA SA's thresholds in the raw GETAE
# answers (with the plugin), and the plugin's hook times (p50, p99, max) as
# it logs them when charon stops, beside the control: sections of pure
# computation of 0, 10, 30 and 100 us timed the same way during each run
# (target/vmtest/time-floor), which is what the VM alone does to a section
# that takes no lock and does no I/O; and, per hook, how many waited (a
# voluntary context switch) or were preempted (hook_switches). Figures
# only: no time is asserted. Ends with "concentrator: N passed, N failed"
# for what is checked (every child established, every SA on its
# thresholds).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

OTHER_SAS=${XFRMSYNC_CC_OTHER_SAS:-100000}
CHILDREN=${XFRMSYNC_CC_CHILDREN:-2000}
IKE_SAS=8
REPLAY=24 TIMER=1200
PLUGIN_BUFFER=${XFRMSYNC_CC_BUFFER:-16384}
kernel=$(uname -r)
OUT=$REPO/target/vmtest/concentrator-$kernel
RUN=/tmp/xfrmsync-cc
PLUGIN_SO=$REPO/target/plugin/libstrongswan-xfrmsync.so
BENCH=$REPO/benches/target/release/vm_bench
PLUGINS="random nonce aes sha1 sha2 hmac kdf gmp kernel-netlink socket-default vici"

passed=0 failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
pids=()
finish() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    echo "concentrator: $passed passed, $failed failed"
    ((failed == 0 && passed > 0))
    exit
}
fatal() { not_ok "$*"; finish; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for f in "$PLUGIN_SO" "$BENCH" target/release/xfrmsync target/vmtest/time-floor /usr/lib/ipsec/charon /usr/sbin/swanctl; do
    [[ -x $f || -f $f ]] || fatal "$f missing: scripts/bench-vm builds what the concentrator needs"
done
echo "concentrator: kernel $kernel, $OTHER_SAS other SAs, $CHILDREN CHILD_SAs over $IKE_SAS IKE_SAs, $(nproc) CPUs, $(free -m | awk '/Mem:/ { print $2 }') MiB"
rm -rf "$OUT" "$RUN"
mkdir -p "$OUT" "$RUN" /usr/lib/ipsec/plugins
cp "$PLUGIN_SO" /usr/lib/ipsec/plugins/libstrongswan-xfrmsync.so
printf 'swanctl {\n    load = random nonce\n}\n' >"$RUN/swanctl-strongswan.conf"

modprobe -a veth xfrm_user esp4 authenc crypto_null 2>/dev/null || fatal "modprobe"
mkdir -p /run/netns
for n in cca ccb; do ip netns del $n 2>/dev/null; done
ip netns add cca && ip netns add ccb || fatal "ip netns add"
ip link add cc-a netns cca type veth peer name cc-b netns ccb || fatal "veth"
ip -n cca -batch - <<EOF || fatal "addresses in cca"
link set lo up
addr add 192.168.111.1/32 dev lo
addr add 10.11.0.1/24 dev cc-a
link set cc-a up
EOF
ip -n ccb -batch - <<EOF || fatal "addresses in ccb"
link set lo up
addr add 192.168.112.1/32 dev lo
addr add 10.11.0.2/24 dev cc-b
link set cc-b up
EOF

# --- the other SAs, and the storm on them ----------------------------------------
t0=$(now)
# One destination each: the kernel walks an SA's hash bucket (by addresses)
# on every add, so SAs sharing addresses would make this quadratic.
awk -v n="$OTHER_SAS" 'BEGIN { for (i = 0; i < n; i++)
    printf "xfrm state add src 10.97.0.1 dst 10.%d.%d.%d proto esp spi 0x%x reqid %d mode transport replay-window 32 enc ecb(cipher_null) \"\"\n", 100 + int(i / 65536), int(i / 256) % 256, i % 256, 0x100000 + i, 5000 + i % 4 }' |
    ip -n ccb -batch - || fatal "adding $OTHER_SAS SAs"
echo "# $OTHER_SAS other SAs added in $(since "$t0") s"
storm_rules() { printf '[[rule]]\nname = "others"\ndst = "10.96.0.0/11"\nreplay_packets = %s\ntimer_ms = %s\n' "$1" "$2" >"$OUT/storm.toml"; }
storm_rules 3 300
# Without its line per SA (100,000 a flip).
target/release/xfrmsync apply --netns ccb "$OUT/storm.toml" > >(grep --line-buffered -v '^applied' >"$RUN/storm.log") 2>&1 &
storm_pid=
for ((i = 0; i < 50; i++)); do
    storm_pid=$(pgrep -f "xfrmsync apply --netns ccb" | head -1)
    [[ -n $storm_pid ]] && break
    sleep 0.1
done
[[ -n $storm_pid ]] || fatal "xfrmsync apply on the other SAs did not start"
pids+=($storm_pid)
for ((i = 0; i < 1200; i++)); do grep -q ready "$RUN/storm.log" && break; sleep 0.5; done
grep -q ready "$RUN/storm.log" || fatal "xfrmsync apply on the other SAs: $(tail -3 "$RUN/storm.log")"
echo "# storm: xfrmsync apply gave the $OTHER_SAS SAs their thresholds in $(since "$t0") s since the adds began"
(
    flip=0
    while kill -0 $storm_pid 2>/dev/null; do
        if ((flip ^= 1)); then storm_rules 4 400; else storm_rules 3 300; fi
        kill -HUP $storm_pid
        sleep 5
    done
) &
pids+=($!)

# --- charon ------------------------------------------------------------------
write_conf() { # side mode
    local side=$1 mode=$2 dir=$RUN/$1 load=$PLUGINS k j
    mkdir -p "$dir/run"
    [[ $mode == plugin ]] && load="$load xfrmsync"
    cat >"$dir/strongswan.conf" <<EOF
charon {
    load_modular = no
    load = $load
    install_routes = no
    retransmit_timeout = 30
    # 8 IKE_SAs from one address at once: no cookies, no blocking
    block_threshold = 1000
    cookie_threshold = 1000
    plugins {
        vici {
            socket = unix://$dir/charon.vici
        }
        xfrmsync {
            replay_packets = $REPLAY
            timer_ms = $TIMER
            receive_buffer = $PLUGIN_BUFFER
            # which hooks waited, which were preempted
            hook_switches = yes
        }
    }
    filelog {
        main {
            path = $OUT/charon-$side-$mode.log
            default = 1
            time_format = %T
            time_add_ms = yes
        }
    }
}
EOF
    {
        echo "connections {"
        if [[ $side == a ]]; then
            # strongswan.conf syntax: one setting a line.
            for ((k = 1; k <= IKE_SAS; k++)); do
                printf '  c%s {\n    version = 2\n    remote_addrs = 10.11.0.2\n    proposals = aes128-sha256-modp2048\n' "$k"
                printf '    rekey_time = 0\n    reauth_time = 0\n    dpd_delay = 0\n'
                printf '    local {\n      auth = psk\n      id = a%s.test\n    }\n    remote {\n      auth = psk\n      id = b.test\n    }\n' "$k"
                echo "    children {"
                # A port of its own: charon does not establish a CHILD_SA
                # whose traffic selectors another one has.
                for ((j = 1; j <= CHILDREN / IKE_SAS; j++)); do
                    printf '      c%s_%s {\n        local_ts = 192.168.111.1/32[udp/%s]\n        remote_ts = 192.168.112.1/32[udp/%s]\n' \
                        "$k" "$j" $((10000 + k * 1000 + j)) $((10000 + k * 1000 + j))
                    printf '        esp_proposals = aes128-sha256\n        rekey_time = 0\n        start_action = start\n      }\n'
                done
                echo "    }"
                echo "  }"
            done
        else
            printf '  cc {\n    version = 2\n    proposals = aes128-sha256-modp2048\n    rekey_time = 0\n    reauth_time = 0\n'
            printf '    dpd_delay = 0\n    unique = never\n'
            printf '    local {\n      auth = psk\n      id = b.test\n    }\n    remote {\n      auth = psk\n    }\n'
            printf '    children {\n      cc {\n        local_ts = 192.168.112.1/32[udp]\n        remote_ts = 192.168.111.1/32[udp]\n'
            printf '        esp_proposals = aes128-sha256\n        rekey_time = 0\n      }\n    }\n  }\n'
        fi
        echo "}"
        printf 'secrets {\n  ike-cc {\n    secret = "xfrmsync concentrator PSK, not a secret"\n  }\n}\n'
    } >"$dir/swanctl.conf"
}
NETNS_PREFIX=cc
source vmtest/guest/charon-lib.sh
tunnel_sas() { ip -n ccb xfrm state list | grep -c '^src 10.11.0.'; }

declare -A SECONDS_TO_ALL
run() { # mode of charon b
    local mode=$1 t0 n=0 deadline floor
    # The control for the hook times: sections of pure computation timed
    # as the plugin times its hooks, beside charon b the whole run.
    "$REPO/target/vmtest/time-floor" 0 10 30 100 >"$OUT/time-floor-$mode.txt" 2>&1 &
    floor=$!
    pids+=("$floor")
    start_charon b "$mode"
    start_charon a noplugin
    sw b --load-all --noprompt --file "$RUN/b/swanctl.conf" >"$OUT/load-b-$mode.log" 2>&1 || fatal "swanctl --load-all for b: $(tail -3 "$OUT/load-b-$mode.log")"
    t0=$(now)
    sw a --load-all --noprompt --file "$RUN/a/swanctl.conf" >"$OUT/load-a-$mode.log" 2>&1 || fatal "swanctl --load-all for a: $(tail -3 "$OUT/load-a-$mode.log")"
    deadline=$((SECONDS + 1800))
    while ((SECONDS < deadline)); do
        n=$(tunnel_sas)
        ((n >= 2 * CHILDREN)) && break
        sleep 1
    done
    SECONDS_TO_ALL[$mode]=$(since "$t0")
    if ((n >= 2 * CHILDREN)); then
        ok "b $mode: $CHILDREN CHILD_SAs ($n SAs in ccb) established in ${SECONDS_TO_ALL[$mode]} s, $OTHER_SAS other SAs and the storm around them"
    else
        not_ok "b $mode: only $n of $((2 * CHILDREN)) SAs after ${SECONDS_TO_ALL[$mode]} s"
    fi
    if [[ $mode == plugin ]]; then
        local t1
        t1=$(now)
        deadline=$((SECONDS + 300))
        while ((SECONDS < deadline)); do
            "$BENCH" check ccb 10.11.0.0/24 "$REPLAY" "$TIMER" >"$OUT/check.txt" 2>&1 && break
            sleep 2
        done
        if "$BENCH" check ccb 10.11.0.0/24 "$REPLAY" "$TIMER" >"$OUT/check.txt" 2>&1; then
            ok "$(cat "$OUT/check.txt") (settled $(since "$t1") s after the last was established)"
        else
            not_ok "$(cat "$OUT/check.txt")"
        fi
    fi
    stop_charon a
    stop_charon b
    kill -TERM "$floor" 2>/dev/null
    wait "$floor"
    sed "s/^/# b $mode: /" "$OUT/time-floor-$mode.txt"
    ip -n ccb xfrm policy flush
    ip -n ccb xfrm state deleteall src 10.11.0.1 2>/dev/null
    ip -n ccb xfrm state deleteall src 10.11.0.2 2>/dev/null
    ip -n cca xfrm state flush
    ip -n cca xfrm policy flush
}

# XFRMSYNC_CC_MODES: which runs (both by default; the ratio needs both).
for mode in ${XFRMSYNC_CC_MODES:-noplugin plugin}; do
    run "$mode"
done
grep -h "xfrmsync: hook times\|xfrmsync: hook switches\|xfrmsync: dispatch failures\|lost\|dropped\|rest\|watched again" "$OUT/charon-b-plugin.log" |
    sed 's/^[0-9:.]* [0-9]*\[[A-Z]*\] /# /' | sort | uniq -c | sed 's/^ *\([0-9]*\) /# (x\1) /' | head -30
[[ -n ${SECONDS_TO_ALL[noplugin]:-} && -n ${SECONDS_TO_ALL[plugin]:-} ]] &&
awk -v a="${SECONDS_TO_ALL[noplugin]}" -v b="${SECONDS_TO_ALL[plugin]}" \
    'BEGIN { printf "RATIO concentrator: establishing %s CHILD_SAs took %.1f s without the plugin, %.1f s with it: ratio %.2f (goal >= 0.95)\n", '"$CHILDREN"', a, b, a / b }'
finish
