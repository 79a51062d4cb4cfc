//! Killing dolly (kill -9) in the middle of a capture or restore leaves the target running,
//! not stopped and not traced, no usable snapshot, and no half-restored process.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// Waits until process `pid` is traced no more.
fn wait_untraced(pid: i32) {
    wait_until("the tracer to let go", Duration::from_secs(5), || {
        proc_status(pid, "TracerPid").as_deref() == Some("0")
    });
}

/// Kills the capture worker `worker` (`kill -9`) and waits for the command `cli` that
/// started it; returns how the command ended.
fn kill_worker(cli: std::process::Child, worker: i32) -> std::process::Output {
    kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    cli.wait_with_output().unwrap()
}

/// Waits until process `pid` has the fork dolly's calls made (its one child).
fn wait_for_calls_fork(pid: i32) {
    wait_until("the calls' fork", Duration::from_secs(5), || {
        tree(pid).len() == 2
    });
}

fn assert_runs_as_before(w: &Workload) {
    wait_untraced(w.pid());
    let state = proc_status(w.pid(), "State").unwrap();
    assert!(
        !state.starts_with('T') && !state.starts_with('t'),
        "stopped: {state}"
    );
    w.wait_ticks(3);
    assert_report_ok(&w.report(w.pid()));
}

/// Killed while its system calls run inside the target (its registers borrowed).
#[test]
fn kill_9_during_capture_leaves_the_target_as_before() {
    for at in [
        "capture:precopied",
        "capture:frozen",
        "capture:injected",
        "capture:pages",
    ] {
        let dolly = Dolly::new();
        let w = Workload::start(2);
        let (mut cli, _) = start_paused(
            &dolly,
            &["snapshot", "capture", "--pid", &w.pid().to_string()],
            at,
        );
        cli.kill().unwrap();
        cli.wait().unwrap();
        assert_runs_as_before(&w);
        wait_until(
            "the capture to be marked failed",
            Duration::from_secs(5),
            || dolly.list().iter().all(|r| r["status"] == "failed"),
        );
        assert!(usable(&dolly).is_empty(), "{at}: {:?}", dolly.list());
        // The process can be captured again at once.
        dolly.capture(w.pid());
    }
}

/// The capture worker itself killed mid-copy (with the target's memory write-tracked and
/// half copied, or frozen): the kernel lets the target go, and the snapshot shows as failed
/// (interrupted), never as usable.
#[test]
fn kill_9_of_the_capture_worker_leaves_a_failed_snapshot() {
    for at in ["capture:precopied", "capture:pages"] {
        let dolly = Dolly::new();
        let w = Workload::start(2);
        let (cli, worker) = start_paused(
            &dolly,
            &["snapshot", "capture", "--pid", &w.pid().to_string()],
            at,
        );
        let out = kill_worker(cli, worker);
        assert_eq!(out.status.code(), Some(1));
        assert_runs_as_before(&w);
        let list = dolly.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["status"], "failed");
        assert!(
            list[0]["reason"].as_str().unwrap().contains("interrupted"),
            "{at}: {list:?}"
        );
    }
}

/// Capture options that fork the process at the freeze and wait until the snapshot is
/// created (so the command sees what happens while the fork is read).
const FORKED: [&str; 4] = ["--fork", "always", "--wait", "created"];

/// A python3 that counts, and prints `count N` on SIGUSR1.
const COUNTER: &str = "import signal, time\nn = 0\ndef report(*_):\n    print('count', n, flush=True)\nsignal.signal(signal.SIGUSR1, report)\nprint('ready', flush=True)\nwhile True:\n    n += 1\n    time.sleep(0.01)\n";

