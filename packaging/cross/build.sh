#!/usr/bin/env bash
# Cross-build mender-connect for a 32-bit ARM target:
#
#   packaging/cross/build.sh armv5te-unknown-linux-gnueabi   # ARMv5TE, Debian armel (glibc, gcc)
#   packaging/cross/build.sh arm-unknown-linux-gnueabihf     # ARMv6+VFPv2 hard-float (Pi Zero/1; zig as linker)
#   packaging/cross/build.sh TARGET [extra cargo args]
#
# Writes (in <repo>/target/<triple>/release/):
#   mender-connect        stripped, with a .gnu_debuglink to the file below: what goes on the device
#   mender-connect.debug  the full debug info (for gdb on the host; see README.md, "Debugging on the device")
# The unstripped binary stays where cargo put it (target/<triple>/release/deps/).
#
# On a fresh machine the first run installs what it needs (root: apt-get, pip in
# a venv under /opt/cross-arm) via cross-arm.sh setup: Debian rustc-web +
# rust-web-src (-Zbuild-std, no rustup target needed), gcc-arm-linux-gnueabi,
# qemu-user, armel/armhf sysroots from Debian packages, ziglang + cargo-zigbuild.
# Env: NICE (default 10), CROSS_ARM_HOME (default /opt/cross-arm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
log() { printf '[cross/build] %s\n' "$*" >&2; }
t=${1:?usage: build.sh TARGET [cargo args]}; shift
case $t in
  armv5te-unknown-linux-gnueabi|arm-unknown-linux-gnueabihf|armv5te-unknown-linux-musleabi|arm-unknown-linux-musleabihf) ;;
  *) log "unsupported target $t"; exit 2 ;;
esac
home=${CROSS_ARM_HOME:-/opt/cross-arm}
need_setup=0
[[ -x /usr/bin/rustc && -e /usr/lib/rustlib/src/rust && -x /usr/bin/qemu-arm && -x /usr/bin/arm-linux-gnueabi-objcopy ]] || need_setup=1
case $t in
  armv5te-unknown-linux-gnueabi) [[ -f $home/sysroot-armel/.complete && -x /usr/bin/arm-linux-gnueabi-gcc ]] || need_setup=1 ;;
  arm-unknown-linux-gnueabihf) [[ -f $home/sysroot-armhf/.complete && -x $home/zigvenv/bin/cargo-zigbuild ]] || need_setup=1 ;;
  *) [[ -x $home/zigvenv/bin/cargo-zigbuild ]] || need_setup=1 ;;
esac
if (( need_setup )); then
  log "setting up the cross toolchain for $t"
  if [[ $(id -u) == 0 ]]; then bash "$here/cross-arm.sh" setup "$t"; else sudo bash "$here/cross-arm.sh" setup "$t"; fi
fi

MENDER_CONNECT_VERSION=${MENDER_CONNECT_VERSION:-$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)}
export MENDER_CONNECT_VERSION
# zig's lld does not add a build-id unless asked; gdb and debuginfod key on it.
# (cross-arm.sh sets target rustflags only for armv5te-gnueabi, which uses gcc: it adds one by default.)
[[ $t == armv5te-unknown-linux-gnueabi ]] || export RUSTFLAGS="${RUSTFLAGS:-} -Clink-arg=-Wl,--build-id=sha1"
[[ $t == *musl* ]] && RUSTFLAGS="$RUSTFLAGS -Clink-self-contained=no"

cd "$repo"
start=$(date +%s)
nice -n "${NICE:-10}" bash "$here/cross-arm.sh" build "$t" --release --locked --bin mender-connect "$@"
log "cargo build took $(( $(date +%s) - start )) s"

out="$repo/target/$t/release"
bin="$out/mender-connect"
objcopy=arm-linux-gnueabi-objcopy
# cargo hard-links release/mender-connect to deps/; objcopy writes a new file, so deps/ keeps the unstripped copy
$objcopy --only-keep-debug "$bin" "$bin.debug"
$objcopy --strip-all --add-gnu-debuglink="$bin.debug" "$bin" "$bin.tmp"
mv "$bin.tmp" "$bin"
size=$(stat -c %s "$bin")
log "$bin: $size bytes stripped ($(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}') MiB); debug info in $bin.debug"
(( size <= 1572864 )) || { log "FAIL: stripped size $size > 1.5 MiB"; exit 1; }
echo "$bin"
