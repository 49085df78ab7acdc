//! The only home of system calls: every `unsafe` call into libc lives in
//! this folder behind a safe function, so the layers above read as plain
//! Rust and each syscall helper exists once.

pub(crate) mod errno;
pub(crate) mod fs;
pub(crate) mod malloc;
pub(crate) mod netlink;
pub(crate) mod passwd;
pub(crate) mod poll;
pub(crate) mod process;
pub(crate) mod pty;
pub(crate) mod signal;
pub(crate) mod socket;
pub(crate) mod sockopt;
pub(crate) mod user;
pub(crate) mod wake;
