//! dolly's runtime: namespaces, clones and the command-line interface over the snapshot
//! core (and, as it grows, the OCI runtime, hooks and replication).

#![warn(missing_docs)]

pub mod cli;
pub mod clone;
pub mod ns;
