//! The NBD wire format: pure encoding and decoding, no I/O. Everything the server sends or
//! receives is built or read here.

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;

pub use consts::*;
