//! Freezing a process tree: every process under the root stopped under ptrace, found again
//! and again until no new one appears (a process not yet frozen may fork).

use std::collections::{HashSet, VecDeque};

use nix::unistd::Pid;

use super::checks;
use crate::error::{ErrorKind, Result};
use crate::image::Zombie;
use crate::proc::ProcDir;
use crate::tracee::{Tracee, Waiting};

/// One frozen process of the tree.
#[derive(Debug)]
pub struct Member {
    /// Its /proc directory.
    pub proc: ProcDir,
    /// Its threads, stopped; the thread-group leader first.
    pub threads: Vec<Tracee>,
    /// It was stopped by job control before dolly froze it.
    pub stopped: bool,
}

/// A frozen tree: live processes, parents before children, and unreaped zombies.
#[derive(Debug)]
pub struct Frozen {
    /// The live processes, root first, parents before children.
    pub members: Vec<Member>,
    /// Children that had exited and were not yet reaped.
    pub zombies: Vec<Zombie>,
    /// When the first of its threads was stopped: the freeze lasts from then.
    pub since: std::time::Instant,
    /// How dolly waits for its threads' stops until the thaw.
    waiting: Option<Waiting>,
}

impl Frozen {
    /// The PIDs of every process of the tree, zombies included.
    pub fn pids(&self) -> HashSet<i32> {
        self.members
            .iter()
            .map(|m| m.proc.pid().as_raw())
            .chain(self.zombies.iter().map(|z| z.pid))
            .collect()
    }

    /// Lets every process run on, children first; returns how long the tree was frozen
    /// (until its last thread was let go: not counting the time dolly itself may then wait
    /// for a CPU, which the processes it lets go can take) and the first failure.
    pub fn thaw(self) -> (std::time::Duration, Result<()>) {
        let threads = self
            .members
            .into_iter()
            .rev()
            .flat_map(|m| m.threads.into_iter().rev())
            .collect();
        let (last, first) = Tracee::let_go(threads);
        drop(self.waiting);
        let last = last.unwrap_or(self.since);
        (last.saturating_duration_since(self.since), first)
    }
}

/// The tree under `root`, parents before children (breadth first). The children of a
/// process in `frozen` are read through its threads as frozen (no thread can start).
fn tree_order(root: Pid, frozen: &[Member]) -> Vec<Pid> {
    let mut order = Vec::new();
    let mut queue = VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        order.push(pid);
        let proc = ProcDir::new(pid);
        let children = match frozen.iter().find(|m| m.proc.pid() == pid) {
            Some(m) => proc.children_of(&m.threads.iter().map(Tracee::pid).collect::<Vec<_>>()),
            None => proc.children(),
        };
        if let Ok(children) = children {
            queue.extend(children);
        }
    }
    order
}

/// Freezes every thread of a process, again and again until no new one appears (a thread
/// not yet frozen may start another). The leader comes first.
fn freeze_threads(proc: &ProcDir) -> Result<Vec<Tracee>> {
    let leader = proc.pid();
    let mut threads = vec![Tracee::seize(leader)?];
    let mut frozen: HashSet<Pid> = HashSet::from([leader]);
    loop {
        // All asked to stop, then all waited for: they stop together, not one by one.
        let mut asked = Vec::new();
        for tid in proc.tasks()? {
            if frozen.insert(tid) {
                match Tracee::seize_thread_start(tid, &threads[0]) {
                    Ok(t) => asked.push(t),
                    Err(e) if e.kind() == ErrorKind::NotFound => continue, // it ended meanwhile
                    Err(e) => return Err(e),
                }
            }
        }
        if asked.is_empty() {
            return Ok(threads);
        }
        for mut t in asked {
            match t.wait_seized() {
                Ok(()) => threads.push(t),
                Err(e) if e.kind() == ErrorKind::NotFound => continue, // it ended meanwhile
                Err(e) => return Err(e),
            }
        }
    }
}

