#!/usr/bin/env bash
# Inside the test VM (vmtest/run-in-vm <kernel> vmtest/guest/tool-suite.sh):
# the `xfrmsync` command on real SAs, in netns b of net-setup.sh.
#
# Uses the binary built on the host: $XFRMSYNC_TOOL, by default
# target/release/xfrmsync (cargo build --release -p xfrmsync-tool), and
# target/vmtest/udp-send (built by run-in-vm). Thresholds are checked twice:
# with `xfrmsync get --json`, and with a raw XFRM_MSG_GETAE sent by a few
# lines of Python below, which share no code with the library.
# Ends with `tool-suite: N passed, N failed`; exits non-zero on a failure.
set -uo pipefail
cd "$(dirname "$0")/../.."

X=${XFRMSYNC_TOOL:-target/release/xfrmsync}
UDP=target/vmtest/udp-send
for bin in "$X" "$UDP"; do
    [[ -x $bin ]] || { echo "tool-suite: $bin missing: build it on the host first (cargo build --release -p xfrmsync-tool)" >&2; exit 1; }
done
kernel=$(uname -r)
# The kernel's name may hold a '+', which the patterns below would read.
out=target/vmtest/tool-${kernel//[^A-Za-z0-9._-]/_}
rm -rf "$out" && mkdir -p "$out"
echo "tool-suite: kernel $kernel, $X"

passed=0 failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
# check DESCRIPTION COMMAND...: the command's output is shown on failure.
check() {
    local what=$1 log
    shift
    log=$("$@" 2>&1) && ok "$what" || { not_ok "$what"; printf '%s\n' "$log" | sed 's/^/    /'; }
}
# wait_for FILE PATTERN SECONDS [AFTER]: until a line of FILE after its
# first AFTER lines matches PATTERN (an extended regex).
wait_for() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        tail -n +$((${4:-0} + 1)) "$1" 2>/dev/null | grep -qE -- "$2" && return 0
        sleep 0.1
    done
    echo "no line matching '$2' in $1 after $3 s (after line ${4:-0}):"; cat "$1"
    return 1
}

KEYS="auth-trunc hmac(sha256) 0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 128 enc cbc(aes) 0x0123456789abcdef0123456789abcdef"
add_sa() { # add_sa NETNS SPI REQID REPLAY-ARGS...: an SA 10.9.0.1 -> 10.9.0.2
    local ns=$1 spi=$2 reqid=$3
    shift 3
    # shellcheck disable=SC2086 # KEYS is words
    ip -n "$ns" xfrm state add src 10.9.0.1 dst 10.9.0.2 proto esp spi "$spi" reqid "$reqid" mode transport "$@" $KEYS
}

# raw_getae NETNS DST,SPI[,MARK,MASK]...: "REPLAY_THRESH TIMER_MS" of each SA
# straight from the kernel, one line each (XFRMA_ETIMER_THRESH is reported
# in 100 ms units). One Python for all: each start costs seconds under TCG.
# A marked SA is asked one threshold per GETAE (XFRM_AE_RTHR, then
# XFRM_AE_ETHR): Linux 5.10 panics on one asking both about an SA with a
# mark and an if_id (issue 16). An unmarked SA is asked both at once.
raw_getae() {
    ip netns exec "$1" python3 - "${@:2}" <<'PY'
import ipaddress, socket, struct, sys
XFRM_MSG_GETAE, NLMSG_ERROR, XFRMA_MARK = 0x1f, 2, 21
XFRMA_REPLAY_THRESH, XFRMA_ETIMER_THRESH = 11, 12
XFRM_AE_RTHR, XFRM_AE_ETHR = 1, 8
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)  # NETLINK_XFRM
s.bind((0, 0))
seq = 0
def getae(spec, flags):
    global seq
    seq += 1
    words = spec.split(",")
    dst, spi = ipaddress.ip_address(words[0]), int(words[1], 0)
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    # struct xfrm_aevent_id: xfrm_usersa_id (daddr, spi, family, proto,
    # pad), saddr, flags, reqid: 48 bytes.
    body = struct.pack("=16s4sHBx16sII", dst.packed.ljust(16, b"\0"), struct.pack(">I", spi), family, 50,
                       b"\0" * 16, flags, 0)
    if len(words) > 2:
        body += struct.pack("=HHII", 12, XFRMA_MARK, int(words[2], 0), int(words[3], 0))
    s.send(struct.pack("=IHHII", 16 + len(body), XFRM_MSG_GETAE, 1, seq, 0) + body)
    data = s.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        sys.exit("GETAE %s: errno %d" % (spec, -struct.unpack_from("=i", data, 16)[0]))
    found, at = {}, 16 + 48
    while at + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, at)
        if alen < 4:
            break
        if atype in (XFRMA_REPLAY_THRESH, XFRMA_ETIMER_THRESH):
            found[atype] = struct.unpack_from("=I", data, at + 4)[0]
        at += (alen + 3) & ~3
    return found
