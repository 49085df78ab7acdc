//! mender-connect: a synchronous Rust re-implementation of Mender's device-side
//! remote-access daemon.
//!
//! The public surface is what `main.rs` wires together (`cli`, `config`,
//! `daemon`, `logging`) and the wire format (`wire`), which the test bed and
//! benches speak; every other layer is private to the crate. See the README's
//! Layout section for the layers and what each may import.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod logging;
pub mod wire;

mod audit;
mod conn;
mod knobs;
mod limits;
mod router;
mod sdnotify;
mod sessions;
mod signals;
mod sys;
mod threads;
mod tunables;

#[doc(hidden)]
pub mod fuzzing;

pub use sys::malloc::tune as tune_malloc;

/// Pieces the tests, benches and examples reach into; not an API.
#[doc(hidden)]
pub mod testing {
    /// The Autobahn conformance client (`examples/wsclient.rs`) drives the
    /// daemon's own dial, poll and close code, not a copy.
    pub use crate::conn::dial::{self, Stream};
    pub use crate::conn::link::end_after_read;
    pub use crate::conn::url::{self, Endpoint};
    /// The largest `forward` the daemon sends.
    pub use crate::sessions::portforward::CHUNK_MAX;
    pub use crate::sys::poll::poll_one;
}
