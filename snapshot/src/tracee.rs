//! A stopped, traced process: seize/interrupt/detach, registers, memory, and remote
//! system calls (run a syscall inside the tracee by pointing its registers at a `syscall`
//! instruction and single-stepping over it).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Context, Error, ErrorKind, Result};
use crate::image::Registers;
use crate::sys;

mod wait;
pub use wait::Waiting;
use wait::{wait_blocking, wait_stop, FREEZE_TIMEOUT};

/// The general-purpose registers as the kernel's ptrace interface has them.
pub type RawRegs = libc::user_regs_struct;

/// Converts kernel registers to their image form.
pub fn regs_to_image(r: &RawRegs) -> Registers {
    Registers {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

/// Converts image registers to the kernel's form.
pub fn regs_from_image(r: &Registers) -> RawRegs {
    RawRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

/// A process (one thread) stopped under ptrace by this process.
#[derive(Debug)]
pub struct Tracee {
    pid: Pid,
    mem: File,
    /// Signals other processes sent while dolly held the tracee (those its calls do not
    /// block: see [`CALLS_MASK`]); sent again on detach.
    deferred: Vec<Signal>,
    /// Attached with PTRACE_SEIZE (so PTRACE_INTERRUPT works).
    seized: bool,
    /// Stopped in the SIGTRAP signal-delivery stop a single step leaves.
    in_trap: bool,
    /// Moving out of that stop (see [`Tracee::park_start`]), not yet waited for: see
    /// [`Tracee::settle`].
    parking: bool,
    /// When dolly asked it to stop, if it did (it ran on until then).
    interrupted_at: Option<Instant>,
    /// What dropping the tracee without `detach` does.
    on_drop: OnDrop,
    /// Its process ignores SIGTRAP (see [`Tracee::set_trap_ignored`]).
    trap_ignored: bool,
}

/// What happens to a tracee dolly lets go of without [`Tracee::detach`] (an error path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDrop {
    /// A process being captured runs on (its registers are dolly's to put back first).
    Detach,
    /// A half-built restore stub dies.
    Kill,
    /// Already let go.
    Nothing,
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.on_drop == OnDrop::Detach {
            let _ = self.settle();
        }
        match self.on_drop {
            OnDrop::Detach => {
                let _ = ptrace::detach(self.pid, None);
            }
            OnDrop::Kill => {
                // Still our traced child: its PID cannot have been reused.
                let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
            }
            OnDrop::Nothing => {}
        }
    }
}

fn gone(pid: Pid, status: &WaitStatus) -> Error {
    Error::new(
        ErrorKind::System,
        format!("process {pid} ended while dolly held it ({status:?})"),
    )
}

impl Tracee {
    /// Seizes a running thread and stops it (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`). Signals
    /// that arrive before the stop are delivered, so nothing is lost. Fails if another
    /// tracer holds it.
    pub fn seize(pid: Pid) -> Result<Tracee> {
        let mut tracee = Tracee::seize_start(pid)?;
        tracee.wait_seized()?;
        Ok(tracee)
    }

    /// The first half of [`Tracee::seize`]: seizes the thread and asks it to stop, without
    /// waiting for the stop (see [`Tracee::wait_seized`]): threads asked together stop
    /// together.
    pub fn seize_start(pid: Pid) -> Result<Tracee> {
        Tracee::seize_start_with(pid, None)
    }

    /// [`Tracee::seize_start`] for another thread of `leader`'s process: it reads and writes
    /// their memory through the leader's `/proc/PID/mem` (the same memory; opening one per
    /// thread took a tenth of a millisecond per ten threads of a freeze).
    pub fn seize_thread_start(tid: Pid, leader: &Tracee) -> Result<Tracee> {
        let mem = leader
            .mem
            .try_clone()
            .with_context(|| format!("sharing the memory file of {}", leader.pid))?;
        Tracee::seize_start_with(tid, Some(mem))
    }

    fn seize_start_with(pid: Pid, mem: Option<File>) -> Result<Tracee> {
        ptrace::seize(pid, ptrace::Options::empty()).map_err(|e| match e {
            Errno::ESRCH => Error::not_found(
                format!("no process {pid}"),
                "check the PID (it may have exited)",
            ),
            Errno::EPERM => Error::busy(
                format!(
                    "process {pid} cannot be traced: another tracer holds it, or it is protected"
                ),
                "stop the debugger, strace or other dolly that holds it, then try again",
            ),
            e => Error::sys(format!("seizing process {pid}"), e),
        })?;
        let mut tracee = match mem {
            Some(mem) => Tracee::with_mem(pid, OnDrop::Detach, mem),
            None => Tracee::open(pid, OnDrop::Detach)?,
        };
        tracee.seized = true;
        tracee.interrupted_at = Some(Instant::now());
        ptrace::interrupt(pid).with_context(|| format!("interrupting process {pid}"))?;
        Ok(tracee)
    }

    /// The second half of [`Tracee::seize`]: waits until the thread is stopped.
    pub fn wait_seized(&mut self) -> Result<()> {
        let pid = self.pid;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            match wait_stop(pid, deadline)? {
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => return Ok(()),
                WaitStatus::Stopped(_, sig) => {
                    // A signal arrived first: deliver it; the interrupt stop follows.
                    ptrace::cont(pid, sig).with_context(|| format!("resuming process {pid}"))?;
                }
                WaitStatus::PtraceEvent(..) | WaitStatus::PtraceSyscall(_) => {
                    ptrace::cont(pid, None).with_context(|| format!("resuming process {pid}"))?;
                }
                // It was exiting: it ends instead of stopping (a freeze skips it and finds
                // its zombie).
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    return Err(Error::not_found(
                        format!("process {pid} ended before it stopped"),
                        "capture it again",
                    ))
                }
                other => return Err(gone(pid, &other)),
            }
        }
    }

    /// Takes over a child that called `PTRACE_TRACEME` and stopped itself with `SIGSTOP`
    /// (a restore stub). Returns `Ok(None)` with its wait status if it exited instead.
    pub fn adopt_stopped_child(pid: Pid) -> Result<std::result::Result<Tracee, WaitStatus>> {
        let status = loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Err(Errno::EINTR) => continue,
                other => break other.with_context(|| format!("waiting for process {pid}"))?,
            }
        };
        match status {
            WaitStatus::Stopped(_, Signal::SIGSTOP) => Ok(Ok(Tracee::open(pid, OnDrop::Kill)?)),
            other => Ok(Err(other)),
        }
    }

    /// Takes over a process this process already traces and that is stopped (a stub that
    /// `PTRACE_O_TRACEFORK` attached). Dropping it kills it.
    pub fn adopt_traced(pid: Pid) -> Result<Tracee> {
        Tracee::open(pid, OnDrop::Kill)
    }

    fn open(pid: Pid, on_drop: OnDrop) -> Result<Tracee> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ESRCH) || e.kind() == std::io::ErrorKind::NotFound
                {
                    // It ended meanwhile (a freeze skips such a process).
                    Error::not_found(format!("process {pid} ended"), "capture it again")
                } else {
                    Error::io(format!("opening /proc/{pid}/mem"), e)
                }
            })?;
        Ok(Tracee::with_mem(pid, on_drop, mem))
    }

    fn with_mem(pid: Pid, on_drop: OnDrop, mem: File) -> Tracee {
        Tracee {
            pid,
            mem,
            deferred: Vec::new(),
            seized: false,
            in_trap: false,
            parking: false,
            interrupted_at: None,
            on_drop,
            trap_ignored: false,
        }
    }

    /// Says whether its process ignores SIGTRAP (`SigIgn` of its status). Dolly's calls end
    /// in SIGTRAPs the kernel forces, which set an ignored SIGTRAP back to its default
    /// action: [`Tracee::run_inside`] then ignores it again (see
    /// [`Remote::ignore_trap_again`]).
    pub fn set_trap_ignored(&mut self, ignored: bool) {
        self.trap_ignored = ignored;
    }

    /// Whether its process ignored SIGTRAP when it was stopped (see
    /// [`Tracee::set_trap_ignored`]).
    pub fn trap_ignored(&self) -> bool {
        self.trap_ignored
    }

    /// When dolly asked the thread to stop (seizing it), if it did: it ran on until then.
    pub fn interrupted_at(&self) -> Option<Instant> {
        self.interrupted_at
    }

    /// The traced thread.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Its general-purpose registers.
    pub fn regs(&self) -> Result<RawRegs> {
        ptrace::getregs(self.pid).with_context(|| format!("reading registers of {}", self.pid))
    }

    /// Sets its general-purpose registers.
    pub fn set_regs(&self, regs: &RawRegs) -> Result<()> {
        ptrace::setregs(self.pid, *regs)
            .with_context(|| format!("writing registers of {}", self.pid))
    }

    /// Its XSAVE area.
    pub fn xstate(&self) -> Result<Vec<u8>> {
        sys::ptrace::get_xstate(self.pid)
            .with_context(|| format!("reading FPU/vector registers of {}", self.pid))
    }

    /// Sets its XSAVE area.
    pub fn set_xstate(&self, xstate: &[u8]) -> Result<()> {
        sys::ptrace::set_xstate(self.pid, xstate)
            .with_context(|| format!("writing FPU/vector registers of {}", self.pid))
    }

    /// Its blocked-signal mask.
    pub fn sigmask(&self) -> Result<u64> {
        sys::ptrace::get_sigmask(self.pid)
            .with_context(|| format!("reading signal mask of {}", self.pid))
    }

    /// Sets its blocked-signal mask.
    pub fn set_sigmask(&self, mask: u64) -> Result<()> {
        sys::ptrace::set_sigmask(self.pid, mask)
            .with_context(|| format!("writing signal mask of {}", self.pid))
    }

    /// Whether a `syscall` instruction is at `ip` in its memory (where dolly can make it run
    /// system calls).
    pub fn has_syscall_at(&self, ip: u64) -> bool {
        let mut insn = [0u8; 2];
        self.read_mem(ip, &mut insn).is_ok() && insn == [0x0f, 0x05]
    }

    /// Reads its memory (any protection).
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_exact_at(buf, addr)
            .with_context(|| format!("reading memory of {} at {addr:#x}", self.pid))
    }

    /// Writes its memory (any protection; private mappings get a private copy).
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_all_at(data, addr)
            .with_context(|| format!("writing memory of {} at {addr:#x}", self.pid))
    }

    /// Sets ptrace options (e.g. `PTRACE_O_EXITKILL`).
    pub fn set_options(&self, options: ptrace::Options) -> Result<()> {
        ptrace::setoptions(self.pid, options)
            .with_context(|| format!("setting ptrace options of {}", self.pid))
    }

    /// Lets `tracees` run on, in their order: all settled first (see [`Tracee::settle`]), at
    /// dolly's priority (a thread waiting for dolly's CPU would not get it from a real-time
    /// dolly), then each let go with dolly's thread urgent (see
    /// [`sys::process::Urgent`]): each thread let go runs at once, and at dolly's priority
    /// those of a busy process would take the CPU from dolly before it lets the others go
    /// (50 threads: 1.7 ms instead of 0.4), the last one before dolly notes the end of the
    /// freeze. Returns when the last was let go (`None` if there was none) and the first
    /// failure.
    pub fn let_go(mut tracees: Vec<Tracee>) -> (Option<Instant>, Result<()>) {
        let mut first = Ok(());
        for t in &mut tracees {
            let r = t.settle();
            if first.is_ok() {
                first = r;
            }
        }
        let urgent = sys::process::Urgent::now();
        let mut last = None;
        for t in tracees {
            let r = t.detach();
            last = Some(Instant::now());
            if first.is_ok() {
                first = r;
            }
        }
        drop(urgent);
        (last, first)
    }

    /// Lets the thread run on (from its stop), sending again any stop signal that arrived
    /// while dolly held it.
    pub fn detach(mut self) -> Result<()> {
        let settled = self.settle();
        let detached =
            ptrace::detach(self.pid, None).with_context(|| format!("detaching from {}", self.pid));
        if detached.is_ok() {
            self.on_drop = OnDrop::Nothing;
        }
        // (Whatever happened: they are the process's. Still traced, it gets them once the
        // drop lets it go.)
        for sig in &self.deferred {
            let _ = nix::sys::signal::kill(self.pid, *sig);
        }
        settled.and(detached)
    }

    /// Kills a tracee and waits for its end (for a process dolly made: a fork made by a
    /// `clone` with [`FORK_HELD_ARGS`], which its parent then reaps).
    pub fn kill_and_wait(mut self) -> Result<()> {
        self.on_drop = OnDrop::Nothing;
        kill_traced(self.pid)
    }

    /// Moves seized tracees out of the trap stop remote calls leave them in (see
    /// [`Tracee::park_start`]): all are moved, then all waited for. Each is tried; the first
    /// failure is returned.
    pub fn park_all(tracees: &mut [Tracee]) -> Result<()> {
        let started: Vec<Result<bool>> = tracees.iter_mut().map(Tracee::park_start).collect();
        let mut first = Ok(());
        for (t, started) in tracees.iter_mut().zip(started) {
            let parked = started.and_then(|moving| if moving { t.park_finish() } else { Ok(()) });
            if first.is_ok() {
                first = parked;
            }
        }
        first
    }

    /// Waits until a tracee [`Tracee::run_inside`] left moving out of its trap stop is in
    /// its `PTRACE_EVENT_STOP` (ptrace requests fail until then): the wait overlaps with
    /// what dolly does meanwhile.
    pub fn settle(&mut self) -> Result<()> {
        if std::mem::take(&mut self.parking) {
            self.park_finish()?;
        }
        Ok(())
    }

    /// Asks a seized tracee in the SIGTRAP stop that remote calls leave it in to move to a
    /// `PTRACE_EVENT_STOP` (returns whether it was asked; [`Tracee::park_finish`] waits for
    /// it). Should dolly die while the tracee waits there, the kernel lets it run on; from
    /// the SIGTRAP stop it would deliver the SIGTRAP, which kills it.
    fn park_start(&mut self) -> Result<bool> {
        if !self.seized || !self.in_trap {
            return Ok(false);
        }
        let pid = self.pid;
        ptrace::interrupt(pid).with_context(|| format!("interrupting process {pid}"))?;
        ptrace::cont(pid, None).with_context(|| format!("resuming process {pid}"))?;
        Ok(true)
    }

    /// Waits until a tracee [`Tracee::park_start`] moved is in its `PTRACE_EVENT_STOP`.
    fn park_finish(&mut self) -> Result<()> {
        let pid = self.pid;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            match wait_stop(pid, deadline)? {
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => {
                    self.in_trap = false;
                    return Ok(());
                }
                WaitStatus::Stopped(_, sig) => {
                    self.defer(sig);
                    ptrace::cont(pid, None).with_context(|| format!("resuming process {pid}"))?;
                }
                WaitStatus::PtraceEvent(..) | WaitStatus::PtraceSyscall(_) => {
                    ptrace::cont(pid, None).with_context(|| format!("resuming process {pid}"))?;
                }
                other => return Err(gone(pid, &other)),
            }
        }
    }

    /// [`Tracee::run_inside`] putting back the registers and signal mask the tracee has now.
    pub fn run_inside_as_is<T>(
        &mut self,
        ip: u64,
        park: bool,
        call: impl FnOnce(&mut Remote<'_>) -> Result<T>,
    ) -> Result<T> {
        self.settle()?;
        let (regs, mask) = (self.regs()?, self.sigmask()?);
        self.run_inside(ip, (&regs, mask), park, call)
    }

    /// Runs `call` inside the tracee through the `syscall` instruction at `ip`, every signal
    /// but SIGTRAP and those of faults blocked ([`CALLS_MASK`]), then puts back an ignored
    /// SIGTRAP (see
    /// [`Tracee::set_trap_ignored`]), registers `regs` and signal mask `mask` whatever
    /// happened (and, if `park`, starts moving it out of the trap the calls leave it in: see
    /// [`Tracee::park_start`]; the next request that needs it stopped waits for that, see
    /// [`Tracee::settle`]).
    pub fn run_inside<T>(
        &mut self,
        ip: u64,
        (regs, mask): (&RawRegs, u64),
        park: bool,
        call: impl FnOnce(&mut Remote<'_>) -> Result<T>,
    ) -> Result<T> {
        self.settle()?;
        self.set_sigmask(CALLS_MASK)?;
        // (The calls start from the registers given: no need to read them again.)
        let done = call(&mut self.remote_with(ip, *regs));
        let ignored_again = match self.trap_ignored {
            true => self.remote_with(ip, *regs).ignore_trap_again(regs.rsp),
            false => Ok(()),
        };
        let put_back = ignored_again.and_then(|()| self.put_back(regs, mask, park));
        let done = done?;
        put_back?;
        Ok(done)
    }

    /// Gives the tracee registers `regs` and signal mask `mask` (its own, after dolly's
    /// calls) and, if `park`, at once starts moving it out of the trap the calls left it in
    /// (see [`Tracee::park_start`]; [`Tracee::settle`] waits for that).
    pub fn put_back(&mut self, regs: &RawRegs, mask: u64, park: bool) -> Result<()> {
        self.set_regs(regs)?;
        self.set_sigmask(mask)?;
        if park {
            self.parking = self.park_start()?;
        }
        Ok(())
    }

    /// The `syscall` instruction of the tracee's vDSO: at `known` (where the vDSO was a
    /// moment ago, checked), else where its areas say it is.
    pub fn vdso_syscall_ip(&self, known: Option<u64>) -> Result<u64> {
        let offset = vdso_syscall_offset()?.ok_or_else(|| {
            Error::refused(
                "no syscall instruction found in the vDSO",
                "this kernel's vDSO is not supported",
            )
        })?;
        if let Some(at) = known.filter(|&at| self.has_syscall_at(at + offset)) {
            return Ok(at + offset);
        }
        let pid = self.pid;
        crate::proc::ProcDir::new(pid)
            .maps_without_flags()?
            .iter()
            .find(|m| m.path == "[vdso]")
            .map(|m| m.start + offset)
            .ok_or_else(|| {
                Error::refused(
                    format!("process {pid} has no vDSO"),
                    "capture a process that keeps its vDSO mapped",
                )
            })
    }

    /// Starts running system calls inside the tracee through the `syscall` instruction at
    /// `syscall_ip`. The caller saves and later restores the registers it needs.
    pub fn remote(&mut self, syscall_ip: u64) -> Result<Remote<'_>> {
        self.settle()?;
        let base = self.regs()?;
        Ok(self.remote_with(syscall_ip, base))
    }

    /// [`Tracee::remote`] for a tracee whose registers are known to be `regs` (no need to
    /// read them: it may be running calls [`Remote::start_run`] started).
    pub fn remote_with(&mut self, syscall_ip: u64, regs: RawRegs) -> Remote<'_> {
        Remote {
            tracee: self,
            ip: syscall_ip,
            base: regs,
        }
    }

    /// Single-steps the tracee until its next trap, doing `meanwhile` once it runs (before
    /// waiting for its stop).
    fn step_until_trap_while(&mut self, meanwhile: impl FnOnce()) -> Result<RawRegs> {
        let step = |pid| ptrace::step(pid, None);
        let pid = self.pid;
        step(pid).with_context(|| format!("single-stepping {pid}"))?;
        meanwhile();
        self.wait_own_trap(step, |status| gone(pid, &status))?;
        self.regs()
    }

    /// Keeps signal `sig`, which arrived while dolly held the tracee, for the detach (once:
    /// the kernel merges a signal sent again while it is pending).
    fn defer(&mut self, sig: Signal) {
        if !self.deferred.contains(&sig) {
            self.deferred.push(sig);
        }
    }

    /// Waits for the next SIGTRAP stop dolly's own doing caused (a trap, a single step, a
    /// system call stop), resuming the tracee with `resume` past any other stop: a signal
    /// another process sent (only those dolly does not block: a stop signal, SIGTRAP, a
    /// fault's signal) is kept for the detach; the child of a reported clone is noted. A
    /// fault of the calls themselves (a SIGSEGV the kernel raised...), or any other status
    /// (the tracee ended), is an error, as `unexpected` says.
    fn wait_own_trap(
        &mut self,
        resume: impl Fn(Pid) -> nix::Result<()>,
        unexpected: impl FnOnce(WaitStatus) -> Error,
    ) -> Result<()> {
        let pid = self.pid;
        loop {
            match wait_blocking(pid)? {
                WaitStatus::Stopped(_, sig) if by_kernel(pid) => {
                    self.in_trap = true;
                    // (A fault of dolly's calls: not the process's signal, never delivered.)
                    if sig != Signal::SIGTRAP {
                        return Err(unexpected(WaitStatus::Stopped(pid, sig)));
                    }
                    return Ok(());
                }
                WaitStatus::Stopped(_, sig) => self.defer(sig),
                WaitStatus::PtraceEvent(..) => {}
                other => return Err(unexpected(other)),
            }
            resume(pid).with_context(|| format!("resuming {pid}"))?;
        }
    }
}

