//! nbdfault: an NBD server that fails requests asynchronously, on policies.
//!
//! Data flows one way: socket → `wire` decode → `transmission` (one task per request) →
//! `storage::BlockDevice` (the fault layer, then a backend) → `wire` encode → socket.
//!
//! The public surface is what the `nbdfault` binary and the tests need, and no more, so the
//! compiler reports code nothing uses: [`cli`] (the command line), [`config`] (a configuration
//! from a file and flags), [`server`] (start a server, run it until a future resolves; the
//! in-process tests start one on port 0 this way), [`ctl`] (the control API client behind
//! `nbdfault ctl`) and [`logging`], and for the fuzz targets in `fuzz/` the entry points of
//! `fuzzing` (the option phase and the transmission phase over in-memory streams, which reach the
//! option parser, the request decoder and the fault layer). Everything else is private. A
//! benchmark or fuzz target that needs more gets it through a narrow entry point like those, or
//! by making a module `pub` here with the reason beside it; the policy language is public in its
//! own crate, `nbdfault-policies`.

pub mod activity;
pub mod cli;
pub mod config;
pub mod ctl;
/// Entry points for the fuzz targets in `fuzz/` (the handshake and the transmission phase over
/// in-memory streams); not an API for anything else.
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod server;

mod control;
mod export;
mod fault;
mod handshake;
mod shutdown;
mod storage;
mod tls;
mod transmission;
mod wire;
