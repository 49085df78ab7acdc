//! Everything about the one websocket: D-Bus auth, dialing, the connection
//! thread, back-off.

pub(crate) mod auth;
pub(crate) mod backoff;
pub mod dial;
pub(crate) mod link;
pub(crate) mod netwatch;
pub(crate) mod outbound;
pub(crate) mod proxy;
pub(crate) mod reframe;
pub(crate) mod sock;
pub(crate) mod timing;
pub mod url;