for spec in sys.argv[1:]:
    if len(spec.split(",")) > 2:  # marked: one threshold per request
        found = getae(spec, XFRM_AE_RTHR)
        found.update(getae(spec, XFRM_AE_ETHR))
    else:
        found = getae(spec, XFRM_AE_RTHR | XFRM_AE_ETHR)
    print(found[XFRMA_REPLAY_THRESH], found[XFRMA_ETIMER_THRESH] * 100)
PY
}

# expect_thresholds NETNS JSONL "SPI:REPLAY:TIMER[:DST] ...": checks the
# `get --json` output in JSONL, then the kernel with a raw GETAE (DST is
# 10.9.0.2 unless given; SA 0x4001 is marked 0x7/0xff).
expect_thresholds() {
    local ns=$1 jsonl=$2 table=$3 entry spi replay timer dst specs=() want=() got
    python3 - "$jsonl" "$table" <<'PY' || return 1
import json, sys
got = {}
for line in open(sys.argv[1]):
    e = json.loads(line)
    got[e["spi"]] = (e["replay_threshold"], e["timer_threshold_ms"], e["daddr"])
bad = []
for item in sys.argv[2].split():
    spi, replay, timer = item.split(":")[:3]
    spi = int(spi, 0)
    if spi not in got:
        bad.append("0x%x: not listed" % spi)
    elif got[spi][:2] != (int(replay), int(timer)):
        bad.append("0x%x: get --json says %s, the rule %s" % (spi, got[spi][:2], (int(replay), int(timer))))
if bad:
    sys.exit("\n".join(bad))
PY
    for entry in $table; do
        IFS=: read -r spi replay timer dst <<<"$entry"
        spec=${dst:-10.9.0.2},$spi
        [[ $spi == 0x4001 ]] && spec+=,0x7,0xff
        specs+=("$spec")
        want+=("$replay $timer")
    done
    got=$(raw_getae "$ns" "${specs[@]}") || return 1
    [[ $got == "$(printf '%s\n' "${want[@]}")" ]] || {
        echo "raw GETAE of ${specs[*]}:"; echo "$got"; echo "expected:"; printf '%s\n' "${want[@]}"; return 1
    }
}

# running PID: the process exists and is not a zombie waiting to be reaped
# (kill -0 succeeds on those).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

# wait_exit PID SECONDS: the process's exit status, or 124 after killing it
# when it has not ended in time (a hung command must not hang the suite).
wait_exit() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        running "$1" || { wait "$1"; return; }
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    return 124
}

vmtest/guest/net-setup.sh >/dev/null || { echo "tool-suite: net-setup failed"; exit 1; }
# A wide window without the ESN flag: the kernel keeps ESN-format replay
# state for it, yet its numbers wrap at 2^32.
add_sa b 0x8801 80 replay-window 64
# net-setup's SAs and this one: every SA of b but 0x3002 matches a rule.
sas_in_b=$(ip -n b xfrm state | grep -c '^src')

# --- apply --once ------------------------------------------------------------
rules=$out/rules.toml
cat >"$rules" <<'EOF'
[[rule]]
name = "busy"
dst = "10.9.0.0/24"
replay_packets = 32
timer_ms = 2000

[[rule]]
name = "child-2"
reqid = 2
replay_packets = 8
timer_ms = 1000

[[rule]]
name = "marked"
dst = "10.9.0.2"
spi = "0x4001"
mark = "0x7/0xff"
replay_packets = 4
timer_ms = 500

