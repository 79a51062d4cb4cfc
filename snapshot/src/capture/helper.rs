//! The helper thread: a thread dolly adds to a process it pre-copies, in the brief stop
//! that sets up write tracking, with dolly's scratch memory (mapped then, kept until the
//! capture is over). It never runs the process's code: it stays stopped under dolly's
//! ptrace and runs only dolly's system calls, outside the process's stops. It makes the
//! userfaultfd that tracks the process's writes (from a file table of its own: the process
//! never sees that fd), and, at the final freeze, the copy-on-write fork (see `cow`) while
//! the process's leader runs dolly's queries: the fork is the helper's child, so the
//! helper reaps it, and the process is not stopped again for that. Let go (dolly ended),
//! the helper ends itself: its registers always lead to `exit`.

use std::os::fd::OwnedFd;

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tracee::{self, RawRegs, Remote, Tracee};

/// Bytes of dolly's scratch memory before its code page (see [`Helper::runner`]).
pub const SCRATCH_LEN: u64 = 8 * crate::sys::PAGE_SIZE;

/// Where in the code page the helper's code is (after the call runner).
const STUB_AT: u64 = 64;

/// The helper's code: a system call, then `exit(0)` of the thread. The helper's calls run
/// through its `syscall` (through system call stops, no trap); their result found, the
/// thread is where `exit` comes next. A fork made there starts there too.
const STUB: [u8; 11] = [
    0x0f, 0x05, // syscall
    0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
    0x31, 0xff, // xor edi, edi
    0x0f, 0x05, // syscall
];

/// Where in the code page the bytes that tell the scratch memory is still dolly's are.
const COOKIE_AT: u64 = 2048;

/// Where in the code page the scratch memory's name is (see [`Helper::start`]).
const NAME_AT: u64 = 2048 + 64;

/// The scratch memory's name in the process's areas (`[anon:dolly-scratch]`): it tells
/// what it is, and keeps it from merging with an area of the process.
const NAME: &[u8] = b"dolly-scratch\0";

/// The `clone` flags of the helper: a thread of the process (sharing its memory and signal
/// actions, its file table until it takes one of its own), traced from its start.
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_FILES
    | libc::CLONE_PTRACE) as u64;

/// The `clone` flags of the fork: a process (a copy of the process's memory), traced from
/// its start, with a copy of the helper's (empty) file table, no signal at its end.
const FORK_FLAGS: u64 = libc::CLONE_PTRACE as u64;

/// The `clone` flags the helper waits with, armed (see [`Helper::arm`]): flags the kernel
/// refuses (shared signal actions without shared memory), so that an armed helper let go
/// (dolly ended) makes no fork.
const REFUSED_FLAGS: u64 = libc::CLONE_SIGHAND as u64;

/// `CLOSE_RANGE_UNSHARE`: `close_range` on a file table of the caller's own.
const CLOSE_RANGE_UNSHARE: u64 = 2;

/// What [`spawn`] made in the stopped process, for [`Helper::start`] once it runs on.
#[derive(Debug)]
pub struct Spawned {
    process: Pid,
    tid: Pid,
    scratch: u64,
    cookie: [u8; 16],
}

/// In the stop that sets up tracking, through `remote` (its process's stopped leader):
/// maps dolly's scratch memory (read, write and execute: a process denied such memory gets
/// no helper) with its code, and makes the helper thread.
pub fn spawn(remote: &mut Remote<'_>, process: Pid) -> Result<Spawned> {
    let page = crate::sys::PAGE_SIZE;
    let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let private = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let scratch = remote.call(
        "mapping dolly's scratch memory",
        libc::SYS_mmap,
        &[0, SCRATCH_LEN + page, rwx, private, u64::MAX, 0],
    )?;
    let code = scratch + SCRATCH_LEN;
    let cookie = cookie(scratch);
    let made = remote
        .write_call_runner(code)
        .and_then(|()| remote.write_mem(code + STUB_AT, &STUB))
        .and_then(|()| remote.write_mem(code + COOKIE_AT, &cookie))
        .and_then(|()| remote.write_mem(code + NAME_AT, NAME))
        .and_then(|()| {
            remote.set_syscall_ip(code + STUB_AT);
            remote.call(
                "making dolly's helper thread",
                libc::SYS_clone,
                &[THREAD_FLAGS, 0, 0, 0, 0],
            )
        });
    match made {
        Ok(tid) => Ok(Spawned {
            process,
            tid: Pid::from_raw(tid as i32),
            scratch,
            cookie,
        }),
        Err(e) => {
            let _ = remote.call(
                "unmapping dolly's scratch memory",
                libc::SYS_munmap,
                &[scratch, SCRATCH_LEN + page],
            );
            Err(e)
        }
    }
}

