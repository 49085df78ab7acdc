//! Byte-rate limiting and path containment shared by the file-transfer sessions.

pub mod bucket;
pub mod path;
pub mod policy;
