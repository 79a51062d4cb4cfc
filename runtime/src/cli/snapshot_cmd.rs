//! `dolly snapshot capture|list|info|persist|restore|delete`.

use serde_json::json;
use std::time::Duration;

use snapshot::{
    awaited, CaptureOptions, Checkpoints, Error, ErrorKind, RestoreOptions, Status, Store,
};

use super::output::{self, human_bytes};
use super::{worker, Cli, SnapshotCommand};

/// Runs a snapshot subcommand; returns the exit status.
pub fn run(cli: &Cli, cmd: &SnapshotCommand, store: &Store) -> Result<i32, Error> {
    match cmd {
        SnapshotCommand::Capture {
            pid,
            name,
            shell_job,
            file_locks,
            tcp_established,
            parent,
            fork,
            wait,
        } => {
            let opts = CaptureOptions {
                pid: *pid,
                name: name.clone(),
                shell_job: *shell_job,
                file_locks: *file_locks,
                tcp_established: *tcp_established,
                parent: match parent.as_deref() {
                    None | Some("none") => None,
                    Some("auto") => snapshot::capture::auto_parent(store, *pid)?,
                    Some(p) => Some(store.resolve(p)?),
                },
                full: parent.as_deref() == Some("none"),
                fork: (*fork).into(),
            };
            let r = worker::capture(store, &opts, *wait)?.record;
            if cli.json {
                output::print_json(&output::record_json(&r));
            } else if r.status == snapshot::Status::Capturing {
                println!(
                    "captured process {} ({}): frozen {:.1} ms, status capturing (its last pages \
                     are being stored; `dolly snapshot info {}` tells when it is created)",
                    r.pid,
                    r.comm,
                    r.frozen_ms.unwrap_or_default(),
                    r.id
                );
                println!("{}", r.id);
            } else {
                println!(
                    "captured process {} ({}): {} in the pool, frozen {:.1} ms, status {}",
                    r.pid,
                    r.comm,
                    human_bytes(r.bytes),
                    r.frozen_ms.unwrap_or_default(),
                    r.status
                );
                println!("{}", r.id);
            }
            Ok(0)
        }
        SnapshotCommand::List => {
            let records = store.list()?;
            if cli.json {
                output::print_json(&records.iter().map(output::record_json).collect());
            } else if records.is_empty() {
                println!("no snapshots in {}", store.root().display());
            } else {
                println!("{}", output::records_table(&records));
            }
            Ok(0)
        }
        SnapshotCommand::Info { id, wait, timeout } => {
            let id = store.resolve(id)?;
            let r = match wait {
                Some(wanted) => awaited::wait_for(
                    store,
                    &id,
                    wanted.status(),
                    Duration::from_secs(*timeout),
                    "wait longer (--timeout SECONDS)",
                )?,
                None => store.record(&id)?,
            };
            if cli.json {
                output::print_json(&output::record_json(&r));
            } else {
                print!("{}", output::record_text(&r));
            }
            Ok(0)
        }
        SnapshotCommand::Restore { id, shell_job } => {
            let id = store.resolve(id)?;
            let opts = RestoreOptions {
                shell_job: *shell_job,
                ..Default::default()
            };
            let restored = snapshot::restore(store, &id, &opts, &Checkpoints::none())?;
            let pid = restored.pid.as_raw();
            if *shell_job {
                // The terminal is the job's now: dolly writes nothing more on it.
                return Ok(wait_foreground(restored.pid));
            }
            if cli.json {
                output::print_json(&json!({ "id": id, "pid": pid }));
            } else {
                println!("restored snapshot {id} as process {pid}");
                println!("{pid}");
            }
            Ok(0)
        }
        SnapshotCommand::Persist { id } => {
            let id = store.resolve(id)?;
            let r = persist_now(store, &id)?;
            if cli.json {
                output::print_json(&output::record_json(&r));
            } else {
                println!("snapshot {id} is persisted");
            }
            Ok(0)
        }
        SnapshotCommand::Delete { id } => {
            let id = store.resolve(id)?;
            store.delete(&id)?;
            if cli.json {
                output::print_json(&json!({ "deleted": id }));
            } else {
                println!("deleted snapshot {id}");
            }
            Ok(0)
        }
    }
}

/// How long `snapshot persist` waits for a capture, or a persister, still at work.
const PERSIST_WAIT: Duration = Duration::from_secs(600);

/// Makes snapshot `id` durable and returns its record: waits for the capture and its
/// persister if they are at work, and persists it here if it was left `created` with nobody
/// making it durable (see `awaited::UNPERSISTED_AFTER`); should another persister take it
/// first, waits for that one.
fn persist_now(store: &Store, id: &str) -> Result<snapshot::Record, Error> {
    let remedy = format!("wait longer: `dolly snapshot info {id} --wait persisted --timeout S`");
    let deadline = std::time::Instant::now() + PERSIST_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match awaited::wait_for(store, id, Status::Persisted, left, &remedy) {
            Err(e)
                if e.kind() == ErrorKind::Refused
                    && store.record(id)?.status == Status::Created =>
            {
                match snapshot::persist(store, id, None, &Checkpoints::none()) {
                    Err(e) if e.kind() == ErrorKind::Busy => continue,
                    persisted => return persisted,
                }
            }
            waited => return waited,
        }
    }
}

/// Waits for a foreground (shell-job) process and returns the status to exit with.
fn wait_foreground(pid: nix::unistd::Pid) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return super::EXIT_FAILURE,
        }
    }
}
