//! Capture real processes, kill them, restore them at their PID, and check they continue
//! from the captured state (their own reports, their output, their PID).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::wait::WaitStatus;
use serde_json::Value;

/// The workload: every check holds after a restore, and the restored copy writes, for the
/// ticks after the capture, exactly the digests the original wrote: it continued from the
/// captured memory, registers and files, not from a fresh start.
#[test]
fn workload_restored_in_place_continues_with_all_its_state() {
    let dolly = Dolly::new();
    let mut w = Workload::start(16);
    let pid = w.pid();
    assert_report_ok(&w.report(pid));

    // The capture happens between this reading and `at_capture`.
    let before_capture = w.last_tick();
    let out = dolly.ok(&[
        "snapshot",
        "capture",
        "--pid",
        &pid.to_string(),
        "--name",
        "warm",
        "--json",
        "--wait",
        "created",
    ]);
    let captured: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(captured["pid"], pid);
    assert_eq!(captured["name"], "warm");
    assert_eq!(captured["status"], "created");
    // Half of 16 MiB is touched, plus heap, stack and the rest.
    assert!(captured["bytes"].as_u64().unwrap() > 8 << 20, "{captured}");
    assert!(captured["frozen_ms"].as_f64().unwrap() > 0.0);
    let id = captured["id"].as_str().unwrap().to_string();
    let at_capture = w.last_tick();

    // The original runs on, undisturbed by the capture.
    w.wait_ticks(6);
    assert_report_ok(&w.report(pid));
    assert_eq!(proc_status(pid, "TracerPid").as_deref(), Some("0"));
    let original = w.ticks();
    w.proc.kill_and_reap();

    let restored = dolly.restore(&id);
    assert_eq!(restored.0, pid, "restored at the original PID");
    w.wait_ticks(4);
    let report = w.report(pid);
    assert_report_ok(&report);
    assert_eq!(report["pid"], pid);
    assert!(report["tick"].as_u64().unwrap() > at_capture);

    // Ticks logged after the restore repeat the original's, digest for digest.
    let all = w.ticks();
    let restart = (1..all.len())
        .find(|&i| all[i].0 <= all[i - 1].0)
        .expect("the log restarts at the capture");
    let resumed = &all[restart..];
    assert!(
        resumed[0].0 >= before_capture && resumed[0].0 <= at_capture + 2,
        "resumed at tick {} (captured between {before_capture} and {at_capture})",
        resumed[0].0
    );
    let mut compared = 0;
    for (tick, digest, _) in resumed {
        if let Some(orig) = original.iter().find(|o| o.0 == *tick) {
            assert_eq!(
                &orig.1, digest,
                "tick {tick}: the restored state differs from the original's"
            );
            compared += 1;
        }
    }
    assert!(compared >= 3, "compared {compared} ticks");

    // Its interval timer still fires.
    let alarms = report["alarms"].as_u64().unwrap();
    w.wait_ticks(3);
    assert!(w.report(pid)["alarms"].as_u64().unwrap() > alarms);
    drop(restored);
}

/// A capture leaves the original exactly as it was: running, untraced, with all its
/// state (the remote system calls dolly ran inside it left no trace).
#[test]
fn capture_leaves_the_original_running_as_before() {
    let dolly = Dolly::new();
    let w = Workload::start(4);
    let pid = w.pid();
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for _ in 0..3 {
        dolly.capture(pid);
    }
    w.wait_ticks(3);
    assert_report_ok(&w.report(pid));
    let state = proc_status(pid, "State").unwrap();
    assert!(state.starts_with('S') || state.starts_with('R'), "{state}");
    assert_eq!(proc_status(pid, "TracerPid").as_deref(), Some("0"));
    let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let areas = |m: &str| m.lines().filter(|l| !l.contains("[heap]")).count();
    assert_eq!(
        areas(&maps_before),
        areas(&maps_after),
        "no scratch mapping left behind"
    );
    assert_eq!(dolly.list().len(), 3);
    // Its log went on without a gap: one tick after another.
    let ticks: Vec<u64> = w.ticks().iter().map(|t| t.0).collect();
    assert!(ticks.windows(2).all(|p| p[1] == p[0] + 1), "{ticks:?}");
}

