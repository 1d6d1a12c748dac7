//! The writeback-error oracle.
//!
//! Two halves share this crate:
//! * the suite ([`suite`]) runs on a client kernel with `/dev/nbdX` attached to an nbdfault server,
//!   makes XFS and ext4 on it, fails the writeback of chosen blocks through the server's control
//!   API and records what fsync, read() and mmap show against what reached the server's disk;
//! * the VM harness ([`vm`]) fetches a Debian kernel, builds an initramfs holding this binary,
//!   starts `nbdfault serve`, boots qemu and runs the suite inside it.
//!
//! Every check names an invariant of the catalogue in `docs/invariants.md`, listed in
//! [`invariants`].

pub mod compare;
pub mod control;
pub mod diff;
pub mod invariants;
pub mod kmsg;
pub mod matrix;
pub mod os;
pub mod pattern;
pub mod policy;
pub mod report;
pub mod story;
pub mod suite;
pub mod version;
pub mod vm;
