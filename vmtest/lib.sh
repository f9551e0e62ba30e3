# shellcheck shell=bash
# Sourced by the vmtest scripts (and by any test script that needs the guest
# tools):  source vmtest/lib.sh; build_guest_tools
#
# build_udp_send: compiles vmtest/guest/udp-send.c into target/vmtest/udp-send
# with `cc -O2 -Wall -Werror` when the binary is missing or older than the
# source. Runs on the host; the guest sees the binary through 9p.

VMTEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$VMTEST_DIR/.." && pwd -P)
UDP_SEND=$REPO_ROOT/target/vmtest/udp-send

build_udp_send() {
    local src=$VMTEST_DIR/guest/udp-send.c cc=${CC:-cc}
    if [[ -x $UDP_SEND && $UDP_SEND -nt $src ]]; then
        return 0
    fi
    command -v "$cc" >/dev/null 2>&1 || { echo "build_udp_send: no C compiler '$cc' (run scripts/setup-vm)" >&2; return 1; }
    mkdir -p "$(dirname "$UDP_SEND")"
    "$cc" -O2 -Wall -Werror -o "$UDP_SEND.tmp" "$src" || { echo "build_udp_send: compiling $src failed" >&2; return 1; }
    mv -f "$UDP_SEND.tmp" "$UDP_SEND"
}

build_guest_tools() {
    build_udp_send
}
