//! Per-thread state: registers (general, FPU/vector, TLS bases), signal mask and queue,
//! alternate signal stack, rseq, robust futex list, clear_child_tid.

use crate::error::{Context, Result};
use crate::image::{AltStack, RobustList, Rseq, Thread};
use crate::sys::process::get_robust_list;
use crate::sys::ptrace::rseq_config;
use crate::tracee::{regs_from_image, regs_to_image, RawRegs, Remote, Tracee};

/// The kernel's "restart with the saved restart block" code (not visible to programs).
const ERESTART_RESTARTBLOCK: i64 = 516;

/// `RSEQ_FLAG_UNREGISTER`.
pub const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// If a thread was stopped inside an rseq critical section, moves it to the section's abort
/// handler and clears `rseq_cs`, as the kernel does on preemption. Done on the live thread
/// too, before dolly runs system calls in it: their returns would make the kernel clear
/// `rseq_cs` without an abort, and the section would run on as if never interrupted.
pub fn abort_rseq_section(tracee: &Tracee, regs: &mut RawRegs) -> Result<()> {
    let Some(rseq) = rseq_config(tracee.pid())
        .with_context(|| format!("reading the rseq registration of {}", tracee.pid()))?
    else {
        return Ok(());
    };
    let word = |tracee: &Tracee, addr: u64| -> Result<u64> {
        let mut b = [0u8; 8];
        tracee.read_mem(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    };
    // struct rseq: cpu_id_start u32, cpu_id u32, rseq_cs u64 ...
    let cs = word(tracee, rseq.pointer + 8)?;
    if cs == 0 {
        return Ok(());
    }
    // struct rseq_cs: version u32, flags u32, start_ip u64, post_commit_offset u64, abort_ip u64.
    let (start, len, abort) = (
        word(tracee, cs + 8)?,
        word(tracee, cs + 16)?,
        word(tracee, cs + 24)?,
    );
    if regs.rip >= start && regs.rip < start.saturating_add(len) {
        regs.rip = abort;
        tracee.set_regs(regs)?;
    }
    tracee.write_mem(rseq.pointer + 8, &0u64.to_ne_bytes())
}

/// What only code running inside the thread can read.
#[derive(Debug, Clone, Copy, Default)]
pub struct HiddenState {
    /// Alternate signal stack.
    pub altstack: AltStack,
    /// `set_tid_address` value.
    pub clear_child_tid: u64,
}

/// Captures a stopped thread. `regs` and `xstate` are its registers as found when it
/// stopped (before any remote call ran in it).
pub fn capture(
    tracee: &Tracee,
    regs: &RawRegs,
    xstate: Vec<u8>,
    sigmask: u64,
    hidden: HiddenState,
    ns_tids: Vec<i32>,
    comm: String,
) -> Result<Thread> {
    let tid = tracee.pid();
    let rseq = rseq_config(tid)
        .with_context(|| format!("reading the rseq registration of {tid}"))?
        .map(|r| Rseq {
            pointer: r.pointer,
            size: r.size,
            signature: r.signature,
            flags: r.flags,
        });
    let (head, len) =
        get_robust_list(tid).with_context(|| format!("reading the robust list of {tid}"))?;
    Ok(Thread {
        tid: tid.as_raw(),
        ns_tids,
        comm,
        regs: regs_to_image(regs),
        xstate: crate::image::Bytes(xstate),
        sigmask,
        pending: crate::resource::signals::pending(tid, false)?,
        altstack: hidden.altstack,
        rseq,
        robust_list: (head != 0).then_some(RobustList { head, len }),
        clear_child_tid: hidden.clear_child_tid,
    })
}

/// Gives a rebuilt thread back its kernel-side registrations: rseq, robust list,
/// clear_child_tid (its memory must already be in place).
pub fn restore_registrations(remote: &mut Remote, thread: &Thread) -> Result<()> {
    if let Some(r) = thread.rseq {
        remote.call(
            "registering rseq",
            libc::SYS_rseq,
            &[r.pointer, r.size as u64, r.flags as u64, r.signature as u64],
        )?;
    }
    if let Some(r) = thread.robust_list {
        remote.call(
            "setting the robust list",
            libc::SYS_set_robust_list,
            &[r.head, r.len],
        )?;
    }
    remote.call(
        "setting the thread id address",
        libc::SYS_set_tid_address,
        &[thread.clear_child_tid],
    )?;
    Ok(())
}

/// The registers to give a restored thread. A system call the freeze interrupted restarts
/// by itself when the thread resumes (the kernel sees `orig_rax` and the `-ERESTART*` code).
/// One that needs kernel state that died with the original (`-ERESTART_RESTARTBLOCK`: the
/// remaining time of a relative sleep, for one) returns `EINTR` instead; `nanosleep` has by
/// then stored the time left where the caller asked, and callers like `sleep` sleep on.
pub fn final_regs(thread: &Thread) -> RawRegs {
    let mut regs = regs_from_image(&thread.regs);
    if (regs.orig_rax as i64) >= 0 && regs.rax as i64 == -ERESTART_RESTARTBLOCK {
        regs.rax = (-libc::EINTR) as i64 as u64;
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERESTARTSYS: i64 = 512;

    fn thread_in_syscall(rax: i64) -> Thread {
        Thread {
            tid: 1,
            ns_tids: vec![1],
            comm: "t".into(),
            regs: crate::image::Registers {
                orig_rax: libc::SYS_clock_nanosleep as u64,
                rax: rax as u64,
                rip: 0x1002,
                ..Default::default()
            },
            xstate: Default::default(),
            sigmask: 0,
            pending: vec![],
            altstack: Default::default(),
            rseq: None,
            robust_list: None,
            clear_child_tid: 0,
        }
    }

    #[test]
    fn restart_block_becomes_eintr_others_restart() {
        let r = final_regs(&thread_in_syscall(-ERESTART_RESTARTBLOCK));
        assert_eq!(r.rax as i64, -(libc::EINTR as i64));
        let r = final_regs(&thread_in_syscall(-ERESTARTSYS));
        assert_eq!(r.rax as i64, -ERESTARTSYS);
        assert_eq!(r.orig_rax, libc::SYS_clock_nanosleep as u64);
    }
}
