//! dolly's snapshot core: capture running processes into snapshots (a versioned manifest
//! plus a page pool) and restore them as running processes.
//!
//! Data flows one way: `/proc` + ptrace → [`capture`] → [`image`] (manifest) + [`pool`]
//! (pages) → [`restore`] → running processes. Each kind of process state lives in one
//! module of [`resource`], with its capture and restore side by side.

#![warn(missing_docs)]

pub mod awaited;
pub mod capture;
pub mod checkpoint;
pub mod error;
pub mod image;
pub mod persist;
pub mod pool;
pub mod proc;
pub mod resource;
pub mod restore;
pub mod store;
pub mod sys;
pub mod tracee;

pub use capture::{capture, capture_observed, CaptureOptions, CaptureReport};
pub use checkpoint::Checkpoints;
pub use error::{Error, ErrorKind, Result};
pub use persist::persist;
pub use restore::{restore, RestoreOptions, Restored};
pub use store::{Record, Status, Store};
