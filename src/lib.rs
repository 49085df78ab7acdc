//! mender-connect: a synchronous Rust re-implementation of Mender's device-side
//! remote-access daemon.

pub mod audit;
pub mod cli;
pub mod config;
pub mod conn;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod knobs;
pub mod limits;
pub mod logging;
pub mod router;
pub mod sdnotify;
pub mod sessions;
pub mod signals;
pub mod sys;
pub mod threads;
pub mod tunables;
pub mod wire;
