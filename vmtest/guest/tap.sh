# Sourced by the guest suites that time their steps (ha-suite.sh,
# route-based-suite.sh) as `source vmtest/guest/tap.sh NAME`: TAP-like
# lines "ok - WHAT (N s)" and "not ok - WHAT (N s)", each saying how long
# its step took, and finish, which prints "NAME: N passed, N failed" and
# exits 0 only if something passed and nothing failed.
tap_name=$1
passed=0 failed=0 last=$SECONDS
report() {
    echo "$1 - ${*:2} ($((SECONDS - last)) s)"
    last=$SECONDS
}
ok() { report ok "$@"; passed=$((passed + 1)); }
not_ok() { report "not ok" "$@"; failed=$((failed + 1)); }
finish() {
    echo "$tap_name: $passed passed, $failed failed"
    [[ $failed -eq 0 && $passed -gt 0 ]]
    exit
}
