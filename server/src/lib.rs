//! nbdfault: an NBD server that fails requests asynchronously, on policies.

pub mod storage;
pub mod wire;
