//! The stubs: the processes a restore forks at the snapshot's PIDs, before dolly rebuilds
//! them. The root stub is forked by dolly; every other stub by its parent's stub, so that it
//! inherits its session and process group as a child does, and zombies are stubs that exit
//! at once. Each stub sets what a process can set on itself, then stops for dolly.
//!
//! This code runs in freshly forked children: it must not allocate. Everything it reads is
//! prepared by dolly before the first fork.

use std::ffi::CStr;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::sys::clone::{fork_at, Forked};
use crate::sys::process::{self as sysproc, AltStack, KernelSigaction};

/// How a stub joins a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Stay in the group it inherited.
    Inherit,
    /// Lead a new group (`setpgid(0, 0)`).
    Lead,
    /// Join an existing group of the tree (created earlier).
    Join(i32),
}

/// What a live process's stub does to itself.
pub struct Setup<'a> {
    pub cwd: &'a CStr,
    pub root: Option<&'a CStr>,
    pub umask: u32,
    pub personality: u32,
    pub comm: &'a CStr,
    pub timerslack: u64,
    pub thp_disable: bool,
    pub subreaper: bool,
    pub sched_policy: i32,
    pub sched_priority: i32,
    pub nice: i32,
    pub affinity: &'a [u64],
    pub io_priority: u32,
    pub actions: &'a [(i32, KernelSigaction)],
    pub altstack: AltStack,
    /// `(fd in dolly, fd in the restored process, close-on-exec)`.
    pub moves: &'a [(i32, i32, bool)],
}

/// One process (or zombie) of the tree to build.
pub struct Node<'a> {
    pub pid: i32,
    /// Start a new session (it led one).
    pub setsid: bool,
    pub group: Group,
    /// Indices of its children, in the order to create them.
    pub children: &'a [usize],
    /// `Some(status)`: a zombie, which exits at once with this wait status.
    pub exit: Option<i32>,
    /// For live processes.
    pub setup: Option<Setup<'a>>,
}

/// The whole tree, and the fds every stub parks for dolly's rebuild.
pub struct Plan<'a> {
    /// dolly's PID: the root stub's parent.
    pub dolly: Pid,
    /// Write end of the pipe stubs report failures on.
    pub report_fd: i32,
    /// Every fd the rebuilds need (the report pipe last); every stub parks helper `i` at
    /// [`Plan::parked`]`(high, i)`.
    pub helpers: &'a [i32],
    /// First fd number above every fd of dolly and of the restored processes.
    pub high: i32,
    pub nodes: &'a [Node<'a>],
}

impl Plan<'_> {
    /// Where helper `i` ends up in every stub.
    pub fn parked(high: i32, i: usize) -> i32 {
        high + i as i32
    }
}

/// Writes "step: error" to the report pipe and leaves.
fn fail(fd: i32, pid: i32, step: &str, err: Errno) -> ! {
    use std::io::Write;
    let mut buf = [0u8; 200];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = writeln!(cur, "process {pid}: {step}: {}", err.desc());
    let n = cur.position() as usize;
    sysproc::write_all_raw(fd, &buf[..n]);
    sysproc::exit_now(1)
}

/// The root stub: becomes dolly's tracee (dolly then follows its forks), stops for dolly to
/// set that up, then builds the tree.
pub fn run_root(plan: &Plan) -> ! {
    let pid = plan.nodes[0].pid;
    let step = |what: &str, r: Result<(), Errno>| {
        if let Err(e) = r {
            fail(plan.report_fd, pid, what, e)
        }
    };
    // Die with dolly until the rebuild is done (dolly then also holds PTRACE_O_EXITKILL).
    step(
        "setting the parent-death signal",
        sysproc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as u64, 0, 0, 0).map(drop),
    );
    if sysproc::parent_pid() != plan.dolly {
        sysproc::exit_now(1);
    }
    step("PTRACE_TRACEME", crate::sys::ptrace::traceme());
    sysproc::stop_self();
    run(plan, 0)
}

/// Exits as a zombie of the snapshot did: with its code, or killed by its signal.
fn exit_as(status: i32, pid: i32, report_fd: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let no_core = sysproc::Rlimit { soft: 0, hard: 0 };
        let _ = sysproc::set_rlimit(Pid::from_raw(0), libc::RLIMIT_CORE, no_core);
        let _ = sysproc::set_sigaction(sig, &KernelSigaction::default());
        let _ = sysproc::unblock_signal(sig);
        // SAFETY: kill(2) with integers.
        unsafe { libc::kill(libc::getpid(), sig) };
        fail(report_fd, pid, "ending as the zombie did", Errno::EINVAL)
    }
    sysproc::exit_now(libc::WEXITSTATUS(status))
}

