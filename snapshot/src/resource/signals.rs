//! Signals: dispositions, queued (pending) signals with their `siginfo`.

use nix::unistd::Pid;

use crate::error::{Context, Result};
use crate::image::{QueuedSignal, SignalAction};
use crate::sys::process::KernelSigaction;
use crate::sys::ptrace::{peek_siginfo, SIGINFO_SIZE};
use crate::tracee::Remote;

/// Highest signal number.
pub const MAX_SIGNAL: i32 = 64;

/// Whether a signal's disposition can be changed (all but SIGKILL and SIGSTOP).
pub fn settable(signo: i32) -> bool {
    signo != libc::SIGKILL && signo != libc::SIGSTOP
}

/// The disposition to set for every settable signal: the captured one, or the default.
pub fn full_table(actions: &[SignalAction]) -> Vec<(i32, KernelSigaction)> {
    (1..=MAX_SIGNAL)
        .filter(|&s| settable(s))
        .map(|signo| {
            let a = actions
                .iter()
                .find(|a| a.signal == signo)
                .map(|a| KernelSigaction {
                    handler: a.handler,
                    flags: a.flags,
                    restorer: a.restorer,
                    mask: a.mask,
                })
                .unwrap_or_default();
            (signo, a)
        })
        .collect()
}

/// Reads the signals queued for a stopped thread (`shared`: for its whole process).
pub fn pending(tid: Pid, shared: bool) -> Result<Vec<QueuedSignal>> {
    let infos =
        peek_siginfo(tid, shared).with_context(|| format!("reading pending signals of {tid}"))?;
    Ok(infos
        .into_iter()
        .map(|info| QueuedSignal {
            signal: i32::from_ne_bytes(info[0..4].try_into().unwrap()),
            info: crate::image::Bytes(info.to_vec()),
        })
        .collect())
}

/// Takes every pending signal of a process being rebuilt (its thread's and its process's),
/// so that only the captured ones are queued again. `scratch` holds 24 writable bytes.
pub fn flush_pending(remote: &mut Remote, scratch: u64) -> Result<()> {
    let mut args = [0u8; 24];
    args[..8].copy_from_slice(&u64::MAX.to_ne_bytes()); // every signal; a zero timeout
    remote.write_mem(scratch, &args)?;
    for _ in 0..1024 {
        if remote.raw(libc::SYS_rt_sigtimedwait, &[scratch, 0, scratch + 8, 8])? < 0 {
            return Ok(());
        }
    }
    Ok(())
}

/// Queues signals again inside a process being rebuilt (its signals are blocked, so they
/// stay pending until its mask is restored): process-wide ones with `rt_sigqueueinfo`, a
/// thread's own with `rt_tgsigqueueinfo`. `scratch` holds 128 writable bytes.
pub fn queue(
    remote: &mut Remote,
    scratch: u64,
    tgid: i32,
    tid: Option<i32>,
    signals: &[QueuedSignal],
) -> Result<()> {
    for sig in signals {
        let mut info = [0u8; SIGINFO_SIZE];
        let n = sig.info.0.len().min(SIGINFO_SIZE);
        info[..n].copy_from_slice(&sig.info.0[..n]);
        remote.write_mem(scratch, &info)?;
        let what = format!("queueing signal {}", sig.signal);
        match tid {
            None => remote.call(
                &what,
                libc::SYS_rt_sigqueueinfo,
                &[tgid as u64, sig.signal as u64, scratch],
            )?,
            Some(tid) => remote.call(
                &what,
                libc::SYS_rt_tgsigqueueinfo,
                &[tgid as u64, tid as u64, sig.signal as u64, scratch],
            )?,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_table_covers_every_settable_signal_once() {
        let t = full_table(&[SignalAction {
            signal: 10,
            handler: 0x1234,
            flags: 4,
            restorer: 0x99,
            mask: 1,
        }]);
        assert_eq!(t.len(), 62);
        assert!(t
            .iter()
            .all(|(s, _)| *s != libc::SIGKILL && *s != libc::SIGSTOP));
        let usr1 = t.iter().find(|(s, _)| *s == 10).unwrap().1;
        assert_eq!(
            (usr1.handler, usr1.flags, usr1.restorer, usr1.mask),
            (0x1234, 4, 0x99, 1)
        );
        assert_eq!(
            t.iter().find(|(s, _)| *s == 2).unwrap().1,
            KernelSigaction::default()
        );
    }
}
