#!/bin/sh
# Runs every cargo-fuzz target in fuzz/ for N seconds each (default 60), with
# libFuzzer's RSS limit at 256 MiB. Seeds come from fuzz/seeds/<target>; the
# working corpus (fuzz/corpus) and crash artifacts (fuzz/artifacts) stay
# uncommitted. Exits non-zero on the first target that finds a crash.
#   scripts/fuzz.sh [seconds] [target...]
set -eu
SECS=${1:-60}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/../fuzz"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

TARGETS=${*:-$(cargo +nightly fuzz list)}
# the chroot target builds its fixture under TMPDIR
TMPDIR=$(mktemp -d)
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT INT TERM
# The parsers are safe Rust, so AddressSanitizer adds nothing but memory (it
# pushed a 10 s run to 215 MiB of the 256 MiB limit): build without it, but
# with debug assertions so integer overflow panics are found too.
FLAGS="-O -a --sanitizer none"
# one build for all targets, so the timed runs measure fuzzing only
# shellcheck disable=SC2086
cargo +nightly fuzz build $FLAGS >&2
for t in $TARGETS; do
    mkdir -p "corpus/$t"
    [ -d "seeds/$t" ] && cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    echo "fuzz.sh: $t for ${SECS}s" >&2
    # shellcheck disable=SC2086
    cargo +nightly fuzz run $FLAGS "$t" "corpus/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=256 \
        -print_final_stats=1 -close_fd_mask=1
done
echo "fuzz.sh: no crash in:" $TARGETS >&2
