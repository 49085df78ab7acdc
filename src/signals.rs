//! Signals become messages: the handler writes the signal number into a
//! self-pipe (`sys::signal`); a thread turns it into a channel event for
//! the main loop.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::sys::signal::{self, Got};

/// The thread that forwards signals; stop it with [`Signals::stop`].
#[derive(Debug)]
pub struct Signals {
    join: JoinHandle<()>,
}

/// Routes `signals` to `tx` from now on; call before starting other threads.
pub fn install(signals: &[libc::c_int], tx: Sender<libc::c_int>) -> io::Result<Signals> {
    let pipe = signal::route(signals)?;
    let join = crate::threads::spawn("signals".to_string(), 64 * 1024, move || {
        while let Got::Signal(sig) = pipe.next() {
            if tx.send(sig).is_err() {
                return;
            }
        }
    })?;
    Ok(Signals { join })
}

impl Signals {
    /// Ends the thread and waits for it (it only waits on the pipe).
    pub fn stop(self) {
        signal::wake_reader();
        crate::threads::join_within(self.join, Duration::from_secs(1));
    }
}
