//! The capture worker: `dolly snapshot capture` forks a worker that does the capture while
//! the command waits for its result. If the command is killed (kill -9, Ctrl-C), the worker
//! notices at its next checkpoint, lets the target run on exactly as before, and marks the
//! snapshot failed. (Killing the worker itself is safe too, except in the few hundred
//! microseconds while its system calls run inside the target with borrowed registers; a
//! fork it holds dies with it, and the listing that finds the capture interrupted has the
//! target reap it.)
//!
//! Once the command has what it waits for (the end of the freeze, the snapshot created, or
//! persisted) the worker goes on alone, in a session of its own and without the command's
//! stdin/stdout/stderr: it stores the last pages and makes the snapshot durable
//! (`persisted`) whether the command has returned or not. It reports on a pipe, one JSON
//! line per step (frozen, created, persisted) or failure.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, getppid, pipe, ForkResult};
use serde::{Deserialize, Serialize};
use snapshot::{CaptureOptions, CaptureReport, Checkpoints, Error, ErrorKind, Record, Store};

/// What a capture command waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Wait {
    /// The freeze is over: the processes run on, the snapshot is `capturing` while its last
    /// pages are stored (a restore of it waits for that).
    Frozen,
    /// The snapshot is restorable (its pages are in the pool).
    Created,
    /// Its pages are durable too.
    Persisted,
}

#[derive(Serialize, Deserialize)]
enum Outcome {
    Done(Box<Record>),
    Failed {
        kind: ErrorKind,
        message: String,
        remedy: Option<String>,
    },
}

impl Outcome {
    fn of(result: Result<Record, Error>) -> Outcome {
        match result {
            Ok(record) => Outcome::Done(Box::new(record)),
            Err(e) => Outcome::Failed {
                kind: e.kind(),
                message: e.message(),
                remedy: e.remedy().map(str::to_string),
            },
        }
    }

    fn into_result(self) -> Result<Record, Error> {
        match self {
            Outcome::Done(record) => Ok(*record),
            Outcome::Failed {
                kind,
                message,
                remedy,
            } => {
                let e = Error::new(kind, message);
                Err(match remedy {
                    Some(r) => e.with_remedy(r),
                    None => e,
                })
            }
        }
    }
}

fn send(out: &mut std::fs::File, outcome: &Outcome) {
    let mut line = serde_json::to_vec(outcome).expect("outcome serializes");
    line.push(b'\n');
    let _ = out.write_all(&line);
}

/// Leaves the command's session and terminal, and its stdin/stdout/stderr (so that whoever
/// waits for the command's output is not kept waiting by the worker).
fn go_alone() {
    let _ = nix::unistd::setsid();
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

fn work(
    store: &Store,
    opts: &CaptureOptions,
    wait: Wait,
    out: OwnedFd,
    parent: nix::unistd::Pid,
) -> ! {
    // The terminal's signals are for the command; the worker finishes or rolls back.
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let mut out = std::fs::File::from(out);
    // Once the command has what it waits for, it may end: the capture goes on without it.
    // (Shared with the capture's own thread: see `snapshot::capture_observed`.)
    let alone = AtomicBool::new(false);
    let abort = || !alone.load(Ordering::SeqCst) && getppid() != parent;
    let report = |out: &mut std::fs::File, step: Wait, outcome: Outcome| {
        send(out, &outcome);
        if step >= wait && !alone.load(Ordering::SeqCst) {
            // (The capture's trace, before stderr goes.)
            snapshot::checkpoint::flush_marks();
            go_alone();
            alone.store(true, Ordering::SeqCst);
        }
    };
    // (Claimed as the freeze ends, before the snapshot can be `created`: it never is
    // without its persister, see `awaited`.)
    let mut claim = None;
    let captured = {
        let mut on_frozen = |record: &Record| {
            claim = store.claim_persisting(&record.id).ok();
            report(
                &mut out,
                Wait::Frozen,
                Outcome::Done(Box::new(record.clone())),
            );
        };
        snapshot::capture_observed(
            store,
            opts,
            &Checkpoints::with_abort(&abort),
            &mut on_frozen,
        )
        .map(|r| r.record)
    };
    let id = captured.as_ref().ok().map(|r| r.id.clone());
    if id.is_none() {
        snapshot::checkpoint::flush_marks();
    }
    report(&mut out, Wait::Created, Outcome::of(captured));
    if let Some(id) = id {
        // Making it durable yields the CPU to the processes just captured.
        let _lowered = snapshot::sys::process::Lowered::by(10);
        let persisted = snapshot::persist(store, &id, claim, &Checkpoints::none());
        // (Another persister took it first, `snapshot persist`: that one's outcome.)
        let persisted = match persisted {
            Err(e) if e.kind() == ErrorKind::Busy => snapshot::awaited::wait_for(
                store,
                &id,
                snapshot::Status::Persisted,
                std::time::Duration::from_secs(600),
                "see `dolly snapshot info`",
            ),
            persisted => persisted,
        };
        report(&mut out, Wait::Persisted, Outcome::of(persisted));
    }
    std::process::exit(0)
}

/// Runs a capture in a forked worker and returns its result once the freeze is over, the
/// snapshot created, or persisted too (`wait`).
pub fn capture(store: &Store, opts: &CaptureOptions, wait: Wait) -> Result<CaptureReport, Error> {
    let (read_end, write_end) = pipe().map_err(|e| Error::sys("creating a pipe", e))?;
    let me = nix::unistd::getpid();
    // SAFETY: the CLI is single-threaded here, so the child may run normal Rust code.
    match unsafe { fork() }.map_err(|e| Error::sys("starting the capture worker", e))? {
        ForkResult::Child => {
            drop(read_end);
            work(store, opts, wait, write_end, me)
        }
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut lines = BufReader::new(std::fs::File::from(read_end));
            let mut next = || -> Result<Record, Error> {
                let mut line = String::new();
                lines
                    .read_line(&mut line)
                    .map_err(|e| Error::io("reading the capture worker's result", e))?;
                match serde_json::from_str::<Outcome>(&line) {
                    Ok(outcome) => outcome.into_result(),
                    Err(_) => Err(Error::new(
                        ErrorKind::System,
                        "the capture worker died without a result (see `dolly snapshot list` for the snapshot's status)",
                    )),
                }
            };
            // One line per step (frozen, created, persisted) up to the one waited for; a
            // failure ends them. (A capture that fails before its freeze is over sends no
            // frozen line.)
            let mut record = next()?;
            let mut step = Wait::Frozen;
            while step < wait {
                record = next()?;
                step = if step == Wait::Frozen {
                    Wait::Created
                } else {
                    Wait::Persisted
                };
            }
            Ok(CaptureReport { record })
        }
    }
}
