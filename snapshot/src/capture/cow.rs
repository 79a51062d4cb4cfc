//! Copy-on-write freeze. A pre-copied process that writes more between two rounds than the
//! freeze could copy in about the time of a `fork()` (what the last round copied tells) is
//! forked from inside (a `clone` run in it while it is stopped), and which of its pages
//! changed (see [`Tracked::compare_with_copy`]), its walk and its copies are read from that
//! copy once the process runs on: the process is stopped for the fork, not for the copy.
//! The copy is held stopped under dolly's ptrace and never runs a single instruction; it
//! shares the process's file descriptor table (so it keeps no file open: a `close` in the
//! process still closes), sends no signal when it ends (a plain `wait` never sees it), dies
//! with dolly, and is reaped by the process, with one more brief stop of one of its
//! threads, when the capture is over.

use std::time::Instant;

use nix::unistd::Pid;

use super::leftovers::ForkNote;
use super::tree::Member;
use crate::error::{Error, ErrorKind, Result};
use crate::image::Area;
use crate::proc::ProcDir;
use crate::resource::tracking::Tracked;
use crate::tracee::Tracee;

/// When the freeze forks a process to copy its pages after the thaw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForkPolicy {
    /// When the pages to copy would take longer than the fork (see [`worth_forking`]).
    #[default]
    Auto,
    /// Whenever there is a page to copy at the freeze.
    Always,
    /// Never: the freeze copies every page while the process is stopped.
    Never,
}

/// Below this, the freeze copies the pages itself: a fork made through ptrace and the stop
/// that reaps it cost more (about 1.5 ms on the machines measured; two threads copy 8 MiB in
/// about 2).
const MIN_FORK_BYTES: u64 = 8 << 20;

/// Copying a page costs about this many times what a fork spends on it (copying its page
/// table entry): 20-40 on the machines measured, so a fork pays once the freeze would copy
/// a sixteenth of what the process holds.
const COPY_PER_FORK: u64 = 16;

/// Whether the freeze of pre-copied process `tracked` (with memory `areas`) is shorter with
/// a fork: what it would copy (see [`Tracked::survey`]) weighed against the memory a fork
/// walks (what the process holds). `room`: the memory the process could still be given,
/// measured just before the freeze (see [`room`]).
pub fn worth_forking(
    policy: ForkPolicy,
    tracked: &mut Tracked,
    areas: &[Area],
    room: Option<u64>,
) -> bool {
    // A fork inside a process whose program uses a userfaultfd of its own could wait for
    // that userfaultfd's reader (its fork event), a thread frozen with it. Memory a fork
    // does not copy must be read from the process itself.
    if policy == ForkPolicy::Never
        || tracked.foreign_uffd
        || areas
            .iter()
            .any(|a| a.flags.dont_fork || a.flags.wipe_on_fork)
    {
        return false;
    }
    let held = tracked.held_bytes();
    // While the fork lives, each page the process writes is copied: at worst all it
    // holds. Not without that much memory to spare, in the system and in its cgroups.
    if policy == ForkPolicy::Auto && room.is_none_or(|room| room < held) {
        return false;
    }
    // (The more the freeze would copy, the more a fork pays: once it does, no need to
    // count further.)
    let pays = |writes: u64| match policy {
        ForkPolicy::Never => false,
        ForkPolicy::Always => true,
        ForkPolicy::Auto => {
            writes >= MIN_FORK_BYTES && writes.saturating_mul(COPY_PER_FORK) >= held + writes
        }
    };
    tracked.survey(areas, pays).is_some_and(pays)
}

/// Whether the children process `pid` makes start in its own PID namespace: not once it
/// called `unshare(CLONE_NEWPID)` and has not forked yet (its fork would be the first
/// process of the new namespace, whose end would leave that namespace unusable).
pub fn forks_in_own_pid_ns(pid: Pid) -> bool {
    let proc = ProcDir::new(pid);
    match (
        proc.read_link("ns/pid"),
        proc.read_link("ns/pid_for_children"),
    ) {
        (Ok(own), Ok(children)) => own == children,
        _ => false,
    }
}

