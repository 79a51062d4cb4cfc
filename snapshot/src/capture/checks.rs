//! What a capture refuses, and why: each refusal names the cause and the remedy.

use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::proc::{ProcDir, Status};

/// Whether `pid` is this thread: once dolly has frozen the tree, the thread that froze it
/// is every member's tracer.
fn traced_by_us(pid: i32) -> bool {
    pid == nix::unistd::gettid().as_raw()
}

fn refuse_busy_tracer(pid: Pid, tracer: i32) -> Error {
    // (`TracerPid` is the tracing thread: named by its process.)
    let tracer = ProcDir::new(Pid::from_raw(tracer))
        .status()
        .map_or(tracer, |s| s.tgid);
    if tracer == nix::unistd::getpid().as_raw() {
        return Error::busy(
            format!(
                "process {pid} is already being captured or restored by this program (another \
                 capture or restore of it runs)"
            ),
            "wait for that to finish, then try again",
        );
    }
    let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    if comm == "dolly" {
        Error::busy(
            format!("process {pid} is already being captured or restored by dolly (pid {tracer})"),
            "wait for the other dolly to finish, then try again",
        )
    } else {
        Error::refused(
            format!("process {pid} is being traced by {comm} (pid {tracer})"),
            format!("detach the debugger or tracer first (quit {comm}, or `kill {tracer}`)"),
        )
    }
}

/// The namespaces a captured process must share with dolly.
const NAMESPACES: [&str; 8] = ["pid", "mnt", "net", "ipc", "uts", "user", "cgroup", "time"];

/// Refusals for every process of the tree: run before it is frozen and again once it is,
/// since things change.
pub fn check_member(proc: &ProcDir, status: &Status) -> Result<()> {
    check_before_calls(proc.pid(), status)?;
    check_rest(proc)
}

/// The refusals of [`check_member`] that must come before dolly runs any call inside the
/// frozen process (a seccomp filter could kill it for one), from its `status` alone.
pub fn check_before_calls(pid: Pid, status: &Status) -> Result<()> {
    let uid = nix::unistd::geteuid();
    if !uid.is_root() && status.uid[0] != uid.as_raw() {
        return Err(Error::refused(
            format!(
                "process {pid} belongs to user {}, and dolly runs as user {uid}",
                status.uid[0]
            ),
            "run dolly as root, or as the user who owns the process",
        ));
    }
    if status.tracer_pid != 0 && !traced_by_us(status.tracer_pid) {
        return Err(refuse_busy_tracer(pid, status.tracer_pid));
    }
    let me = nix::unistd::getpid();
    if pid == me || pid == nix::unistd::getppid() {
        return Err(Error::refused(
            format!("the tree holds dolly itself (process {pid})"),
            "capture a process that is not an ancestor of dolly",
        ));
    }
    if status.seccomp != 0 {
        let mode = if status.seccomp == 1 {
            "strict mode"
        } else {
            "a filter"
        };
        return Err(Error::refused(
            format!("process {pid} runs under seccomp ({mode}): not supported yet"),
            "capture a process without seccomp",
        ));
    }
    Ok(())
}

/// The refusals of [`check_member`] that may come once calls ran inside the frozen process
/// (they are read while the calls run): namespaces, scheduling, POSIX timers.
pub fn check_rest(proc: &ProcDir) -> Result<()> {
    let pid = proc.pid();
    // A restore puts the process in dolly's namespaces: it must be in them already.
    static OURS: std::sync::OnceLock<Vec<Option<std::path::PathBuf>>> = std::sync::OnceLock::new();
    let ours = OURS.get_or_init(|| {
        NAMESPACES
            .iter()
            .map(|ns| std::fs::read_link(format!("/proc/self/ns/{ns}")).ok())
            .collect()
    });
    for (ns, ours) in NAMESPACES.iter().zip(ours) {
        let theirs = std::fs::read_link(proc.path(&format!("ns/{ns}"))).ok();
        if theirs.is_some() && theirs != *ours {
            return Err(Error::refused(
                format!("process {pid} is in another {ns} namespace than dolly: not supported yet"),
                "run dolly in the process's namespaces (e.g. with nsenter), or capture a process in dolly's",
            ));
        }
    }
    let (policy, _) = crate::sys::process::get_scheduler(pid).unwrap_or((0, 0));
    if policy & !libc::SCHED_RESET_ON_FORK == 6 {
        return Err(Error::refused(
            format!("process {pid} runs under SCHED_DEADLINE: not supported yet"),
            "capture it under another scheduling policy",
        ));
    }
    let timers = proc.read("timers").unwrap_or_default();
    if !timers.trim().is_empty() {
        return Err(Error::refused(
            format!("process {pid} has POSIX timers (timer_create): not supported yet"),
            "capture a process without POSIX timers",
        ));
    }
    Ok(())
}

/// Refusals for the root of the tree, before anything is touched.
pub fn preflight(proc: &ProcDir) -> Result<Status> {
    let pid = proc.pid();
    let stat = proc.stat().map_err(|_| {
        Error::not_found(
            format!("no process {pid}"),
            "check the PID (it may have exited)",
        )
    })?;
    let status = proc.status()?;
    if status.tgid != pid.as_raw() {
        return Err(Error::refused(
            format!(
                "{pid} is a thread of process {}, not a process",
                status.tgid
            ),
            format!("capture process {} instead", status.tgid),
        ));
    }
    const PF_KTHREAD: u32 = 0x0020_0000;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(Error::refused(
            format!("{pid} is a kernel thread"),
            "capture a user-space process",
        ));
    }
    check_member(proc, &status)?;
    if stat.state == 'Z' {
        return Err(Error::refused(
            format!("process {pid} is a zombie (it has exited)"),
            "there is nothing left to capture",
        ));
    }
    if proc.read_link("exe").is_err() {
        return Err(Error::refused(
            format!("process {pid} has no executable dolly can read"),
            "capture a user-space process (as root, or as its owner)",
        ));
    }
    Ok(status)
}