/// Whether the signal tracee `pid` stopped with comes from what its thread just did (for
/// dolly's calls: a trap instruction, a single step, a system call stop, or a fault; the
/// kernel's, `si_code` above 0), not from a process that sent it.
fn by_kernel(pid: Pid) -> bool {
    ptrace::getsiginfo(pid).map_or(true, |info| info.si_code > 0)
}

/// The arguments of the `clone` that makes a fork held by dolly (the last call of a batch,
/// see `capture::cow`): traced from its start (`CLONE_PTRACE`: the tracee is seized, so the child stops before its
/// first instruction), without a stop of the tracee to report it; sharing the tracee's fd
/// table and filesystem context; no signal at its end. (EXITKILL goes on the fork alone, once
/// held: set on the process, dolly dying would kill it.)
pub const FORK_HELD_ARGS: [u64; 5] = [
    (libc::CLONE_FILES | libc::CLONE_FS | libc::CLONE_PTRACE) as u64,
    0,
    0,
    0,
    0,
];

/// System calls to run inside a tracee in one go ([`Remote::run`]).
#[derive(Debug, Default)]
pub struct Calls {
    list: Vec<(i64, [u64; 6])>,
}

impl Calls {
    /// Adds syscall `nr` with up to six arguments; returns its index in the results.
    pub fn add(&mut self, nr: i64, args: &[u64]) -> usize {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        self.list.push((nr, a));
        self.list.len() - 1
    }

