//! Process-level system calls `nix` does not wrap (or wraps with allocation, which a
//! freshly forked restore stub must avoid).

use nix::errno::Errno;
use nix::unistd::Pid;

use super::check;

/// A signal disposition in the kernel's own layout (`struct sigaction` of the syscall, not
/// of glibc), as `rt_sigaction(2)` reads and writes it on x86_64.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    /// Handler address, or 0 (`SIG_DFL`) / 1 (`SIG_IGN`).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// Address of the signal-return trampoline (`SA_RESTORER`).
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// `kcmp(KCMP_FILE)`: whether fd `a` of `pid_a` and fd `b` of `pid_b` are the same open file
/// description (so share offset and status flags).
pub fn same_file_description(pid_a: Pid, a: i32, pid_b: Pid, b: i32) -> Result<bool, Errno> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes only integers.
    let rc = check(unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid_a.as_raw() as libc::c_long,
            pid_b.as_raw() as libc::c_long,
            KCMP_FILE,
            a as libc::c_long,
            b as libc::c_long,
        )
    })?;
    Ok(rc == 0)
}

/// Reads the robust-futex list head and its size of thread `tid`.
pub fn get_robust_list(tid: Pid) -> Result<(u64, u64), Errno> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: the kernel writes one pointer into `head` and one size into `len`.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw() as libc::c_long,
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    })?;
    Ok((head, len as u64))
}

/// A resource limit; `u64::MAX` is RLIM_INFINITY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Reads resource limit `resource` of process `pid` (0 = self).
pub fn get_rlimit(pid: Pid, resource: u32) -> Result<Rlimit, Errno> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid rlimit64 the kernel fills; the new limit pointer is null.
    let rc = unsafe {
        libc::prlimit64(
            pid.as_raw(),
            resource as _,
            std::ptr::null(),
            &mut old as *mut libc::rlimit64,
        )
    };
    check(rc as libc::c_long)?;
    Ok(Rlimit {
        soft: old.rlim_cur,
        hard: old.rlim_max,
    })
}

/// Sets resource limit `resource` of process `pid` (0 = self).
pub fn set_rlimit(pid: Pid, resource: u32, limit: Rlimit) -> Result<(), Errno> {
    let new = libc::rlimit64 {
        rlim_cur: limit.soft,
        rlim_max: limit.hard,
    };
    // SAFETY: `new` is a valid rlimit64 that the kernel only reads.
    let rc = unsafe {
        libc::prlimit64(
            pid.as_raw(),
            resource as _,
            &new as *const libc::rlimit64,
            std::ptr::null_mut(),
        )
    };
    check(rc as libc::c_long).map(drop)
}

/// Starts a new session led by the calling process (no allocation).
pub fn new_session() -> Result<(), Errno> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() } as libc::c_long).map(drop)
}

/// Makes the calling process lead a new process group (no allocation).
pub fn new_process_group() -> Result<(), Errno> {
    // SAFETY: setpgid takes integers.
    check(unsafe { libc::setpgid(0, 0) } as libc::c_long).map(drop)
}

/// Moves the calling process into process group `pgid` of its session (no allocation).
pub fn join_process_group(pgid: i32) -> Result<(), Errno> {
    // SAFETY: setpgid takes integers.
    check(unsafe { libc::setpgid(0, pgid) } as libc::c_long).map(drop)
}

/// Unblocks one signal of the calling thread (no allocation).
pub fn unblock_signal(signo: i32) -> Result<(), Errno> {
    let set: u64 = 1 << (signo - 1);
    // SAFETY: the kernel reads 8 bytes of mask; the old-mask pointer is null.
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK as libc::c_long,
            &set as *const u64,
            std::ptr::null_mut::<u64>(),
            8 as libc::c_long,
        )
    })
    .map(drop)
}

/// Changes the working directory (no allocation).
pub fn chdir(path: &std::ffi::CStr) -> Result<(), Errno> {
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::chdir(path.as_ptr()) } as libc::c_long).map(drop)
}

/// Changes the root directory (no allocation).
pub fn chroot(path: &std::ffi::CStr) -> Result<(), Errno> {
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) } as libc::c_long).map(drop)
}

