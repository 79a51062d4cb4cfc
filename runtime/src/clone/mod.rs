//! Clones: run copies of a snapshot beside the original, each in fresh PID, mount, UTS and
//! IPC namespaces (and optionally network), at the snapshot's own PIDs, sharing its pooled
//! pages copy-on-write.
//!
//! Starting a clone: dolly forks a runner, which unshares the namespaces and forks the
//! clone's init (PID 1 there), then exits. The init sets the namespace up and restores the
//! snapshot inside it; it reports `ready PID` (or `error ...`) on a pipe and stays, reaping
//! and forwarding signals, until the restored process ends.

mod init;
pub mod record;
mod template;

pub use record::{CloneRecord, Exit};
pub use template::{Clone, Template};

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};
use snapshot::error::{Context, Error, ErrorKind, Result};
use snapshot::Store;

use crate::ns::{Net, Overlay};

/// How to start a clone.
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// Its network: the host's, or a namespace with only `lo`.
    pub net: Net,
    /// A hostname for its UTS namespace (default: the host's).
    pub hostname: Option<String>,
    /// Host directories it sees through private copy-on-write overlays.
    pub overlays: Vec<PathBuf>,
}

/// Refuses a snapshot no clone can start from, before forking anything. (One still
/// `capturing` is waited for by the restore inside the clone.)
fn check_snapshot(store: &Store, snapshot: &str) -> Result<()> {
    let record = store.record(snapshot)?;
    if !record.status.is_restorable() && record.status != snapshot::Status::Capturing {
        let why = record.reason.map(|r| format!(": {r}")).unwrap_or_default();
        return Err(Error::refused(
            format!("snapshot {snapshot} is {}{why}", record.status),
            "only created or persisted snapshots can be cloned; capture again",
        ));
    }
    Ok(())
}

fn overlays_for(dir: &std::path::Path, dirs: &[PathBuf]) -> Result<Vec<Overlay>> {
    dirs.iter()
        .enumerate()
        .map(|(i, d)| {
            let dir_abs = d.canonicalize().map_err(|e| {
                Error::refused(
                    format!("cannot overlay {}: {e}", d.display()),
                    "give --overlay an existing directory",
                )
            })?;
            if !dir_abs.is_dir() {
                return Err(Error::refused(
                    format!("cannot overlay {}: not a directory", d.display()),
                    "give --overlay a directory",
                ));
            }
            Ok(Overlay {
                dir: dir_abs,
                upper: dir.join(format!("overlay-{i}/upper")),
                work: dir.join(format!("overlay-{i}/work")),
            })
        })
        .collect()
}

/// Starts one clone of snapshot `snapshot` (an id) and waits until it runs.
pub fn start(store: &Store, snapshot: &str, opts: &CloneOptions) -> Result<CloneRecord> {
    check_snapshot(store, snapshot)?;
    let id = snapshot::store::new_id();
    let dir = record::clone_dir(store, &id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = (|| {
        let overlays = overlays_for(&dir, &opts.overlays)?;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
        let mut flags = CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC;
        if opts.net == Net::None {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        // SAFETY: glibc's fork keeps the child's allocator usable even if the caller has
        // threads; the child runs dolly code, then exits.
        match unsafe { fork() }.context("starting the clone runner")? {
            ForkResult::Child => {
                drop(r);
                let code = (|| -> Result<()> {
                    nix::sched::unshare(flags).context("creating the clone's namespaces")?;
                    // SAFETY: as above; this child becomes PID 1 of the new PID namespace.
                    match unsafe { fork() }.context("starting the clone's init")? {
                        ForkResult::Child => init::main(store, snapshot, opts, &overlays, &dir, w),
                        ForkResult::Parent { child } => {
                            let mut out = std::fs::File::from(w);
                            std::io::Write::write_all(
                                &mut out,
                                format!("init {child}\n").as_bytes(),
                            )
                            .context("reporting")
                        }
                    }
                })();
                if let Err(e) = code {
                    eprintln!("dolly: {e}");
                    std::process::exit(1);
                }
                std::process::exit(0);
            }
            ForkResult::Parent { child: runner } => {
                drop(w);
                let outcome = read_report(r);
                let _ = waitpid(runner, None);
                let (init_pid, pid) = outcome?;
                let host_pid =
                    std::fs::read_to_string(format!("/proc/{init_pid}/task/{init_pid}/children"))
                        .ok()
                        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::System,
                                format!("the clone's process ended at once (init {init_pid})"),
                            )
                        })?;
                let record = CloneRecord {
                    id: id.clone(),
                    snapshot: snapshot.to_string(),
                    pid,
                    host_pid,
                    init_pid,
                    init_start: record::start_time(init_pid).unwrap_or(0),
                    created_at: snapshot::store::now_rfc3339(),
                    net: opts.net,
                    hostname: opts.hostname.clone(),
                    overlays,
                };
                record.save(store)?;
                Ok(record)
            }
        }
    })();
    if started.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    started
}

/// Reads the runner's and init's reports: `init HOSTPID`, then `ready PID` or `error JSON`.
fn read_report(r: std::os::fd::OwnedFd) -> Result<(i32, i32)> {
    let mut init_pid = None;
    for line in BufReader::new(std::fs::File::from(r)).lines() {
        let line = line.context("reading the clone's report")?;
        if let Some(p) = line.strip_prefix("init ") {
            init_pid = p.parse().ok();
        } else if let Some(p) = line.strip_prefix("ready ") {
            let pid = p
                .parse()
                .map_err(|_| Error::new(ErrorKind::System, format!("bad report {line:?}")))?;
            return init_pid.map(|i| (i, pid)).ok_or_else(|| {
                Error::new(ErrorKind::System, "the clone's init did not say its PID")
            });
        } else if let Some(json) = line.strip_prefix("error ") {
            let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            let kind = serde_json::from_value(v["kind"].clone()).unwrap_or(ErrorKind::System);
            let mut e = Error::new(
                kind,
                format!("in the clone: {}", v["message"].as_str().unwrap_or(json)),
            );
            if let Some(h) = v["hint"].as_str() {
                e = e.with_remedy(h);
            }
            return Err(e);
        }
    }
    Err(Error::new(
        ErrorKind::System,
        "the clone's init ended without reporting",
    ))
}