fn numbers(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Where a restored copy started logging: the first value that is not above its predecessor.
fn restart_point(values: &[u64]) -> usize {
    (1..values.len())
        .find(|&i| values[i] <= values[i - 1])
        .unwrap_or_else(|| panic!("no restart in {values:?}"))
}

/// python3 with a counter in a dict: the restored interpreter continues from the captured
/// value (not from 0, and not from where the original got to before it was killed).
#[test]
fn python_interpreter_continues_from_captured_counter() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import time\nd = {'n': 0}\nwhile True:\n    d['n'] += 1\n    print(d['n'], flush=True)\n    time.sleep(0.02)\n";
    let mut py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    wait_until("python output", Duration::from_secs(10), || {
        numbers(&out).len() >= 20
    });
    let before = *numbers(&out).last().unwrap();
    let id = dolly.capture(py.pid());
    let after = *numbers(&out).last().unwrap();
    wait_until("more python output", Duration::from_secs(10), || {
        numbers(&out).last().unwrap() > &(after + 20)
    });
    let killed_at = *numbers(&out).last().unwrap();
    let pid = py.pid();
    py.kill_and_reap();

    let restored = dolly.restore(&id);
    assert_eq!(restored.0, pid);
    wait_until("restored python output", Duration::from_secs(10), || {
        numbers(&out).len() > killed_at as usize + 10
    });
    let values = numbers(&out);
    let first = values[restart_point(&values)];
    assert!(
        first > before && first <= after + 1,
        "the restored counter resumed at {first}; captured between {before} and {after}"
    );
    // And it keeps counting, one by one.
    let tail = &values[restart_point(&values)..];
    assert!(tail.windows(2).all(|p| p[1] == p[0] + 1), "{tail:?}");
}

/// `sleep 5` captured after 1 s and restored ends about 4 s later: the interrupted
/// nanosleep restarts with the time that was left, neither at once nor from the start.
#[test]
fn sleep_restores_mid_nanosleep_and_sleeps_the_rest() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let mut sleep = Spawned(spawn_detached(
        Command::new("sleep").arg("5"),
        &dir.path().join("out"),
    ));
    std::thread::sleep(Duration::from_secs(1));
    let id = dolly.capture(sleep.pid());
    let pid = sleep.pid();
    sleep.kill_and_reap();

    let started = Instant::now();
    let restored = dolly.restore(&id);
    assert_eq!(restored.0, pid);
    let status = restored.wait(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert!(
        took > Duration::from_millis(3300) && took < Duration::from_millis(4700),
        "the restored sleep ran {took:?}, expected the ~4 s left at capture"
    );
}

/// bash running a loop: its shell variable continues from the captured value.
#[test]
fn bash_loop_continues_from_captured_value() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "i=0; while :; do i=$((i+1)); if (( i % 2000 == 0 )); then echo $i >> {}; fi; done",
        log.display()
    );
    let mut bash = Spawned(spawn_detached(
        Command::new("bash").args(["-c", &script]),
        &dir.path().join("out"),
    ));
    wait_until("bash output", Duration::from_secs(10), || {
        numbers(&log).len() >= 5
    });
    let before = *numbers(&log).last().unwrap();
    let id = dolly.capture(bash.pid());
    let after = *numbers(&log).last().unwrap();
    wait_until("more bash output", Duration::from_secs(10), || {
        *numbers(&log).last().unwrap() > after + 10_000
    });
    let killed_at = numbers(&log).len();
    bash.kill_and_reap();

    let restored = dolly.restore(&id);
    wait_until("restored bash output", Duration::from_secs(10), || {
        numbers(&log).len() > killed_at + 5
    });
    let values = numbers(&log);
    let first = values[restart_point(&values)];
    assert!(
        first > before && first <= after + 2000,
        "bash resumed at {first}; captured between {before} and {after}"
    );
    drop(restored);
}

