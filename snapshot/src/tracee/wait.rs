//! How dolly waits for the stops of the threads it holds.
//!
//! A stop after a step or a system call comes within microseconds. On an idle machine,
//! dolly polls for it: blocking in `waitpid` lets its CPU go idle, and on a virtual machine
//! the host then has to wake that CPU (about 0.1 ms a time). Polling only pays while a CPU
//! is free for each of dolly and the process: on a busy machine, the thread dolly lets go
//! is often woken on dolly's own CPU, and a poll that yields it gives it nothing (the
//! scheduler picks dolly again), so a stop waits for a time slice (a 64 MiB freeze beside
//! one busy loop took 16 ms instead of 2). There, dolly blocks: its CPU passes straight to
//! the thread, and back to dolly at the stop. It blocks at once: even yielding for 0.1 ms
//! before blocking kept the CPU from the thread (4–9 ms, against 2.4–5.5 blocking at once).
//!
//! Which machine it is, dolly decides as each freeze (or the stop that reaps a fork)
//! begins, from the tasks runnable (`/proc/loadavg`: it polls if a CPU, of those dolly may
//! run on, is left for each of dolly and the process once the others have theirs; the
//! fewest of three looks 0.1 ms
//! apart, as this kernel counts a task that just went to sleep as runnable for a moment),
//! and learns it from the process too: a thread asked to stop that has not within
//! [`STOP_SOON`] and is runnable (a thread running on a CPU of its own stops within
//! 20–40 µs; one waiting for a CPU, only when it gets one) makes it block for the rest of
//! that freeze; one that is not (asleep, on a CPU slow to wake) for that wait only.
//! `DOLLY_WAIT=poll|block` decides instead.
//!
//! A blocking wait for a thread asked to stop still ends at the freeze's deadline: a timer
//! of dolly's thread interrupts it (a thread in uninterruptible sleep stops only when it
//! wakes, which may be never).

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{
    pthread_sigmask, sigaction, SaFlags, SigAction, SigEvent, SigHandler, SigSet, SigevNotify,
    SigmaskHow, Signal,
};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::time::ClockId;
use nix::unistd::Pid;

use crate::error::{Context, Error, Result};
use crate::proc::ProcDir;

thread_local! {
    /// Whether this thread polls for its tracees' stops (see the module's comment).
    static POLLING: Cell<bool> = const { Cell::new(true) };
    /// The timer that ends this thread's blocking waits at their deadline.
    static THREAD_TIMER: RefCell<ThreadTimer> = RefCell::new(ThreadTimer::default());
}

/// The environment variable that fixes how dolly waits: `poll` or `block`.
pub const WAIT_ENV: &str = "DOLLY_WAIT";

/// How long a thread asked to stop may take before dolly blocks for it (and, if it waits
/// for a CPU, takes the machine for a busy one: see the module's comment).
const STOP_SOON: Duration = Duration::from_micros(100);

/// How this thread waits for stops until dropped, from a freeze's start to its end (it
/// stays on the thread that began it).
#[derive(Debug)]
pub struct Waiting {
    was: bool,
    _this_thread: PhantomData<*const ()>,
}