/// Bytes that tell dolly's scratch memory at `scratch` from anything the process may have
/// mapped there since.
fn cookie(scratch: u64) -> [u8; 16] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(now ^ 0x646f_6c6c_7920_7363).to_ne_bytes());
    bytes[8..].copy_from_slice(&(scratch ^ std::process::id() as u64).to_ne_bytes());
    bytes
}

/// A helper's scratch memory as noted beside its snapshot while the capture runs (see
/// [`HELPERS_FILE`]): should the capture be killed, the helper ends itself, but its
/// scratch memory stays in the process until [`remove_leftovers`] unmaps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScratchNote {
    /// The process.
    pub pid: i32,
    /// When it started (clock ticks after boot): tells it from a later process with its PID.
    pub start_time: u64,
    /// The scratch memory: `[start, end)`.
    pub start: u64,
    /// Its end.
    pub end: u64,
    /// The bytes that tell it is still dolly's.
    pub cookie: [u8; 16],
}

/// The file beside a snapshot's record that notes its capture's helpers' scratch memory.
pub const HELPERS_FILE: &str = "helpers.json";

/// Unmaps the scratch memory noted in `notes` from the processes it is still in (each
/// stopped briefly for that: one of its threads runs `munmap`); returns whether every note
/// is settled (its process gone, or the memory no longer dolly's, or unmapped).
pub fn remove_leftovers(notes: &[ScratchNote]) -> bool {
    let mut settled = true;
    for note in notes {
        let pid = Pid::from_raw(note.pid);
        let proc = crate::proc::ProcDir::new(pid);
        if !proc.stat().is_ok_and(|s| s.start_time == note.start_time) {
            continue;
        }
        let mut seen = [0u8; 16];
        let at = note.end - crate::sys::PAGE_SIZE + COOKIE_AT;
        let ours = std::fs::File::open(proc.path("mem"))
            .and_then(|mem| std::os::unix::fs::FileExt::read_exact_at(&mem, &mut seen, at))
            .is_ok_and(|()| seen == note.cookie);
        if !ours {
            continue;
        }
        let unmapped = Tracee::seize(pid).and_then(|mut thread| {
            // (Stopped: still dolly's?)
            let mut seen = [0u8; 16];
            if thread.read_mem(at, &mut seen).is_err() || seen != note.cookie {
                return thread.detach();
            }
            let ip = thread.vdso_syscall_ip(None)?;
            let done = thread.run_inside_as_is(ip, false, |remote| {
                remote
                    .call(
                        "unmapping dolly's scratch memory",
                        libc::SYS_munmap,
                        &[note.start, note.end - note.start],
                    )
                    .map(drop)
            });
            let detached = thread.detach();
            done.and(detached)
        });
        settled &= unmapped.is_ok();
    }
    settled
}

/// A process's helper thread, held stopped by dolly (see the module's documentation).
#[derive(Debug)]
pub struct Helper {
    process: Pid,
    thread: Option<Tracee>,
    scratch: u64,
    cookie: [u8; 16],
    /// Where the process's vDSO `syscall` instruction is (the helper's way out once the
    /// scratch memory is gone).
    vdso_ip: u64,
    /// Asked into the fork's `clone` ([`Helper::arm`]); waited for there once `entered`.
    armed: bool,
    entered: bool,
}

