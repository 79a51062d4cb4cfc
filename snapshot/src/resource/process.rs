//! Process-wide state that is neither memory, files, signals nor credentials: resource
//! limits, interval timers, `prctl` flags and the kernel's address-space layout fields.

use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::image::{ITimer, ITimers, MmLayout, ProcessFlags, Rlimit, Scheduling};
use crate::proc::Stat;
use crate::sys::process::{get_rlimit, set_rlimit, Rlimit as SysRlimit};
use crate::tracee::Remote;

/// Number of `RLIMIT_*` resources.
const RLIMIT_COUNT: u32 = 16;

/// Parses `/proc/PID/limits`: one line per `RLIMIT_*`, in resource order, with the soft and
/// hard limits in fixed-width columns. (`prlimit` would need CAP_SYS_RESOURCE to read
/// another user's process.)
pub fn parse_limits(text: &str) -> Result<Vec<Rlimit>> {
    let bad = |line: &str| {
        Error::new(
            crate::ErrorKind::System,
            format!("unexpected /proc limits line {line:?}"),
        )
    };
    let value = |s: &str, line: &str| -> Result<Option<u64>> {
        match s.trim() {
            "unlimited" => Ok(None),
            v => v.parse().map(Some).map_err(|_| bad(line)),
        }
    };
    text.lines()
        .skip(1)
        .take(RLIMIT_COUNT as usize)
        .enumerate()
        .map(|(resource, line)| {
            let soft = line.get(26..47).ok_or_else(|| bad(line))?;
            let hard = line.get(47..68).unwrap_or(&line[47.min(line.len())..]);
            Ok(Rlimit {
                resource: resource as u32,
                soft: value(soft, line)?,
                hard: value(hard, line)?,
            })
        })
        .collect()
}

/// Reads every resource limit of a process.
pub fn capture_rlimits(proc: &crate::proc::ProcDir) -> Result<Vec<Rlimit>> {
    let limits = parse_limits(&proc.read("limits")?)?;
    if limits.len() != RLIMIT_COUNT as usize {
        return Err(Error::new(
            crate::ErrorKind::System,
            format!(
                "/proc/{}/limits lists {} limits, expected {RLIMIT_COUNT}",
                proc.pid(),
                limits.len()
            ),
        ));
    }
    Ok(limits)
}

/// Sets the resource limits of a process being rebuilt (from dolly, before its credentials
/// change). A hard limit above dolly's own cannot be set without CAP_SYS_RESOURCE.
pub fn restore_rlimits(pid: Pid, limits: &[Rlimit]) -> Result<()> {
    for l in limits {
        let want = SysRlimit {
            soft: l.soft.unwrap_or(libc::RLIM_INFINITY),
            hard: l.hard.unwrap_or(libc::RLIM_INFINITY),
        };
        set_rlimit(pid, l.resource, want).map_err(|e| {
            let own = get_rlimit(Pid::from_raw(0), l.resource).map(|r| r.hard).unwrap_or(0);
            Error::refused(
                format!(
                    "cannot give the process its resource limit {} (soft {:?}, hard {:?}; dolly's hard limit is {own}): {e}",
                    l.resource, l.soft, l.hard
                ),
                "run dolly with hard limits at least as high as the process had (ulimit -H), or as a user with CAP_SYS_RESOURCE",
            )
        })?;
    }
    Ok(())
}

/// An `ITimer` from a `struct itimerval` (two timevals) as the kernel writes it.
pub fn read_timeval_pair(raw: &[u8]) -> ITimer {
    let w = |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
    ITimer {
        interval_us: w(0) * 1_000_000 + w(1),
        value_us: w(2) * 1_000_000 + w(3),
    }
}

