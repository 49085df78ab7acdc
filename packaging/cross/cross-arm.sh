#!/usr/bin/env bash
# cross-arm.sh - (copied from /work/shared/tools/cross-arm.sh and adapted for this repo:
#   the armel/armhf sysroots are downloaded with a *private* apt configuration, so
#   the machine's dpkg architectures and `apt-get update` are left untouched;
#   binutils-arm-linux-gnueabi is installed for objcopy/strip/readelf of ARM ELF files.)
# cross-build a Rust crate for ARMv5TE (armel) and ARMv6 hard-float
# on Debian 12 (bookworm) x86_64, run it under qemu-user, and measure its real
# (guest) RSS.  Needs root for `setup` (apt-get); everything else runs as anyone.
#
# Works without the rustup dist server: the compiler is Debian's rustc-web
# (bookworm-security, 1.96.0 when written) and the ARM std is compiled from
# Debian's matching rust-web-src with -Zbuild-std (RUSTC_BOOTSTRAP=1).  The
# rustup toolchains on the machine cannot be used for this: their versions do
# not match rust-web-src, and build-std then fails inside core.
#
# usage (run in the crate's directory for build/run/rss):
#   cross-arm.sh setup  [TARGET...]          install everything the TARGETs need (default: all)
#   cross-arm.sh build  TARGET [cargo args]  e.g. build armv5te-unknown-linux-gnueabi --release
#   cross-arm.sh test   TARGET [cargo args]  cargo test, the test binaries run under qemu-user
#   cross-arm.sh run    TARGET BINARY [args] run under qemu-user (-cpu arm926 / arm1176)
#   cross-arm.sh rss    TARGET BINARY [args] same, and print the guest's peak RSS
#   cross-arm.sh env    TARGET               print the exports `build` uses (for `eval`)
#
# TARGETs:
#   armv5te-unknown-linux-gnueabi  Debian armel: gcc-arm-linux-gnueabi, dynamic glibc 2.36 +
#                                  Debian libssl3/libdbus-1-3 (a sysroot of extracted .debs)
#   armv5te-unknown-linux-musleabi static musl via zig (PyPI ziglang + cargo-zigbuild);
#                                  needs vendored C deps (openssl `vendored`, dbus `vendored`)
#                                  or rustls.  ARMv5TE code: runs on ARMv5, ARMv6 and later.
#   arm-unknown-linux-musleabihf   same, ARMv6 + VFPv2 hard-float (Raspberry Pi Zero/1)
#   arm-unknown-linux-gnueabihf    ARMv6 hf, dynamic glibc 2.36 via zig, linked against
#                                  Debian armhf .so files.  It can only be *run* here on an
#                                  ARMv7 CPU model: Debian armhf libs are ARMv7/Thumb-2 and
#                                  die with SIGILL on arm1176 (a Pi Zero needs Raspberry Pi
#                                  OS's own ARMv6 libs at run time).
#
# Env: CROSS_ARM_HOME (default /opt/cross-arm) holds sysroots, the zig venv, guest-rss.py.
#      CROSS_ARM_GLIBC (default 2.36) glibc version for arm-unknown-linux-gnueabihf via zig.
set -euo pipefail

CROSS_ARM_HOME=${CROSS_ARM_HOME:-/opt/cross-arm}
CROSS_ARM_GLIBC=${CROSS_ARM_GLIBC:-2.36}
ZIGLANG_VERSION=${ZIGLANG_VERSION:-0.17.1}
CARGO_ZIGBUILD_VERSION=${CARGO_ZIGBUILD_VERSION:-0.24.0}
ALL_TARGETS="armv5te-unknown-linux-gnueabi armv5te-unknown-linux-musleabi arm-unknown-linux-musleabihf arm-unknown-linux-gnueabihf"
# runtime + link-time closure of libssl3 and libdbus-1-3 (libsystemd0 and its deps)
SYSROOT_PKGS="libc6 libgcc-s1 libatomic1 libssl-dev libssl3 libdbus-1-dev libdbus-1-3 libsystemd0
              libcap2 libgcrypt20 liblz4-1 liblzma5 libzstd1 libgpg-error0"

log() { printf '[cross-arm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

deb_arch() { case $1 in
  armv5te-unknown-linux-gnueabi) echo armel ;;
  arm-unknown-linux-gnueabihf) echo armhf ;;
  *) echo "" ;; esac; }
gnu_triple() { case $1 in armel) echo arm-linux-gnueabi ;; armhf) echo arm-linux-gnueabihf ;; esac; }
uses_zig() { [[ $1 != armv5te-unknown-linux-gnueabi ]]; }
qemu_cpu() { case $1 in armv5te-*) echo arm926 ;; *) echo arm1176 ;; esac; }
env_name() { echo "$1" | tr 'a-z-' 'A-Z_'; }   # CARGO_TARGET_<NAME>_...
cc_name() { echo "$1" | tr '-' '_'; }           # CC_<name>