[[rule]]
name = "v6-in"
family = "inet6"
direction = "in"
replay_packets = 64
timer_ms = 5000
EOF
# In b: 0x2001/0x2002 are reqid 2; 0x3001/0x7101 are IPv6 towards b (in);
# 0x3002 is IPv6 from b (out) and matches no rule, so keeps the defaults.
want_once="0x1001:32:2000 0x1002:32:2000:10.9.0.1 0x2001:8:1000 0x2002:8:1000:10.9.0.1 0x4001:4:500
0x5001:32:2000 0x6001:32:2000 0x7001:32:2000 0x8801:32:2000 0x3001:64:5000:fd00:9::2 0x7101:64:5000:fd00:9::2
0x3002:2:1000:fd00:9::1"
"$X" apply --once --netns b "$rules" >"$out/once.out" 2>&1
once_rc=$?
check "apply --once exits 0 and prints one line per SA and the ready line" \
    bash -c "[[ $once_rc == 0 ]] && [[ \$(grep -c '^applied ' $out/once.out) == $((sas_in_b - 1)) ]] && grep -q '^xfrmsync apply: ready: 4 rules' $out/once.out || { cat $out/once.out; false; }"
check "apply names the rule behind each SA's thresholds" \
    bash -c "grep -q '^applied replay-threshold 4 timer 500 ms to esp dst 10.9.0.2 spi 0x00004001 mark 0x7/0xff by rule marked\$' $out/once.out && grep -q '^applied replay-threshold 8 timer 1000 ms to esp dst 10.9.0.2 spi 0x00002001 by rule child-2\$' $out/once.out || { cat $out/once.out; false; }"
"$X" get --netns b --json >"$out/get-all.jsonl" 2>"$out/get-all.err"
check "get --json lists every SA of b" bash -c "[[ \$(wc -l <$out/get-all.jsonl) == $sas_in_b ]] || cat $out/get-all.jsonl $out/get-all.err"
check "each SA has its most specific rule's thresholds (get --json and raw GETAE)" \
    expect_thresholds b "$out/get-all.jsonl" "$want_once"
check "get --json names the replay form honestly (esn, wide-window, legacy)" python3 - "$out/get-all.jsonl" <<'PY'
import json, sys
by = {e["spi"]: e for e in map(json.loads, open(sys.argv[1]))}
want = {0x2001: ("esn", 64, True), 0x8801: ("wide-window", 32, False), 0x1001: ("legacy", 32, False)}
for spi, (form, bits, flag) in want.items():
    e = by[spi]
    got = (e["replay_form"], e["seq_bits"], e["esn_flag"])
    assert got == (form, bits, flag), (hex(spi), got)
assert by[0x8801]["replay"]["format"] == "esn", "0x8801 reported in the ESN-format structure"
PY
"$X" get --netns b 10.9.0.2 0x4001 --mark 0x7/0xff >"$out/get-one.txt" 2>&1
check "get of one marked SA prints its thresholds" \
    grep -q "thresholds  replay 4 packets, timer 500 ms" "$out/get-one.txt"
"$X" get --netns b 10.9.0.2 0x4001 >"$out/get-nomark.txt" 2>&1
rc=$?
check "get of a marked SA without its mark fails naming the SA" \
    bash -c "[[ $rc == 1 ]] && grep -q '^xfrmsync: esp dst 10.9.0.2 spi 0x00004001: .*No such process' $out/get-nomark.txt || cat $out/get-nomark.txt"

# --- apply as a daemon: SIGHUP reloads, a broken file keeps the rules ---------
live=$out/live.toml
cp "$rules" "$live"
"$X" apply --netns b "$live" >"$out/daemon.out" 2>&1 &
daemon=$!
check "apply prints its ready line" wait_for "$out/daemon.out" '^xfrmsync apply: ready: 4 rules' 20
sed -i '0,/replay_packets = 32/s//replay_packets = 16/; 0,/timer_ms = 2000/s//timer_ms = 3000/' "$live"
kill -HUP "$daemon"
check "SIGHUP with a changed file reloads it" wait_for "$out/daemon.out" '^xfrmsync apply: reloaded: 4 rules' 20
check "the changed rule is applied to its SAs" wait_for "$out/daemon.out" \
    '^applied replay-threshold 16 timer 3000 ms to esp dst 10.9.0.2 spi 0x00001001 by rule busy$' 10
"$X" get --netns b --json >"$out/get-reloaded.jsonl" 2>&1
check "after the reload (get --json and raw GETAE)" expect_thresholds b "$out/get-reloaded.jsonl" \
    "0x1001:16:3000 0x5001:16:3000 0x2001:8:1000 0x4001:4:500"