impl Helper {
    /// Once the process runs on after [`spawn`]: takes the helper thread over, gives it a
    /// file table of its own (empty), names the scratch memory, and makes the userfaultfd
    /// that tracks the process's writes inside it; returns the helper and dolly's copy of
    /// that userfaultfd (`flags` its flags). `vdso_ip`: the process's vDSO `syscall`
    /// instruction. On failure the helper is ended (and the scratch memory unmapped).
    pub fn start(spawned: Spawned, vdso_ip: u64, flags: u64) -> Result<(Helper, OwnedFd)> {
        let Spawned {
            process,
            tid,
            scratch,
            cookie,
        } = spawned;
        let thread = tracee::take_thread(tid)?;
        // Every signal blocked, SIGTRAP too: its calls run through system call stops (no
        // trap), and should dolly end while it is in one, the kernel sends it a SIGTRAP
        // that, blocked, goes with it when it exits (else it would end the process).
        thread.set_sigmask(!0)?;
        let mut helper = Helper {
            process,
            thread: Some(thread),
            scratch,
            cookie,
            vdso_ip,
            armed: false,
            entered: false,
        };
        helper.call(
            "giving dolly's helper thread a file table",
            libc::SYS_close_range,
            &[0, u32::MAX as u64, CLOSE_RANGE_UNSHARE],
        )?;
        let (start, end) = helper.scratch();
        let code = start + SCRATCH_LEN;
        // An area of its own, whatever memory of the process is next to it: with a flag
        // the process's memory lacks, it does not merge with it (mapped, it may have).
        helper.call(
            "setting dolly's scratch memory apart",
            libc::SYS_madvise,
            &[start, end - start, libc::MADV_NOHUGEPAGE as u64],
        )?;
        // (Not every kernel names anonymous memory: then it is only not named.)
        let _ = helper.call(
            "naming dolly's scratch memory",
            libc::SYS_prctl,
            &[
                libc::PR_SET_VMA as u64,
                libc::PR_SET_VMA_ANON_NAME as u64,
                start,
                end - start,
                code + NAME_AT,
            ],
        );
        let fd = helper.call("making a userfaultfd", libc::SYS_userfaultfd, &[flags])?;
        let ours = crate::sys::socket::borrow_thread_fd(tid, fd as i32)
            .map_err(|e| Error::sys("taking the userfaultfd", e));
        helper.call("closing the userfaultfd", libc::SYS_close, &[fd])?;
        Ok((helper, ours?))
    }

    /// What to note of it beside the snapshot while the capture runs (see [`ScratchNote`]).
    pub fn note(&self) -> ScratchNote {
        let (start, end) = self.scratch();
        ScratchNote {
            pid: self.process.as_raw(),
            start_time: crate::proc::ProcDir::new(self.process)
                .stat()
                .map_or(0, |s| s.start_time),
            start,
            end,
            cookie: self.cookie,
        }
    }

