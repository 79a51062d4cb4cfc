//! dolly's runtime: the command-line interface over the snapshot core (and, as it grows,
//! namespaces, clones, the OCI runtime, hooks and replication).

#![warn(missing_docs)]

pub mod cli;
