//! Threads: every thread comes back with its TID, name, registers, TLS, signal mask,
//! alternate signal stack, rseq, robust list and clear_child_tid; threads blocked in a
//! futex, a condition variable, a join or a sleep go on.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `tid -> name` of every thread of a process.
fn threads_of(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .map(|tid: i32| {
            (
                tid,
                read(Path::new(&format!("/proc/{pid}/task/{tid}/comm")))
                    .trim()
                    .to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Worker `w`'s chain positions in the log, in order.
fn positions(log: &str, w: usize) -> Vec<u64> {
    let prefix = format!("worker={w} n=");
    log.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The multi-threaded Rust program, captured through a fork made at the freeze: all its
/// threads at their TIDs with their names; each worker's hash chain (in TLS and in shared
/// memory) goes on from where it was captured and stays right; the condition-variable
/// ping-pong goes on; the join returns.
#[test]
fn rust_threads_come_back_with_their_state() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = Command::new(example_bin("threads"));
    cmd.args(["--dir", dir.path().to_str().unwrap(), "--workers", "4"]);
    let mut prog = Spawned(spawn_detached(&mut cmd, &dir.path().join("out")));
    wait_until("the threads", Duration::from_secs(10), || {
        positions(&read(&log), 0).last().is_some_and(|&n| n > 20)
    });
    let pid = prog.pid();
    let threads = threads_of(pid);
    assert_eq!(
        threads.len(),
        8,
        "main, 4 workers, 2 ping-pong, joined: {threads:?}"
    );
    // (Read before the capture: the restored copy goes on from the capture's instant, which
    // the original may have passed by the time the capture returns.)
    let pings_before: u64 = read(&log)
        .lines()
        .filter_map(|l| l.strip_prefix("pingpong=")?.parse().ok())
        .next_back()
        .unwrap();
    // Forked at the freeze (from its main thread, the others stopped), its pages read from
    // the fork: the threads' memory is the same instant's.
    let captured = dolly.capture_with(pid, &["--fork", "always"]);
    assert_eq!(captured["forked"], 1, "{captured}");
    let id = captured["id"].as_str().unwrap().to_string();
    let at_capture = *positions(&read(&log), 0).last().unwrap();
    wait_until("the original to run on", Duration::from_secs(10), || {
        positions(&read(&log), 0).last().unwrap() > &(at_capture + 30)
    });
    let lines_before = read(&log).lines().count();
    prog.kill_and_reap();

    let restored = dolly.restore(&id);
    assert_eq!(
        threads_of(pid),
        threads,
        "every thread at its TID, with its name"
    );
    wait_until(
        "the restored threads to run",
        Duration::from_secs(10),
        || read(&log).lines().count() > lines_before + 60,
    );
    let text = read(&log);
    let after: String = text
        .lines()
        .skip(lines_before)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        !after.contains("ok=false"),
        "every chain is right after the restore:\n{after}"
    );
    for w in 0..4 {
        let n = positions(&after, w);
        assert!(
            n[0] <= at_capture + 40 && n[0] >= 1,
            "worker {w} went on from its captured position ({:?})",
            &n[..3]
        );
        assert!(
            n.windows(2).all(|p| p[1] >= p[0]) && n.last() > n.first(),
            "worker {w} advances"
        );
    }
    let pings: Vec<u64> = after
        .lines()
        .filter_map(|l| l.strip_prefix("pingpong=")?.parse().ok())
        .collect();
    assert!(
        pings[0] >= pings_before && pings.last() > pings.first(),
        "the ping-pong goes on: {pings:?}"
    );
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    let status = restored.wait(Duration::from_secs(10));
    assert!(
        matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
    assert!(read(&log).ends_with("joined\n"));
}

/// python3 with threads: workers go on counting from their captured counts, a thread
/// blocked on an Event (a futex wait) wakes when it is set after the restore, and a thread
/// blocked reading a pipe reads what is written to it after the restore.
#[test]
fn python_threads_come_back() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let go = dir.path().join("go");
    let script = format!(
        "import threading, time, os\n\
         ev = threading.Event()\n\
         lock = threading.Lock()\n\
         counts = {{}}\n\
         def worker(name, delay):\n\
         \x20   n = 0\n\
         \x20   while True:\n\
         \x20       n += 1\n\
         \x20       with lock:\n\
         \x20           counts[name] = n\n\
         \x20       time.sleep(delay)\n\
         def waiter():\n\
         \x20   ev.wait()\n\
         \x20   print('event set', flush=True)\n\
         r, w = os.pipe()\n\
         def reader():\n\
         \x20   print('read', os.read(r, 100).decode(), flush=True)\n\
         ts = [threading.Thread(target=worker, args=(f'w{{i}}', 0.01 * (i + 1)), daemon=True) for i in range(3)]\n\
         ts.append(threading.Thread(target=waiter, daemon=True))\n\
         ts.append(threading.Thread(target=reader, daemon=True))\n\
         for t in ts: t.start()\n\
         while True:\n\
         \x20   time.sleep(0.05)\n\
         \x20   with lock:\n\
         \x20       print(counts.get('w0', 0), flush=True)\n\
         \x20   if os.path.exists('{}') and not ev.is_set():\n\
         \x20       ev.set()\n\
         \x20       os.write(w, b'through the pipe')\n",
        go.display()
    );
    let mut py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", &script]),
        &out,
    ));
    let counts = || -> Vec<u64> { read(&out).lines().filter_map(|l| l.parse().ok()).collect() };
    wait_until("python threads", Duration::from_secs(10), || {
        counts().last().is_some_and(|&n| n > 10)
    });
    let pid = py.pid();
    let threads = threads_of(pid);
    assert_eq!(
        threads.len(),
        6,
        "main, 3 workers, the waiter and the reader"
    );
    // The capture happens between these two readings.
    let before_capture = *counts().last().unwrap();
    let id = dolly.capture(pid);
    let at_capture = *counts().last().unwrap();
    wait_until("the original to run on", Duration::from_secs(10), || {
        counts().last().unwrap() > &(at_capture + 20)
    });
    let seen = counts().len();
    py.kill_and_reap();

    let restored = dolly.restore(&id);
    assert_eq!(
        threads_of(pid).iter().map(|t| t.0).collect::<Vec<_>>(),
        threads.iter().map(|t| t.0).collect::<Vec<_>>()
    );
    wait_until("the restored workers", Duration::from_secs(10), || {
        counts().len() > seen + 5
    });
    let first = counts()[seen];
    assert!(
        first >= before_capture && first <= at_capture + 10,
        "w0 resumed at {first}, captured between {before_capture} and {at_capture}"
    );
    assert!(!read(&out).contains("event set") && !read(&out).contains("read "));
    std::fs::write(&go, b"").unwrap();
    wait_until(
        "the waiting thread and the reading thread to wake",
        Duration::from_secs(10),
        || read(&out).contains("event set") && read(&out).contains("read through the pipe"),
    );
    drop(restored);
}

/// A clone of a multi-threaded process runs with all its threads.
#[test]
fn threaded_process_can_be_cloned() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = Command::new(example_bin("threads"));
    cmd.args(["--dir", dir.path().to_str().unwrap(), "--workers", "2"]);
    let prog = Spawned(spawn_detached(&mut cmd, &dir.path().join("out")));
    wait_until("the threads", Duration::from_secs(10), || {
        positions(&read(&log), 0).len() > 3
    });
    let clone = dolly.clone_over(&["--pid", &prog.pid().to_string()], dir.path());
    let host = clone.host;
    assert_eq!(threads_of(host).len(), threads_of(prog.pid()).len());
    let inside = clone.inside(&log);
    let n = read(&inside).lines().count();
    wait_until(
        "the clone's threads to run",
        Duration::from_secs(10),
        || read(&inside).lines().count() > n + 20,
    );
    assert!(!read(&inside).contains("ok=false"));
    dolly.kill_clones(&clone);
}
