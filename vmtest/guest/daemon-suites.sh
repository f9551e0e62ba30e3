#!/usr/bin/env bash
# Inside the test VM: the real-daemon suites in one boot, for running them
# on their own (scripts/test-daemons does, once per kernel):
#   vmtest/guest/pfkey-suite.sh       racoon's PF_KEY path with a rule applier
#   vmtest/guest/strongswan-suite.sh  charon with the plugin, and without it
# Each prints its own "<suite>: N passed, N failed"; exits non-zero if either
# failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
rc=0
for suite in pfkey strongswan; do
    start=$SECONDS
    vmtest/guest/$suite-suite.sh || rc=1
    echo "# $suite suite: $((SECONDS - start)) s"
done
exit $rc