/// Builds node `me` of the tree (this process), its children, then stops for dolly.
pub fn run(plan: &Plan, me: usize) -> ! {
    let node = &plan.nodes[me];
    let (fd, pid) = (plan.report_fd, node.pid);
    let step = |what: &str, r: Result<(), Errno>| {
        if let Err(e) = r {
            fail(fd, pid, what, e)
        }
    };
    if me != 0 {
        // Die with the parent stub (dolly holds PTRACE_O_EXITKILL on this one too).
        step(
            "setting the parent-death signal",
            sysproc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as u64, 0, 0, 0).map(drop),
        );
    }
    // (Not SIGTRAP: dolly's calls end in SIGTRAPs the kernel forces, which would set the
    // process's own SIGTRAP action back to the default: see `tracee::CALLS_MASK`.)
    step(
        "blocking signals",
        sysproc::block_signals(crate::tracee::CALLS_MASK),
    );
    if node.setsid {
        step("setsid", sysproc::new_session());
    }
    match node.group {
        Group::Inherit => {}
        Group::Lead => step("setpgid", sysproc::new_process_group()),
        Group::Join(g) => step("joining its process group", sysproc::join_process_group(g)),
    }
    if let Some(status) = node.exit {
        exit_as(status, pid, fd);
    }
    for &child in node.children {
        match fork_at(&[plan.nodes[child].pid], 0) {
            Ok(Forked::Child) => run(plan, child),
            Ok(Forked::Parent(_)) => {}
            Err(e) => fail(
                fd,
                plan.nodes[child].pid,
                "creating the process at its PID",
                e,
            ),
        }
    }
    let Some(s) = &node.setup else {
        sysproc::exit_now(1)
    };
    step("chdir", sysproc::chdir(s.cwd));
    if let Some(root) = s.root {
        step("chroot", sysproc::chroot(root));
    }
    sysproc::set_umask(s.umask);
    step("personality", sysproc::set_personality(s.personality));
    step(
        "setting the name",
        sysproc::prctl(libc::PR_SET_NAME, s.comm.as_ptr() as u64, 0, 0, 0).map(drop),
    );
    step(
        "setting the timer slack",
        sysproc::prctl(libc::PR_SET_TIMERSLACK, s.timerslack, 0, 0, 0).map(drop),
    );
    // Set both ways: the stub starts with dolly's settings, not the defaults.
    step(
        "setting THP disable",
        sysproc::prctl(libc::PR_SET_THP_DISABLE, s.thp_disable as u64, 0, 0, 0).map(drop),
    );
    step(
        "setting the subreaper flag",
        sysproc::prctl(libc::PR_SET_CHILD_SUBREAPER, s.subreaper as u64, 0, 0, 0).map(drop),
    );
    step(
        "setting the scheduling policy",
        sysproc::set_scheduler(s.sched_policy, s.sched_priority),
    );
    step("setting the nice value", sysproc::set_nice(s.nice));
    step(
        "setting the CPU affinity",
        sysproc::set_affinity(s.affinity),
    );
    step(
        "setting the I/O priority",
        sysproc::set_io_priority(s.io_priority),
    );
    for (signo, action) in s.actions {
        step(
            "setting a signal action",
            sysproc::set_sigaction(*signo, action),
        );
    }
    step("sigaltstack", sysproc::set_altstack(&s.altstack));
    // The fd table: park every helper at its number above `high`, park this process's own
    // fds above those, close the rest, then put each at its number. (Children were forked
    // first: they inherited the helpers where dolly had them.)
    let parked_moves = plan.high + plan.helpers.len() as i32;
    for (i, &h) in plan.helpers.iter().enumerate() {
        step(
            "parking an fd",
            sysproc::dup2(h, Plan::parked(plan.high, i)),
        );
    }
    for (i, m) in s.moves.iter().enumerate() {
        step("parking an fd", sysproc::dup2(m.0, parked_moves + i as i32));
    }
    let end = parked_moves + s.moves.len() as i32;
    // The report pipe is the last helper.
    let fd = Plan::parked(plan.high, plan.helpers.len() - 1);
    let step = |what: &str, r: Result<(), Errno>| {
        if let Err(e) = r {
            fail(fd, pid, what, e)
        }
    };
    step("closing fds", sysproc::close_range(0, plan.high as u32 - 1));
    step("closing fds", sysproc::close_range(end as u32, u32::MAX));
    for (i, &(_, target, cloexec)) in s.moves.iter().enumerate() {
        step(
            "placing an fd",
            sysproc::dup3(parked_moves + i as i32, target, cloexec),
        );
    }
    if !s.moves.is_empty() {
        step(
            "closing fds",
            sysproc::close_range(parked_moves as u32, end as u32 - 1),
        );
    }
    sysproc::stop_self();
    sysproc::exit_now(1)
}
