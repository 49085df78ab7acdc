//! Per-session protocol handlers (shell, file transfer, port forward,
//! mender-client) and the interface the router drives them through.

pub mod filetransfer;
pub mod menderclient;
pub mod portforward;
pub mod shell;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::conn::outbound::Outbound;
use crate::wire::codec::ProtoMsg;
use crate::wire::view::MsgView;

/// What a handler knows about the router session it lives in.
#[derive(Debug, Clone)]
pub struct SessionCtx {
    /// The server-chosen session id (may be empty: mender-client triggers).
    pub sid: String,
    /// Where replies go.
    pub out: Outbound,
}

/// One protocol's state inside one router session. Called on the session's
/// own thread, one message at a time and in order; long work (a dial, a file)
/// belongs on a thread the handler starts, so the session keeps reading.
pub trait Handler: Send {
    /// Handles one inbound message of this handler's protocol.
    fn handle(&mut self, msg: ProtoMsg);
    /// The session ended (close, timeout, shutdown): release everything
    /// without sending protocol replies.
    fn close(&mut self);
    /// A way to handle some of this protocol's messages on the connection
    /// thread itself (see [`Direct`]); asked once, right after creation.
    fn direct(&self) -> Option<Arc<dyn Direct>> {
        None
    }
}

/// Handles a message on the connection thread, sparing the hand-off to the
/// session thread. The router only offers a message when nothing of its
/// session is queued or being handled, so order is kept. It must never
/// block (no waiting on a socket, a full queue or a slow lock).
pub trait Direct: Send + Sync {
    /// Handles `msg` at once, or says `None` (having changed nothing) and
    /// the message goes to the session's thread.
    fn try_handle(&self, msg: &MsgView<'_>) -> Option<Taken>;
}

/// The rest of a message a [`Direct`] way took, run on the connection thread
/// after its attempt to write the replies queued meanwhile (a full socket
/// may still hold them back). Must not block either.
pub trait Deferred: Send + Sync {
    /// Does the rest.
    fn after_write(&self);
}

/// What a [`Direct`] way did with a message it took.
pub enum Taken {
    /// Handled completely.
    Done,
    /// Its reply is queued; this runs once the reply was handed on.
    AfterWrite(Arc<dyn Deferred>),
}

/// Builds a protocol's handler when a session first uses that protocol.
pub type Factory = Box<dyn Fn(&SessionCtx) -> Box<dyn Handler> + Send + Sync>;

/// The router-session protocols that are enabled, by protocol number.
#[derive(Default)]
pub struct Registry {
    factories: BTreeMap<u16, Factory>,
}

impl Registry {
    /// An empty registry (every protocol answered with "no handler").
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Enables `proto`, served by handlers from `factory`.
    pub fn register(&mut self, proto: u16, factory: Factory) {
        self.factories.insert(proto, factory);
    }

    /// Creates a handler for `proto`, or `None` when it is not enabled.
    pub fn create(&self, proto: u16, ctx: &SessionCtx) -> Option<Box<dyn Handler>> {
        self.factories.get(&proto).map(|f| f(ctx))
    }

    /// Enabled protocol numbers in ascending order.
    pub fn protocols(&self) -> impl Iterator<Item = u16> + '_ {
        self.factories.keys().copied()
    }
}

/// The remote terminal bypasses router sessions (protocol.md §2.5): it gets
/// every proto-1 message directly, keyed by sid.
pub trait ShellRouter: Send + Sync {
    /// Handles one shell message; must not block the connection thread.
    fn dispatch(&self, msg: ProtoMsg);
    /// Stops every shell (auth loss, shutdown); returns how many were stopped.
    fn terminate_all(&self) -> usize;
    /// One line per live shell (sid and user) for the SIGUSR1 status dump.
    fn status(&self) -> Vec<String> {
        Vec::new()
    }
}

/// First 8 characters of a sid, for thread names and logs.
pub fn sid8(sid: &str) -> String {
    // The sid comes from the network: a NUL in a thread name makes
    // `thread::Builder::spawn` panic, and the release build aborts on panic.
    sid.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sid8_keeps_only_thread_name_safe_characters() {
        assert_eq!(sid8("3c2e6b0a-9f1d-4e8b-b7a4-5d6c7e8f9000"), "3c2e6b0a");
        assert_eq!(sid8("ab"), "ab");
        assert_eq!(sid8("ééééééééé"), "");
        assert_eq!(sid8("a\0b/c d-e"), "abcd-e");
    }
}