/// Freezes the threads of process `pid` (refusing what [`checks::check_member`] refuses);
/// `None` if it is gone, a zombie, or exiting (the `root` asked for: an error if it is
/// exiting). How dolly waits for the stops of the freeze (`waiting`) is begun as its first
/// process is frozen.
fn freeze_member(pid: Pid, root: bool, waiting: &mut Option<Waiting>) -> Result<Option<Member>> {
    let proc = ProcDir::new(pid);
    let (Ok(stat), Ok(status)) = (proc.stat(), proc.status()) else {
        return Ok(None); // gone (exited and reaped) meanwhile
    };
    if stat.state == 'Z' {
        return Ok(None); // a zombie
    }
    // (Begun as the first process is frozen, for the whole freeze.)
    waiting.get_or_insert_with(|| Waiting::begin(stat.state == 'R'));
    checks::check_member(&proc, &status)?;
    let mut threads = match freeze_threads(&proc) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound && !root => return Ok(None),
        // A process that is exiting cannot be seized (EPERM): it is not one to capture but
        // a zombie to be.
        Err(e)
            if e.kind() == ErrorKind::Busy
                && !root
                && proc
                    .stat()
                    .map_or(true, |s| s.state == 'Z' || s.state == 'X') =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // (As read a moment before the stop; a capture reads it again, stopped.)
    for t in &mut threads {
        t.set_trap_ignored(crate::tracee::ignores_trap(status.sig_ignored));
    }
    Ok(Some(Member {
        proc,
        threads,
        stopped: stat.state == 'T',
    }))
}

impl Member {
    /// When it was asked to stop: it ran on until then.
    fn frozen_since(&self) -> std::time::Instant {
        self.threads[0]
            .interrupted_at()
            .unwrap_or_else(std::time::Instant::now)
    }
}

/// The live processes of the tree under `root` (read while they run), parents before
/// children, each once, with the parent it was found under (none for the root).
pub fn live_order(root: Pid) -> Vec<(Pid, Option<Pid>)> {
    let mut seen = HashSet::new();
    tree_order(root, &[])
        .into_iter()
        .filter(|&pid| seen.insert(pid))
        .filter_map(|pid| {
            let stat = ProcDir::new(pid).stat().ok()?;
            let parent = (pid != root).then_some(Pid::from_raw(stat.ppid));
            (!matches!(stat.state, 'Z' | 'X')).then_some((pid, parent))
        })
        .collect()
}

/// Whether process `pid` still has `parent` for parent (`None`: whatever it has): a process
/// that left the tree (its parent ended), or a new one with a PID found in it earlier, does
/// not.
pub fn still_under(pid: Pid, parent: Option<Pid>) -> bool {
    parent.is_none_or(|parent| {
        ProcDir::new(pid)
            .stat()
            .is_ok_and(|s| s.ppid == parent.as_raw())
    })
}

/// Freezes process `pid` alone (its threads): a tree of one, for a stop that needs no other
/// process frozen with it. `None` if it is gone meanwhile (see [`freeze_member`]).
pub fn freeze_process(pid: Pid, root: bool) -> Result<Option<Frozen>> {
    let mut waiting = None;
    Ok(
        freeze_member(pid, root, &mut waiting)?.map(|member| Frozen {
            since: member.frozen_since(),
            members: vec![member],
            zombies: Vec::new(),
            waiting,
        }),
    )
}

/// Freezes `root` and all its descendants.
pub fn freeze(root: Pid) -> Result<Frozen> {
    // (First: it outlives the members, which wait for their threads as they are dropped.)
    let mut waiting = None;
    let mut members: Vec<Member> = Vec::new();
    let mut frozen: HashSet<Pid> = HashSet::new();
    let mut since = None;
    let order = loop {
        let mut new = false;
        let order = tree_order(root, &members);
        for &pid in &order {
            if frozen.contains(&pid) {
                continue;
            }
            let Some(member) = freeze_member(pid, pid == root, &mut waiting)? else {
                continue;
            };
            since.get_or_insert(member.frozen_since());
            members.push(member);
            frozen.insert(pid);
            new = true;
        }
        if !new {
            // Read with every process frozen: none can fork or reap any more.
            break order;
        }
    };
    // Put them in tree order and find the zombies.
    members.sort_by_key(|m| {
        order
            .iter()
            .position(|&p| p == m.proc.pid())
            .unwrap_or(usize::MAX)
    });
    let mut zombies = Vec::new();
    for pid in order {
        if frozen.contains(&pid) {
            continue;
        }
        let Ok(stat) = ProcDir::new(pid).stat() else {
            continue;
        };
        if stat.state == 'Z' && frozen.contains(&Pid::from_raw(stat.ppid)) {
            zombies.push(Zombie {
                pid: pid.as_raw(),
                ppid: stat.ppid,
                pgid: stat.pgid,
                sid: stat.sid,
                wait_status: stat.exit_code,
            });
        }
    }
    Ok(Frozen {
        members,
        zombies,
        since: since.unwrap_or_else(std::time::Instant::now),
        waiting,
    })
}
