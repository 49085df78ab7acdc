//! Everything about the one websocket: D-Bus auth, dialing, the connection
//! thread, back-off, the message codec and the router.

pub mod auth;
pub mod backoff;
pub mod codec;
pub mod control;
pub mod dial;
pub mod link;
pub mod netwatch;
pub mod outbound;
pub mod proxy;
pub mod reframe;
pub mod router;
pub mod timing;
pub mod url;
pub mod wake;
