//! nbdfault: an NBD server that fails requests asynchronously, on policies.
//!
//! Data flows one way: socket → [`wire`] decode → [`transmission`] (one task per request) →
//! [`storage::BlockDevice`] (the fault layer, then a backend) → [`wire`] encode → socket.

pub mod activity;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod export;
pub mod fault;
/// Entry points for the fuzz targets in `fuzz/` (the handshake and the transmission phase over
/// in-memory streams); not an API for anything else.
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod logging;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod tls;
pub mod transmission;
pub mod wire;
