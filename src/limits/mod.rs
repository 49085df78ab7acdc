//! Byte-rate limiting and path containment shared by the file-transfer sessions.

pub(crate) mod bucket;
pub(crate) mod path;
pub(crate) mod policy;
