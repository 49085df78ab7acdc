//! `mender-connect`: command line and wiring only.

use std::path::Path;
use std::process::ExitCode;

use mender_connect::cli::{self, Parsed};
use mender_connect::{config, daemon, logging};

fn main() -> ExitCode {
    mender_connect::tune_malloc();
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