    /// How many calls there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Bytes of tracee memory [`Remote::run`] needs for its table.
    pub fn table_len(&self) -> u64 {
        (self.list.len() as u64 + 1) * 64
    }
}

/// Machine code that runs a table of system calls: for each 64-byte entry at `rbx`
/// (`nr, a1..a6, result`) until `nr` is -1, loads the registers, `syscall`, stores `rax`
/// in `result`; then `int3` (at [`RUN_CALLS_TRAP`]), and back to it should the thread go
/// on (its trap's SIGTRAP cancelled: dolly waited for the stop, then ended). The child of
/// a `clone` in the table (a fork: `rax` 0 after a `clone`) goes to `exit(0)` instead:
/// should dolly end before it took the child over, the child ends itself. Then, at
/// [`RUN_CALLS_NET`], the handler of a [`Net`].
const RUN_CALLS: [u8; 180] = [
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x48, 0x83, 0xf8, 0xff, // cmp rax, -1
    0x74, 0x2f, // je done
    0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
    0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
    0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
    0x4c, 0x8b, 0x53, 0x20, // mov r10, [rbx+32]
    0x4c, 0x8b, 0x43, 0x28, // mov r8, [rbx+40]
    0x4c, 0x8b, 0x4b, 0x30, // mov r9, [rbx+48]
    0x0f, 0x05, // syscall
    0x48, 0x85, 0xc0, // test rax, rax
    0x75, 0x06, // jnz store
    0x48, 0x83, 0x3b, 0x38, // cmp qword [rbx], 56 (clone)
    0x74, 0x0d, // je child
    0x48, 0x89, 0x43, 0x38, // store: mov [rbx+56], rax
    0x48, 0x83, 0xc3, 0x40, // add rbx, 64
    0xeb, 0xc8, // jmp back to the first instruction
    0xcc, // done: int3
    0xeb, 0xfd, // jmp done
    0xb8, 0x3c, 0x00, 0x00, 0x00, // child: mov eax, 60 (exit)
    0x31, 0xff, // xor edi, edi
    0x0f, 0x05, // syscall
    // The net's SIGTRAP handler (rdx: the ucontext of the trap). A trap of the batch (its
    // rip right after the `int3`; its rsp, the batch's, the net's frame + 8):
    0x48, 0x8d, 0x05, 0xee, 0xff, 0xff, 0xff, // lea rax, [rip - 18] (the trap's rip)
    0x48, 0x3b, 0x82, 0xa8, 0x00, 0x00, 0x00, // cmp rax, [rdx + 168] (uc_mcontext.rip)
    0x75, 0x38, // jne foreign
    0x48, 0x8b, 0xa2, 0xa0, 0x00, 0x00, 0x00, // mov rsp, [rdx + 160] (uc_mcontext.rsp)
    0x48, 0x8b, 0x84, 0x24, 0x70, 0x01, 0x00,
    0x00, // mov rax, [rsp + 368] (the count's address)
    0xf0, 0x48, 0xff, 0x08, // lock dec qword [rax]
    0x75, 0x1c, // jnz back (another thread's handler is still to run)
    0xb8, 0x0d, 0x00, 0x00, 0x00, // mov eax, 13 (rt_sigaction)
    0xbf, 0x05, 0x00, 0x00, 0x00, // mov edi, 5 (SIGTRAP)
    0x48, 0x8d, 0xb4, 0x24, 0x30, 0x01, 0x00, 0x00, // lea rsi, [rsp + 304] (the saved action)
    0x31, 0xd2, // xor edx, edx
    0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8
    0x0f, 0x05, // syscall
    0xb8, 0x0f, 0x00, 0x00, 0x00, // back: mov eax, 15 (rt_sigreturn)
    0x0f, 0x05, // syscall
    // A SIGTRAP of the process's own (the handler left as its action: dolly ended once its
    // threads were back): its own action back, and this one signal returned from.
    0xb8, 0x0d, 0x00, 0x00, 0x00, // foreign: mov eax, 13 (rt_sigaction)
    0xbf, 0x05, 0x00, 0x00, 0x00, // mov edi, 5 (SIGTRAP)
    0x48, 0x8d, 0x35, 0x23, 0x00, 0x00, 0x00, // lea rsi, [rip + 35] (the kept action)
    0x31, 0xd2, // xor edx, edx
    0x41, 0xba, 0x08, 0x00, 0x00, 0x00, // mov r10d, 8
    0x0f, 0x05, // syscall
    0x48, 0x83, 0xc4, 0x08, // add rsp, 8 (the kernel's frame, past its return address)
    0xb8, 0x0f, 0x00, 0x00, 0x00, // mov eax, 15 (rt_sigreturn)
    0x0f, 0x05, // syscall
    0x0f, 0x0b, // ud2 (a frame rt_sigreturn refused)
];

