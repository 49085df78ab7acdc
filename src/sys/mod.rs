//! The only home of system calls: every `unsafe` call into libc lives in
//! this folder behind a safe function, so the layers above read as plain
//! Rust and each syscall helper exists once.

pub mod errno;
pub mod poll;
pub mod socket;
pub mod user;
pub mod wake;