fn timeval_pair(t: &ITimer) -> [u8; 32] {
    let mut out = [0u8; 32];
    let words = [
        t.interval_us / 1_000_000,
        t.interval_us % 1_000_000,
        t.value_us / 1_000_000,
        t.value_us % 1_000_000,
    ];
    for (i, w) in words.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

/// Arms the interval timers inside a process being rebuilt (`scratch`: 32 bytes).
pub fn restore_itimers(remote: &mut Remote, scratch: u64, t: &ITimers) -> Result<()> {
    for (which, timer) in [
        (libc::ITIMER_REAL, &t.real),
        (libc::ITIMER_VIRTUAL, &t.virtual_),
        (libc::ITIMER_PROF, &t.prof),
    ] {
        if timer.value_us == 0 && timer.interval_us == 0 {
            continue;
        }
        // A periodic timer that has fired reads as 0 until its signal is taken (the kernel
        // re-arms it then); that signal is among the pending ones. Arm it for the next
        // period, as the kernel would have: 0 would disarm it.
        let mut timer = *timer;
        if timer.value_us == 0 {
            timer.value_us = timer.interval_us;
        }
        remote.write_mem(scratch, &timeval_pair(&timer))?;
        remote.call(
            "arming an interval timer",
            libc::SYS_setitimer,
            &[which as u64, scratch, 0],
        )?;
    }
    Ok(())
}

/// Reads how the scheduler treats a process, and its OOM score adjustment.
pub fn capture_sched(proc: &crate::proc::ProcDir, stat: &Stat) -> Result<(Scheduling, i32)> {
    let pid = proc.pid();
    let (policy, priority) = crate::sys::process::get_scheduler(pid)
        .map_err(|e| Error::sys(format!("reading the scheduling policy of {pid}"), e))?;
    let affinity = crate::sys::process::get_affinity(pid)
        .map_err(|e| Error::sys(format!("reading the CPU affinity of {pid}"), e))?;
    let io_priority = crate::sys::process::get_io_priority(pid)
        .map_err(|e| Error::sys(format!("reading the I/O priority of {pid}"), e))?;
    let oom = proc.read("oom_score_adj")?.trim().parse().unwrap_or(0);
    Ok((
        Scheduling {
            policy,
            priority,
            nice: stat.nice,
            affinity,
            io_priority,
        },
        oom,
    ))
}

/// The affinity to give a restored process: the captured CPUs that exist here, or all of
/// them if none does.
pub fn usable_affinity(wanted: &[u64]) -> Vec<u64> {
    let here = crate::sys::process::get_affinity(Pid::from_raw(0)).unwrap_or_default();
    let both: Vec<u64> = here
        .iter()
        .enumerate()
        .map(|(i, w)| w & wanted.get(i).copied().unwrap_or(0))
        .collect();
    if both.iter().all(|&w| w == 0) {
        here
    } else {
        both
    }
}

/// Reads which memory a core dump of the process includes.
pub fn capture_coredump_filter(proc: &crate::proc::ProcDir) -> Result<u32> {
    let text = proc.read("coredump_filter")?;
    u32::from_str_radix(text.trim(), 16).map_err(|_| {
        Error::new(
            crate::ErrorKind::System,
            format!("bad coredump_filter {text:?}"),
        )
    })
}

/// Gives a process being rebuilt its core dump filter (from dolly).
pub fn restore_coredump_filter(pid: Pid, value: u32) -> Result<()> {
    std::fs::write(
        format!("/proc/{pid}/coredump_filter"),
        format!("{value:#x}"),
    )
    .map_err(|e| Error::io(format!("setting the core dump filter of {pid}"), e))
}

/// Gives a process being rebuilt its OOM score adjustment (from dolly).
pub fn restore_oom_score_adj(pid: Pid, value: i32) -> Result<()> {
    let path = format!("/proc/{pid}/oom_score_adj");
    let current: i32 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if current == value {
        return Ok(());
    }
    std::fs::write(&path, value.to_string()).map_err(|e| {
        Error::refused(
            format!("cannot set the process's oom_score_adj to {value} (dolly's is {current}): {e}"),
            "lowering oom_score_adj needs CAP_SYS_RESOURCE: run dolly with it, or with an oom_score_adj at most the process's",
        )
    })
}

/// The layout fields of a process, from its stat line, program break and auxv.
pub fn mm_layout(stat: &Stat, brk: u64, auxv: Vec<u64>) -> MmLayout {
    MmLayout {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv,
    }
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP)` inside a process being rebuilt: sets the layout fields
/// (so /proc/PID/cmdline, environ, auxv, brk and exe read as before). `scratch` must hold
/// 104 bytes plus the auxv.
pub fn set_mm_map(
    remote: &mut Remote,
    scratch: u64,
    mm: &MmLayout,
    exe_fd: Option<i32>,
) -> Result<()> {
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    const MAP_SIZE: u64 = 104;
    let auxv_addr = scratch + MAP_SIZE;
    let mut buf = Vec::with_capacity(MAP_SIZE as usize + mm.auxv.len() * 8);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_addr,
    ] {
        buf.extend_from_slice(&w.to_ne_bytes());
    }
    buf.extend_from_slice(&((mm.auxv.len() * 8) as u32).to_ne_bytes());
    buf.extend_from_slice(&exe_fd.map_or(u32::MAX, |fd| fd as u32).to_ne_bytes());
    for w in &mm.auxv {
        buf.extend_from_slice(&w.to_ne_bytes());
    }
    remote.write_mem(scratch, &buf)?;
    remote.call(
        "setting the address-space layout (PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, scratch, MAP_SIZE],
    )?;
    Ok(())
}

/// Gives back `PR_SET_DUMPABLE` (after the credentials, which reset it).
pub fn restore_dumpable(remote: &mut Remote, flags: &ProcessFlags) -> Result<()> {
    if flags.dumpable <= 1 {
        remote.call(
            "setting the dumpable flag",
            libc::SYS_prctl,
            &[libc::PR_SET_DUMPABLE as u64, flags.dumpable as u64],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeval_pairs_round_trip() {
        let t = ITimer {
            interval_us: 2_500_000,
            value_us: 17,
        };
        assert_eq!(read_timeval_pair(&timeval_pair(&t)), t);
    }

    fn finite(v: u64) -> Option<u64> {
        (v != libc::RLIM_INFINITY).then_some(v)
    }

    #[test]
    fn reads_own_limits_as_prlimit_does() {
        let me = crate::proc::ProcDir::new(nix::unistd::getpid());
        let limits = capture_rlimits(&me).unwrap();
        assert_eq!(limits.len(), RLIMIT_COUNT as usize);
        for l in &limits {
            let want = get_rlimit(Pid::from_raw(0), l.resource).unwrap();
            assert_eq!(
                (l.soft, l.hard),
                (finite(want.soft), finite(want.hard)),
                "resource {}",
                l.resource
            );
        }
    }
}