/// Where, after [`RUN_CALLS`], a copy of the process's own SIGTRAP action is kept for its
/// handler (see [`Remote::keep_trap_action`]).
const RUN_CALLS_KEPT_ACTION: u64 = 192;

/// Where the copy of the process's own SIGTRAP action kept beside dolly's code at `runner`
/// is (see [`Remote::keep_trap_action`]).
fn kept_trap_action(runner: u64) -> u64 {
    runner + RUN_CALLS_KEPT_ACTION
}

/// Bytes of dolly's code that runs calls ([`Remote::write_call_runner`]).
pub fn call_runner_len() -> usize {
    RUN_CALLS.len()
}

/// Whether `code` is dolly's code that runs calls: memory dolly left in a process.
pub fn is_call_runner(code: &[u8]) -> bool {
    code == RUN_CALLS
}

/// The fork the table of calls `table` (as [`Remote::start_run`] wrote it and the calls
/// filled it in) made, if it made one: the PID a `clone` with [`FORK_HELD_ARGS`] returned.
pub fn fork_in_table(table: &[u8]) -> Option<i32> {
    let word =
        |entry: &[u8], i: usize| u64::from_ne_bytes(entry[i * 8..i * 8 + 8].try_into().unwrap());
    table
        .chunks_exact(64)
        .take_while(|entry| word(entry, 0) != u64::MAX)
        .find(|entry| {
            word(entry, 0) == libc::SYS_clone as u64
                && (0..5).all(|i| word(entry, i + 1) == FORK_HELD_ARGS[i])
        })
        .map(|entry| word(entry, 7) as i64)
        .filter(|&made| made > 0 && made <= i32::MAX as i64)
        .map(|made| made as i32)
}