impl Waiting {
    /// Begins a freeze's waits, before its first thread is asked to stop (`running`: the
    /// process's leader was running, so it is one of the tasks runnable): polling if the
    /// machine has a CPU free for dolly and one for the process, else blocking (or as
    /// `DOLLY_WAIT` says).
    pub fn begin(running: bool) -> Waiting {
        let polling = match std::env::var(WAIT_ENV).as_deref() {
            Ok("block") => {
                crate::checkpoint::mark("wait: blocking (DOLLY_WAIT)");
                false
            }
            Ok("poll") => true,
            _ => {
                let idle = machine_has_room(running);
                if !idle {
                    crate::checkpoint::mark("wait: blocking (no CPU free)");
                }
                idle
            }
        };
        Waiting {
            was: POLLING.with(|p| p.replace(polling)),
            _this_thread: PhantomData,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        POLLING.with(|p| p.set(self.was));
    }
}

/// Whether a CPU is left for each of dolly and the process once the other runnable tasks
/// have theirs (see the module's comment); yes if that cannot be read.
fn machine_has_room(running: bool) -> bool {
    let runnable = (0..3)
        .filter_map(|look| {
            if look > 0 {
                // (Spinning: the freeze that follows finds dolly's CPU as warm as before.)
                let until = Instant::now() + LOOKS_APART;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            runnable_tasks()
        })
        .min();
    match (runnable, usable_cpus()) {
        (Some(runnable), Some(cpus)) => polls(runnable, cpus, running),
        _ => true,
    }
}

/// How far apart [`machine_has_room`] looks at the tasks runnable.
const LOOKS_APART: Duration = Duration::from_micros(100);

/// Whether to poll with `runnable` tasks on the machine (dolly, reading, among them; and
/// the process's leader if `running`) and `cpus` CPUs: if a CPU is left for each of dolly
/// and the process once the others have theirs.
fn polls(runnable: u64, cpus: u64, running: bool) -> bool {
    let others = runnable.saturating_sub(1 + u64::from(running));
    others + 2 <= cpus
}

/// The tasks runnable on the machine now (the fourth field of `/proc/loadavg`).
fn runnable_tasks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let field = text.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

/// The CPUs dolly may run on (its affinity: a container's cpuset, `taskset`), at most those
/// online. (The tasks runnable are the machine's: with a cpuset, the rule errs towards
/// blocking.)
fn usable_cpus() -> Option<u64> {
    let online = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN).ok()??;
    let online = u64::try_from(online).ok()?;
    let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0))
        .ok()
        .map(|set| {
            let cpus = 0..nix::sched::CpuSet::count();
            cpus.filter(|&cpu| set.is_set(cpu).unwrap_or(false)).count() as u64
        });
    Some(allowed.filter(|&n| n > 0).map_or(online, |n| n.min(online)))
}

/// How long a freeze may wait for a thread to reach a stop.
pub(super) const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits for a thread asked to stop (interrupted, or moving out of a trap stop) to reach
/// its stop; fails at `deadline` (a thread in uninterruptible sleep stops only when it
/// wakes).
pub(super) fn wait_stop(pid: Pid, deadline: Instant) -> Result<WaitStatus> {
    // A stop usually comes within microseconds. Polling: poll without sleeping for a
    // while (yielding the CPU to the tracee); a thread still not stopped after STOP_SOON
    // makes dolly block, for the rest of the freeze if it waits for a CPU (see the
    // module's comment), else for this wait. Blocking: block until the deadline at once.
    // Should no alarm bound that, poll every 200 µs until the deadline instead.
    let asked = Instant::now();
    let mut polling = POLLING.with(Cell::get);
    let may_switch = std::env::var(WAIT_ENV).map_or(true, |v| v != "poll");
    let mut this_wait_blocks = !polling;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(not_stopped(pid));
                }
                let waited = now - asked;
                if polling && !this_wait_blocks && waited >= STOP_SOON && may_switch {
                    this_wait_blocks = true;
                    match ProcDir::new(pid).stat().map(|s| s.state) {
                        Ok('R') => {
                            polling = false;
                            POLLING.with(|p| p.set(false));
                            crate::checkpoint::mark(&format!(
                                "wait: blocking (process {pid} not stopped after {waited:?})"
                            ));
                        }
                        state => crate::checkpoint::mark(&format!(
                            "wait: blocking for this stop (process {pid} not stopped after \
                             {waited:?}, state {})",
                            state.map_or('?', |s| s)
                        )),
                    }
                }
                if !this_wait_blocks && waited < SPIN_FOR_STOP {
                    std::thread::yield_now();
                    continue;
                }
                if this_wait_blocks {
                    if let Some(waited) = block_until(pid, deadline) {
                        return waited;
                    }
                    this_wait_blocks = false;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(status) => return Ok(status),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(wait_failed(pid, e)),
        }
    }
}