    /// Runs syscall `nr` in the helper (through system call stops); a negative result is
    /// an error saying `what` failed.
    fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        let rc = self.remote(self.stub())?.raw_without_trap(nr, args)?;
        if (-4095..0).contains(&rc) {
            return Err(Error::sys(
                format!("{what} (inside process {})", self.process),
                nix::errno::Errno::from_raw(-rc as i32),
            ));
        }
        Ok(rc as u64)
    }

    fn thread(&mut self) -> &mut Tracee {
        self.thread
            .as_mut()
            .expect("the helper thread, until it ends")
    }

    fn remote(&mut self, ip: u64) -> Result<Remote<'_>> {
        let thread = self.thread();
        let regs = thread.regs()?;
        Ok(thread.remote_with(ip, regs))
    }

    /// The helper's `syscall` instruction.
    fn stub(&self) -> u64 {
        self.scratch + SCRATCH_LEN + STUB_AT
    }

    /// The helper thread.
    pub fn tid(&self) -> Pid {
        self.thread.as_ref().map_or(self.process, Tracee::pid)
    }

    /// Dolly's scratch memory in the process: `[start, end)`.
    pub fn scratch(&self) -> (u64, u64) {
        (
            self.scratch,
            self.scratch + SCRATCH_LEN + crate::sys::PAGE_SIZE,
        )
    }

    /// Where the code that runs a batch of calls is ([`Remote::run`]), in the scratch
    /// memory's last page.
    pub fn runner(&self) -> u64 {
        self.scratch + SCRATCH_LEN
    }

    /// Whether the scratch memory is still dolly's (the process could have mapped over
    /// it), read through `thread` (a stopped thread of the process).
    pub fn intact(&self, thread: &Tracee) -> bool {
        let mut seen = [0u8; 16];
        thread
            .read_mem(self.runner() + COOKIE_AT, &mut seen)
            .is_ok_and(|()| seen == self.cookie)
    }

    /// Just before the final freeze: starts the helper into the fork's `clone` (it stops at
    /// its entry: [`Helper::fork_start`] gives the call its flags and lets it run), not
    /// waiting. Let go there (dolly ended), the call fails and the helper exits.
    pub fn arm(&mut self) -> Result<()> {
        let stub = self.stub();
        let thread = self.thread();
        let mut regs = thread.regs()?;
        regs.rip = stub;
        regs.rax = libc::SYS_clone as u64;
        regs.orig_rax = u64::MAX;
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8) = (REFUSED_FLAGS, 0, 0, 0, 0);
        thread.set_regs(&regs)?;
        // (The fork runs on another CPU than dolly, which reads the process's /proc files
        // meanwhile.)
        let _ = crate::sys::process::move_off_this_cpu(thread.pid());
        thread.to_syscall_stop()?;
        self.armed = true;
        Ok(())
    }

    /// Waits until the armed helper is at the entry of the fork's `clone`.
    fn entered(&mut self) -> Result<()> {
        if self.armed && !self.entered {
            let regs = self.thread().wait_syscall_stop()?;
            if regs.orig_rax != libc::SYS_clone as u64 {
                return Err(Error::new(
                    crate::error::ErrorKind::System,
                    format!(
                        "dolly's helper thread in {} stopped elsewhere",
                        self.process
                    ),
                ));
            }
            self.entered = true;
        }
        Ok(())
    }

    /// Lets the armed helper's `clone` run (the fork of the stopped process), not waiting
    /// for it ([`Helper::fork_finish`] does).
    pub fn fork_start(&mut self) -> Result<()> {
        self.entered()?;
        let thread = self.thread();
        let mut regs = thread.regs()?;
        regs.rdi = FORK_FLAGS;
        thread.set_regs(&regs)?;
        thread.to_syscall_stop()
    }

    /// Waits for the `clone` [`Helper::fork_start`] let run; returns its result (the
    /// fork's PID, or a negative errno).
    pub fn fork_finish(&mut self) -> Result<i64> {
        let regs = self.thread().wait_syscall_stop()?;
        self.armed = false;
        self.entered = false;
        Ok(regs.rax as i64)
    }

    /// The armed `clone` not wanted (no fork): skipped (the helper leaves its entry stop
    /// without running it).
    pub fn disarm(&mut self) -> Result<()> {
        if !self.armed {
            return Ok(());
        }
        self.entered()?;
        let thread = self.thread();
        let mut regs = thread.regs()?;
        regs.orig_rax = u64::MAX;
        thread.set_regs(&regs)?;
        thread.to_syscall_stop()?;
        thread.wait_syscall_stop()?;
        self.armed = false;
        self.entered = false;
        Ok(())
    }

    /// Reaps the helper's ended child `pid` (the fork).
    pub fn reap(&mut self, pid: i32) -> Result<()> {
        let flags = (libc::__WALL | libc::WNOHANG) as u64;
        let rc = self
            .remote(self.stub())?
            .raw_without_trap(libc::SYS_wait4, &[pid as u64, 0, flags, 0])?;
        if rc < 0 && rc != -(libc::ECHILD as i64) {
            return Err(Error::sys(
                "reaping dolly's fork of the process",
                nix::errno::Errno::from_raw(-rc as i32),
            ));
        }
        Ok(())
    }

    /// Ends the helper: unmaps the scratch memory (through the process's vDSO, not the
    /// code it unmaps) and lets the thread go to its `exit`.
    pub fn finish(mut self) -> Result<()> {
        self.end()
    }

    fn end(&mut self) -> Result<()> {
        if self.thread.is_none() {
            return Ok(());
        }
        let disarmed = self.disarm();
        let (start, end) = self.scratch();
        let vdso_ip = self.vdso_ip;
        let unmapped = self.remote(vdso_ip).and_then(|mut remote| {
            remote.raw_without_trap(libc::SYS_munmap, &[start, end - start])
        });
        // Right after (it is now in the vDSO's code): to its `exit`.
        let thread = self.thread.take().expect("checked above");
        let exits = thread.regs().and_then(|mut regs: RawRegs| {
            regs.rip = vdso_ip;
            regs.rax = libc::SYS_exit as u64;
            regs.orig_rax = u64::MAX;
            regs.rdi = 0;
            thread.set_regs(&regs)
        });
        let tid = thread.pid();
        let detached = thread.detach();
        let ended = disarmed.and(unmapped.map(drop)).and(exits).and(detached);
        if ended.is_err() {
            // (Its process ended: the helper is a zombie that only dolly, its tracer, can
            // reap, and the process is not done before it is.)
            use nix::sys::wait::{waitpid, WaitPidFlag};
            let _ = waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
        }
        ended
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.end();
    }
}
