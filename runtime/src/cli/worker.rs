//! The capture worker: `dolly snapshot capture` forks a worker that does the capture while
//! the command waits for its result. If the command is killed (kill -9, Ctrl-C), the worker
//! notices at its next checkpoint, lets the target run on exactly as before, and marks the
//! snapshot failed. (Killing the worker itself is safe too, except in the few hundred
//! microseconds while its system calls run inside the target with borrowed registers.)

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, getppid, pipe, ForkResult};
use serde::{Deserialize, Serialize};
use snapshot::{CaptureOptions, CaptureReport, Checkpoints, Error, ErrorKind, Record, Store};

#[derive(Serialize, Deserialize)]
enum Outcome {
    Done(Record),
    Failed {
        kind: ErrorKind,
        message: String,
        remedy: Option<String>,
    },
}

fn work(store: &Store, opts: &CaptureOptions, out: OwnedFd, parent: nix::unistd::Pid) -> ! {
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
    let abort = || getppid() != parent;
    let outcome = match snapshot::capture(store, opts, &Checkpoints::with_abort(&abort)) {
        Ok(report) => Outcome::Done(report.record),
        Err(e) => Outcome::Failed {
            kind: e.kind(),
            message: e.message(),
            remedy: e.remedy().map(str::to_string),
        },
    };
    let mut out = std::fs::File::from(out);
    let _ = out.write_all(&serde_json::to_vec(&outcome).expect("outcome serializes"));
    drop(out);
    std::process::exit(0)
}

/// Runs a capture in a forked worker and returns its result.
pub fn capture(store: &Store, opts: &CaptureOptions) -> Result<CaptureReport, Error> {
    let (read_end, write_end) = pipe().map_err(|e| Error::sys("creating a pipe", e))?;
    let me = nix::unistd::getpid();
    // SAFETY: the CLI is single-threaded here, so the child may run normal Rust code.
    match unsafe { fork() }.map_err(|e| Error::sys("starting the capture worker", e))? {
        ForkResult::Child => {
            drop(read_end);
            work(store, opts, write_end, me)
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut text = Vec::new();
            let read = std::fs::File::from(read_end).read_to_end(&mut text);
            let _ = waitpid(child, None);
            read.map_err(|e| Error::io("reading the capture worker's result", e))?;
            match serde_json::from_slice::<Outcome>(&text) {
                Ok(Outcome::Done(record)) => Ok(CaptureReport { record }),
                Ok(Outcome::Failed { kind, message, remedy }) => {
                    let e = Error::new(kind, message);
                    Err(match remedy {
                        Some(r) => e.with_remedy(r),
                        None => e,
                    })
                }
                Err(_) => Err(Error::new(
                    ErrorKind::System,
                    "the capture worker died without a result (see `dolly snapshot list` for the snapshot's status)",
                )),
            }
        }
    }
}
