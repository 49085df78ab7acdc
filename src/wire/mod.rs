//! The wire format, pure and shared by every layer: the msgpack value and
//! `ProtoMsg` envelope (protocol.md §1), control messages (§2.6) and the
//! decision a control message asks for.

pub mod action;
pub mod codec;
pub mod control;
pub mod types;
pub mod view;