/// The memory process `pid` could still be given: what the system has available
/// (`MemAvailable`), or less if its memory cgroups leave less room. Read before the
/// freeze (it takes a few tenths of a millisecond).
pub fn room(pid: Pid) -> Option<u64> {
    let available = available_memory()?;
    Some(cgroup_room(pid).map_or(available, |room| room.min(available)))
}

/// How much more memory process `pid`'s cgroups let it use, if they limit it.
fn cgroup_room(pid: Pid) -> Option<u64> {
    let cgroups = ProcDir::new(pid).read("cgroup").ok()?;
    crate::proc::memory_headroom(&cgroups, std::path::Path::new("/sys/fs/cgroup"))
}

/// Memory the system can still give without swapping (`MemAvailable`), in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// A copy-on-write copy of a process, made at its freeze and held stopped: the process's
/// memory as of the freeze, whatever the process writes since.
#[derive(Debug)]
pub struct Held {
    parent: Pid,
    /// Its PID inside the process's PID namespace (for the process's `wait4`).
    ns_pid: i32,
    /// Where the parent's vDSO was (to run the reaping `wait4` through).
    vdso: Option<u64>,
    /// When its process started (see [`Held::set_parent_start_time`]; 0: unknown).
    parent_start_time: u64,
    /// When dolly saw it made (clock ticks after boot): it started at most then.
    made_at: u64,
    copy: Option<CopyState>,
}

/// The copy, before and after dolly took it over.
#[derive(Debug)]
enum CopyState {
    /// Made in a batch of calls, not yet waited for: it sits in the stop it starts in (see
    /// [`Held::hold`]).
    Made(Pid),
    /// Taken over: in its first stop, killed should dolly end.
    Held(Tracee),
}

impl CopyState {
    fn pid(&self) -> Pid {
        match self {
            CopyState::Made(pid) => *pid,
            CopyState::Held(tracee) => tracee.pid(),
        }
    }

    /// Kills it and waits for its end (its parent then reaps it).
    fn kill(self) -> Result<()> {
        match self {
            CopyState::Made(pid) => crate::tracee::kill_traced(pid),
            CopyState::Held(tracee) => tracee.kill_and_wait(),
        }
    }
}

/// The fork of frozen, pre-copied process `parent` (surveyed, see [`worth_forking`]; its
/// vDSO at `vdso`) that a `clone` ([`crate::tracee::FORK_HELD_ARGS`]) made from inside, the
/// last of a batch of calls run by `remote` in one of its stopped threads, returning
/// `made`. The fork is taken over after the thaw (see [`Held::hold`]): waiting for its
/// first stop is no work for the freeze. After that, [`Held::take_over`] has the process's
/// tracking read the fork.
pub fn hold_inside(
    remote: &mut crate::tracee::Remote<'_>,
    parent: Pid,
    vdso: Option<u64>,
    made: i64,
) -> Result<Held> {
    let child = remote.fork_made(made)?;
    Ok(Held::new(parent, vdso, CopyState::Made(child), made as i32))
}