/// Sets the file-mode creation mask (no allocation).
pub fn set_umask(mask: u32) {
    // SAFETY: umask takes an integer and cannot fail.
    unsafe { libc::umask(mask) };
}

/// Sets the calling thread's alternate signal stack (no allocation; its addresses are not
/// dereferenced here).
pub fn set_altstack(stack: &AltStack) -> Result<(), Errno> {
    // SAFETY: the kernel reads one stack_t from `stack`.
    check(unsafe { libc::syscall(libc::SYS_sigaltstack, stack as *const AltStack, 0usize) })
        .map(drop)
}

/// A new shared anonymous memory object (what `mmap(MAP_SHARED|MAP_ANONYMOUS)` creates,
/// "/dev/zero (deleted)") of `len` bytes, as an fd that another process can map.
pub fn new_shared_anonymous(len: u64) -> Result<std::fs::File, Errno> {
    use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let nz = std::num::NonZeroUsize::new(len as usize).ok_or(Errno::EINVAL)?;
    // SAFETY: a fresh anonymous mapping nothing else refers to; unmapped below.
    let addr = unsafe {
        mmap_anonymous(
            None,
            nz,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )
    }?;
    let start = addr.as_ptr() as u64;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/map_files/{start:x}-{:x}", start + len));
    // SAFETY: unmaps the mapping made above; the object lives on through the fd.
    let _ = unsafe { munmap(addr, len as usize) };
    opened.map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// Sets the disposition of signal `signo` for the calling process (no allocation; usable in
/// a forked child).
pub fn set_sigaction(signo: i32, action: &KernelSigaction) -> Result<(), Errno> {
    // SAFETY: `action` is a valid kernel sigaction; the old-action pointer is null.
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            signo as libc::c_long,
            action as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8 as libc::c_long,
        )
    })
    .map(drop)
}

/// Sets the calling thread's blocked-signal mask to `mask` (no allocation; usable in a
/// forked child).
pub fn block_signals(mask: u64) -> Result<(), Errno> {
    // SAFETY: the kernel reads 8 bytes of mask; the old-mask pointer is null.
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as libc::c_long,
            &mask as *const u64,
            std::ptr::null_mut::<u64>(),
            8 as libc::c_long,
        )
    })
    .map(drop)
}

/// An alternate signal stack (`sigaltstack(2)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AltStack {
    /// Base address.
    pub sp: u64,
    /// `SS_*` flags.
    pub flags: i32,
    /// Padding of the kernel's `stack_t`.
    pub pad: i32,
    /// Size in bytes.
    pub size: u64,
}

/// Calls `prctl(2)` with integer arguments.
pub fn prctl(option: i32, a2: u64, a3: u64, a4: u64, a5: u64) -> Result<i64, Errno> {
    // SAFETY: the options dolly passes take integers or addresses it owns.
    let rc = unsafe { libc::prctl(option, a2, a3, a4, a5) };
    check(rc as libc::c_long)
}

/// Sets the execution domain of the calling process.
pub fn set_personality(persona: u32) -> Result<(), Errno> {
    // SAFETY: personality takes one integer.
    let rc = unsafe { libc::personality(persona as libc::c_ulong) };
    check(rc as libc::c_long).map(drop)
}

/// Closes every fd in `[first, last]` of the calling process.
pub fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range takes integers.
    let rc = unsafe { libc::close_range(first, last, 0) };
    check(rc as libc::c_long).map(drop)
}

/// Duplicates `old` onto `new`, with `O_CLOEXEC` if `cloexec` (no allocation).
pub fn dup3(old: i32, new: i32, cloexec: bool) -> Result<(), Errno> {
    // SAFETY: dup3 takes integers; replacing `new` is the point.
    let rc = unsafe { libc::dup3(old, new, if cloexec { libc::O_CLOEXEC } else { 0 }) };
    check(rc as libc::c_long).map(drop)
}

/// `dup2` onto a fixed number (no allocation).
pub fn dup2(old: i32, new: i32) -> Result<(), Errno> {
    // SAFETY: dup2 takes integers; replacing `new` is the point.
    let rc = unsafe { libc::dup2(old, new) };
    check(rc as libc::c_long).map(drop)
}

/// Ends the calling process at once, without unwinding or running exit handlers: the only
/// safe way out of a forked child.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Raises `SIGSTOP` on the calling process (no allocation).
pub fn stop_self() {
    // SAFETY: kill/getpid take integers.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGSTOP);
    }
}

