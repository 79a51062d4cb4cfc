//! An event loop for the tests, built on kernel objects whose state lives only in the kernel:
//! an epoll instance watching a periodic timerfd and a signalfd, a semaphore eventfd used as
//! a counter, a one-hour one-shot timerfd and a short one-shot timerfd that has fired and is
//! never read until asked. A forked child shares all of them and sleeps.
//!
//! ```text
//! events --dir DIR
//! ```
//!
//! Lines appended to DIR/log:
//! - `ready pid=P child=C epfd=E`: everything is set up and the short timer has fired;
//! - `usr1 total=N`: a SIGUSR1 arrived through the signalfd; the eventfd counter got +1
//!   (the program itself keeps N in memory);
//! - `report reads=R expired=X left_ms=L ticks=T bad=B` on SIGUSR2: R reads emptied the
//!   semaphore eventfd (one per SIGUSR1 ever received), X expirations of the short timer were
//!   pending, L ms are left on the one-hour timer, T periodic ticks were counted, B epoll events
//!   came with data the program never registered.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

const TICK: u64 = 0x7171;
const SIGNAL: u64 = 0x5167;

fn read_u64(fd: impl AsFd) -> Option<u64> {
    let mut buf = [0u8; 8];
    match nix::unistd::read(fd, &mut buf) {
        Ok(8) => Some(u64::from_ne_bytes(buf)),
        _ => None,
    }
}

/// Appends one line to the log in a single write (a reader never sees half of it).
fn say(log: &mut std::fs::File, line: String) {
    log.write_all(format!("{line}\n").as_bytes())
        .expect("writing the log");
}

fn timer(flags: TimerFlags, expiration: Expiration) -> TimerFd {
    let t = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags).expect("timerfd");
    t.set(expiration, TimerSetTimeFlags::empty())
        .expect("arming a timerfd");
    t
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .expect("usage: events --dir DIR");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .expect("opening the log");

    let mut signals = SigSet::empty();
    signals.add(Signal::SIGUSR1);
    signals.add(Signal::SIGUSR2);
    signals.thread_block().expect("blocking signals");
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK).expect("signalfd");
    let counter =
        EventFd::from_value_and_flags(0, EfdFlags::EFD_SEMAPHORE | EfdFlags::EFD_NONBLOCK)
            .expect("eventfd");
    let tick = timer(
        TimerFlags::TFD_NONBLOCK,
        Expiration::Interval(TimeSpec::from_duration(Duration::from_millis(20))),
    );
    let hour = timer(
        TimerFlags::empty(),
        Expiration::OneShot(TimeSpec::from_duration(Duration::from_secs(3600))),
    );
    let short = timer(
        TimerFlags::TFD_NONBLOCK,
        Expiration::OneShot(TimeSpec::from_duration(Duration::from_millis(30))),
    );
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    epoll
        .add(&tick, EpollEvent::new(EpollFlags::EPOLLIN, TICK))
        .expect("watching the timer");
    epoll
        .add(&sigfd, EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))
        .expect("watching the signals");

    // SAFETY: the program is single-threaded; the child only sleeps.
    let child = match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    std::thread::sleep(Duration::from_millis(100));
    say(
        &mut log,
        format!(
            "ready pid={} child={child} epfd={}",
            std::process::id(),
            epoll.0.as_raw_fd()
        ),
    );

    let (mut total, mut ticks, mut bad) = (0u64, 0u64, 0u64);
    let mut events = [EpollEvent::empty(); 4];
    loop {
        let n = match epoll.wait(&mut events, 1000u16) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("epoll_wait: {e}"),
        };
        for event in &events[..n] {
            match event.data() {
                TICK => ticks += read_u64(&tick).unwrap_or(0),
                SIGNAL => {
                    while let Ok(Some(info)) = sigfd.read_signal() {
                        if info.ssi_signo == Signal::SIGUSR1 as u32 {
                            total += 1;
                            counter.write(1).expect("counting");
                            say(&mut log, format!("usr1 total={total}"));
                        } else {
                            let mut reads = 0;
                            while counter.read().is_ok() {
                                reads += 1;
                            }
                            let expired = read_u64(&short).unwrap_or(0);
                            let left_ms = match hour.get().expect("reading a timer") {
                                Some(Expiration::OneShot(left)) => Duration::from(left).as_millis(),
                                _ => 0,
                            };
                            say(&mut log, format!("report reads={reads} expired={expired} left_ms={left_ms} ticks={ticks} bad={bad}"
                            ));
                        }
                    }
                }
                _ => bad += 1,
            }
        }
    }
}
