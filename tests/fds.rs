//! Fds to kernel objects whose state only the kernel holds: eventfds, timerfds, signalfds and
//! epoll instances come back with their counters, timers, masks and registrations.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `key=value` of the last log line starting with `prefix`.
fn field(log: &str, prefix: &str, key: &str) -> Option<u64> {
    let line = log.lines().rfind(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
}

/// Whether fd `a` of process `p` and fd `b` of process `q` are one open file description.
fn same_description(p: i32, a: i32, q: i32, b: i32) -> bool {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp takes integers.
    unsafe { libc::syscall(libc::SYS_kcmp, p, q, KCMP_FILE, a, b) == 0 }
}

/// Sends SIGUSR1 to `pid` and waits until the program has counted it (standard signals sent
/// together would merge).
fn usr1(pid: i32, log: &Path, total: u64) {
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("the SIGUSR1 to be counted", Duration::from_secs(10), || {
        field(&read(log), "usr1", "total") == Some(total)
    });
}

/// Sends SIGUSR2 and returns the `report` line's fields that follow.
fn report(pid: i32, log: &Path) -> (u64, u64, u64, u64, u64) {
    let before = read(log)
        .lines()
        .filter(|l| l.starts_with("report"))
        .count();
    kill(Pid::from_raw(pid), Signal::SIGUSR2).unwrap();
    wait_until("the report", Duration::from_secs(10), || {
        read(log)
            .lines()
            .filter(|l| l.starts_with("report"))
            .count()
            > before
    });
    let log = read(log);
    let f = |k| field(&log, "report", k).unwrap();
    (f("reads"), f("expired"), f("left_ms"), f("ticks"), f("bad"))
}

/// The event loop (examples/events.rs): after a restore its epoll instance still delivers the
/// timer's ticks and the signals with the data they were registered with; the semaphore
/// eventfd holds the count from before the capture plus what came after; the fired one-shot
/// timer's expiration is still pending; the one-hour timer has not been re-armed; the child
/// shares the very same descriptions. A clone of it has the same state.
#[test]
fn eventfd_timerfd_signalfd_and_epoll_keep_their_state() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = Command::new(example_bin("events"));
    cmd.args(["--dir", dir.path().to_str().unwrap()]);
    let mut prog = Spawned(spawn_detached(&mut cmd, &dir.path().join("out")));
    let pid = prog.pid();
    wait_until("the event loop", Duration::from_secs(10), || {
        read(&log).contains("ready")
    });
    let ready = std::time::Instant::now(); // the one-hour timer was armed 100 ms before
    let child = field(&read(&log), "ready", "child").unwrap() as i32;
    let epfd = field(&read(&log), "ready", "epfd").unwrap() as i32;
    for n in 1..=3 {
        usr1(pid, &log, n);
    }
    std::thread::sleep(Duration::from_millis(100)); // some ticks
    let id = dolly.capture(pid);
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    prog.kill_and_reap();
    reap_until_gone(child);

    let restored = dolly.restore(&id);
    assert!(
        same_description(pid, epfd, child, epfd),
        "parent and child share one epoll instance"
    );
    for n in 4..=5 {
        usr1(pid, &log, n);
    }
    // Armed 100 ms before `ready`, the one-hour timer has at most 1 h - 100 ms - (time since)
    // left when reported; re-armed by the restore it would have more.
    let bound = 3_600_000 - 100 - ready.elapsed().as_millis() as u64;
    let (reads, expired, left_ms, ticks, bad) = report(pid, &log);
    assert_eq!(
        reads, 5,
        "the eventfd counted 3 before and 2 after, as a semaphore"
    );
    assert_eq!(
        expired, 1,
        "the fired one-shot timer's expiration was still pending"
    );
    assert!(
        (3_000_000..=bound).contains(&left_ms),
        "the one-hour timer kept running, not re-armed: {left_ms} ms left, at most {bound}"
    );
    assert!(ticks >= 5, "the periodic timer ticked: {ticks}");
    assert_eq!(bad, 0, "every epoll event came with its registered data");
    std::thread::sleep(Duration::from_millis(200));
    let (_, _, _, later, _) = report(pid, &log);
    assert!(later > ticks, "the periodic timer goes on ticking");

    // A clone has the captured state too: 3 counted, one expiration pending.
    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    let inside = clone.inside(&log);
    usr1(clone.host, &inside, 4);
    let (reads, expired, _, _, bad) = report(clone.host, &inside);
    assert_eq!(
        (reads, expired, bad),
        (4, 1, 0),
        "the clone's kernel objects"
    );
    dolly.kill_clones(&clone);

    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    drop(restored);
    reap_until_gone(child);
}