/// Several stores side by side do not see each other, and DOLLY_ROOT / DOLLY_POOL or
/// --root / --pool choose the store.
#[test]
fn stores_side_by_side_do_not_interfere() {
    let a = Dolly::new();
    let b = Dolly::new();
    let w = Workload::start(1);
    let id_a = a.capture(w.pid());
    let id_b = b.capture(w.pid());
    let ids = |d: &Dolly| {
        d.list()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), vec![id_a.clone()]);
    assert_eq!(ids(&b), vec![id_b.clone()]);
    // --root/--pool override the environment.
    let out = a
        .cmd()
        .args([
            "--root",
            b.root.path().to_str().unwrap(),
            "--pool",
            b.pool.path().to_str().unwrap(),
        ])
        .args(["snapshot", "list", "--json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id_b));
    a.ok(&["snapshot", "delete", &id_a]);
    assert!(a.list().is_empty());
    assert_eq!(ids(&b), vec![id_b]);
    assert!(!a.pool_dir(&id_a).exists() && !a.snapshot_dir(&id_a).exists());
}

/// `snapshot info` shows what capture printed; `list` shows status, size and frozen time.
#[test]
fn list_and_info_describe_the_snapshot() {
    let dolly = Dolly::new();
    let w = Workload::start(2);
    let out = dolly.ok(&[
        "snapshot",
        "capture",
        "--pid",
        &w.pid().to_string(),
        "--name",
        "two",
        "--json",
        "--wait",
        "persisted",
    ]);
    let captured: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(captured["status"], "persisted");
    let id = captured["id"].as_str().unwrap();
    let info: Value =
        serde_json::from_str(&dolly.ok(&["snapshot", "info", "two", "--json"])).unwrap();
    for key in ["id", "name", "pid", "status", "bytes", "frozen_ms"] {
        assert_eq!(info[key], captured[key], "{key}");
    }
    let text = dolly.ok(&["snapshot", "list"]);
    assert!(
        text.contains(id) && text.contains("persisted") && text.contains("dolly-workload"),
        "{text}"
    );
    let info_text = dolly.ok(&["snapshot", "info", &id[..8]]);
    assert!(info_text.contains("status        persisted"), "{info_text}");
}

/// A process that is not root keeps its user and group ids, groups and capabilities.
#[test]
fn unprivileged_process_keeps_its_credentials() {
    use std::os::unix::process::CommandExt;
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    nix::unistd::chown(dir.path(), Some(nix::unistd::Uid::from_raw(1234)), None).unwrap();
    let out = dir.path().join("out");
    let script = "import time\nn = 0\nwhile True:\n    n += 1\n    print(n, flush=True)\n    time.sleep(0.02)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let groups = [5, 6, 7];
            if libc::setgroups(3, groups.as_ptr()) != 0
                || libc::setresgid(4321, 4321, 4321) != 0
                || libc::setresuid(1234, 1234, 1234) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut py = Spawned(spawn_detached(&mut cmd, &out));
    wait_until("python output", Duration::from_secs(10), || {
        numbers(&out).len() >= 5
    });
    let identity = |pid: i32| -> Vec<String> {
        [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Umask",
        ]
        .iter()
        .map(|k| format!("{k}: {}", proc_status(pid, k).unwrap()))
        .collect()
    };
    let before = identity(py.pid());
    assert!(before[0].starts_with("Uid: 1234"), "{before:?}");
    let id = dolly.capture(py.pid());
    let pid = py.pid();
    py.kill_and_reap();
    let restored = dolly.restore(&id);
    assert_eq!(identity(pid), before);
    let seen = numbers(&out).len();
    wait_until("restored python output", Duration::from_secs(10), || {
        numbers(&out).len() > seen + 5
    });
    drop(restored);
}

/// Blocking calls the freeze interrupted restart in the restored process, with no EINTR
/// or kernel-internal error leaking to it: pause() waits on until a signal comes.
#[test]
fn interrupted_pause_restarts_after_restore() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import ctypes, signal, os\n\
                  libc = ctypes.CDLL(None, use_errno=True)\n\
                  signal.signal(signal.SIGUSR1, lambda *a: None)\n\
                  print('pausing', flush=True)\n\
                  rc = libc.pause()\n\
                  print('woke', rc, ctypes.get_errno(), flush=True)\n";
    let mut py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    wait_until("python to pause", Duration::from_secs(10), || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("pausing")
    });
    std::thread::sleep(Duration::from_millis(100));
    let id = dolly.capture(py.pid());
    let pid = py.pid();
    py.kill_and_reap();
    let restored = dolly.restore(&id);
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains("woke"),
        "pause() returned by itself after the restore: {text}"
    );
    assert!(proc_status(pid, "State").unwrap().starts_with('S'));
    nix::sys::signal::kill(restored.pid(), nix::sys::signal::Signal::SIGUSR1).unwrap();
    let status = restored.wait(Duration::from_secs(10));
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains(&format!("woke -1 {}", libc::EINTR)), "{text}");
}

/// A process in a chroot comes back in the same root.
#[test]
fn chrooted_process_keeps_its_root() {
    let dolly = Dolly::new();
    let jail = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("/"),
        jail.path(),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(jail.path());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import time, os\nn = 0\nwhile True:\n    n += 1\n    print(n, flush=True)\n    time.sleep(0.02)\n";
    let mut py = Spawned(spawn_detached(
        Command::new("chroot")
            .arg(jail.path())
            .args(["python3", "-c", script]),
        &out,
    ));
    wait_until("python output", Duration::from_secs(10), || {
        numbers(&out).len() >= 5
    });
    let root = std::fs::read_link(format!("/proc/{}/root", py.pid())).unwrap();
    assert_eq!(root, jail.path());
    let id = dolly.capture(py.pid());
    let pid = py.pid();
    py.kill_and_reap();
    let restored = dolly.restore(&id);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        jail.path()
    );
    let seen = numbers(&out).len();
    wait_until("restored python output", Duration::from_secs(10), || {
        numbers(&out).len() > seen + 5
    });
    drop(restored);
}

