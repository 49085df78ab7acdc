//! Everything about the one websocket: D-Bus auth, dialing, the connection
//! thread, back-off.

pub mod auth;
pub mod backoff;
pub mod dial;
pub mod link;
pub mod netwatch;
pub mod outbound;
pub mod proxy;
pub mod reframe;
pub mod timing;
pub mod url;
