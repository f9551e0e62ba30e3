#!/usr/bin/env bash
# Inside the test VM: every real-kernel suite of the project, in one boot
# (booting under TCG costs more than most suites). XFRMSYNC_VM_SET says
# which:
#   core  kernel-suite.sh (C and Rust API, examples, kernel facts),
#         route-based-suite.sh (64 SAs with a mark and an if_id, which a
#         GETAE for both thresholds panics 5.10 on) and registry-suite.sh
#         (bursts of 5,000 SAs through `xfrmsync apply`)
#   full  the same, plus tool-suite.sh (the xfrmsync command) and the
#         daemon suites that exist
# Each suite runs to its end even when one before it failed; the time each
# took is printed. Ends with `guest-suites: N passed, N failed`.
set -uo pipefail
cd "$(dirname "$0")/../.."

set_name=${XFRMSYNC_VM_SET:-full}
case $set_name in
    core) export XFRMSYNC_BURST=${XFRMSYNC_BURST:-5000}
          list=(kernel-suite.sh route-based-suite.sh registry-suite.sh) ;;
    full) export XFRMSYNC_BURST=${XFRMSYNC_BURST:-5000}
          list=(kernel-suite.sh route-based-suite.sh registry-suite.sh tool-suite.sh)
          for daemon in strongswan-suite.sh pfkey-suite.sh; do
              [[ -f vmtest/guest/$daemon ]] && list+=("$daemon")
          done ;;
    *) echo "suites: XFRMSYNC_VM_SET is '$set_name', not core or full" >&2; exit 2 ;;
esac
echo "suites: $set_name set on $(uname -r): ${list[*]}"
passed=0 failed=0 failures=()
for suite in "${list[@]}"; do
    echo "=== suite $suite"
    t0=$SECONDS
    if bash "vmtest/guest/$suite"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); failures+=("$suite")
    fi
    echo "suite-time: $suite $((SECONDS - t0)) s"
done
((failed == 0)) || echo "suites: failed: ${failures[*]}"
echo "guest-suites: $passed passed, $failed failed"
((failed == 0))