/// Asserts that the [`COUNTER`] at `pid` (writing to `out`) counts on.
fn assert_counts_on(pid: i32, out: &std::path::Path) {
    let count = |line: String| line[6..].parse::<u64>().unwrap();
    let first = count(ask(pid, out, "count"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(count(ask(pid, out, "count")) > first, "it runs on");
}

/// How the zombie `pid` ended (the wait status its parent would read), once it is one.
fn zombie_status(pid: i32) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        if fields[0] == "Z" {
            return fields.last().unwrap().trim().parse().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "{pid} never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The capture worker killed while it holds the fork it made of a process at the freeze:
/// still frozen, before it took the fork over (`capture:pages`), or while it reads the
/// process's last pages from it (`capture:forked`). The fork ends with the worker (killed,
/// or ending itself: it never runs the process's code), as a zombie of the process, which
/// no plain `wait` sees; the listing that finds the capture interrupted has the process
/// reap it. No child is left behind, nor dolly's memory, and the process runs on.
#[test]
fn kill_9_of_the_capture_worker_holding_a_fork_leaves_no_zombie() {
    for at in ["capture:pages", "capture:forked"] {
        let dolly = Dolly::new();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let prog = python_ready(COUNTER, &out);
        let pid = prog.pid();
        let (_, areas) = capture_traces(pid);
        let pid_arg = pid.to_string();
        let args = [&["snapshot", "capture", "--pid", &pid_arg][..], &FORKED].concat();
        let (cli, worker) = start_paused(&dolly, &args, at);
        let held = tree(pid);
        assert_eq!(
            held.len(),
            2,
            "{at}: the fork, held while its pages are read"
        );
        kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
        // Killed with dolly once taken over; let go before, it ends itself at once (see
        // `tracee::RUN_CALLS`): never a crash into memory it lacks.
        let status = zombie_status(held[1]);
        assert!(
            status == libc::SIGKILL || status == 0,
            "{at}: the fork ended with status {status}"
        );
        let output = cli.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(1));
        let list = dolly.list();
        assert_eq!(list[0]["status"], "failed", "{at}: {list:?}");
        assert_eq!(tree(pid), vec![pid], "{at}: no child left behind");
        assert_eq!(
            capture_traces(pid).1,
            areas,
            "{at}: dolly's scratch memory left"
        );
        assert_counts_on(pid, &out);
    }
}

/// The capture worker killed while a process runs dolly's calls (its registers dolly's),
/// or sits in the trap that ends them, before or after dolly saw it stop there: the
/// process goes back by itself to its own registers, signal mask, extended state and
/// SIGTRAP action (dolly's safety net, see `tracee::Net`) and runs on, its own checks all
/// true; the listing that finds the capture interrupted has it unmap dolly's memory:
/// nothing is left.
#[test]
fn kill_9_of_the_capture_worker_while_its_calls_run_leaves_the_process_running() {
    for at in ["capture:calls", "capture:calls done"] {
        let dolly = Dolly::new();
        let w = Workload::start(2);
        let pid = w.pid();
        let before = own_state(pid);
        let (cli, worker) = start_paused(
            &dolly,
            &["snapshot", "capture", "--pid", &pid.to_string()],
            at,
        );
        kill_worker(cli, worker);
        // Its registers, mask, dispositions, alternate stack, vector registers: its own.
        assert_runs_as_before(&w);
        let list = dolly.list();
        assert_eq!(list[0]["status"], "failed", "{at}: {list:?}");
        assert_eq!(
            own_state(pid),
            before,
            "{at}: dolly's memory or action left"
        );
        w.wait_ticks(2);
        assert_report_ok(&w.report(pid));
    }
}

/// What dolly's calls could leave in process `pid`: writable and executable memory, its
/// threads, the signals it catches, ignores and blocks, its children.
fn own_state(pid: i32) -> (Vec<String>, Vec<Option<String>>, Vec<i32>) {
    let (threads, rwx) = capture_traces(pid);
    let status = ["SigCgt", "SigIgn", "SigBlk"].map(|key| proc_status(pid, key));
    (rwx, [vec![threads], status.to_vec()].concat(), tree(pid))
}

/// [`kill_9_of_the_capture_worker_while_its_calls_run_leaves_the_process_running`] for a
/// process that ignores SIGTRAP (which dolly's first calls, single steps, set back to its
/// default): it ignores it still, and a SIGTRAP sent to it does nothing.
#[test]
fn kill_9_in_the_calls_of_a_process_ignoring_sigtrap_leaves_it_ignored() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = format!("import signal\nsignal.signal(signal.SIGTRAP, signal.SIG_IGN)\n{COUNTER}");
    let prog = python_ready(&script, &out);
    let pid = prog.pid();
    let before = own_state(pid);
    let (cli, worker) = start_paused(
        &dolly,
        &["snapshot", "capture", "--pid", &pid.to_string()],
        "capture:calls",
    );
    kill_worker(cli, worker);
    assert_counts_on(pid, &out);
    dolly.list();
    assert_eq!(own_state(pid), before, "SIGTRAP ignored, as before");
    kill(Pid::from_raw(pid), Signal::SIGTRAP).unwrap();
    assert_counts_on(pid, &out);
}

/// [`kill_9_of_the_capture_worker_while_its_calls_run_leaves_the_process_running`] when
/// the calls end with the `clone` of the fork the freeze makes: the listing also has the
/// process reap that fork.
#[test]
fn kill_9_of_the_capture_worker_while_its_calls_fork_leaves_no_child() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let prog = python_ready(COUNTER, &out);
    let pid = prog.pid();
    let before = own_state(pid);
    let pid_arg = pid.to_string();
    let args = [&["snapshot", "capture", "--pid", &pid_arg][..], &FORKED].concat();
    let (cli, worker) = start_paused(&dolly, &args, "capture:calls");
    wait_for_calls_fork(pid);
    kill_worker(cli, worker);
    assert_counts_on(pid, &out);
    let list = dolly.list();
    assert_eq!(list[0]["status"], "failed", "{list:?}");
    assert_eq!(
        own_state(pid),
        before,
        "dolly's memory, action or fork left"
    );
    assert_counts_on(pid, &out);
}

