//! `mender-connect`: command line and wiring only.

use std::path::Path;
use std::process::ExitCode;

use mender_connect::cli::{self, Parsed};
use mender_connect::{config, daemon, logging};

fn main() -> ExitCode {
    tune_malloc();
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    let opts = match cli::parse(args) {
        Parsed::Exit {
            code,
            stdout,
            stderr,
        } => {
            print!("{stdout}");
            eprint!("{stderr}");
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
        Parsed::Daemon(opts) => opts,
    };
    // The level is set before the configuration is read, so its debug lines
    // are visible (the reference applies it too late, behavior.md §1.4).
    logging::init(opts.level);
    let cfg = match config::load(&opts.config, &opts.fallback_config) {
        Ok(cfg) => cfg,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let user = match config::validate(&cfg, Path::new(config::DEFAULT_SHELLS_FILE)) {
        Ok(user) => user,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    match daemon::run(&cfg, &user) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}

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
fn tune_malloc() {
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

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
