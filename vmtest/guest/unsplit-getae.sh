#!/usr/bin/env bash
# Inside the test VM, by vmtest/crash-repro only: NEVER part of the default
# run, since it can take the kernel down. Sends the GETAE the library never
# sends, raw: both thresholds (XFRM_AE_RTHR | XFRM_AE_ETHR) in one request,
# on SAs with mark 0x7/0xff and if_id 5, ESN windows 32 to 1024 and the
# same without ESN, in that order; each is announced ("asking: ...") before
# it is sent, so the last such line names the one a panic answered. Then the
# same on SAs with an if_id and no mark. Ends with "unsplit-getae: all N
# answered".
set -euo pipefail
cd "$(dirname "$0")/../.."
KEYS="auth-trunc hmac(sha256) 0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 128 enc cbc(aes) 0x0123456789abcdef0123456789abcdef"
modprobe -a xfrm_user esp4 authenc
mkdir -p /run/netns
ip netns del uq 2>/dev/null || true
ip netns add uq
batch="" specs=()
for marked in 1 0; do
    for esn in 1 0; do
        for ((i = 1; i <= 32; i++)); do
            window=$((32 * i))
            spi=$(printf '0x%x' $((0x7000 + marked * 0x400 + esn * 0x100 + i)))
            flags="replay-window $window"
            ((esn)) && flags="flag esn $flags"
            mark=""
            ((marked)) && mark="mark 0x7 mask 0xff"
            batch+="xfrm state add src 10.12.0.1 dst 10.12.0.2 proto esp spi $spi reqid $i mode transport $flags $mark if_id 5 $KEYS
"
            specs+=("$spi,$marked,$esn,$window")
        done
    done
done
printf '%s' "$batch" | ip -n uq -batch -
echo "unsplit-getae: kernel $(uname -r), ${#specs[@]} SAs with if_id 5"
ip netns exec uq python3 - "${specs[@]}" <<'PY'
import socket, struct, sys
XFRM_MSG_GETAE, NLMSG_ERROR, XFRMA_MARK = 0x1f, 2, 21
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)  # NETLINK_XFRM
s.bind((0, 0))
for seq, spec in enumerate(sys.argv[1:], 1):
    spi, marked, esn, window = (int(w, 0) for w in spec.split(","))
    shape = f"{'mark + if_id' if marked else 'if_id only'}, {'ESN' if esn else 'no ESN'} window {window}"
    print(f"asking: {shape}", flush=True)
    body = struct.pack("=16s4sHBx16sII", bytes([10, 12, 0, 2]).ljust(16, b"\0"), struct.pack(">I", spi),
                       socket.AF_INET, 50, b"\0" * 16, 1 | 8, 0)  # XFRM_AE_RTHR | XFRM_AE_ETHR
    if marked:
        body += struct.pack("=HHII", 12, XFRMA_MARK, 7, 0xFF)
    s.send(struct.pack("=IHHII", 16 + len(body), XFRM_MSG_GETAE, 1, seq, 0) + body)
    data = s.recv(65536)
    kind = struct.unpack_from("=IH", data)[1]
    if kind == NLMSG_ERROR:
        sys.exit(f"GETAE {shape}: errno {-struct.unpack_from('=i', data, 16)[0]}")
    print(f"answered: {shape}", flush=True)
print(f"unsplit-getae: all {len(sys.argv) - 1} answered")
PY
