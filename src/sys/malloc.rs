//! glibc allocator tunables, set once at start.

/// glibc gives new threads malloc arenas of their own (up to 8 per core), and
/// memory freed in one stays resident for that arena: with a thread per
/// session the RSS crept up ~1.5 MiB over 1,000 sessions (tests/leaks.rs).
/// One arena lets every thread reuse what the others freed and lets glibc
/// trim the heap; the daemon moves too little data for the shared lock to
/// matter.
///
/// A fixed mmap threshold: blocks over it (a large inbound message, nothing
/// on the steady paths, whose buffers are 64 KiB at most) are mapped on
/// their own and unmapped when freed. glibc's default threshold rises to the
/// size of the largest block freed, up to 32 MiB, after which such blocks
/// come from the heap and stay resident after a burst (tests/memory.rs).
/// `MALLOC_ARENA_MAX` and `MALLOC_MMAP_THRESHOLD_` in the environment win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    const MMAP_THRESHOLD: libc::c_int = 256 * 1024;
    // SAFETY: only sets allocator tunables, before any thread exists.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Nothing to tune outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
