//! Process state, one module per kind of resource. Each holds the capture side and the
//! restore side of its resource; `capture` and `restore` only orchestrate.

pub mod creds;
pub mod files;
pub mod incremental;
pub mod inet;
pub mod inotify;
pub mod lost_pages;
pub mod memory;
pub mod process;
pub mod signals;
pub mod sockets;
pub mod sysv;
pub mod tcp;
pub mod thread;
pub mod tracking;
pub mod tree;
pub mod tty;
