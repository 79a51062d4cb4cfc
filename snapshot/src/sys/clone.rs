//! `clone3(2)` with `set_tid`: create a process at a chosen PID in each PID namespace.

use nix::errno::Errno;
use nix::unistd::Pid;

/// Which side of [`fork_at`] the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent; the child has this PID (as the parent's namespace sees it).
    Parent(Pid),
    /// In the child.
    Child,
}

/// Forks the calling process (like `fork(2)`: a copy of its memory and fds), giving the
/// child the PIDs in `set_tid`: `set_tid[0]` in the innermost PID namespace, `set_tid[1]`
/// in its parent, and so on; namespaces beyond the list pick PIDs as usual. An empty
/// `set_tid` is a plain fork. `flags` are extra `CLONE_*` flags (e.g. `CLONE_NEWPID`).
///
/// The child must only do what is safe after fork in this program (it is single-threaded
/// where dolly calls this) and must leave with `_exit` or by being rebuilt by a tracer.
pub fn fork_at(set_tid: &[libc::pid_t], flags: u64) -> Result<Forked, Errno> {
    let mut args: libc::clone_args = {
        // SAFETY: clone_args is plain old data; all-zero is its documented default.
        unsafe { std::mem::zeroed() }
    };
    args.flags = flags;
    args.exit_signal = libc::SIGCHLD as u64;
    if !set_tid.is_empty() {
        args.set_tid = set_tid.as_ptr() as u64;
        args.set_tid_size = set_tid.len() as u64;
    }
    // SAFETY: without CLONE_VM the child runs on its own copy of this stack, exactly as
    // after fork(); `args` and `set_tid` outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match rc {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as libc::pid_t))),
    }
}