apt_update() {
  # The security archive has no armel at all; for armhf/i386 its index was seen
  # failing with "File has unexpected size ... Mirror sync in progress?".  That
  # only loses foreign-arch *security* lists, so don't let it stop the setup.
  apt-get update -qq || log "warning: apt-get update reported errors (see above); going on"
}

setup_apt() {
  local need_gcc=0 arches="" t a
  for t in "$@"; do
    [[ $t == armv5te-unknown-linux-gnueabi ]] && need_gcc=1
    a=$(deb_arch "$t"); [[ -n $a && $arches != *$a* ]] && arches="$arches $a"
  done
  local pkgs="rustc-web cargo-web rust-web-src qemu-user pkg-config make perl python3 python3-venv
              binutils-arm-linux-gnueabi ca-certificates"
  (( need_gcc )) && pkgs="$pkgs gcc-arm-linux-gnueabi libc6-dev-armel-cross"
  local p missing=""
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  if [[ -n $missing ]]; then
    log "installing:$missing"
    apt_update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  local rv sv
  rv=$(/usr/bin/rustc -V | awk '{print $2}')
  sv=$(readlink -f /usr/lib/rustlib/src/rust | sed 's/.*rustc-//')
  [[ $rv == "$sv" ]] || die "rustc-web $rv and rust-web-src $sv differ: build-std needs the same version"
  log "Debian rustc $rv, cargo $(/usr/bin/cargo -V | awk '{print $2}'), rust-src $sv"
  for a in $arches; do make_sysroot "$a"; done
}

private_apt() {  # private_apt ARCH apt-get-args... : apt for a foreign arch without dpkg --add-architecture
  local arch=$1 d="$CROSS_ARM_HOME/apt-$1" mirror; shift
  if [[ ! -f $d/sources.list ]]; then
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/empty"
    mirror=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
             | grep -v security | head -n1 | tr -d ' ' || true)
    echo "deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} bookworm main" > "$d/sources.list"
    : > "$d/status"
  fi
  apt-get -q -o Dir::Etc::sourcelist="$d/sources.list" -o Dir::Etc::sourceparts="$d/empty" \
    -o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" -o Dir::State::status="$d/status" \
    -o Dir::Etc::preferencesparts="$d/empty" -o APT::Architecture="$arch" -o APT::Architectures="$arch" \
    -o APT::Sandbox::User=root "$@"
}