/// Where [`RUN_CALLS`] stops, done: right after its `int3`.
const RUN_CALLS_TRAP: u64 = 57;

/// Where the handler of a [`Net`] starts in [`RUN_CALLS`].
const RUN_CALLS_NET: u64 = 68;

/// `struct sigaction` as `rt_sigaction` reads and writes it: handler, flags, restorer, mask.
pub const SIGACTION_LEN: u64 = 32;

/// An action that ignores its signal (`SIG_IGN`), as `rt_sigaction` reads it.
pub const IGNORED_ACTION: [u8; SIGACTION_LEN as usize] = {
    let mut action = [0; SIGACTION_LEN as usize];
    action[0] = 1;
    action
};

/// A safety net under a batch of calls (see [`Remote::start_run`]), for a thread whose
/// registers are dolly's while the batch runs: should dolly end then, or while the thread
/// sits in the trap that ends the batch (before or after dolly's wait saw it: the thread
/// then traps again), the SIGTRAP of that trap, no longer stopping the thread for dolly,
/// runs a handler (in dolly's code) that returns the thread with `rt_sigreturn` to its own
/// registers, signal mask and extended state, from a frame dolly wrote beforehand (see
/// [`sys::sigframe`]). The handler of the last of the threads under nets (a count in the
/// tracee's memory tells) first puts the process's own SIGTRAP action back. The process
/// runs on, as if dolly had let it go (dolly's memory stays mapped in it). A SIGTRAP the
/// handler finds outside dolly's code (the process's own, the handler left as its action)
/// has it put back the copy of the process's action kept beside dolly's code (see
/// [`Remote::keep_trap_action`]) and return from that signal.
///
/// It takes [`Net::LEN`] bytes of the tracee's writable memory: room for the frame the
/// kernel builds to run the handler, then dolly's frame (whose `siginfo` part holds the
/// saved SIGTRAP action, then the handler's, then the count's address).
#[derive(Debug, Clone, Copy)]
pub struct Net {
    /// Where dolly's frame starts.
    frame: u64,
}

impl Net {
    /// Bytes a net takes.
    pub const LEN: u64 = 24 * 1024;

    /// The net spread at `at` (see [`Remote::spread_net`]).
    pub fn at(at: u64) -> Net {
        Net {
            frame: at + Net::FRAME_AT,
        }
    }

    /// The handler of the nets of dolly's code at `runner`: the SIGTRAP action they install.
    pub fn handler(runner: u64) -> u64 {
        runner + RUN_CALLS_NET
    }

    /// Where dolly's frame starts in a net: what is below is left for the kernel's frame
    /// (with the largest extended state, 11 KiB, and the red zone).
    const FRAME_AT: u64 = 16 * 1024;

    /// Where the process's own SIGTRAP action is kept.
    pub fn saved_action(&self) -> u64 {
        self.frame + sys::sigframe::INFO_AT
    }

    /// Where the handler's SIGTRAP action is (its first word: [`Net::handler`]).
    pub fn action(&self) -> u64 {
        self.saved_action() + SIGACTION_LEN
    }

    /// Where the address of the count of threads under nets is.
    fn count_address(&self) -> u64 {
        self.action() + SIGACTION_LEN
    }

    /// The stack pointer of a batch under it.
    fn rsp(&self) -> u64 {
        self.frame + 8
    }

    /// Adds the call that spreads it (installs its handler as the SIGTRAP action) to
    /// `calls`, first among them; with `save`, the call saves the action it replaces in the
    /// net (the action then known: no other thread's batch runs).
    pub fn add_install(&self, calls: &mut Calls, save: bool) -> usize {
        let saved = if save { self.saved_action() } else { 0 };
        calls.add(
            libc::SYS_rt_sigaction,
            &[libc::SIGTRAP as u64, self.action(), saved, 8],
        )
    }
}

