//! Process trees: a process and all its descendants captured together and restored with
//! their PIDs, parents, groups and sessions, shared pipes and memory, and zombies.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `(pid, ppid, pgid, sid)` of a process, from /proc/PID/stat.
fn family(pid: i32) -> (i32, i32, i32, i32) {
    let stat = read(Path::new(&format!("/proc/{pid}/stat")));
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    (
        pid,
        rest[1].parse().unwrap(),
        rest[2].parse().unwrap(),
        rest[3].parse().unwrap(),
    )
}

/// A shell pipeline with data in flight: `sh -c 'producer | consumer'`. The producer writes
/// numbers faster than the consumer reads them, so the pipe is full when captured. After the
/// restore nothing is lost or repeated: the consumer goes on from the number after the last
/// it read, and the shell still waits for both (its wait4 restarts).
#[test]
fn shell_pipeline_with_data_in_flight_loses_and_repeats_nothing() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let consumer = format!(
        "import sys, time\n\
         log = open('{}', 'a', buffering=1)\n\
         want = 1\n\
         for line in sys.stdin:\n\
         \x20   n = int(line)\n\
         \x20   if n != want:\n\
         \x20       log.write(f'GAP {{want}} {{n}}\\n')\n\
         \x20   want = n + 1\n\
         \x20   if n % 200 == 0:\n\
         \x20       log.write(f'{{n}}\\n')\n\
         \x20       time.sleep(0.01)\n",
        log.display()
    );
    let script = format!("i=0; while :; do i=$((i+1)); echo $i; done | python3 -c \"{consumer}\"");
    let mut sh = Spawned(spawn_detached(
        Command::new("sh").args(["-c", &script]),
        &dir.path().join("out"),
    ));
    let numbers = || -> Vec<u64> { read(&log).lines().filter_map(|l| l.parse().ok()).collect() };
    wait_until("the pipeline to run", Duration::from_secs(20), || {
        numbers().len() >= 5
    });
    let pids = tree(sh.pid());
    assert_eq!(
        pids.len(),
        3,
        "sh, the producer subshell and python: {pids:?}"
    );
    let families: Vec<_> = pids.iter().map(|&p| family(p)).collect();
    // The capture happens between these two readings of the log.
    let before_capture = *numbers().last().unwrap();
    let id = dolly.capture(sh.pid());
    let at_capture = *numbers().last().unwrap();
    wait_until("more output", Duration::from_secs(20), || {
        *numbers().last().unwrap() > at_capture + 2000
    });
    kill_tree(&pids);
    let _ = sh.0.wait();
    let before_restore = numbers().len();

    let restored = dolly.restore(&id);
    assert_eq!(restored.0, sh.pid());
    for f in &families {
        assert_eq!(family(f.0), *f, "pid, parent, group and session of {}", f.0);
    }
    wait_until(
        "the restored pipeline to run",
        Duration::from_secs(20),
        || numbers().len() > before_restore + 10,
    );
    let text = read(&log);
    assert!(
        !text.contains("GAP"),
        "nothing lost or repeated: {}",
        &text[text.find("GAP").unwrap()..]
    );
    let values = numbers();
    let resumed = values[before_restore];
    assert!(
        resumed > before_capture && resumed <= at_capture + 200,
        "resumed at {resumed}, captured between {before_capture} and {at_capture}"
    );
    drop(restored);
    kill_tree(&pids);
}

/// A parent blocked in waitpid() for a child that still runs, and a zombie it has not reaped:
/// after the restore the wait goes on and returns the child's status when it exits, and the
/// zombie is still there to reap, with its status.
#[test]
fn waiting_parent_and_zombie_child_come_back() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import os, time, sys\n\
                  a = os.fork()\n\
                  if a == 0:\n    time.sleep(1.5)\n    os._exit(7)\n\
                  b = os.fork()\n\
                  if b == 0:\n    os._exit(3)\n\
                  print('waiting', a, b, flush=True)\n\
                  _, st = os.waitpid(a, 0)\n\
                  print('A', os.waitstatus_to_exitcode(st), flush=True)\n\
                  _, st = os.waitpid(b, 0)\n\
                  print('B', os.waitstatus_to_exitcode(st), flush=True)\n";
    let py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    wait_until("the children", Duration::from_secs(10), || {
        read(&out).contains("waiting")
    });
    let fields: Vec<i32> = read(&out)
        .split_whitespace()
        .skip(1)
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    let (a, b) = (fields[0], fields[1]);
    wait_until("B to be a zombie", Duration::from_secs(5), || {
        proc_status(b, "State").is_some_and(|s| s.starts_with('Z'))
    });
    std::thread::sleep(Duration::from_millis(300));
    let out_before = read(&out);
    let id = dolly.capture(py.pid());
    let info: serde_json::Value =
        serde_json::from_str(&dolly.ok(&["--json", "snapshot", "info", &id])).unwrap();
    assert_eq!(info["processes"], 2, "the parent and A (B is a zombie)");
    // The parent first: killed after A, it could still print A's end.
    kill_tree(&[a, py.pid()]);
    reap_until_gone(b);

    let started = Instant::now();
    let restored = dolly.restore(&id);
    assert_eq!(
        proc_status(a, "PPid").as_deref(),
        Some(py.pid().to_string().as_str())
    );
    assert!(
        proc_status(b, "State").unwrap().starts_with('Z'),
        "B is a zombie again"
    );
    let status = restored.wait(Duration::from_secs(10));
    assert!(
        matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
    let took = started.elapsed();
    let text = read(&out);
    assert_eq!(
        text.strip_prefix(&out_before).unwrap_or(&text),
        "A 7\nB 3\n",
        "the parent's waits returned as they would have"
    );
    assert!(
        took > Duration::from_millis(500),
        "A slept on after the restore ({took:?})"
    );
}