/// A read(2) on a pipe that the freeze interrupted goes on waiting after the restore,
/// and returns the byte a signal handler (SA_RESTART) writes into the pipe.
#[test]
fn interrupted_read_on_a_pipe_restarts_after_restore() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut blocker = blocker("read-pipe", &out);
    wait_until("the read to block", Duration::from_secs(10), || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("blocking")
    });
    std::thread::sleep(Duration::from_millis(100));
    let id = dolly.capture(blocker.pid());
    let pid = blocker.pid();
    blocker.kill_and_reap();
    let restored = dolly.restore(&id);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !std::fs::read_to_string(&out).unwrap().contains("read"),
        "the read returned by itself"
    );
    nix::sys::signal::kill(restored.pid(), nix::sys::signal::Signal::SIGUSR1).unwrap();
    let status = restored.wait(Duration::from_secs(10));
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert_eq!(restored.0, pid);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("read 1 0 x"), "{text}");
}

/// Whether process `pid`'s status line `key` (`SigCgt`, `SigIgn`) has `sig` set.
fn signal_bit(pid: i32, key: &str, sig: i32) -> bool {
    let mask = u64::from_str_radix(&proc_status(pid, key).unwrap(), 16).unwrap();
    mask & (1 << (sig - 1)) != 0
}

/// A process's own SIGTRAP disposition (a handler, or ignored) is the one thing dolly's
/// traps could change: they are SIGTRAPs, and the kernel resets the action of a trap
/// signal the thread blocks or ignores. Captured (copied at the freeze, and forked) and
/// restored, the process keeps it, in the original and in the restored process alike.
#[test]
fn sigtrap_handlers_and_ignored_sigtrap_survive_capture_and_restore() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let trap = libc::SIGTRAP;
    for ignored in [false, true] {
        let out = dir.path().join(format!("out-{ignored}"));
        let setup = if ignored {
            "signal.signal(signal.SIGTRAP, signal.SIG_IGN)"
        } else {
            "signal.signal(signal.SIGTRAP, lambda *a: print('trapped', flush=True))"
        };
        let script = format!(
            "import signal, time\n{setup}\nbuf = bytearray(32 << 20)\n\
             print('ready', flush=True)\ni = 0\n\
             while True:\n    buf[(i * 4096) % len(buf)] = 1\n    i += 1\n    \
             if i % 100000 == 0: print('tick', i, flush=True)\n"
        );
        let mut py = python_ready(&script, &out);
        let pid = py.pid();
        let key = if ignored { "SigIgn" } else { "SigCgt" };
        assert!(signal_bit(pid, key, trap), "set up: {key}");
        // Copied at the freeze, then forked at it (the fork reaped through one more stop).
        dolly.capture_with(pid, &["--fork", "never"]);
        let record = dolly.capture_with(pid, &["--fork", "always"]);
        assert!(record["forked_bytes"].as_u64().unwrap_or(0) > 0, "{record}");
        let id = record["id"].as_str().unwrap().to_string();
        assert!(
            signal_bit(pid, key, trap),
            "{key} of the original after the captures"
        );
        // A SIGTRAP sent to it now still does what its program set up.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTRAP,
        )
        .unwrap();
        if !ignored {
            wait_until("the original's handler", Duration::from_secs(10), || {
                read(&out).contains("trapped")
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(proc_status(pid, "State").is_some_and(|s| !s.starts_with('Z')));
        py.kill_and_reap();
        std::fs::write(&out, "").unwrap();
        let restored = dolly.restore(&id);
        let rpid = restored.pid().as_raw();
        assert!(signal_bit(rpid, key, trap), "{key} of the restored process");
        nix::sys::signal::kill(restored.pid(), nix::sys::signal::Signal::SIGTRAP).unwrap();
        wait_until(
            "the restored process to go on",
            Duration::from_secs(10),
            || {
                let text = read(&out);
                text.contains("tick") && (ignored || text.contains("trapped"))
            },
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(proc_status(rpid, "State").is_some_and(|s| !s.starts_with('Z')));
    }
}