/// [`kill_9_of_the_capture_worker_while_its_calls_run_leaves_the_process_running`] for a
/// threaded process, killed in its leader's batch or in its other threads' (which run at
/// the same time, each under a net of its own), or once they are back: every thread goes
/// on with its state.
#[test]
fn kill_9_while_the_threads_run_dolly_s_calls_leaves_every_thread_running() {
    // (Then: the threads back in their own state, the process's SIGTRAP action not yet: the
    // listing puts it back. Last: the leader's batch that forks the process, after the
    // other threads': the listing has it reap the fork.)
    for at in [
        "capture:calls",
        "capture:thread calls",
        "capture:thread calls done",
        "capture:threads back",
        "capture:fork calls",
    ] {
        let dolly = Dolly::new();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = std::process::Command::new(example_bin("threads"));
        cmd.args(["--dir", dir.path().to_str().unwrap(), "--workers", "4"]);
        let prog = Spawned(spawn_detached(&mut cmd, &dir.path().join("out")));
        let pid = prog.pid();
        let lines = || read(&log).lines().count();
        wait_until("the threads", Duration::from_secs(10), || lines() > 20);
        let before = own_state(pid);
        let pid_arg = pid.to_string();
        let args = [&["snapshot", "capture", "--pid", &pid_arg][..], &FORKED].concat();
        let (cli, worker) = start_paused(&dolly, &args, at);
        if at == "capture:fork calls" {
            wait_for_calls_fork(pid);
        }
        kill_worker(cli, worker);
        if at == "capture:threads back" {
            // The nets' handler is still the process's SIGTRAP action: a SIGTRAP of the
            // process's own finds no net of dolly's to go back to; the handler puts the
            // process's action back and lets that one signal go.
            wait_untraced(pid);
            kill(Pid::from_raw(pid), Signal::SIGTRAP).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(
                own_state(pid).1,
                before.1,
                "{at}: its own SIGTRAP action back"
            );
        }
        dolly.list();
        assert_eq!(
            own_state(pid),
            before,
            "{at}: dolly's memory or action left"
        );
        let seen = lines();
        wait_until("the threads to go on", Duration::from_secs(10), || {
            lines() > seen + 30
        });
        let text = read(&log);
        let after: Vec<&str> = text.lines().skip(seen).collect();
        assert!(
            after.iter().any(|l| l.starts_with("pingpong=")),
            "{at}: the ping-pong goes on"
        );
        assert!(
            !after.iter().any(|l| l.contains("ok=false")),
            "{at}: every worker's chain, TLS and alternate stack hold:\n{}",
            after.join("\n")
        );
    }
}

