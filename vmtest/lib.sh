# shellcheck shell=bash
# Sourced by the vmtest scripts (and by any test script that needs the guest
# tools):  source vmtest/lib.sh; build_guest_tools
#
# VM_KERNELS: the kernel series the rig boots (scripts/setup-vm installs them).
#
# build_guest_tools: compiles each vmtest/guest/<tool>.c (udp-send,
# xfrm-probe, time-floor) into target/vmtest/<tool> with `cc -O2 -Wall -Werror` when the
# binary is missing or older than the source. Runs on the host; the guest sees
# the binaries through 9p. build_udp_send and build_xfrm_probe build one.

VMTEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$VMTEST_DIR/.." && pwd -P)
# shellcheck disable=SC2034 # used by the scripts that source this file
VM_KERNELS="5.10 6.1 6.12 sid"
# shellcheck disable=SC2034
UDP_SEND=$REPO_ROOT/target/vmtest/udp-send
# shellcheck disable=SC2034
XFRM_PROBE=$REPO_ROOT/target/vmtest/xfrm-probe

build_guest_tool() { # name
    local src=$VMTEST_DIR/guest/$1.c out=$REPO_ROOT/target/vmtest/$1 cc=${CC:-cc}
    if [[ -x $out && $out -nt $src ]]; then
        return 0
    fi
    command -v "$cc" >/dev/null 2>&1 || { echo "build_guest_tool: no C compiler '$cc' (run scripts/setup-vm)" >&2; return 1; }
    mkdir -p "$(dirname "$out")"
    "$cc" -O2 -Wall -Werror -o "$out.tmp" "$src" || { echo "build_guest_tool: compiling $src failed" >&2; return 1; }
    mv -f "$out.tmp" "$out"
}

build_udp_send() { build_guest_tool udp-send; }
build_xfrm_probe() { build_guest_tool xfrm-probe; }

build_guest_tools() {
    build_udp_send && build_xfrm_probe && build_guest_tool time-floor
}