/// Runs system calls inside a stopped tracee.
#[derive(Debug)]
pub struct Remote<'a> {
    tracee: &'a mut Tracee,
    ip: u64,
    base: RawRegs,
}

impl Remote<'_> {
    /// Moves the `syscall` instruction used (e.g. after the vDSO moved).
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.ip = ip;
    }

    /// The tracee.
    pub fn tracee(&self) -> &Tracee {
        self.tracee
    }

    /// Runs syscall `nr` with up to six arguments; returns the raw result (a negative
    /// errno on failure).
    pub fn raw(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        self.raw_while(nr, args, || {})
    }

    /// [`Remote::raw`], doing `meanwhile` while the call runs (it is not done if the call
    /// could not be started).
    pub fn raw_while(&mut self, nr: i64, args: &[u64], meanwhile: impl FnOnce()) -> Result<i64> {
        self.tracee.set_regs(&self.call_regs(nr, args))?;
        let after = self.tracee.step_until_trap_while(meanwhile)?;
        self.result_of(nr, &after)
    }

    /// [`Remote::raw`] through system call stops (`PTRACE_SYSCALL`) rather than a single
    /// step: it makes no trap signal (see [`Tracee::set_trap_ignored`]), but stops twice.
    pub fn raw_without_trap(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let pid = self.tracee.pid;
        self.tracee.set_regs(&self.call_regs(nr, args))?;
        let syscall = |pid| ptrace::syscall(pid, None);
        // (Into the call, then out of it.)
        for _ in 0..2 {
            syscall(pid).with_context(|| format!("resuming {pid}"))?;
            self.tracee
                .wait_own_trap(syscall, |status| gone(pid, &status))?;
        }
        let after = self.tracee.regs()?;
        self.result_of(nr, &after)
    }

    /// After a process's calls, where it ignores SIGTRAP: ignores it again (the traps that
    /// end dolly's calls are SIGTRAPs the kernel forces, and forcing a signal a process
    /// ignores sets it back to its default action, keeping its flags and mask). Only
    /// through system call stops (see [`Remote::raw_without_trap`]); the action goes
    /// through 32 bytes of the stack under `sp` (below its red zone), put back after. An
    /// action not at its default (the process set one meanwhile) is left as it is.
    pub fn ignore_trap_again(&mut self, sp: u64) -> Result<()> {
        const ACTION_LEN: usize = 32;
        let at = (sp - 128 - ACTION_LEN as u64) & !15;
        let mut kept = [0u8; ACTION_LEN];
        self.read_mem(at, &mut kept)?;
        let sigtrap = libc::SIGTRAP as u64;
        let mut action = [0u8; ACTION_LEN];
        let step = |remote: &mut Self, new: u64, old: u64| -> Result<()> {
            let rc = remote.raw_without_trap(libc::SYS_rt_sigaction, &[sigtrap, new, old, 8])?;
            if rc < 0 {
                return Err(Error::sys(
                    "ignoring SIGTRAP again",
                    Errno::from_raw(-rc as i32),
                ));
            }
            Ok(())
        };
        let set = step(self, 0, at)
            .and_then(|()| self.read_mem(at, &mut action))
            .and_then(|()| {
                // (The handler comes first: SIG_DFL is 0, SIG_IGN 1.)
                if action[..8] != 0u64.to_ne_bytes() {
                    return Ok(());
                }
                action[..8].copy_from_slice(&1u64.to_ne_bytes());
                self.write_mem(at, &action)?;
                step(self, at, 0)
            });
        let put_back = self.write_mem(at, &kept);
        set.and(put_back)
    }

    /// The registers that make the tracee run syscall `nr` with `args`, from the `syscall`
    /// instruction at [`Remote`]'s `ip`.
    fn call_regs(&self, nr: i64, args: &[u64]) -> RawRegs {
        let mut regs = self.base;
        regs.rip = self.ip;
        regs.rax = nr as u64;
        // Not in a syscall: keeps the kernel from "restarting" anything on resume.
        regs.orig_rax = u64::MAX;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        regs.rdi = a[0];
        regs.rsi = a[1];
        regs.rdx = a[2];
        regs.r10 = a[3];
        regs.r8 = a[4];
        regs.r9 = a[5];
        // Clear the trap flag so the program's own single-stepping does not interfere.
        regs.eflags &= !0x100;
        regs
    }

    /// The result of syscall `nr`, from the registers `after` it; an error unless the
    /// tracee stopped right after the `syscall` instruction.
    fn result_of(&self, nr: i64, after: &RawRegs) -> Result<i64> {
        if after.rip != self.ip + 2 {
            return Err(Error::new(
                ErrorKind::System,
                format!(
                    "remote syscall {nr} in {} stopped at {:#x}, not after the syscall instruction at {:#x}",
                    self.tracee.pid, after.rip, self.ip
                ),
            ));
        }
        Ok(after.rax as i64)
    }

    /// After a `clone` with [`FORK_HELD_ARGS`] run inside the tracee among a batch of calls
    /// returned `made`: the child's PID
    /// (a failed `clone` is an error naming it). The child starts stopped (a child of a
    /// seized tracee) and is dolly's to take over ([`take_fork`]), at once or after the
    /// thaw.
    pub fn fork_made(&self, made: i64) -> Result<Pid> {
        if made <= 0 {
            return Err(Error::sys(
                format!("forking process {} from inside it", self.tracee.pid),
                Errno::from_raw(if made < 0 { -made as i32 } else { libc::EIO }),
            ));
        }
        Ok(Pid::from_raw(made as i32))
    }

    /// Maps a page for [`Remote::run`]'s code inside the tracee (read and execute only: it
    /// is written through /proc/PID/mem, so a process that denies writable-executable memory
    /// can run it too). Unmap it with `munmap(addr, 4096)` when done.
    pub fn map_call_runner(&mut self) -> Result<u64> {
        let page = self.call(
            "mapping dolly's code page",
            libc::SYS_mmap,
            &[
                0,
                crate::sys::PAGE_SIZE,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        self.write_call_runner(page)?;
        Ok(page)
    }

    /// Writes [`Remote::run`]'s code at `at`, in executable memory of the tracee (through
    /// /proc/PID/mem, which writes whatever the protection).
    pub fn write_call_runner(&self, at: u64) -> Result<()> {
        self.write_mem(at, &RUN_CALLS)
    }

    /// Spreads a [`Net`] at `at` ([`Net::LEN`] bytes of the tracee's writable memory) for a
    /// batch this thread runs through the code at `runner`: writes the frame that returns
    /// it to `state` (its own registers, mask and extended state) and the handler's action.
    /// `saved`: the process's own SIGTRAP action, if known (else the batch saves it: see
    /// [`Net::add_install`]). `count`: where the count of the threads under nets is (8
    /// bytes of the tracee's writable memory), which the caller sets (see
    /// [`Remote::count_nets`]) before any of their batches starts.
    pub fn spread_net(
        &self,
        at: u64,
        runner: u64,
        state: sys::sigframe::ThreadState<'_>,
        saved: Option<&[u8; SIGACTION_LEN as usize]>,
        count: u64,
    ) -> Result<Net> {
        let net = Net::at(at);
        let mut frame = sys::sigframe::rt_sigframe(net.frame, state);
        let handler = Net::handler(runner);
        let action = [
            handler,
            (libc::SA_SIGINFO | SA_RESTORER) as u64,
            // (Never returned to: the handler ends in `rt_sigreturn`.)
            runner + RUN_CALLS.len() as u64 - 2,
            u64::MAX,
        ];
        let mut put = |at: u64, bytes: &[u8]| {
            let at = (at - net.frame) as usize;
            frame[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let not_saved = [u64::MAX.to_ne_bytes(), [0; 8], [0; 8], [0; 8]].concat();
        put(net.saved_action(), saved.map_or(&not_saved[..], |s| &s[..]));
        put(net.action(), &action.map(u64::to_ne_bytes).concat());
        put(net.count_address(), &count.to_ne_bytes());
        self.write_mem(net.frame, &frame)?;
        Ok(net)
    }

    /// Keeps a copy of the process's own SIGTRAP action `action` beside dolly's code at
    /// `runner`, for the nets' handler to put back should it run on a SIGTRAP of the
    /// process's own (see [`RUN_CALLS`]).
    pub fn keep_trap_action(&self, runner: u64, action: &[u8]) -> Result<()> {
        self.write_mem(kept_trap_action(runner), action)
    }

    /// Sets the count at `count` of the threads whose batches are about to run under nets
    /// (see [`Remote::spread_net`]) to `threads`: should dolly end, the handler of the last
    /// of them to run puts the process's SIGTRAP action back. (One counted whose handler
    /// never runs leaves the action to a later dolly: see `capture::leftovers`.)
    pub fn count_nets(&self, count: u64, threads: u64) -> Result<()> {
        self.write_mem(count, &threads.to_ne_bytes())
    }

    /// Takes a [`Net`] in once the batch under it is over (this thread stopped at its end):
    /// puts the process's own SIGTRAP action back, with a call run through the `syscall`
    /// instruction (if the batch saved none, it did not install the net's). Until it is
    /// back, a SIGTRAP would run the net's handler.
    pub fn take_net_in(&mut self, net: &Net) -> Result<()> {
        let mut handler = [0u8; 8];
        self.read_mem(net.saved_action(), &mut handler)?;
        if u64::from_ne_bytes(handler) == u64::MAX {
            return Ok(());
        }
        self.call(
            "putting the process's SIGTRAP action back",
            libc::SYS_rt_sigaction,
            &[libc::SIGTRAP as u64, net.saved_action(), 0, 8],
        )
        .map(drop)
    }

    /// Runs every call of `calls` inside the tracee with a single stop, through the code
    /// page `runner` ([`Remote::map_call_runner`]) and a table at `table` (writable, at
    /// least [`Calls::table_len`] bytes). Returns each call's raw result (negative errno on
    /// failure). The tracee must block the signals [`CALLS_MASK`] blocks.
    pub fn run(&mut self, calls: &Calls, runner: u64, table: u64) -> Result<Vec<i64>> {
        self.start_run(calls, runner, table, None)?;
        self.finish_run(calls.list.len(), runner, table)
    }

    /// The first half of [`Remote::run`]: writes the table and lets the tracee run the
    /// calls, without waiting for them ([`Remote::finish_run`] does). The threads of a
    /// process can so run theirs at the same time. Under `net` (spread for this thread,
    /// its install among the calls), the calls run on the net's stack.
    pub fn start_run(
        &mut self,
        calls: &Calls,
        runner: u64,
        table: u64,
        net: Option<&Net>,
    ) -> Result<()> {
        let mut raw = Vec::with_capacity(calls.table_len() as usize);
        for (nr, args) in &calls.list {
            raw.extend_from_slice(&nr.to_ne_bytes());
            for a in args {
                raw.extend_from_slice(&a.to_ne_bytes());
            }
            raw.extend_from_slice(&0u64.to_ne_bytes());
        }
        raw.extend_from_slice(&(-1i64).to_ne_bytes());
        raw.resize(calls.table_len() as usize, 0);
        self.write_mem(table, &raw)?;
        let mut regs = self.base;
        regs.rip = runner;
        regs.rbx = table;
        if let Some(net) = net {
            regs.rsp = net.rsp();
        }
        regs.orig_rax = u64::MAX;
        regs.eflags &= !0x100;
        self.tracee.set_regs(&regs)?;
        let pid = self.tracee.pid;
        ptrace::cont(pid, None).with_context(|| format!("resuming {pid}"))
    }

    /// The result of call `index` of the table at `table` that [`Remote::start_run`] wrote,
    /// as it is now (0 if the call was not reached); `None` if it cannot be read. For a run
    /// that did not end where it should.
    pub fn run_result(&self, table: u64, index: usize) -> Option<i64> {
        let mut word = [0u8; 8];
        self.read_mem(table + index as u64 * 64 + 56, &mut word)
            .ok()
            .map(|()| i64::from_ne_bytes(word))
    }

    /// The second half of [`Remote::run`]: waits until the `count` calls
    /// [`Remote::start_run`] started (through `runner`, with the table at `table`) are
    /// done, and returns their raw results.
    pub fn finish_run(&mut self, count: usize, runner: u64, table: u64) -> Result<Vec<i64>> {
        let pid = self.tracee.pid;
        let done = runner + RUN_CALLS_TRAP;
        self.tracee.wait_own_trap(
            |pid| ptrace::cont(pid, None),
            |other| {
                Error::new(
                    ErrorKind::System,
                    format!("dolly's system calls in {pid} were interrupted: {other:?}"),
                )
            },
        )?;
        let at = self.tracee.regs()?.rip;
        if at != done {
            return Err(Error::new(
                ErrorKind::System,
                format!("dolly's system calls in {pid} stopped at {at:#x}, not at {done:#x}"),
            ));
        }
        let mut out = vec![0u8; count * 64];
        self.read_mem(table, &mut out)?;
        Ok(out
            .chunks_exact(64)
            .map(|e| i64::from_ne_bytes(e[56..64].try_into().unwrap()))
            .collect())
    }

    /// Runs syscall `nr`; a negative result becomes an error saying `what` failed.
    pub fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        self.call_while(what, nr, args, || {})
    }

    /// [`Remote::call`], doing `meanwhile` while the call runs (see [`Remote::raw_while`]).
    pub fn call_while(
        &mut self,
        what: &str,
        nr: i64,
        args: &[u64],
        meanwhile: impl FnOnce(),
    ) -> Result<u64> {
        let rc = self.raw_while(nr, args, meanwhile)?;
        if (-4095..0).contains(&rc) {
            return Err(Error::sys(
                format!("{what} (inside process {})", self.tracee.pid),
                Errno::from_raw(-rc as i32),
            ));
        }
        Ok(rc as u64)
    }

    /// Reads the tracee's memory.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.tracee.read_mem(addr, buf)
    }

    /// Writes the tracee's memory.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.tracee.write_mem(addr, data)
    }
}