/// Writes all of `buf` to `fd` (no allocation; for a forked child's error report).
pub fn write_all_raw(fd: i32, buf: &[u8]) {
    // SAFETY: `buf` is valid for `len` bytes.
    unsafe {
        libc::write(fd, buf.as_ptr().cast(), buf.len());
    }
}

/// The PID of the calling process's parent.
pub fn parent_pid() -> Pid {
    nix::unistd::getppid()
}

/// Whether process or thread `pid` exists (including zombies).
pub fn pid_exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `pidfd_open(2)`: a file descriptor that refers to process `pid`.
pub fn pidfd_open(pid: Pid) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers and returns a new fd we then own.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Scheduling policy (with `SCHED_RESET_ON_FORK`) and static priority of process `pid`.
pub fn get_scheduler(pid: Pid) -> Result<(i32, i32), Errno> {
    // SAFETY: sched_getscheduler takes an integer.
    let policy = unsafe { libc::sched_getscheduler(pid.as_raw()) };
    check(policy as libc::c_long)?;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the kernel writes one sched_param.
    check(unsafe { libc::sched_getparam(pid.as_raw(), &mut param) } as libc::c_long)?;
    Ok((policy, param.sched_priority))
}

/// Sets the calling process's scheduling policy and static priority (no allocation).
pub fn set_scheduler(policy: i32, priority: i32) -> Result<(), Errno> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: the kernel reads one sched_param.
    check(unsafe { libc::sched_setscheduler(0, policy, &param) } as libc::c_long).map(drop)
}

/// Sets the calling process's nice value (no allocation).
pub fn set_nice(nice: i32) -> Result<(), Errno> {
    // SAFETY: setpriority takes integers.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } as libc::c_long).map(drop)
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;

/// I/O priority of process `pid`.
pub fn get_io_priority(pid: Pid) -> Result<u32, Errno> {
    // SAFETY: ioprio_get takes integers.
    check(unsafe {
        libc::syscall(
            libc::SYS_ioprio_get,
            IOPRIO_WHO_PROCESS,
            pid.as_raw() as libc::c_long,
        )
    })
    .map(|v| v as u32)
}

/// Sets the calling process's I/O priority (no allocation).
pub fn set_io_priority(value: u32) -> Result<(), Errno> {
    // SAFETY: ioprio_set takes integers.
    check(unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            value as libc::c_long,
        )
    })
    .map(drop)
}

/// CPU affinity mask of process `pid`, in 64-bit words.
pub fn get_affinity(pid: Pid) -> Result<Vec<u64>, Errno> {
    let mut mask = vec![0u64; 16];
    // SAFETY: the kernel writes at most the given number of bytes into `mask`.
    let n = check(unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            pid.as_raw(),
            mask.len() * 8,
            mask.as_mut_ptr(),
        )
    })?;
    mask.truncate((n as usize).div_ceil(8));
    Ok(mask)
}

/// Moves process `pid` onto the CPU the calling thread runs on: for a process of dolly's
/// about to end (a fork it made), whose exit then takes no CPU from the processes it
/// shares memory with (on a kernel without preemption, the exit of a 64 MiB fork held the
/// CPU of the process it was forked from for 2 ms).
pub fn move_to_this_cpu(pid: nix::unistd::Pid) -> Result<(), Errno> {
    let cpu = nix::sched::sched_getcpu()?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(pid, &set)
}

/// Makes the calling thread run before every task of the usual scheduling class until
/// dropped (`SCHED_FIFO`, if dolly may: with `CAP_SYS_NICE`, as root has; else nice -20):
/// for letting the threads of a process go, each of which would otherwise take dolly's CPU
/// the moment it is woken, before dolly lets the next go or even returns from the call
/// that woke it (then, on this VM, for a whole time slice: 4 ms).
#[derive(Debug)]
pub struct Urgent {
    /// The policy (with `SCHED_RESET_ON_FORK`) and priority to go back to, if the policy
    /// was changed.
    was: Option<(i32, i32)>,
    /// The nice value to go back to, if it was raised instead.
    _raised: Option<Lowered>,
}