good=$out/good.toml
cp "$live" "$good"
n=0
# Each broken file: its content change, the line the refusal must name, and
# a word of the reason.
while IFS='|' read -r what edit line word; do
    n=$((n + 1))
    cp "$good" "$live"
    sed -i "$edit" "$live"
    before=$(wc -l <"$out/daemon.out")
    kill -HUP "$daemon"
    check "SIGHUP with $what: refused, naming line $line" \
        wait_for "$out/daemon.out" "^$live:$line: .*$word" 10 "$before"
done <<'EOF'
a syntax error|3s/.*/dst = "10.9.0.0\/24/|3|
an unknown key|4s/replay_packets/replay_treshold/|4|replay_treshold
an address that does not parse|3s/.*/dst = "10.9.0.300\/24"/|3|10.9.0.300
a negative threshold|5s/timer_ms = .*/timer_ms = -1000/|5|negative
a threshold beyond what the kernel can hold|10s/replay_packets = .*/replay_packets = 4294967296/|10|beyond what the kernel can hold
EOF
check "each refusal says the rules in force stay" \
    bash -c "[[ \$(grep -c 'refused; the 4 rules in force stay in force' $out/daemon.out) == $n ]] || cat $out/daemon.out"
# A new SA after the refusals gets the rules in force, not the broken file's.
add_sa b 0x9001 90 replay-window 32
check "a new SA gets the rules in force after the refusals" wait_for "$out/daemon.out" \
    '^applied replay-threshold 16 timer 3000 ms to esp dst 10.9.0.2 spi 0x00009001 by rule busy$' 10
raw=$(raw_getae b 10.9.0.2,0x9001)
check "raw GETAE of the new SA: 16 packets, 3000 ms" test "$raw" = "16 3000"
kill -TERM "$daemon"
wait_exit "$daemon" 20
rc=$?
check "SIGTERM ends apply with status 0" bash -c "[[ $rc == 0 ]] && grep -q '^xfrmsync apply: SIGTERM: exiting' $out/daemon.out"

# --- set / get -----------------------------------------------------------------
"$X" set --netns b 10.9.0.2 0x5001 --replay-threshold 7 --timer-ms 1500 --oseq 100 --seq 50 >"$out/set.out" 2>&1
check "set of thresholds and sequence numbers in one request" grep -q '^set esp dst 10.9.0.2 spi 0x00005001' "$out/set.out"
"$X" get --netns b --json 10.9.0.2 0x5001 >"$out/get-set.json"
check "get returns what set set" python3 -c '
import json, sys
e = json.load(open(sys.argv[1]))
got = (e["replay_threshold"], e["timer_threshold_ms"], e["replay"]["oseq"], e["replay"]["seq"])
assert got == (7, 1500, 100, 50), got' "$out/get-set.json"
"$X" set --netns b 10.9.0.2 0x7001 --seq 0x100000005 >/dev/null 2>&1
"$X" get --netns b --json 10.9.0.2 0x7001 >"$out/get-esn.json"
check "an ESN SA takes a 64-bit sequence number" python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["replay"]
assert (r["seq_hi"], r["seq"]) == (1, 5), r' "$out/get-esn.json"
"$X" set --netns b 10.9.0.2 0x8801 --replay-threshold 9 --seq 0x100000005 >"$out/set-wide.out" 2>&1
rc=$?
raw=$(raw_getae b 10.9.0.2,0x8801)
check "a wide-window SA without ESN refuses a 64-bit number, and nothing is half set" bash -c \
    "[[ $rc == 1 && '$raw' == '16 3000' ]] && grep -q '^xfrmsync: esp dst 10.9.0.2 spi 0x00008801: seq 4294967301 does not fit' $out/set-wide.out || { echo rc=$rc raw=$raw; cat $out/set-wide.out; }"
"$X" set --netns b 10.9.0.2 0xdead --replay-threshold 1 >"$out/set-missing.out" 2>&1
rc=$?
check "set on a missing SA fails naming it" bash -c \
    "[[ $rc == 1 ]] && grep -q '^xfrmsync: esp dst 10.9.0.2 spi 0x0000dead: .*No such process; nothing was changed' $out/set-missing.out || cat $out/set-missing.out"

