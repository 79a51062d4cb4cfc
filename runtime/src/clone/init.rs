//! The clone's init: PID 1 of its new PID namespace. It sets up the namespace (private
//! mounts, a fresh /proc, overlays, hostname, loopback), restores the snapshot inside it
//! at its original PIDs, then reaps orphans, forwards SIGTERM/SIGINT/SIGHUP to the restored
//! process, and exits with it (which ends everything else in the namespace).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use snapshot::{Checkpoints, Error, RestoreOptions, Store};

use super::record::{save_exit, Exit};
use super::CloneOptions;
use crate::ns::{self, Net, Overlay};

/// The restored root process (inside the namespace), for the signal handler.
static TARGET: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let target = TARGET.load(Ordering::SeqCst);
    if target > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(target, sig) };
    }
}

/// What init reports on its pipe: one line, `ready PID` or `error JSON`.
fn report(out: &mut std::fs::File, line: &str) {
    let _ = out.write_all(format!("{line}\n").as_bytes());
}

fn set_up(opts: &CloneOptions, overlays: &[Overlay]) -> Result<(), Error> {
    ns::make_mounts_private()?;
    ns::mount_proc()?;
    ns::mount_devpts()?;
    for overlay in overlays {
        ns::mount_overlay(overlay)?;
    }
    if let Some(name) = &opts.hostname {
        ns::set_hostname(name)?;
    }
    if opts.net == Net::None {
        ns::loopback_up()?;
    }
    Ok(())
}

/// Keeps nothing of the caller's fds but `keep`: stdin/stdout/stderr become /dev/null, so
/// the clone does not hold the terminal or pipes of whoever started it.
fn detach_fds(keep: i32) {
    // SAFETY: plain fd syscalls on numbers this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        for fd in 0..3 {
            if null >= 0 && fd != keep {
                libc::dup2(null, fd);
            }
        }
        let keep = keep as u32;
        libc::close_range(3, keep - 1, 0);
        libc::close_range(keep + 1, u32::MAX, 0);
    }
}

/// Runs as PID 1 of the clone's namespaces; never returns.
pub fn main(
    store: &Store,
    snapshot: &str,
    opts: &CloneOptions,
    overlays: &[Overlay],
    dir: &Path,
    out: OwnedFd,
) -> ! {
    let _ = nix::sys::prctl::set_name(c"dolly-init");
    let keep = out.as_raw_fd();
    let mut out = std::fs::File::from(out);
    detach_fds(keep);
    // Opened before any overlay is mounted: the clone's directory may lie under one.
    let dir = match std::fs::File::open(dir) {
        Ok(d) => d,
        Err(e) => {
            let err = serde_json::json!({ "kind": "system", "message": format!("opening {}: {e}", dir.display()) });
            report(&mut out, &format!("error {err}"));
            std::process::exit(1);
        }
    };
    let restore = || -> Result<Pid, Error> {
        set_up(opts, overlays)?;
        let options = RestoreOptions {
            in_new_pid_namespace: true,
            ..Default::default()
        };
        Ok(snapshot::restore(store, snapshot, &options, &Checkpoints::none())?.pid)
    };
    let target = match restore() {
        Ok(pid) => pid,
        Err(e) => {
            let err =
                serde_json::json!({ "kind": e.kind(), "message": e.message(), "hint": e.remedy() });
            report(&mut out, &format!("error {err}"));
            std::process::exit(1);
        }
    };
    TARGET.store(target.as_raw(), Ordering::SeqCst);
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only calls kill(2).
        let _ = unsafe {
            sigaction(
                sig,
                &SigAction::new(
                    SigHandler::Handler(forward),
                    SaFlags::SA_RESTART,
                    SigSet::empty(),
                ),
            )
        };
    }
    report(&mut out, &format!("ready {target}"));
    drop(out);
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == target => finish(&dir, Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == target => {
                finish(&dir, Exit::Signal(sig as i32))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => finish(&dir, Exit::Code(0)),
        }
    }
}

fn finish(dir: &std::fs::File, exit: Exit) -> ! {
    let _ = save_exit(dir, exit);
    std::process::exit(exit.status())
}
