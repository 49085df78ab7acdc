#!/usr/bin/env bash
# Build the Debian package of mender-connect on a fresh Debian/Ubuntu machine.
#
#   packaging/debian/build-deb.sh
#
# Output (in <repo>/target/debian/):
#   mender-connect_<version>_<arch>.deb          the package (control name: mender-connect-rs)
#   mender-connect-dbgsym_<version>_<arch>.deb   its debug symbols (/usr/lib/debug/.build-id/...)
#   build/                                       dpkg-buildpackage's tree, .changes and .buildinfo
#
# The binary package is called mender-connect-rs and Provides/Conflicts/Replaces
# mender-connect, so it replaces Debian's Go mender-connect (a package cannot
# conflict with its own name, and keeping the Go package's name would let apt
# "upgrade" back to Debian's higher-versioned Go build).  The file is named
# after what it installs, mender-connect, as CI and users expect; dpkg and apt
# read the name from the control file, never from the file name.
#
# Build deps are installed with apt-get when missing (needs root, or sudo).
# The compiler is the machine's rustup cargo (not Debian's rustc, too old).
# Env: CARGO (default: cargo from PATH or ~/.cargo/bin), NICE (default 10).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out="$repo/target/debian"
log() { printf '[build-deb] %s\n' "$*" >&2; }

# --- build dependencies --------------------------------------------------------
pkgs="build-essential debhelper dpkg-dev pkg-config libssl-dev libdbus-1-dev"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [[ -n $missing ]]; then
    SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >&2 || log "warning: apt-get update reported errors; going on"
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q --no-install-recommends $missing >&2
fi
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
CARGO=${CARGO:-$(command -v cargo || true)}
[[ -x $CARGO ]] || { log "error: no cargo found; install a Rust toolchain with rustup (https://rustup.rs)"; exit 1; }
export CARGO

# --- version -------------------------------------------------------------------
cargo_ver=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
chlog_ver=$(dpkg-parsechangelog -l "$here/changelog" -S Version)
stage="$out/build/mender-connect-rs-$cargo_ver"
rm -rf "$out/build"; mkdir -p "$stage/debian"
tar -C "$here" --exclude='*.sh' -cf - . | tar -C "$stage/debian" -xf -
if [[ ${chlog_ver%-*} != "$cargo_ver" ]]; then
    # Cargo.toml was bumped without a changelog entry: build a snapshot version
    # rather than a package whose version lies about its contents.
    deb_ver="$cargo_ver-0~snapshot$(date -u +%Y%m%d%H%M)"
    log "Cargo.toml version $cargo_ver != debian/changelog $chlog_ver: building $deb_ver"
    { printf 'mender-connect-rs (%s) UNRELEASED; urgency=medium\n\n  * Snapshot build of %s.\n\n -- %s  %s\n\n' \
          "$deb_ver" "$(git -C "$repo" describe --always --dirty 2>/dev/null || echo "$cargo_ver")" \
          "$(dpkg-parsechangelog -l "$here/changelog" -S Maintainer)" "$(date -R)"
      cat "$here/changelog"; } > "$stage/debian/changelog"
else
    deb_ver=$chlog_ver
fi
arch=$(dpkg-architecture -qDEB_HOST_ARCH)

# --- build -----------------------------------------------------------------------
log "building mender-connect-rs $deb_ver ($arch) with $($CARGO --version)"
start=$(date +%s)
( cd "$stage" && MC_SRCDIR="$repo" nice -n "${NICE:-10}" dpkg-buildpackage -b -us -uc >&2 )
log "dpkg-buildpackage took $(( $(date +%s) - start )) s"

main="$out/build/mender-connect-rs_${deb_ver}_${arch}.deb"
dbg="$out/build/mender-connect-rs-dbgsym_${deb_ver}_${arch}.ddeb"
[[ -f $dbg ]] || dbg="${dbg%.ddeb}.deb"
[[ -f $main && -f $dbg ]] || { log "error: expected $main and $dbg"; ls -l "$out/build" >&2; exit 1; }
rm -f "$out"/mender-connect_*.deb "$out"/mender-connect-dbgsym_*.deb
cp "$main" "$out/mender-connect_${deb_ver}_${arch}.deb"
cp "$dbg" "$out/mender-connect-dbgsym_${deb_ver}_${arch}.deb"
ls -l "$out"/*.deb >&2
echo "$out/mender-connect_${deb_ver}_${arch}.deb"