/// How long [`wait_stop`] polls without sleeping (with `DOLLY_WAIT=poll`).
const SPIN_FOR_STOP: Duration = Duration::from_millis(2);

fn wait_failed(pid: Pid, e: Errno) -> Error {
    Error::sys(format!("waiting for process {pid} to stop"), e)
}

fn not_stopped(pid: Pid) -> Error {
    Error::refused(
        format!("process {pid} did not stop within {FREEZE_TIMEOUT:?}"),
        "it is probably in uninterruptible sleep (state D, e.g. on I/O or a hung mount); try again when it is not",
    )
}

/// Waits in `waitpid` for the next stop of `pid` until `deadline`, the wait interrupted
/// then by this thread's alarm; `None` if the alarm cannot be set (then poll instead).
fn block_until(pid: Pid, deadline: Instant) -> Option<Result<WaitStatus>> {
    let alarm = Alarm::set(deadline)?;
    let waited = loop {
        if Instant::now() >= deadline {
            // (One last look: a stop that came just then counts.)
            break match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => Err(not_stopped(pid)),
                Ok(status) => Ok(status),
                Err(e) => Err(wait_failed(pid, e)),
            };
        }
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            // The alarm (or another signal): the deadline is looked at again.
            Err(Errno::EINTR) => continue,
            Ok(status) => break Ok(status),
            Err(e) => break Err(wait_failed(pid, e)),
        }
    };
    drop(alarm);
    Some(waited)
}

/// The signal of the alarm: one nothing sends (a stack fault of the x87 coprocessor, unused
/// on x86-64), whose action, a handler that does nothing (and without `SA_RESTART`, so that
/// the wait it interrupts returns), dolly sets once, unless the program dolly runs in has
/// an action of its own for it (then there is no alarm).
const ALARM_SIGNAL: Signal = Signal::SIGSTKFLT;

extern "C" fn on_alarm(_: libc::c_int) {}

/// After this, the alarm rings again and again until it is taken down: one that rang just
/// before `waitpid` began to wait rings once more while it waits.
const RING_AGAIN: Duration = Duration::from_millis(10);

/// This thread's alarm, ringing from a deadline on until dropped; the signal unblocked
/// meanwhile in this thread.
struct Alarm {
    mask: Option<SigSet>,
}

impl Alarm {
    /// Sets the alarm to ring at `deadline`; `None` if it cannot be.
    fn set(deadline: Instant) -> Option<Alarm> {
        static HANDLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let handled = *HANDLED.get_or_init(|| {
            let ours = SigAction::new(
                SigHandler::Handler(on_alarm),
                SaFlags::empty(),
                SigSet::empty(),
            );
            // SAFETY: the handler does nothing, so it is safe whenever it runs.
            match unsafe { sigaction(ALARM_SIGNAL, &ours) } {
                Ok(was) if matches!(was.handler(), SigHandler::SigDfl) => true,
                Ok(was) => {
                    // (Not dolly's to take: put back.)
                    // SAFETY: the action the program had.
                    let _ = unsafe { sigaction(ALARM_SIGNAL, &was) };
                    false
                }
                Err(_) => false,
            }
        });
        if !handled {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        THREAD_TIMER.with(|t| {
            let mut t = t.borrow_mut();
            let timer = t.get()?;
            timer
                .set(
                    Expiration::IntervalDelayed(
                        TimeSpec::from_duration(left.max(Duration::from_nanos(1))),
                        TimeSpec::from_duration(RING_AGAIN),
                    ),
                    TimerSetTimeFlags::empty(),
                )
                .ok()
        })?;
        let mut unblock = SigSet::empty();
        unblock.add(ALARM_SIGNAL);
        let mut mask = SigSet::empty();
        let was_blocked = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&unblock), Some(&mut mask))
            .is_ok()
            && mask.contains(ALARM_SIGNAL);
        Some(Alarm {
            mask: was_blocked.then_some(mask),
        })
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        THREAD_TIMER.with(|t| {
            if let Some(timer) = t.borrow_mut().get() {
                let _ = timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(Duration::ZERO)),
                    TimerSetTimeFlags::empty(),
                );
            }
        });
        if let Some(mask) = self.mask {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
        }
    }
}

