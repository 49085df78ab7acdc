//! Fuzz target: see `mender_connect::fuzzing::chroot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mender_connect::fuzzing::chroot(data);
});
