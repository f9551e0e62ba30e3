# Sourced by the daemon suites (strongswan-suite.sh, concentrator-suite.sh):
# one charon per network namespace, each with its own directory $RUN/<side>
# (strongswan.conf, swanctl.conf, the vici socket, and run/ bound over /run
# in its mount namespace, so that charon's pid file and sockets stay its
# own). The suite sets RUN and OUT, a pids array, fatal(), and a write_conf
# <side> <mode> of its own; NETNS_PREFIX names the namespaces (<prefix><side>).

declare -A CHARON
# start_charon SIDE MODE: writes its configuration, starts charon and waits
# up to 60 s for its vici socket.
start_charon() {
    local side=$1 mode=$2 dir=$RUN/$1 i
    write_conf "$side" "$mode"
    rm -f "$dir/charon.vici"
    ip netns exec "$NETNS_PREFIX$side" sh -c 'mount --bind "$1/run" /run && STRONGSWAN_CONF="$1/strongswan.conf" exec /usr/lib/ipsec/charon' \
        sh "$dir" >"$OUT/charon-$side-$mode.stderr" 2>&1 &
    CHARON[$side]=$!
    pids+=($!)
    for ((i = 0; i < 600; i++)); do
        [[ -S $dir/charon.vici ]] && break
        kill -0 "${CHARON[$side]}" 2>/dev/null || break
        sleep 0.1
    done
    [[ -S $dir/charon.vici ]] || fatal "charon $side ($mode) did not come up: $(tail -5 "$OUT/charon-$side-$mode.stderr" "$OUT/charon-$side-$mode.log" 2>/dev/null)"
}
stop_charon() { # side
    kill "${CHARON[$1]}" 2>/dev/null
    wait "${CHARON[$1]}" 2>/dev/null
}
sw() { # side swanctl-args...: swanctl against that side's charon
    local side=$1; shift
    STRONGSWAN_CONF=$RUN/swanctl-strongswan.conf swanctl "$@" --uri "unix://$RUN/$side/charon.vici"
}
