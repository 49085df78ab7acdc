//! Everything about the one websocket: D-Bus auth, dialing, the connection
//! thread, back-off, the message codec and the router.

pub mod codec;
pub mod control;