/// Takes over `child`, the fork a tracee made with [`FORK_HELD_ARGS`] ([`Remote::fork_made`]):
/// waits for its first stop (it never runs an instruction before it) and has it killed should
/// dolly end (until then, let go, a fork made by a batch of calls ends itself: see
/// [`RUN_CALLS`]). If that fails, the child is killed and its end
/// waited for; its parent must still reap it.
pub fn take_fork(child: Pid) -> Result<Tracee> {
    let first = loop {
        match waitpid(child, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            other => break other.with_context(|| format!("waiting for {child}")),
        }
    };
    let held = first.and_then(|first| {
        match first {
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP)
            | WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
            other => return Err(gone(child, &other)),
        }
        let held = Tracee::open(child, OnDrop::Kill)?;
        held.set_options(ptrace::Options::PTRACE_O_EXITKILL)?;
        Ok(held)
    });
    if held.is_err() {
        let _ = kill_traced(child);
    }
    held
}

/// Kills `pid`, a process dolly traces, and waits for its end (which its parent then reaps).
pub fn kill_traced(pid: Pid) -> Result<()> {
    // (Its exit, which tears down its memory, on dolly's CPU, not on its parent's.)
    let _ = crate::sys::process::move_to_this_cpu(pid);
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(()),
            // Stops reported before the kill took effect.
            Err(Errno::EINTR) | Ok(_) => continue,
            // Its end was already waited for.
            Err(Errno::ECHILD) => return Ok(()),
            Err(e) => return Err(Error::sys(format!("waiting for the end of {pid}"), e)),
        }
    }
}