make_sysroot() {
  # Extract the -dev .debs into a private sysroot instead of installing them with
  # multiarch: libssl3:armel from bookworm cannot be co-installed with the newer
  # libssl3:amd64 from bookworm-security (Multi-Arch: same needs equal versions).
  local arch=$1 sr="$CROSS_ARM_HOME/sysroot-$1" tmp p l t
  [[ -f $sr/.complete ]] && return 0
  log "building sysroot $sr"
  private_apt "$arch" update >/dev/null
  tmp=$(mktemp -d); rm -rf "$sr"; mkdir -p "$sr"
  # shellcheck disable=SC2046
  ( cd "$tmp" && private_apt "$arch" download $(for p in $SYSROOT_PKGS; do echo "$p:$arch"; done) >/dev/null )
  for p in "$tmp"/*.deb; do dpkg-deb -x "$p" "$sr"; done
  rm -rf "$tmp"
  # absolute symlinks (e.g. libdbus-1.so -> /lib/...) would point at the host: re-point them
  find "$sr" -type l -lname '/*' | while read -r l; do t=$(readlink "$l"); ln -sfn "$sr$t" "$l"; done
  touch "$sr/.complete"
}

setup_zig() {
  local v="$CROSS_ARM_HOME/zigvenv"
  [[ -x $v/bin/cargo-zigbuild ]] && return 0
  log "installing ziglang $ZIGLANG_VERSION + cargo-zigbuild $CARGO_ZIGBUILD_VERSION from PyPI into $v"
  python3 -m venv "$v"
  "$v/bin/pip" install -q "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
}

write_guest_rss() {  # the repo's copy (with --mark and signal forwarding), where CROSS_ARM_HOME users expect it
  mkdir -p "$CROSS_ARM_HOME"
  install -m 755 "$(dirname "$(readlink -f "$0")")/guest-rss.py" "$CROSS_ARM_HOME/guest-rss.py"
}

print_env() {
  local t=$1 E C a sr tr
  E=$(env_name "$t"); C=$(cc_name "$t")
  echo "export RUSTC=/usr/bin/rustc CARGO=/usr/bin/cargo RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1"
  a=$(deb_arch "$t")
  if [[ -n $a ]]; then
    sr="$CROSS_ARM_HOME/sysroot-$a"; tr=$(gnu_triple "$a")
    echo "export PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_SYSROOT_DIR=$sr PKG_CONFIG_LIBDIR=$sr/usr/lib/$tr/pkgconfig:$sr/usr/share/pkgconfig"
    echo "export CFLAGS_$C='-I$sr/usr/include/$tr -I$sr/usr/include'"
    echo "export CARGO_TARGET_${E}_RUSTFLAGS='-L$sr/usr/lib/$tr -L$sr/lib/$tr -Clink-arg=-Wl,-rpath-link,$sr/usr/lib/$tr -Clink-arg=-Wl,-rpath-link,$sr/lib/$tr'"
  fi
  # runner for `cargo test` / `cargo run`
  echo "export CARGO_TARGET_${E}_RUNNER='$(qemu_cmd "$t" "" 2>/dev/null | sed '$d' | tr '\n' ' ')'"
  if [[ $t == armv5te-unknown-linux-gnueabi ]]; then
    echo "export CARGO_TARGET_${E}_LINKER=arm-linux-gnueabi-gcc CC_$C=arm-linux-gnueabi-gcc AR_$C=arm-linux-gnueabi-ar"
  else
    echo "export PATH=$CROSS_ARM_HOME/zigvenv/bin:/usr/bin:\$PATH"
    # rustc would take musl's crt1.o etc. from the std component, absent with build-std: let zig supply them
    [[ $t == *musl* ]] && echo "export CARGO_TARGET_${E}_RUSTFLAGS='-Clink-self-contained=no'"
  fi
  return 0
}

cmd_build() {  # cmd_build SUBCOMMAND TARGET [cargo args]
  local sub=$1 t=$2; shift 2
  eval "$(print_env "$t")"
  local ztarget=$t
  [[ $t == arm-unknown-linux-gnueabihf ]] && ztarget="$t.$CROSS_ARM_GLIBC"
  # std,panic_abort serves panic=abort and =unwind alike; tests need the default set (with `test`)
  local std="-Zbuild-std=std,panic_abort"
  [[ $sub == test ]] && std="-Zbuild-std"
  if uses_zig "$t"; then
    [[ $sub == build ]] && sub=zigbuild
    "$CROSS_ARM_HOME/zigvenv/bin/cargo-zigbuild" "$sub" "$std" --target "$ztarget" "$@"
  else
    /usr/bin/cargo "$sub" "$std" --target "$t" "$@"
  fi
}

qemu_cmd() {  # prints the qemu-arm command line, one word per line, the binary last
  local t=$1 bin=$2 a sr tr
  a=$(deb_arch "$t")
  if [[ $t == arm-unknown-linux-gnueabihf ]]; then
    sr="$CROSS_ARM_HOME/sysroot-armhf"; tr=arm-linux-gnueabihf
    log "note: Debian armhf libs are ARMv7: running on -cpu cortex-a7, not arm1176"
    printf '%s\n' qemu-arm -cpu cortex-a7 "$sr/lib/$tr/ld-linux-armhf.so.3" --library-path "$sr/lib/$tr:$sr/usr/lib/$tr" "$bin"
  elif [[ -n $a ]]; then
    printf '%s\n' qemu-arm -cpu "$(qemu_cpu "$t")" -L "$CROSS_ARM_HOME/sysroot-$a" "$bin"
  else
    printf '%s\n' qemu-arm -cpu "$(qemu_cpu "$t")" "$bin"
  fi
}

main() {
  local sub=${1:-}; shift || true
  case $sub in
    setup)
      [[ $(id -u) == 0 ]] || die "setup needs root (apt-get)"
      local targets=("$@"); (( ${#targets[@]} )) || read -r -a targets <<<"$ALL_TARGETS"
      mkdir -p "$CROSS_ARM_HOME"
      setup_apt "${targets[@]}"
      local t; for t in "${targets[@]}"; do uses_zig "$t" && { setup_zig; break; }; done
      write_guest_rss
      log "setup done for: ${targets[*]}" ;;
    env)   print_env "$1" ;;
    build) cmd_build build "$@" ;;
    test)  cmd_build test "$@" ;;
    run)   local t=$1 b=$2; shift 2; mapfile -t q < <(qemu_cmd "$t" "$b"); exec "${q[@]}" "$@" ;;
    rss)   local t=$1 b=$2; shift 2; mapfile -t q < <(qemu_cmd "$t" "$b")
           exec python3 "$(dirname "$(readlink -f "$0")")/guest-rss.py" -- "${q[@]}" "$@" ;;
    *) sed -n '2,40p' "$0"; exit 2 ;;
  esac
}
main "$@"