/// Shared anonymous memory inherited across fork stays shared: what the child writes after
/// the restore, the parent sees.
#[test]
fn memory_shared_across_fork_stays_shared() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import mmap, os, time, struct\n\
                  m = mmap.mmap(-1, 4096)\n\
                  c = os.fork()\n\
                  if c == 0:\n\
                  \x20   n = 0\n\
                  \x20   while True:\n\
                  \x20       n += 1\n\
                  \x20       m[0:8] = struct.pack('Q', n)\n\
                  \x20       time.sleep(0.01)\n\
                  last = 0\n\
                  while True:\n\
                  \x20   v = struct.unpack('Q', m[0:8])[0]\n\
                  \x20   if v < last:\n\
                  \x20       print('BACKWARDS', last, v, flush=True)\n\
                  \x20   if v // 50 != last // 50:\n\
                  \x20       print(v, flush=True)\n\
                  \x20   last = v\n\
                  \x20   time.sleep(0.01)\n";
    let py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    let seen = || -> Vec<u64> { read(&out).lines().filter_map(|l| l.parse().ok()).collect() };
    wait_until(
        "the parent to see the child's writes",
        Duration::from_secs(10),
        || seen().len() >= 2,
    );
    let pids = tree(py.pid());
    let id = dolly.capture(py.pid());
    kill_tree(&pids);
    let before = seen().len();
    let restored = dolly.restore(&id);
    wait_until(
        "the restored parent to see the restored child's writes",
        Duration::from_secs(10),
        || seen().len() >= before + 2,
    );
    assert!(!read(&out).contains("BACKWARDS"));
    drop(restored);
    kill_tree(&pids);
}

/// Process groups and sessions: a session leader with a child that leads its own group and
/// one that stays in the leader's, each restored into the same group and session.
#[test]
fn groups_and_sessions_come_back() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import os, time\n\
                  a = os.fork()\n\
                  if a == 0:\n    os.setpgid(0, 0)\n    b = os.fork()\n    if b == 0:\n        time.sleep(60)\n    time.sleep(60)\n\
                  c = os.fork()\n\
                  if c == 0:\n    time.sleep(60)\n\
                  print('ready', flush=True)\n\
                  time.sleep(60)\n";
    let py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    wait_until("the tree", Duration::from_secs(10), || {
        read(&out).contains("ready") && tree(py.pid()).len() == 4
    });
    let pids = tree(py.pid());
    let families: Vec<_> = pids.iter().map(|&p| family(p)).collect();
    let id = dolly.capture(py.pid());
    kill_tree(&pids);
    let restored = dolly.restore(&id);
    for f in &families {
        assert_eq!(family(f.0), *f, "pid, parent, group and session");
    }
    let groups: std::collections::HashSet<i32> = families.iter().map(|f| f.2).collect();
    assert_eq!(groups.len(), 2, "two groups: {families:?}");
    drop(restored);
    kill_tree(&pids);
}

/// A whole tree cloned: the pipeline runs in a clone beside the original.
#[test]
fn a_tree_can_be_cloned() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done | while read n; do echo $n >> {}; done",
        log.display()
    );
    let sh = Spawned(spawn_detached(
        Command::new("sh").args(["-c", &script]),
        &dir.path().join("out"),
    ));
    wait_until("the pipeline", Duration::from_secs(10), || {
        read(&log).lines().count() > 5
    });
    let clone = dolly.clone_over(&["--pid", &sh.pid().to_string()], dir.path());
    let host = clone.host;
    let inside = clone.inside(&log);
    let n0 = read(&inside).lines().count();
    wait_until(
        "the cloned pipeline to run",
        Duration::from_secs(10),
        || read(&inside).lines().count() > n0 + 5,
    );
    assert!(tree(host).len() >= 3, "the clone has the whole tree");
    dolly.kill_clones(&clone);
    let pids = tree(sh.pid());
    kill_tree(&pids);
}
