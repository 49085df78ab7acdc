//! Fuzz target: see `mender_connect::fuzzing::reframe`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mender_connect::fuzzing::reframe(data);
});
