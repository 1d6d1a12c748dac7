//! nbdfault: an NBD server that fails requests asynchronously, on policies.
//!
//! Data flows one way: socket → [`wire`] decode → [`transmission`] (one task per request) →
//! [`storage::BlockDevice`] (the fault layer, then a backend) → [`wire`] encode → socket.

pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod export;
pub mod fault;
pub mod handshake;
pub mod logging;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod tls;
pub mod transmission;
pub mod wire;