/// A thread's timer for its alarm, made on first use. A forked child inherits the thread's
/// copy of it but not the timer (a process's timers are its own): it makes its own, and
/// never deletes the parent's.
#[derive(Default)]
struct ThreadTimer {
    made: Option<(Timer, u32)>,
}

impl ThreadTimer {
    fn get(&mut self) -> Option<&mut Timer> {
        let me = std::process::id();
        if self.made.as_ref().is_some_and(|(_, by)| *by != me) {
            if let Some((inherited, _)) = self.made.take() {
                std::mem::forget(inherited);
            }
        }
        if self.made.is_none() {
            let to_this_thread = SigEvent::new(SigevNotify::SigevThreadId {
                signal: ALARM_SIGNAL,
                thread_id: nix::unistd::gettid().as_raw(),
                si_value: 0,
            });
            let timer = Timer::new(ClockId::CLOCK_MONOTONIC, to_this_thread).ok()?;
            self.made = Some((timer, me));
        }
        self.made.as_mut().map(|(timer, _)| timer)
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        if let Some((timer, by)) = self.made.take() {
            if by != std::process::id() {
                std::mem::forget(timer);
            }
        }
    }
}

/// How long [`wait_blocking`] polls before it sleeps: longer than the `clone` of a process
/// with 64 MiB of written memory takes (about 1 ms).
const SPIN_LIMIT: Duration = Duration::from_millis(4);

/// Waits for the next stop or end of `pid`, after a step, a system call or a batch of
/// them: polled for a while if this thread polls, then blocking.
pub(super) fn wait_blocking(pid: Pid) -> Result<WaitStatus> {
    if POLLING.with(Cell::get) {
        let spin_until = Instant::now() + SPIN_LIMIT;
        while Instant::now() < spin_until {
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => std::thread::yield_now(),
                other => return other.with_context(|| format!("waiting for {pid}")),
            }
        }
    }
    block(pid)
}

fn block(pid: Pid) -> Result<WaitStatus> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            other => return other.with_context(|| format!("waiting for {pid}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_with_a_cpu_left_for_dolly_and_the_process() {
        // Dolly alone, or with the running process, on 2 CPUs: both have one.
        assert!(polls(1, 2, false));
        assert!(polls(2, 2, true));
        // One other task running: on 2 CPUs, none is left; on 4, there is.
        assert!(!polls(3, 2, true));
        assert!(!polls(2, 2, false));
        assert!(polls(3, 4, true));
        // One CPU: never.
        assert!(!polls(1, 1, false));
    }

    #[test]
    fn counts_only_the_cpus_dolly_may_run_on() {
        let online = usable_cpus().unwrap();
        assert!(online >= 1);
        // A thread of its own, held to one CPU it may run on (as a cpuset or `taskset`
        // would).
        let pinned = std::thread::spawn(|| {
            let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
            let first = (0..nix::sched::CpuSet::count())
                .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
                .unwrap();
            let mut one = nix::sched::CpuSet::new();
            one.set(first).unwrap();
            nix::sched::sched_setaffinity(Pid::from_raw(0), &one).unwrap();
            usable_cpus()
        });
        assert_eq!(pinned.join().unwrap(), Some(1));
    }

    #[test]
    fn a_blocking_wait_ends_at_its_deadline() {
        // A child that stays asleep: no stop comes.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                std::thread::sleep(Duration::from_secs(30));
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let asked = Instant::now();
        let waited = block_until(child, asked + Duration::from_millis(100));
        let took = asked.elapsed();
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        let err = waited.expect("an alarm").expect_err("no stop");
        assert!(err.message().contains("did not stop"), "{}", err.message());
        assert!(took >= Duration::from_millis(100), "{took:?}");
    }
}
