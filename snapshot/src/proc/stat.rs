//! `/proc/PID/stat`.

use crate::error::{Error, ErrorKind, Result};

/// The fields of `/proc/PID/stat` dolly uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stat {
    /// Process id.
    pub pid: i32,
    /// Command name (up to 15 bytes).
    pub comm: String,
    /// Scheduler state letter (R, S, D, T, t, Z, ...).
    pub state: char,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// Controlling terminal device number (0: none).
    pub tty_nr: u32,
    /// Kernel `PF_*` flags.
    pub flags: u32,
    /// Nice value (-20..19).
    pub nice: i32,
    /// Number of threads.
    pub num_threads: u32,
    /// Start of the program text.
    pub start_code: u64,
    /// End of the program text.
    pub end_code: u64,
    /// Bottom (highest address) of the main stack at exec.
    pub start_stack: u64,
    /// Start of the initialized data.
    pub start_data: u64,
    /// End of the initialized data.
    pub end_data: u64,
    /// Start of the heap (brk area).
    pub start_brk: u64,
    /// Start of the argument strings.
    pub arg_start: u64,
    /// End of the argument strings.
    pub arg_end: u64,
    /// Start of the environment strings.
    pub env_start: u64,
    /// End of the environment strings.
    pub env_end: u64,
    /// Exit status (for zombies).
    pub exit_code: i32,
    /// When it started, in clock ticks after boot.
    pub start_time: u64,
    /// The signal its parent gets when it ends (0: none, a "clone" child).
    pub exit_signal: i32,
    /// The signals it ignores (bit `n - 1` for signal `n`).
    pub sig_ignored: u64,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and parentheses, so it is
/// taken between the first `(` and the last `)`.
pub fn parse_stat(text: &str) -> Result<Stat> {
    let bad = || {
        Error::new(
            ErrorKind::System,
            format!("unexpected /proc stat line {text:?}"),
        )
    };
    let open = text.find('(').ok_or_else(bad)?;
    let close = text.rfind(')').ok_or_else(bad)?;
    let pid = text[..open].trim().parse().map_err(|_| bad())?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    if rest.len() < 50 {
        return Err(bad());
    }
    // rest[i] is field i + 3 of proc(5).
    let num = |i: usize| -> Result<u64> { rest[i].parse::<u64>().map_err(|_| bad()) };
    let int = |i: usize| -> Result<i32> { rest[i].parse::<i32>().map_err(|_| bad()) };
    Ok(Stat {
        pid,
        comm,
        state: rest[0].chars().next().ok_or_else(bad)?,
        ppid: int(1)?,
        pgid: int(2)?,
        sid: int(3)?,
        tty_nr: num(4)? as u32,
        flags: num(6)? as u32,
        nice: int(16)?,
        num_threads: num(17)? as u32,
        start_code: num(23)?,
        end_code: num(24)?,
        start_stack: num(25)?,
        start_data: num(42)?,
        end_data: num(43)?,
        start_brk: num(44)?,
        arg_start: num(45)?,
        arg_end: num(46)?,
        env_start: num(47)?,
        env_end: num(48)?,
        exit_code: int(49)?,
        start_time: num(19)?,
        exit_signal: int(35)?,
        sig_ignored: num(30)?,
    })
}

/// Clock ticks per second, as [`Stat`] counts times (`USER_HZ`).
fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64
}

/// Clock ticks since boot now, as [`Stat::start_time`] counts them (0 if the clock cannot be
/// read).
pub fn boot_ticks_now() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    let per_second = ticks_per_second();
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        t.tv_sec() as u64 * per_second + t.tv_nsec() as u64 * per_second / 1_000_000_000
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_parens_and_spaces() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    123 4096 10 18446744073709551615 94000 95000 140000 0 0 0 0 4096 0 0 0 0 17 1 \
                    0 0 0 0 0 96000 97000 98000 141000 141100 141100 141200 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "we (ird) name");
        assert_eq!(s.state, 'S');
        assert_eq!((s.ppid, s.pgid, s.sid), (1, 4242, 4242));
        assert_eq!(s.num_threads, 1);
        assert_eq!((s.start_time, s.exit_signal), (123, 17));
        assert_eq!(s.sig_ignored, 4096);
        assert_eq!(
            (s.start_code, s.end_code, s.start_stack),
            (94000, 95000, 140000)
        );
        assert_eq!(
            (s.start_data, s.end_data, s.start_brk),
            (96000, 97000, 98000)
        );
        assert_eq!(
            (s.arg_start, s.arg_end, s.env_start, s.env_end),
            (141000, 141100, 141100, 141200)
        );
    }

    #[test]
    fn rejects_truncated_line() {
        assert!(parse_stat("1 (init) S 0").is_err());
    }

    #[test]
    fn boot_ticks_count_as_a_process_start_time_does() {
        let before = boot_ticks_now();
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let after = boot_ticks_now();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let started = crate::proc::ProcDir::new(pid).stat().map(|s| s.start_time);
        child.kill().unwrap();
        child.wait().unwrap();
        let started = started.unwrap();
        assert!(
            before <= started && started <= after,
            "started at {started}, not within [{before}, {after}]"
        );
    }
}
