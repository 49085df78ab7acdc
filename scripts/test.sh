#!/bin/sh
# The project's test command (the README's, and exactly what CI runs):
# installs what the tests need, then runs every check in order.
#   TEST_FUZZ=0       skip the 20 s-per-target fuzzing pass
#   TEST_PACKAGING=0  skip the Debian package check and the ARM cross route
#                     (the package check installs and removes the .deb here)
set -eu
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[test] $1 done at +$(( $(date +%s) - t0 )) s" >&2; }
./scripts/deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
stamp clippy
# unit, vector, integration, end-to-end (mender-cli), chaos, leak and gdb tests
cargo test
stamp "cargo test"
# websocket conformance (Autobahn client cases via kosoku) against the
# daemon's own websocket code, diffed with tests/data/autobahn-expected.json
./scripts/autobahn.sh
stamp autobahn
if [ "${TEST_FUZZ:-1}" != 0 ]; then
    ./scripts/fuzz.sh 20
    stamp fuzz
fi
if [ "${TEST_PACKAGING:-1}" != 0 ]; then
    # build, lintian, dpkg -i, systemd-analyze verify, --version, remove
    if [ "$(id -u)" = 0 ]; then
        packaging/debian/check-deb.sh
    else
        sudo --preserve-env=PATH,HOME,CARGO_HOME,RUSTUP_HOME packaging/debian/check-deb.sh
    fi
    stamp debian
    # ARMv5/ARMv6 cross builds + qemu tests; ci.sh tells a toolchain outage
    # (apt mirror, rustc-web version jump) from a code failure
    packaging/cross/ci.sh
    stamp cross
fi
