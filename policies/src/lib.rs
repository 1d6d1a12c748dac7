//! The nbdfault policy language and its engine.

pub mod units;