/// Finds the offset of a `syscall` instruction in a vDSO image: the `mov $nr, %eax;
/// syscall` of a vDSO function's fallback path (clock_gettime, gettimeofday, getres, time),
/// so the two bytes are known to be an instruction and not the middle of one.
pub fn find_syscall_in_vdso(vdso: &[u8]) -> Option<u64> {
    let numbers = [
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_clock_getres,
        libc::SYS_time,
    ];
    for nr in numbers {
        let mut pattern = vec![0xb8];
        pattern.extend_from_slice(&(nr as u32).to_le_bytes());
        pattern.extend_from_slice(&[0x0f, 0x05]);
        if let Some(pos) = vdso
            .windows(pattern.len())
            .position(|w| w == pattern.as_slice())
        {
            return Some((pos + 5) as u64);
        }
    }
    None
}

/// Offset, in this kernel's vDSO, of a `syscall` instruction (found once).
pub fn vdso_syscall_offset() -> Result<Option<u64>> {
    static OFFSET: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    if let Some(o) = OFFSET.get() {
        return Ok(*o);
    }
    let (_, bytes) = own_vdso()?;
    Ok(*OFFSET.get_or_init(|| find_syscall_in_vdso(&bytes)))
}

/// The vDSO of the calling process: its address and bytes.
pub fn own_vdso() -> Result<(u64, Vec<u8>)> {
    let maps = crate::proc::ProcDir::new(nix::unistd::getpid()).maps_without_flags()?;
    let vdso = maps.iter().find(|m| m.path == "[vdso]").ok_or_else(|| {
        Error::refused(
            "this process has no vDSO",
            "dolly needs the vDSO (do not boot with vdso=0)",
        )
    })?;
    let mut bytes = vec![0u8; vdso.len() as usize];
    // SAFETY: the vDSO is mapped readable in this process for its whole length.
    let src = unsafe { std::slice::from_raw_parts(vdso.start as *const u8, bytes.len()) };
    bytes.copy_from_slice(src);
    Ok((vdso.start, bytes))
}

/// The blocked-signal mask dolly's calls run with (bits 0..63): every signal but SIGTRAP
/// and those a fault raises (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS). The traps that end
/// the calls are SIGTRAPs the kernel forces, as is the signal of a call that faults (or
/// that a seccomp filter traps), and forcing a signal the thread blocks sets its action
/// back to the default (a process's own handler would be lost); unblocked, the signal
/// stops the thread for dolly and is never delivered.
pub const CALLS_MASK: u64 = !(bit(libc::SIGTRAP)
    | bit(libc::SIGSEGV)
    | bit(libc::SIGBUS)
    | bit(libc::SIGILL)
    | bit(libc::SIGFPE)
    | bit(libc::SIGSYS));

/// `SA_RESTORER`: the action gives the code a handler returns to (required on x86-64).
const SA_RESTORER: libc::c_int = 0x0400_0000;

/// Signal `sig`'s bit in a signal mask.
const fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// Whether signal set `ignored` (`SigIgn` of a process's status, or its `stat`) has
/// SIGTRAP.
pub fn ignores_trap(ignored: u64) -> bool {
    ignored & bit(libc::SIGTRAP) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_syscall_in_own_vdso() {
        let (_, bytes) = own_vdso().unwrap();
        let off = find_syscall_in_vdso(&bytes).expect("a syscall instruction in the vDSO");
        assert_eq!(&bytes[off as usize..off as usize + 2], &[0x0f, 0x05]);
    }

    #[test]
    fn register_conversion_round_trips() {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut raw: RawRegs = unsafe { std::mem::zeroed() };
        raw.rip = 1;
        raw.fs_base = 2;
        raw.orig_rax = u64::MAX;
        raw.gs = 3;
        let back = regs_from_image(&regs_to_image(&raw));
        assert_eq!(
            (back.rip, back.fs_base, back.orig_rax, back.gs),
            (1, 2, u64::MAX, 3)
        );
    }
}