/// Killed while rebuilding the process: nothing is left at the PID, and the snapshot
/// restores fine afterwards.
#[test]
fn kill_9_during_restore_leaves_no_half_restored_process() {
    let dolly = Dolly::new();
    let mut w = Workload::start(2);
    let pid = w.pid();
    let id = dolly.capture(pid);
    w.proc.kill_and_reap();
    for at in ["restore:prepared", "restore:rebuilding", "restore:detach"] {
        let (mut cli, _) = start_paused(&dolly, &["snapshot", "restore", &id], at);
        cli.kill().unwrap();
        cli.wait().unwrap();
        if at != "restore:prepared" {
            // The stub died with dolly; it was reparented to us (a subreaper): reap it.
            let status =
                wait_child(Pid::from_raw(pid), Duration::from_secs(5)).expect("the stub ended");
            assert!(
                matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
                "{at}: {status:?}"
            );
        }
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{at}: something is left at PID {pid}"
        );
    }
    let restored = dolly.restore(&id);
    w.wait_ticks(2);
    assert_report_ok(&w.report(restored.0));
}

/// Two captures of one process at the same moment: the second is refused while the first
/// holds it, and the first completes.
#[test]
fn a_second_capture_of_the_same_process_is_refused() {
    let dolly = Dolly::new();
    let other_store = Dolly::new();
    let w = Workload::start(1);
    let (mut cli, _) = start_paused(
        &dolly,
        &["snapshot", "capture", "--pid", &w.pid().to_string()],
        "capture:frozen",
    );
    let err = dolly.refused(&["snapshot", "capture", "--pid", &w.pid().to_string()]);
    assert!(err.contains("already being captured or restored"), "{err}");
    // Another store cannot take it either (the first dolly traces it).
    let err = other_store.refused(&["snapshot", "capture", "--pid", &w.pid().to_string()]);
    assert!(
        err.contains("already being captured or restored by dolly"),
        "{err}"
    );
    // Deleting a snapshot that is being captured is refused too.
    let capturing = dolly.list();
    let id = capturing[0]["id"].as_str().unwrap();
    assert_eq!(capturing[0]["status"], "capturing");
    let err = dolly.refused(&["snapshot", "delete", id]);
    assert!(err.contains("being captured or restored"), "{err}");
    assert!(other_store.list().is_empty());
    // The paused capture ends when its command is killed; the target runs on.
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert_runs_as_before(&w);
}

/// The fork a capture reads a process's last pages from, killed before it is read (as the
/// kernel's out-of-memory killer would: it takes the fork first): the capture fails saying
/// so, leaves no snapshot that looks usable and no child behind, and the process runs on.
#[test]
fn a_fork_killed_under_the_capture_fails_it_cleanly() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let prog = python_ready(COUNTER, &out);
    let pid = prog.pid();
    let go = dir.path().join("go");
    let pid_arg = pid.to_string();
    let args = [
        &["--json", "snapshot", "capture", "--pid", &pid_arg][..],
        &FORKED,
    ]
    .concat();
    let (cli, _) = start_paused_with(
        &dolly,
        &args,
        "capture:forked",
        &[("DOLLY_PAUSE_UNTIL", go.as_os_str())],
    );
    let fork = tree(pid)[1];
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{fork}/oom_score_adj"))
            .unwrap()
            .trim(),
        "1000",
        "the out-of-memory killer takes the fork first"
    );
    kill(Pid::from_raw(fork), Signal::SIGKILL).unwrap();
    std::fs::write(&go, b"").unwrap();
    let output = cli.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("killed before it was read"), "{said}");
    assert!(usable(&dolly).is_empty(), "{:?}", dolly.list());
    assert_eq!(tree(pid), vec![pid], "no child left behind");
    assert_counts_on(pid, &out);
}