# --- defaults --------------------------------------------------------------------
"$X" defaults --netns b --json >"$out/defaults.json"
check "defaults shows the kernel's defaults" grep -qx '{"netns":"b","replay_threshold":2,"timer_ms":1000}' "$out/defaults.json"
"$X" defaults --netns b --timer-ms 3000 --replay-threshold 5 >"$out/defaults-set.out" 2>&1
check "defaults sets both sysctls in b, and only in b" bash -c "
    [[ \$(ip netns exec b cat /proc/sys/net/core/xfrm_aevent_etime) == 30 && \$(ip netns exec b cat /proc/sys/net/core/xfrm_aevent_rseqth) == 5 ]] &&
    [[ \$(ip netns exec a cat /proc/sys/net/core/xfrm_aevent_etime) == 10 && \$(ip netns exec a cat /proc/sys/net/core/xfrm_aevent_rseqth) == 2 ]] || cat $out/defaults-set.out"
add_sa b 0x9002 91 replay-window 32
raw=$(raw_getae b 10.9.0.2,0x9002)
check "a new SA gets the new defaults (raw GETAE)" test "$raw" = "5 3000"
"$X" defaults --netns b --timer-ms 250 --replay-threshold 9 >"$out/defaults-bad.out" 2>&1
rc=$?
check "defaults refuses a timer the kernel cannot keep, and changes nothing" bash -c "
    [[ $rc == 1 && \$(ip netns exec b cat /proc/sys/net/core/xfrm_aevent_rseqth) == 5 ]] && grep -q 'multiple of 100' $out/defaults-bad.out || cat $out/defaults-bad.out"
"$X" defaults --netns b --timer-ms 1000 --replay-threshold 2 >/dev/null

# --- monitor -------------------------------------------------------------------------
"$X" monitor --netns b --json --sa 10.9.0.2 0x1001 --seconds 8 >"$out/monitor.jsonl" 2>"$out/monitor.err" &
mon=$!
"$X" monitor --netns b --json --rule-file "$rules" --rule child-2 --seconds 8 >"$out/monitor-rule.jsonl" 2>&1 &
mon_rule=$!
sleep 2
"$UDP" --netns /run/netns/a 10.9.0.2 9001 40 64 20 2>/dev/null
"$UDP" --netns /run/netns/a 10.9.0.2 9002 20 64 20 2>/dev/null
wait_exit "$mon" 30
rc=$?
wait_exit "$mon_rule" 30
check "monitor --json prints the events of the SA asked for while traffic flows" python3 - "$out/monitor.jsonl" "$rc" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
assert sys.argv[2] == "0", "exit status " + sys.argv[2]
assert len(events) >= 2, events
assert all(e["spi"] == 0x1001 and e["daddr"] == "10.9.0.2" for e in events), events
assert events[-1]["replay"]["seq"] >= 32, events[-1]
PY
check "monitor --rule prints only the events of the SAs that rule governs" python3 - "$out/monitor-rule.jsonl" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
assert events, "no events"
assert {e["spi"] for e in events} == {0x2001}, [e["spi"] for e in events]
PY
# A 4096-bit ESN window: 128 bitmap words, which a human line must not spill.
add_sa b 0x9201 92 flag esn replay-window 4096
"$X" monitor --netns b --sa 10.9.0.2 0x9201 --count 1 --seconds 15 >"$out/monitor-wide.txt" 2>&1 &
mon=$!
"$X" monitor --netns b --json --sa 10.9.0.2 0x9201 --count 1 --seconds 15 >"$out/monitor-wide.jsonl" 2>&1 &
mon_json=$!
sleep 2
"$X" set --netns b 10.9.0.2 0x9201 --replay-threshold 3 >/dev/null
wait_exit "$mon" 30
wait_exit "$mon_json" 30
check "a 4096-bit bitmap stays short on a human line, whole in JSON" python3 - "$out/monitor-wide.txt" "$out/monitor-wide.jsonl" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 1 and lines[0].startswith("update esp dst 10.9.0.2 spi 0x00009201"), lines
assert len(lines[0]) < 300 and "(128 words, " in lines[0], (len(lines[0]), lines[0])
event = json.loads(open(sys.argv[2]).read())
assert len(event["replay"]["bitmap"]) == 128 and event["replay_form"] == "esn", event
PY
"$X" monitor --netns b >/dev/null 2>&1 &
mon=$!
# A SIGINT that arrives before the monitor has taken it is discarded (the
# shell starts background commands with SIGINT ignored): send it until the
# monitor ends.
for ((i = 0; i < 40; i++)); do
    sleep 0.5
    running "$mon" || break
    kill -INT "$mon"
done
wait_exit "$mon" 5
rc=$?
check "monitor ends on SIGINT with status 0" test "$rc" = 0

echo "tool-suite: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