impl Urgent {
    /// Raises the calling thread's scheduling priority as said (a thread under another
    /// policy than the usual ones, real-time or deadline, keeps it).
    pub fn now() -> Urgent {
        let me = Pid::from_raw(0);
        let was = get_scheduler(me).ok().filter(|&(policy, _)| {
            matches!(
                policy & !libc::SCHED_RESET_ON_FORK,
                libc::SCHED_OTHER | libc::SCHED_BATCH | libc::SCHED_IDLE
            )
        });
        let Some(was) = was else {
            return Urgent {
                was: None,
                _raised: None,
            };
        };
        let fifo = set_scheduler(libc::SCHED_FIFO, 1).is_ok();
        Urgent {
            was: fifo.then_some(was),
            _raised: (!fifo).then(|| Lowered::by(-40)),
        }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if let Some((policy, priority)) = self.was {
            // (The nice value was kept meanwhile.)
            let _ = set_scheduler(policy, priority);
        }
    }
}

/// Sets the calling process's CPU affinity (no allocation).
pub fn set_affinity(mask: &[u64]) -> Result<(), Errno> {
    // SAFETY: the kernel reads `len` bytes of `mask`.
    check(unsafe {
        libc::syscall(
            libc::SYS_sched_setaffinity,
            0,
            mask.len() * 8,
            mask.as_ptr(),
        )
    })
    .map(drop)
}

/// Takes a `flock(2)` lock on `fd`'s description without waiting: exclusive if `write`.
pub fn flock(fd: impl std::os::fd::AsFd, write: bool) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let op = if write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
    // SAFETY: flock takes integers.
    check(unsafe { libc::flock(fd.as_fd().as_raw_fd(), op) } as libc::c_long).map(drop)
}

/// A `struct flock` for bytes `start..=end` (`None`: to the end of the file).
pub fn flock_struct(write: bool, start: u64, end: Option<u64>) -> libc::flock {
    libc::flock {
        l_type: if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start as i64,
        l_len: end.map_or(0, |e| (e - start + 1) as i64),
        l_pid: 0,
    }
}

/// Takes a byte-range lock with `cmd` (`F_SETLK`, `F_OFD_SETLK`) without waiting.
pub fn set_lock(
    fd: impl std::os::fd::AsFd,
    cmd: i32,
    write: bool,
    start: u64,
    end: Option<u64>,
) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let lock = flock_struct(write, start, end);
    // SAFETY: the kernel reads one struct flock.
    check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, &lock) } as libc::c_long).map(drop)
}

/// Faults in dolly's own code (its executable mappings) ahead of time, so that a freeze does
/// not wait for page faults on code run for the first time. Best effort.
pub fn populate_own_code() {
    const MADV_POPULATE_READ: i32 = 22;
    let Ok(maps) = crate::proc::ProcDir::new(nix::unistd::getpid()).maps_without_flags() else {
        return;
    };
    for m in maps.iter().filter(|m| m.exec && !m.path.starts_with('[')) {
        // SAFETY: populating page tables of an existing mapping changes no memory contents.
        unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.len() as usize,
                MADV_POPULATE_READ,
            );
        }
    }
}

/// Lowers the calling thread's scheduling priority (its nice value, per thread on Linux)
/// by `by` until dropped: work that runs beside the processes it serves (copying their
/// memory while they run) then yields the CPU to them rather than delaying them.
#[derive(Debug)]
pub struct Lowered {
    was: Option<i32>,
}

impl Lowered {
    /// Lowers the priority (raises it, `by` negative); best effort.
    pub fn by(by: i32) -> Lowered {
        // SAFETY: getpriority/setpriority read and set the calling thread's nice value.
        unsafe {
            *libc::__errno_location() = 0;
            let was = libc::getpriority(libc::PRIO_PROCESS, 0);
            if *libc::__errno_location() != 0 {
                return Lowered { was: None };
            }
            let lowered = libc::setpriority(libc::PRIO_PROCESS, 0, (was + by).clamp(-20, 19)) == 0;
            Lowered {
                was: lowered.then_some(was),
            }
        }
    }
}

impl Drop for Lowered {
    fn drop(&mut self) {
        if let Some(was) = self.was {
            // SAFETY: as above. (Raising it back needs CAP_SYS_NICE, which root has.)
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, was) };
        }
    }
}