/// Runs `call` inside stopped thread `thread` through its vDSO (at `vdso`, where known),
/// its registers and signal mask put back after (see [`Tracee::run_inside`]).
fn run_inside<T>(
    thread: &mut Tracee,
    vdso: Option<u64>,
    park: bool,
    call: impl FnOnce(&mut crate::tracee::Remote<'_>) -> Result<T>,
) -> Result<T> {
    let ip = thread.vdso_syscall_ip(vdso)?;
    thread.run_inside_as_is(ip, park, call)
}

/// Reaps ended child `ns_pid` from inside its parent (`wait4`). A child already reaped (the
/// process waited for it itself, with `__WALL`) is no error.
pub(super) fn wait_for(remote: &mut crate::tracee::Remote<'_>, ns_pid: i32) -> Result<()> {
    // (Already a zombie: no need to block, which a PID reused meanwhile could make last.)
    let flags = (libc::__WALL | libc::WNOHANG) as u64;
    let rc = remote.raw(libc::SYS_wait4, &[ns_pid as u64, 0, flags, 0])?;
    if rc < 0 && rc != -(libc::ECHILD as i64) {
        return Err(Error::sys(
            "reaping dolly's fork of the process",
            nix::errno::Errno::from_raw(-rc as i32),
        ));
    }
    Ok(())
}

impl Held {
    /// The fork `copy` (seen as `ns_pid` by its parent) of process `parent`, whose vDSO is
    /// at `vdso`.
    fn new(parent: Pid, vdso: Option<u64>, copy: CopyState, ns_pid: i32) -> Held {
        crate::checkpoint::mark(&format!("cow: {parent} forked as {}", copy.pid()));
        Held {
            parent,
            ns_pid,
            vdso,
            parent_start_time: 0,
            made_at: crate::proc::boot_ticks_now(),
            copy: Some(copy),
        }
    }

    /// What to note of it beside the snapshot while it lives (see [`super::leftovers`]).
    pub fn note(&self) -> ForkNote {
        let pid = self.pid();
        ForkNote {
            parent: self.parent.as_raw(),
            pid: pid.as_raw(),
            ns_pid: self.ns_pid,
            started_by: self.made_at,
            parent_start_time: self.parent_start_time,
        }
    }

    /// Gives when its process started (from the `stat` read at the freeze), for its note.
    pub fn set_parent_start_time(&mut self, start_time: u64) {
        self.parent_start_time = start_time;
    }

    /// After the thaw, first thing: takes the fork over if it was not yet (see
    /// [`crate::tracee::take_fork`]). Should that fail, the fork was killed: its process
    /// reaps it (through a stop of one of its threads), and the capture fails.
    pub fn hold(&mut self) -> Result<()> {
        let Some(CopyState::Made(child)) = self.copy else {
            return Ok(());
        };
        match crate::tracee::take_fork(child) {
            Ok(tracee) => {
                self.copy = Some(CopyState::Held(tracee));
                Ok(())
            }
            Err(e) => {
                // (Killed and waited for already: not to be killed again, its PID may be
                // free once its process reaps it.)
                self.copy = None;
                let _ = reap(self.parent, self.ns_pid, self.vdso);
                Err(Error::new(
                    ErrorKind::System,
                    format!(
                        "dolly could not take over the fork it made of process {} at the                          freeze, to read its memory from: {}",
                        self.parent,
                        e.message()
                    ),
                )
                .with_remedy("capture again, or with --fork never"))
            }
        }
    }

    /// After the thaw (work kept out of the freeze), once [`Held::hold`]: has the process's
    /// `tracked` read the fork from now on (see [`Tracked::use_copy`]), and makes the fork
    /// the kernel's first pick should memory run out while it lives (each page the process
    /// writes is copied): the capture then fails, and the process runs on.
    pub fn take_over(&self, tracked: &mut Tracked) -> Result<()> {
        let _ = std::fs::write(format!("/proc/{}/oom_score_adj", self.pid()), b"1000");
        tracked.use_copy(self.pid()).map_err(|e| self.explain(e))
    }

    /// The process it is a copy of.
    pub fn parent(&self) -> Pid {
        self.parent
    }

    /// Whether the fork is still held as it was made: in its tracing stop, never run. (Once
    /// killed it leaves that stop at once, and its memory goes before it is a zombie.)
    fn intact(&self) -> bool {
        ProcDir::new(self.pid())
            .stat()
            .is_ok_and(|s| s.state == 't')
    }

    /// Says why reading the fork failed, if it is because the fork was killed (the kernel's
    /// out-of-memory killer takes it first: see [`Held::take_over`]); else returns `e` as it is.
    pub fn explain(&self, e: Error) -> Error {
        if self.intact() {
            return e;
        }
        Error::new(
            ErrorKind::System,
            format!(
                "the fork dolly made of process {} at the freeze, to read its memory from, was \
                 killed before it was read (out of memory? while it lives, each page the \
                 process writes is copied)",
                self.parent
            ),
        )
        .with_remedy("free memory, or capture with --fork never")
    }

    /// Fails (see [`Held::explain`]) unless the fork is still intact once its pages were
    /// read: killed meanwhile, its memory may have gone under the reads without an error.
    pub fn check_intact(&self) -> Result<()> {
        if self.intact() {
            return Ok(());
        }
        Err(self.explain(Error::new(
            ErrorKind::System,
            format!("the fork of process {} ended", self.parent),
        )))
    }

    /// Ends the fork while its process is still frozen (a capture failing before the thaw):
    /// kills it and has the process reap it through its stopped leader.
    pub fn end_frozen(mut self, member: &mut Member) -> Result<()> {
        let Some(copy) = self.copy.take() else {
            return Ok(());
        };
        // (Reaped whatever the wait for its end said: at worst there is nothing to reap.)
        let killed = copy.kill();
        let ns_pid = self.ns_pid;
        let reaped = run_inside(&mut member.threads[0], self.vdso, true, |remote| {
            wait_for(remote, ns_pid)
        });
        killed.and(reaped)
    }

    /// The copy's PID.
    pub fn pid(&self) -> Pid {
        self.copy.as_ref().map_or(self.parent, CopyState::pid)
    }

    /// Ends the copy: kills it, then has its parent reap it (a `wait4` run inside one of
    /// its threads, stopped for that). Returns how long that thread was stopped, in ms.
    pub fn release(mut self) -> Result<f64> {
        self.end()
    }

    fn end(&mut self) -> Result<f64> {
        let Some(copy) = self.copy.take() else {
            return Ok(0.0);
        };
        let killed = copy.kill();
        let reaped = reap(self.parent, self.ns_pid, self.vdso);
        killed.and(reaped)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// Has process `parent` reap its ended child `ns_pid` (a PID as it sees it). Returns how long
/// the thread that did was stopped, in ms (0 if the process is gone: its children then go
/// to a reaper that reaps them).
pub(super) fn reap(parent: Pid, ns_pid: i32, vdso: Option<u64>) -> Result<f64> {
    let stopped_ms = run_in(parent, vdso, |remote| wait_for(remote, ns_pid))?;
    crate::checkpoint::mark(&format!(
        "cow: {parent} reaped its fork ({stopped_ms:.3} ms)"
    ));
    Ok(stopped_ms)
}

/// Runs `call` inside process `parent` (through its vDSO, at `vdso` if known), in one of
/// its threads stopped for that (the leader, unless it has ended before the others), its
/// registers and signal mask put back after, then lets it go. Returns how long that thread
/// was stopped, in ms (0 if the process is gone).
pub(super) fn run_in(
    parent: Pid,
    vdso: Option<u64>,
    call: impl FnOnce(&mut crate::tracee::Remote<'_>) -> Result<()>,
) -> Result<f64> {
    let proc = ProcDir::new(parent);
    let live = |tid: &Pid| {
        ProcDir::new(*tid)
            .stat()
            .is_ok_and(|s| !matches!(s.state, 'Z' | 'X'))
    };
    let Some(tid) = proc.tasks().ok().and_then(|t| t.into_iter().find(live)) else {
        return Ok(0.0);
    };
    let stat = proc.stat().ok();
    let job_stopped = stat.as_ref().is_some_and(|s| s.state == 'T');
    let _waiting = crate::tracee::Waiting::begin(stat.as_ref().is_some_and(|s| s.state == 'R'));
    let asking = Instant::now();
    let mut thread = match Tracee::seize(tid) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0.0),
        Err(e) => return Err(e),
    };
    // (As read a moment before the stop.)
    thread.set_trap_ignored(stat.is_some_and(|s| crate::tracee::ignores_trap(s.sig_ignored)));
    // (Stopped from the interrupt on, which the seizing makes.)
    let since = thread.interrupted_at().unwrap_or(asking);
    let ran = run_inside(&mut thread, vdso, job_stopped, call);
    // (Stopped until it is let go.)
    let (let_go, detached) = Tracee::let_go(vec![thread]);
    let stopped_ms = let_go.map_or(0.0, |t| t.duration_since(since).as_secs_f64() * 1e3);
    ran?;
    detached?;
    Ok(stopped_ms)
}
