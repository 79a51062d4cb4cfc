//! Near-instant capture: memory is copied while the process runs and only what changed is
//! copied at the freeze; what is stored is the memory of one instant.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Asks the scribbler at `pid` to check its memory; returns the verdict line.
fn verify(pid: i32, log: &Path) -> String {
    ask(pid, log, "verify")
}

/// Restores snapshot `id` of the scribbler at `pid` (logging into `log`) and checks that it
/// holds one instant; the restored process is ended when the result is dropped.
fn restore_verified(dolly: &Dolly, id: &str, pid: i32, log: &Path) -> Restored {
    let restored = dolly.restore(id);
    let verdict = verify(pid, log);
    assert!(verdict.starts_with("verify ok"), "snapshot {id}: {verdict}");
    restored
}

/// Starts the scribbler example in `dir` with `args`, once it is ready.
fn start_scribbler(dir: &Path, args: &[&str]) -> Spawned {
    let mut cmd = Command::new(example_bin("scribbler"));
    cmd.arg("--dir").arg(dir).args(args);
    let prog = Spawned(spawn_detached(&mut cmd, &dir.join("out")));
    wait_until("the scribbler", Duration::from_secs(20), || {
        let log = read(&dir.join("log"));
        assert!(!log.contains("error:"), "the scribbler: {log}");
        log.contains("ready")
    });
    prog
}

/// A process that rewrites its memory as fast as it can while it is captured (pages written,
/// dropped with MADV_DONTNEED, mapped over with MAP_FIXED during the pre-copy): the restored
/// copy and a clone hold every page as it was at one single instant, and go on writing.
#[test]
fn memory_rewritten_during_the_capture_is_stored_as_of_one_instant() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut prog = start_scribbler(dir.path(), &["--mib", "64"]);
    let pid = prog.pid();
    assert!(verify(pid, &log).starts_with("verify ok"));
    std::thread::sleep(Duration::from_millis(300)); // well into its scribbling
                                                    // It writes faster than pre-copy copies, so `--fork auto` forks it too when it has the
                                                    // CPU to itself; on a loaded machine it may not outpace pre-copy, hence `always` here.
    let first = dolly.capture_with(pid, &["--fork", "always"]);
    let id = first["id"].as_str().unwrap().to_string();
    // The freeze forked it to read its last pages from the fork after the thaw. The fork
    // is gone, and the process goes on unharmed.
    assert_eq!(first["forked"], 1, "{first}");
    assert!(first["forked_bytes"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(tree(pid), vec![pid], "no child left behind");
    let after = verify(pid, &log);
    assert!(after.starts_with("verify ok"), "{after}");
    // Without the fork, the freeze copies those pages itself (one instant too).
    let unforked = dolly.capture_with(pid, &["--fork", "never", "--parent", "none"]);
    assert_eq!(unforked["forked"], 0, "{unforked}");
    // From now on it only writes pages (see examples/scribbler.rs on MADV_DONTNEED).
    std::fs::write(dir.path().join("steady"), b"").unwrap();
    prog.kill_and_reap();

    let restored = dolly.restore(&id);
    let first = verify(pid, &log);
    assert!(first.starts_with("verify ok"), "{first}");
    std::thread::sleep(Duration::from_millis(200));
    let second = verify(pid, &log);
    assert!(second.starts_with("verify ok"), "{second}");
    let turns = |l: &str| l.rsplit('=').next().unwrap().parse::<u64>().unwrap();
    assert!(turns(&second) > turns(&first), "it goes on writing");

    // The restored copy, still writing, captured (by default) against the snapshot it came
    // from: what it did not write since is shared with it, and the next restore holds one
    // instant again. `--parent none` stores it all.
    let whole = dolly.capture_with(pid, &["--parent", "none"]);
    assert!(whole["parent"].is_null(), "{whole}");
    assert_eq!(whole["shared_bytes"].as_u64().unwrap_or(0), 0, "{whole}");
    assert!(whole["bytes"].as_u64().unwrap() >= 64 << 20, "{whole}");
    let again = dolly.capture_with(pid, &[]);
    assert_eq!(again["parent"], id.as_str(), "{again}");
    assert!(again["shared_bytes"].as_u64().unwrap() > 0, "{again}");
    drop(restored);
    reap_until_gone(pid);
    let restored = dolly.restore(again["id"].as_str().unwrap());
    let third = verify(pid, &log);
    assert!(third.starts_with("verify ok"), "{third}");

    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    let inside = clone.inside(&log);
    let verdict = verify(clone.host, &inside);
    assert!(verdict.starts_with("verify ok"), "{verdict}");
    dolly.kill_clones(&clone);
    drop(restored);
    reap_until_gone(pid);

    let unforked_id = unforked["id"].as_str().unwrap();
    let _restored = restore_verified(&dolly, unforked_id, pid, &log);
}

/// A process rewriting memory backed by transparent huge pages (`MADV_HUGEPAGE`, 2 MiB pages
/// mapped whole as the capture begins): write tracking protects and walks them whole, its
/// writes split them (as a fork's copy-on-write does), and a snapshot forked at the freeze or
/// copied by it, restored, holds one instant.
#[test]
fn transparent_huge_pages_rewritten_during_the_capture_are_stored_as_of_one_instant() {
    let dolly = Dolly::new();
    for fork in ["always", "never"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // (Steady from the start: a drop or a mapping over part of a huge page splits it.)
        std::fs::write(dir.path().join("steady"), b"").unwrap();
        let mut prog = start_scribbler(dir.path(), &["--mib", "64", "--huge"]);
        let pid = prog.pid();
        let huge_kib = || {
            let rollup = read(Path::new(&format!("/proc/{pid}/smaps_rollup")));
            let line = rollup.lines().find(|l| l.starts_with("AnonHugePages:"));
            line.and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        };
        wait_until(
            "its memory in transparent huge pages (AnonHugePages in its smaps_rollup; \
             /sys/kernel/mm/transparent_hugepage/enabled must be madvise or always)",
            Duration::from_secs(5),
            || huge_kib().is_some_and(|k| k >= 32 << 10),
        );
        let record = dolly.capture_with(pid, &["--fork", fork, "--parent", "none"]);
        assert_eq!(record["forked"], u64::from(fork == "always"), "{record}");
        assert!(verify(pid, &log).starts_with("verify ok"));
        prog.kill_and_reap();
        drop(restore_verified(
            &dolly,
            record["id"].as_str().unwrap(),
            pid,
            &log,
        ));
        reap_until_gone(pid);
    }
}

/// python3 churning its heap while it is captured (objects of up to 4 KiB of random bytes made
/// and freed at full speed: CPython's allocator and glibc's malloc reusing and returning
/// memory): forked
/// at the freeze and not, each snapshot, restored, holds the interpreter of one instant. The
/// restored process replays its run from the start up to the step it was captured at and
/// finds every object as that replay makes it, then goes on.
#[test]
fn python_churning_its_heap_is_restored_as_of_one_instant() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // (Checked at the top of the loop, where the state is whole: the handler only asks.)
    let script = r#"import hashlib, random, signal
def run(steps=None):
    rng, items, total, step = random.Random(7), {}, 0, 0
    while steps is None or step < steps:
        if steps is None and asked:
            asked.clear()
            again, again_total = run(step)
            mine = {k: hashlib.sha1(v).digest() for k, v in items.items()}
            ok = mine == again and total == again_total == sum(map(len, items.values()))
            print('check', 'ok' if ok else 'BAD', 'step', step, flush=True)
        k = rng.randrange(20000)
        old = items.get(k)
        if old is not None:
            total -= len(old)
        if rng.random() < 0.3:
            items.pop(k, None)
        else:
            v = rng.randbytes(rng.randrange(1, 4096))
            items[k] = v
            total += len(v)
        step += 1
    return {k: hashlib.sha1(v).digest() for k, v in items.items()}, total
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
print('ready', flush=True)
run()
"#;
    let mut py = python_ready(script, &out);
    let pid = py.pid();
    std::thread::sleep(Duration::from_millis(300)); // well into its churning
    let check = |what: &str| {
        let line = ask(pid, &out, "check");
        assert!(line.starts_with("check ok"), "{what}: {line}");
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let before = check("before the captures");
    let ids: Vec<String> = ["always", "never"]
        .iter()
        .map(|fork| {
            let record = dolly.capture_with(pid, &["--fork", fork, "--parent", "none"]);
            assert_eq!(record["forked"], u64::from(*fork == "always"), "{record}");
            record["id"].as_str().unwrap().to_string()
        })
        .collect();
    py.kill_and_reap();
    // (Each restored process is at a step of its own instant: after the check made before
    // the captures, and the second capture's after the first's.)
    let mut last = before;
    for id in &ids {
        let restored = dolly.restore(id);
        let at = check(&format!("snapshot {id}"));
        assert!(at > last, "snapshot {id}: step {at}, not after {last}");
        assert!(check(&format!("snapshot {id}, later")) > at, "it goes on");
        last = at;
        drop(restored);
        reap_until_gone(pid);
    }
}

/// Captures in a row of a process that writes, drops and maps over its memory all the while
/// (pre-copy reads its areas as they change, forks it at most freezes): each snapshot,
/// restored, holds the memory of one instant. (Pre-copy once tracked an area the kernel listed
/// twice while the process remapped it, and stored stale pages in about one forked capture in
/// fifteen.)
#[test]
fn captures_in_a_row_of_a_busy_writer_each_hold_one_instant() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut prog = start_scribbler(dir.path(), &["--mib", "64"]);
    let pid = prog.pid();
    std::thread::sleep(Duration::from_millis(300));
    let ids: Vec<String> = (0..8)
        .map(|_| {
            let record = dolly.capture_with(pid, &["--parent", "none"]);
            record["id"].as_str().unwrap().to_string()
        })
        .collect();
    prog.kill_and_reap();
    for id in &ids {
        drop(restore_verified(&dolly, id, pid, &log));
        reap_until_gone(pid);
    }
}

/// A tree whose processes the freeze forks (`--fork always`) to read their pages after the
/// thaw: neither process sees a trace of its fork (no SIGCHLD, no child, no zombie), the
/// child it has is still its only one, and the snapshot holds the memory of the freeze. The
/// pipe between them is the tree's own (the forks, which share their fds, do not count as
/// holders outside it) and comes back with what it held.
#[test]
fn processes_forked_at_the_freeze_see_no_trace_of_it() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"import hashlib, os, random, signal, time
got = []
signal.signal(signal.SIGCHLD, lambda *_: got.append(1))
data = bytearray(random.Random(5).randbytes(8 << 20))
r, w = os.pipe()
kid = os.fork()
if kid == 0:
    os.close(r)
    data[0] = 1
    os.write(w, b'from the child')
    while True:
        time.sleep(1)
os.close(w)
def report(*_):
    print('state', len(got), hashlib.sha256(data).hexdigest(), flush=True)
def drain(*_):
    print('pipe', os.read(r, 100), flush=True)
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGUSR2, drain)
print('ready', flush=True)
while True:
    time.sleep(1)
"#;
    let prog = python_ready(script, &out);
    let pid = prog.pid();
    let before = tree(pid);
    assert_eq!(before.len(), 2, "python and its child");
    let traces: Vec<_> = before.iter().map(|&p| capture_traces(p)).collect();
    let state = ask(pid, &out, "state");
    let cap = dolly.capture_with(pid, &["--fork", "always"]);
    assert_eq!(cap["forked"], 2, "{cap}");
    assert_eq!(cap["processes"], 2, "{cap}");
    // No SIGCHLD, the same digest, and no other child (nor zombie) than the one it made;
    // no thread or memory of dolly's left.
    assert_eq!(ask(pid, &out, "state"), state);
    assert_eq!(tree(pid), before);
    let after: Vec<_> = before.iter().map(|&p| capture_traces(p)).collect();
    assert_eq!(after, traces);

    dolly.end_originals(cap["id"].as_str().unwrap());
    drop(prog);
    let _restored = dolly.restore(cap["id"].as_str().unwrap());
    assert_eq!(ask(pid, &out, "state"), state, "the memory of the freeze");
    assert_eq!(tree(pid), before);
    kill(Pid::from_raw(pid), Signal::SIGUSR2).unwrap();
    wait_until("the pipe read", Duration::from_secs(10), || {
        read(&out).contains("pipe ")
    });
    assert!(
        read(&out).contains("pipe b'from the child'"),
        "{}",
        read(&out)
    );
}

/// A refusal found in one process of a tree after another was forked at the freeze (the
/// parent is inspected, and forked, first; its child holds a connection to outside the
/// tree): the capture fails with that refusal, the parent's fork is ended and reaped while
/// the tree is still frozen, and both processes run on untraced, with no SIGCHLD, no child
/// and no zombie they did not make, and no snapshot left.
#[test]
fn a_refusal_after_a_fork_ends_the_fork_and_leaves_the_tree_as_it_was() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sock = dir.path().join("sock");
    let server = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let script = format!(
        r#"import hashlib, os, random, signal, socket, time
got = []
signal.signal(signal.SIGCHLD, lambda *_: got.append(1))
data = bytearray(random.Random(5).randbytes(8 << 20))
kid = os.fork()
if kid == 0:
    s = socket.socket(socket.AF_UNIX)
    s.connect({sock:?})
    while True:
        time.sleep(1)
def report(*_):
    print('state', len(got), hashlib.sha256(data).hexdigest(), flush=True)
signal.signal(signal.SIGUSR1, report)
print('ready', flush=True)
while True:
    time.sleep(1)
"#
    );
    let prog = python_ready(&script, &out);
    // The peer stays with this test process: outside the captured tree.
    let _peer = server.accept().unwrap().0;
    let pid = prog.pid();
    let before = tree(pid);
    assert_eq!(before.len(), 2, "python and its child");
    let traces: Vec<_> = before.iter().map(|&p| capture_traces(p)).collect();
    let state = ask(pid, &out, "state");
    let pid_arg = pid.to_string();
    let run = dolly
        .cmd()
        .env("DOLLY_TRACE", "1")
        .args(["snapshot", "capture", "--pid", &pid_arg, "--fork", "always"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a unix socket connected to process")
            && err.contains("outside the captured tree"),
        "the child's refusal: {err}"
    );
    assert!(
        err.contains(&format!("cow: {pid} forked as")),
        "the parent was forked before the refusal: {err}"
    );
    for p in &before {
        assert_eq!(proc_status(*p, "TracerPid").as_deref(), Some("0"));
        let state = proc_status(*p, "State").unwrap();
        assert!(state.starts_with('S') || state.starts_with('R'), "{state}");
    }
    // No SIGCHLD, the same memory, and no other child (nor zombie) than the one it made;
    // no thread or memory of dolly's left.
    assert_eq!(ask(pid, &out, "state"), state);
    assert_eq!(tree(pid), before);
    let after: Vec<_> = before.iter().map(|&p| capture_traces(p)).collect();
    assert_eq!(after, traces);
    assert!(dolly.list().is_empty(), "{:?}", dolly.list());
    // (The child too: it would outlive its parent, killed on drop.)
    kill_tree(&before);
}

/// `snapshot info --json` of a snapshot.
fn info(dolly: &Dolly, id: &str) -> serde_json::Value {
    serde_json::from_str(&dolly.ok(&["--json", "snapshot", "info", id])).unwrap()
}

/// Captures, returning as soon as the snapshot is created while its persister is held in
/// the middle of its copy (`persist:chunk`); returns the id and the persister's PID.
fn capture_held(dolly: &Dolly, pid: i32) -> (String, i32) {
    let out = run_ok(dolly.cmd().env("DOLLY_PAUSE_AT", "persist:chunk").args([
        "snapshot",
        "capture",
        "--pid",
        &pid.to_string(),
    ]));
    let id = out.lines().last().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = info(dolly, &id);
        let persister = now["persister"].as_i64().unwrap_or(0) as i32;
        if persister != 0 {
            return (id, persister);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no persister started for the snapshot: {now}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waiting for a status later, and a snapshot its persister left `created`: `info --wait
/// persisted` waits for the capture that returned at the freeze; for the snapshot whose
/// persister was killed it says at once that nothing makes it durable, naming `snapshot
/// persist`, which makes it durable; with the memory tier wiped, it then restores from the
/// durable tier.
#[test]
fn a_snapshot_waited_for_later_and_one_left_created_made_durable_on_demand() {
    let dolly = Dolly::new();
    let mut w = Workload::start(16);
    let pid = w.pid();
    let out = run_ok(
        dolly
            .cmd()
            .args(["snapshot", "capture", "--pid", &pid.to_string()]),
    );
    let id = out.lines().last().unwrap().to_string();
    let waited: serde_json::Value = serde_json::from_str(&dolly.ok(&[
        "--json",
        "snapshot",
        "info",
        &id,
        "--wait",
        "persisted",
    ]))
    .unwrap();
    assert_eq!(waited["status"], "persisted", "{waited}");

    let (left, persister) = capture_held(&dolly, pid);
    kill(Pid::from_raw(persister), Signal::SIGKILL).unwrap();
    wait_until("the persister to be gone", Duration::from_secs(5), || {
        info(&dolly, &left)["persisting"] == false
    });
    let err = dolly.refused(&["snapshot", "info", &left, "--wait", "persisted"]);
    assert!(
        err.contains("nothing is making it durable")
            && err.contains(&format!("dolly snapshot persist {left}")),
        "{err}"
    );
    // (`created` counts as reached for `--wait created`.)
    let created: serde_json::Value = serde_json::from_str(
        &dolly.ok(&["--json", "snapshot", "info", &left, "--wait", "created"]),
    )
    .unwrap();
    assert_eq!(created["status"], "created", "{created}");

    let persisted: serde_json::Value =
        serde_json::from_str(&dolly.ok(&["--json", "snapshot", "persist", &left])).unwrap();
    assert_eq!(persisted["status"], "persisted", "{persisted}");
    assert_eq!(info(&dolly, &left)["status"], "persisted");
    std::fs::remove_dir_all(dolly.pool_dir(&left)).unwrap();
    assert_eq!(info(&dolly, &left)["status"], "persisted");
    w.proc.kill_and_reap();
    let _restored = dolly.restore(&left);
    assert_report_ok(&w.report(pid));
}

/// Statuses: a capture returns `created` at once, its pages are made durable in the
/// background (`--wait persisted` waits for it) and `snapshot info` tells the frozen time,
/// the times to created and to persisted, and the bytes. A snapshot is restorable while
/// still `created`; its persister killed, it stays `created` (restorable, never shown as
/// persisted). With the memory tier wiped, as by a reboot, persisted snapshots restore from
/// the durable tier and created ones show `incomplete`.
#[test]
fn statuses_created_then_persisted_and_what_a_wiped_memory_tier_leaves() {
    let dolly = Dolly::new();
    let w = Workload::start(16);
    let pid = w.pid();

    let persisted = dolly.capture_with(pid, &["--wait", "persisted"]);
    assert_eq!(persisted["status"], "persisted", "{persisted}");
    let id_p = persisted["id"].as_str().unwrap().to_string();
    let i = info(&dolly, &id_p);
    for key in ["frozen_ms", "created_ms", "persisted_ms"] {
        assert!(i[key].as_f64().unwrap() > 0.0, "{key}: {i}");
    }
    assert!(
        i["persisted_ms"].as_f64() >= i["created_ms"].as_f64(),
        "{i}"
    );
    assert!(i["bytes"].as_u64().unwrap() > 8 << 20, "{i}");

    // Created, its persister held: restorable all the same.
    let (id_c, persister) = capture_held(&dolly, pid);
    assert_eq!(info(&dolly, &id_c)["status"], "created");
    assert_eq!(info(&dolly, &id_c)["persisting"], true);
    let mut w = w;
    w.proc.kill_and_reap();
    let restored = dolly.restore(&id_c);
    assert_report_ok(&w.report(pid));
    drop(restored);
    reap_until_gone(pid);

    // The persister killed mid-way: still created, not persisting, restorable.
    kill(Pid::from_raw(persister), Signal::SIGKILL).unwrap();
    wait_until("the persister to be gone", Duration::from_secs(5), || {
        info(&dolly, &id_c)["persisting"] == false
    });
    assert_eq!(info(&dolly, &id_c)["status"], "created");

    // The memory tier wiped.
    for id in [&id_p, &id_c] {
        std::fs::remove_dir_all(dolly.pool_dir(id)).unwrap();
    }
    assert_eq!(info(&dolly, &id_p)["status"], "persisted");
    assert_eq!(info(&dolly, &id_c)["status"], "incomplete");
    let err = dolly.refused(&["snapshot", "restore", &id_c]);
    assert!(err.contains("incomplete"), "{err}");
    let restored = dolly.restore(&id_p);
    assert_report_ok(&w.report(pid));
    drop(restored);
}

/// `--parent`: a second capture of a process stores only the pages that changed since the
/// first and shares the rest; its parent deleted (and, once persisted, the memory tier
/// wiped), it restores with every page of its own instant, and a chain goes on.
#[test]
fn incremental_snapshots_store_what_changed_and_outlive_their_parent() {
    let dolly = Dolly::new();
    let w = Workload::start(32);
    let pid = w.pid();
    let err = dolly.refused(&[
        "snapshot",
        "capture",
        "--pid",
        &pid.to_string(),
        "--parent",
        "nope",
    ]);
    assert!(
        err.contains("nope") && err.contains("snapshot list"),
        "{err}"
    );
    assert!(dolly.list().is_empty(), "a refused capture leaves nothing");
    let full = dolly.capture_with(pid, &[]);
    let id_full = full["id"].as_str().unwrap().to_string();
    w.wait_ticks(2);
    // (`auto`: the newest snapshot of the same process.)
    let inc = dolly.capture_with(pid, &["--parent", "auto", "--wait", "persisted"]);
    let id_inc = inc["id"].as_str().unwrap().to_string();
    assert_eq!(inc["parent"], id_full.as_str(), "{inc}");
    let (full_bytes, inc_bytes) = (
        full["bytes"].as_u64().unwrap(),
        inc["bytes"].as_u64().unwrap(),
    );
    let shared = inc["shared_bytes"].as_u64().unwrap();
    assert!(
        inc_bytes * 10 < full_bytes,
        "the child stores what changed: {inc_bytes} of {full_bytes} bytes"
    );
    assert!(
        shared + inc_bytes >= full_bytes * 9 / 10,
        "and shares the rest: {shared} + {inc_bytes} of {full_bytes}"
    );
    let at_capture = w.last_tick();

    // The parent deleted: the child restores, and carries on from its own instant.
    dolly.ok(&["snapshot", "delete", &id_full]);
    let mut w = w;
    w.proc.kill_and_reap();
    reap_until_gone(pid);
    let seen = w.ticks().len();
    let restored = dolly.restore(&id_inc);
    assert_report_ok(&w.report(pid));
    // It resumes from the tick it was captured at, with the digest the original had there.
    wait_until(
        "a tick of the restored process",
        Duration::from_secs(20),
        || w.ticks().len() > seen,
    );
    let ticks = w.ticks();
    let (tick, digest, _) = &ticks[seen];
    assert!(
        *tick <= at_capture + 1,
        "resumed at tick {tick}, captured at {at_capture}"
    );
    if let Some(original) = ticks[..seen].iter().find(|t| t.0 == *tick) {
        assert_eq!(
            &original.1, digest,
            "the same state as the original at tick {tick}"
        );
    }

    // A grandchild of the restored process, then the memory tier wiped: restorable from the
    // durable tier (the shared pages' durable copies included).
    // (`auto`: the snapshot it was restored from. Its memory still read from that
    // snapshot's pool is shared, not copied.)
    let grand = dolly.capture_with(pid, &["--parent", "auto", "--wait", "persisted"]);
    let id_grand = grand["id"].as_str().unwrap().to_string();
    assert_eq!(grand["parent"], id_inc.as_str(), "{grand}");
    assert!(
        grand["shared_bytes"].as_u64().unwrap() > full_bytes / 2
            && grand["bytes"].as_u64().unwrap() < full_bytes / 4,
        "{grand}"
    );
    drop(restored);
    reap_until_gone(pid);
    dolly.ok(&["snapshot", "delete", &id_inc]);
    std::fs::remove_dir_all(dolly.pool_dir(&id_grand)).unwrap();
    assert_eq!(info(&dolly, &id_grand)["status"], "persisted");
    let restored = dolly.restore(&id_grand);
    assert_report_ok(&w.report(pid));
    drop(restored);
}

/// An incremental capture of a process rewriting its memory during both captures holds
/// every page as of its own instant: pages found equal to the parent's are shared, pages
/// written after that comparison are copied again at the freeze.
#[test]
fn incremental_capture_of_memory_being_rewritten_is_of_one_instant() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // 64 MiB, of which 8 are rewritten all the time (pages written, dropped, mapped over:
    // the area is split, and its pieces stay tracked).
    let mut prog = start_scribbler(dir.path(), &["--mib", "64", "--hot-mib", "8"]);
    let pid = prog.pid();
    let parent = dolly.capture(pid);
    std::thread::sleep(Duration::from_millis(200));
    let child = dolly.capture_with(pid, &["--parent", &parent]);
    assert!(
        child["shared_bytes"].as_u64().unwrap() > 48 << 20,
        "{child}"
    );
    assert!(child["bytes"].as_u64().unwrap() <= 9 << 20, "{child}");
    std::fs::write(dir.path().join("steady"), b"").unwrap();
    prog.kill_and_reap();
    dolly.ok(&["snapshot", "delete", &parent]);

    let _restored = restore_verified(&dolly, child["id"].as_str().unwrap(), pid, &log);
}

/// Captures `pid` with dolly held between the pre-copy and the freeze while the process,
/// told so by the file DIR/drop, drops pages (until `dropped()`); returns the snapshot id.
fn capture_dropping_before_the_freeze(
    dolly: &Dolly,
    pid: i32,
    dir: &Path,
    dropped: impl Fn() -> bool,
) -> String {
    let go = dir.join("go");
    // (Until created: the fork a freeze may make of it is gone by then.)
    let (capture, _) = start_paused_with(
        dolly,
        &[
            "snapshot",
            "capture",
            "--pid",
            &pid.to_string(),
            "--wait",
            "created",
        ],
        "capture:precopied",
        &[("DOLLY_PAUSE_UNTIL", go.as_os_str())],
    );
    std::fs::write(dir.join("drop"), b"").unwrap();
    wait_until("the drop", Duration::from_secs(10), dropped);
    std::fs::write(&go, b"").unwrap();
    let out = capture.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8(out.stdout).unwrap();
    id.lines().last().unwrap().to_string()
}

/// Pages a process drops after the pre-copy copied them and before the freeze, and never
/// writes again, are not in the snapshot: they read as zeros after a restore. (The quick
/// walk at the freeze only sees which pages were written; the userfaultfd's events tell it
/// where pages went.)
#[test]
fn pages_dropped_between_the_precopy_and_the_freeze_are_left_out() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut prog = start_scribbler(dir.path(), &["--mib", "16", "--hot-mib", "4"]);
    let pid = prog.pid();
    let id = capture_dropping_before_the_freeze(&dolly, pid, dir.path(), || {
        read(&log).contains("dropped")
    });
    std::fs::write(dir.path().join("steady"), b"").unwrap();
    prog.kill_and_reap();

    let _restored = restore_verified(&dolly, &id, pid, &log);
}

/// The same for a private file mapping: pages the process wrote (its own copies) and then
/// dropped between the pre-copy and the freeze read the file again after a restore. (Such
/// drops leave userfaultfd markers the quick walk skips: only the events find them.)
#[test]
fn dropped_copies_of_a_private_file_mapping_read_the_file_again() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, vec![b'F'; 1 << 20]).unwrap();
    let script = format!(
        r#"
import mmap, os, signal, time
f = open({data:?}, "r+b")
m = mmap.mmap(f.fileno(), 1 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
m[:] = b"W" * (1 << 20)
def report(*_):
    with open({out:?}, "wb") as o:
        o.write(bytes(m[::4096]))
signal.signal(signal.SIGUSR1, report)
print("ready", flush=True)
while not os.path.exists({drop:?}):
    time.sleep(0.01)
m.madvise(mmap.MADV_DONTNEED)
open({dropped:?}, "w").close()
while True:
    time.sleep(0.05)
"#,
        data = data.to_str().unwrap(),
        out = dir.path().join("pages").to_str().unwrap(),
        drop = dir.path().join("drop").to_str().unwrap(),
        dropped = dir.path().join("dropped").to_str().unwrap(),
    );
    let mut py = python_ready(&script, &dir.path().join("out"));
    let pid = py.pid();
    let id = capture_dropping_before_the_freeze(&dolly, pid, dir.path(), || {
        dir.path().join("dropped").exists()
    });
    py.kill_and_reap();
    reap_until_gone(pid);

    let _restored = dolly.restore(&id);
    let pages = dir.path().join("pages");
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("the report", Duration::from_secs(10), || {
        std::fs::read(&pages).is_ok_and(|p| p.len() == 256)
    });
    let seen = std::fs::read(&pages).unwrap();
    assert!(
        seen.iter().all(|&b| b == b'F'),
        "every page reads the file again: {}",
        String::from_utf8_lossy(&seen)
    );
}

/// Identical pages of two instances of one program are stored once: a second python3
/// holding the same 16 MiB at other addresses, captured with `--parent auto` (the newest
/// snapshot of the same command), shares them with the first one's snapshot, found by
/// content; it restores with them after that snapshot is deleted.
#[test]
fn pages_of_another_instance_of_the_program_are_found_by_content() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let script = |pad_mib: u32| {
        format!(
            r#"import hashlib, random, signal, time
pad = bytearray({pad_mib} << 20)  # puts what follows elsewhere
data = bytearray(random.Random(7).randbytes(16 << 20))
def report(*_):
    print('digest', hex(id(data)), hashlib.sha256(data).hexdigest(), flush=True)
signal.signal(signal.SIGUSR1, report)
print('ready', flush=True)
while True:
    time.sleep(1)
"#
        )
    };
    // The digest line of the process at `pid` writing to `out`: (address, digest).
    let digest = |pid: i32, out: &Path| -> (String, String) {
        let line = ask(pid, out, "digest");
        let words: Vec<&str> = line.split(' ').collect();
        (words[1].to_string(), words[2].to_string())
    };
    let (out_a, out_b) = (dir.path().join("a"), dir.path().join("b"));
    let a = python_ready(&script(0), &out_a);
    let id_a = dolly.capture_with(a.pid(), &["--wait", "created"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = python_ready(&script(3), &out_b);
    let (at_a, digest_a) = digest(a.pid(), &out_a);
    let (at_b, digest_b) = digest(b.pid(), &out_b);
    assert_eq!(digest_a, digest_b);
    assert_ne!(at_a, at_b, "the same bytes at other addresses");

    let inc = dolly.capture_with(b.pid(), &["--parent", "auto", "--wait", "created"]);
    assert_eq!(inc["parent"], id_a.as_str(), "{inc}");
    let shared = inc["shared_bytes"].as_u64().unwrap();
    assert!(
        shared >= 15 << 20,
        "the 16 MiB are the parent's already: {shared} bytes shared, {} stored",
        inc["bytes"]
    );

    let id_b = inc["id"].as_str().unwrap().to_string();
    dolly.ok(&["snapshot", "delete", &id_a]);
    drop(a);
    dolly.end_originals(&id_b);
    let _restored = dolly.restore(&id_b);
    assert_eq!(
        digest(b.pid(), &out_b),
        (at_b, digest_b),
        "the restored copy holds the same bytes where they were"
    );
}

/// Memory mapped while the capture copies (a fresh private mapping every few ms, each filled
/// with a pattern of its own, at addresses never used before: none is unmapped) is taken as
/// of the freeze too: pre-copy tracks the mappings that appear between its rounds. The
/// restored copy checks every byte of every buffer it holds.
#[test]
fn memory_mapped_during_the_precopy_is_captured_whole() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"import mmap, signal, time
SIZE = 1 << 20
bufs = []
def pattern(seed):
    return seed.to_bytes(8, 'little') * (SIZE // 8)
def check(*_):
    bad = sum(1 for m, seed in bufs if m[:] != pattern(seed))
    print('check', 'bad', bad, flush=True)
signal.signal(signal.SIGUSR1, check)
turn = 0
while True:
    if turn < 400:
        m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE)
        m[:] = pattern(turn)
        bufs.append((m, turn))
    turn += 1
    if turn == 20:
        print('ready', flush=True)
    time.sleep(0.003)
"#;
    let py = python_ready(script, &out);
    let pid = py.pid();
    let checked = |pid: i32, out: &Path| ask(pid, out, "check");
    assert_eq!(checked(pid, &out), "check bad 0");
    let id = dolly.capture(pid);
    dolly.end_originals(&id);
    let _restored = dolly.restore(&id);
    assert_eq!(checked(pid, &out), "check bad 0", "{}", read(&out));
    // And it goes on (mapping and filling more, up to 400 buffers).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(checked(pid, &out), "check bad 0");
}

/// `--fork always` does not fork a process holding memory a fork would not copy
/// (`MADV_DONTFORK`, which examples/workload has): the freeze copies it itself, and the
/// restored process finds that memory as it was.
#[test]
fn memory_a_fork_would_not_copy_is_copied_at_the_freeze() {
    let dolly = Dolly::new();
    let mut w = Workload::start(2);
    let pid = w.pid();
    let cap = dolly.capture_with(pid, &["--fork", "always"]);
    assert_eq!(cap["forked"], 0, "{cap}");
    w.proc.kill_and_reap();
    let _restored = dolly.restore(cap["id"].as_str().unwrap());
    w.wait_ticks(2);
    assert_report_ok(&w.report(pid));
}

/// By default `snapshot capture` returns as soon as the freeze is over: the snapshot reads
/// `capturing` (its frozen time known) while the worker stores the last pages (here read
/// from the fork of a process that rewrites its memory), then `created`. A clone and a
/// restore asked for meanwhile wait for it, and bring back the memory of the freeze.
#[test]
fn capture_returns_when_the_freeze_is_over() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut prog = start_scribbler(dir.path(), &["--mib", "256"]);
    let pid = prog.pid();
    std::thread::sleep(Duration::from_millis(300));
    let pid_arg = pid.to_string();
    // (Forked whatever the writer managed to write meanwhile: under the load of the other
    // tests, `--fork auto` may find copying at the freeze cheaper.)
    let args = [
        "--json", "snapshot", "capture", "--pid", &pid_arg, "--fork", "always",
    ];
    let out = dolly.ok(&args);
    let cap: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = cap["id"].as_str().unwrap().to_string();
    assert_eq!(cap["status"], "capturing", "{cap}");
    assert!(cap["frozen_ms"].as_f64().unwrap() > 0.0, "{cap}");
    // The fork, if its pages are still being read.
    let forks: Vec<i32> = tree(pid).into_iter().skip(1).collect();
    std::fs::write(dir.path().join("steady"), b"").unwrap();
    // A clone asked for meanwhile waits for it too.
    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    prog.kill_and_reap();

    let mut restore = dolly
        .cmd()
        .args(["snapshot", "restore", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The fork outlives the original a moment: this test process, a subreaper, adopts it
    // and must reap it (PID 1 would) for the restore to have the process group.
    let status = loop {
        for &f in &forks {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(f),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        if let Some(status) = restore.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{:?}", restore.wait_with_output());
    let _restored = Restored(pid);
    let record = info(&dolly, &id);
    assert_eq!(record["forked"], 1, "{record}");
    assert!(record["bytes"].as_u64().unwrap() > 128 << 20, "{record}");
    let verdict = verify(pid, &log);
    assert!(verdict.starts_with("verify ok"), "{verdict}");
    let inside = clone.inside(&log);
    let verdict = verify(clone.host, &inside);
    assert!(verdict.starts_with("verify ok"), "{verdict}");
    dolly.kill_clones(&clone);
}

/// A memory cgroup with a limit, made for a test and removed after it (the process moved
/// back to its own cgroup first).
struct LimitedCgroup {
    dir: std::path::PathBuf,
    home: std::path::PathBuf,
    pid: i32,
}

impl LimitedCgroup {
    /// Moves `pid` into a new cgroup v1 memory cgroup under this test's own, limited to
    /// `limit` bytes.
    fn enter(pid: i32, limit: u64) -> LimitedCgroup {
        let own = read(Path::new("/proc/self/cgroup"));
        let path = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .expect("a cgroup v1 memory controller (this machine has one)");
        let home = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let dir = home.join(format!("dolly-test-{pid}"));
        std::fs::create_dir(&dir).unwrap();
        let cgroup = LimitedCgroup { dir, home, pid };
        std::fs::write(cgroup.dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        std::fs::write(cgroup.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        cgroup
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A process that writes fast enough to be forked at the freeze is not, when its memory
/// cgroup has less room than it holds (the kernel's copies as it writes would be charged
/// there): the freeze copies its pages itself, and the snapshot holds one instant.
#[test]
fn a_process_whose_cgroup_lacks_room_is_not_forked() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::write(dir.path().join("steady"), b"").unwrap();
    let mut prog = start_scribbler(dir.path(), &["--mib", "64"]);
    let pid = prog.pid();
    // Without a limit it is forked (at least once in eight captures: while other tests
    // load both cores, a pre-copy round may keep up with it, and then it need not be; three
    // were once not enough in CI).
    let free: Vec<serde_json::Value> = (0..8)
        .map(|_| dolly.capture_with(pid, &["--parent", "none"]))
        .take_while(|c| c["forked"] != 1)
        .collect();
    assert!(free.len() < 8, "without a limit it is forked: {free:?}");
    let cgroup = LimitedCgroup::enter(pid, 16 << 20);
    let limited = dolly.capture_with(pid, &["--parent", "none"]);
    assert_eq!(limited["forked"], 0, "{limited}");
    drop(cgroup);
    prog.kill_and_reap();
    let _restored = restore_verified(&dolly, limited["id"].as_str().unwrap(), pid, &log);
}

/// Memory a process maps between the pre-copy and the freeze has its kernel flags read
/// after the thaw, from the fork the freeze made (`--fork always`): an anonymous area and a
/// private file mapping advised `MADV_DONTDUMP` come back with that flag and their data. Memory a fork lacks or wipes
/// (`MADV_DONTFORK`, `MADV_WIPEONFORK`, advised in that moment on a new area or on one the
/// pre-copy knew) fails the capture with a clear error, and leaves the process running,
/// untraced, with no child. In a process with locked memory (which a fork's areas never
/// are), a new area comes back locked.
#[test]
fn flags_of_memory_mapped_just_before_the_freeze_are_read_from_the_fork() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ask_file = dir.path().join("ask");
    let data = dir.path().join("data");
    std::fs::write(&data, b"file!!!!".repeat(1 << 17)).unwrap();
    // Asked "map ADVICE", it maps a new area and advises it; "advise ADVICE" advises the
    // last one again. Then it prints "done N 0xADDRESS".
    let script = format!(
        r#"import ctypes, mmap, os, time
ASK = {ask:?}
DATA = {data:?}
bufs = []
done = 0
print('ready', flush=True)
while True:
    if os.path.exists(ASK):
        verb, advice = open(ASK).read().split()
        os.unlink(ASK)
        if verb == 'write':
            bufs[-1][:] = bufs[-1][:]
        elif verb == 'mlockall':
            assert ctypes.CDLL(None).mlockall(3) == 0  # MCL_CURRENT | MCL_FUTURE
        elif verb == 'map':
            m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)
            m[:] = b'dolly!!!' * (1 << 17)
            bufs.append(m)
        elif verb == 'mapfile':
            with open(DATA, 'rb') as f:
                bufs.append(mmap.mmap(f.fileno(), 1 << 20, access=mmap.ACCESS_COPY))
        # (Python's mmap module lacks the last two.)
        if verb not in ('mlockall', 'write'):
            bufs[-1].madvise({{'MADV_WIPEONFORK': 18, 'MADV_KEEPONFORK': 19}}.get(advice) or getattr(mmap, advice))
        done += 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(bufs[-1]))
        print('done', done, hex(addr), flush=True)
    time.sleep(0.002)
"#,
        ask = ask_file.to_str().unwrap(),
        data = data.to_str().unwrap(),
    );
    let py = python_ready(&script, &out);
    let pid = py.pid();
    let pid_arg = pid.to_string();
    let asked = std::cell::Cell::new(0);
    // Asks the process to do `what` (renamed into place: never read half-written) and
    // waits until it has.
    let ask = |what: &str| {
        let part = dir.path().join("ask.part");
        std::fs::write(&part, what).unwrap();
        std::fs::rename(&part, &ask_file).unwrap();
        asked.set(asked.get() + 1);
        let line = format!("done {} ", asked.get());
        wait_until(what, Duration::from_secs(10), || read(&out).contains(&line));
    };
    // A capture held after its pre-copy (the areas' flags read) while the process does
    // `what`; returns the capture's output (with --json, errors too are on stdout: the
    // paused run's stderr is read for the pause).
    let capture_while = |whats: &[&str]| {
        let go = dir.path().join("go");
        let _ = std::fs::remove_file(&go);
        let (capture, _) = start_paused_with(
            &dolly,
            &[
                "--json", "snapshot", "capture", "--pid", &pid_arg, "--fork", "always", "--wait",
                "created",
            ],
            "capture:precopied",
            &[("DOLLY_PAUSE_UNTIL", go.as_os_str())],
        );
        for what in whats {
            ask(what);
        }
        std::fs::write(&go, b"").unwrap();
        capture.wait_with_output().unwrap()
    };
    let refused = |whats: &[&str]| {
        let what = whats.join(", ");
        let failed = capture_while(whats);
        assert!(!failed.status.success(), "{what}: {failed:?}");
        let err = String::from_utf8_lossy(&failed.stdout);
        assert!(err.contains("left out of forks"), "{what}: {err}");
        assert!(err.contains("--fork never"), "{what}: {err}");
        assert_eq!(
            proc_status(pid, "TracerPid").as_deref(),
            Some("0"),
            "left traced"
        );
        assert_eq!(tree(pid), vec![pid], "no child left behind");
    };

    let done = capture_while(&["mapfile MADV_DONTDUMP", "map MADV_DONTDUMP"]);
    assert!(done.status.success(), "{done:?}");
    let record: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(record["forked"], 1, "{record}");
    // The address of the area mapped last.
    let last_address = || {
        let text = read(&out);
        let last = text.lines().rfind(|l| l.starts_with("done")).unwrap();
        u64::from_str_radix(last.rsplit("0x").next().unwrap(), 16).unwrap()
    };
    let at = last_address();
    let file_at = {
        let text = read(&out);
        let line = text.lines().find(|l| l.starts_with("done 1 ")).unwrap();
        u64::from_str_radix(line.rsplit("0x").next().unwrap(), 16).unwrap()
    };
    refused(&["advise MADV_WIPEONFORK"]);
    ask("advise MADV_KEEPONFORK");
    // Wiped in the fork, and every page written since the last round: the fork holds none
    // of the area's pages where pre-copy had some.
    refused(&["advise MADV_WIPEONFORK", "write -"]);
    ask("advise MADV_KEEPONFORK");
    refused(&["advise MADV_DONTFORK"]);
    ask("advise MADV_DOFORK");
    refused(&["map MADV_DONTFORK"]);
    ask("advise MADV_DOFORK");
    // A fork's areas are never locked: in a process with locked memory the flags of new
    // areas are read at the freeze, from the process.
    ask("mlockall -");
    let locked = capture_while(&["map MADV_NORMAL"]);
    assert!(locked.status.success(), "{locked:?}");
    let locked: serde_json::Value = serde_json::from_slice(&locked.stdout).unwrap();
    assert_eq!(locked["forked"], 1, "{locked}");
    let locked_at = last_address();

    drop(py);
    reap_until_gone(pid);
    // The flags of area `at` in restored process `pid`.
    let flags_at = |at: u64| {
        let smaps = read(Path::new(&format!("/proc/{pid}/smaps")));
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{at:x}-")))
            .find(|l| l.starts_with("VmFlags:"))
            .unwrap_or_else(|| panic!("no area at {at:#x}: {smaps}"))
            .to_string()
    };
    let restored = dolly.restore(record["id"].as_str().unwrap());
    let flags = flags_at(at);
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    let mut data = vec![0u8; 16];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut data, at + 4096).unwrap();
    assert_eq!(&data, b"dolly!!!dolly!!!");
    let flags = flags_at(file_at);
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut data, file_at + 4096).unwrap();
    assert_eq!(&data, b"file!!!!file!!!!");
    drop(mem);
    drop(restored);
    reap_until_gone(pid);
    let _restored = dolly.restore(locked["id"].as_str().unwrap());
    let flags = flags_at(locked_at);
    assert!(flags.split_whitespace().any(|f| f == "lo"), "{flags}");
}

/// Huge pages reserved for a test (`/proc/sys/vm/nr_hugepages`), given back after it.
struct HugePages(String);

impl HugePages {
    fn reserve(pages: u32) -> HugePages {
        let path = "/proc/sys/vm/nr_hugepages";
        let before = read(Path::new(path)).trim().to_string();
        let want = before.parse::<u32>().unwrap_or(0).max(pages);
        std::fs::write(path, want.to_string()).unwrap();
        HugePages(before)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", &self.0);
    }
}

/// A process with hugetlb memory is not forked at the freeze, even with `--fork always`:
/// with the pool of huge pages empty, its copy-on-write would take a huge page from the
/// fork. The freeze copies it, and the restored process finds its data.
#[test]
fn hugetlb_memory_is_not_forked() {
    let dolly = Dolly::new();
    let _pages = HugePages::reserve(4);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"import mmap, signal, time
SIZE = 2 << 20
m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)  # MAP_HUGETLB
m[:] = b'huge!!!!' * (SIZE // 8)
def check(*_):
    print('check', 'ok' if m[:] == b'huge!!!!' * (SIZE // 8) else 'bad', flush=True)
signal.signal(signal.SIGUSR1, check)
print('ready', flush=True)
while True:
    time.sleep(0.01)
"#;
    let py = python_ready(script, &out);
    let pid = py.pid();
    let cap = dolly.capture_with(pid, &["--fork", "always"]);
    assert_eq!(cap["forked"], 0, "{cap}");
    drop(py);
    reap_until_gone(pid);
    let _restored = dolly.restore(cap["id"].as_str().unwrap());
    assert_eq!(ask(pid, &out, "check"), "check ok");
}

/// A process denied writable and executable memory (`PR_SET_MDWE`) is forked at the freeze
/// all the same (dolly's code page is then a mapping of its own, left out of the image with
/// the rest of dolly's memory), and the restored process finds the memory of a single
/// instant: what it wrote all over its pages agrees with its own record of it.
#[test]
fn a_process_denied_writable_executable_memory_is_forked_too() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"import ctypes, mmap, random, signal, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(65, 1, 0, 0, 0) == 0, ctypes.get_errno()  # PR_SET_MDWE: refuse exec gain
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print('rwx allowed', flush=True)
except OSError:
    pass
PAGES = 4096
data = bytearray(PAGES * 4096)
record = [0] * PAGES
def check(*_):
    bad = sum(1 for i in range(PAGES) if data[i * 4096] != record[i])
    print('check', 'ok' if bad == 0 else 'bad %d' % bad, flush=True)
signal.signal(signal.SIGUSR1, check)
print('ready', flush=True)
n = 0
while True:
    for _ in range(1000):
        n += 1
        i = random.randrange(PAGES)
        data[i * 4096] = n & 255
        record[i] = n & 255
    time.sleep(0.001)
"#;
    let py = python_ready(script, &out);
    let pid = py.pid();
    assert!(!read(&out).contains("rwx allowed"), "{}", read(&out));
    // (Executable memory: where dolly's code page would be seen, in the process as in the
    // image, where it would be a mapping of the snapshot's pages.)
    let code_pages = |pid: i32| {
        read(Path::new(&format!("/proc/{pid}/maps")))
            .lines()
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')))
            .count()
    };
    let before = code_pages(pid);
    let cap = dolly.capture_with(pid, &["--fork", "always"]);
    assert_eq!(cap["forked"], 1, "{cap}");
    assert_eq!(
        code_pages(pid),
        before,
        "dolly's code page left in the process"
    );
    drop(py);
    reap_until_gone(pid);
    let _restored = dolly.restore(cap["id"].as_str().unwrap());
    assert_eq!(ask(pid, &out, "check"), "check ok");
    assert_eq!(code_pages(pid), before, "dolly's code page in the image");
}

/// A process that called `unshare(CLONE_NEWPID)` and has not forked since is not forked at
/// the freeze, even with `--fork always`: its fork would be the first process of the new
/// PID namespace, and once that ends no process can be made there. The process still forks
/// after the capture (its first child is PID 1 of its namespace).
#[test]
fn a_process_about_to_start_a_pid_namespace_is_not_forked() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"import ctypes, os, random, signal, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(0x20000000) == 0, ctypes.get_errno()  # CLONE_NEWPID
data = bytearray(8 << 20)
def fork(*_):
    kid = os.fork()
    if kid == 0:
        print('child', os.getpid(), flush=True)
        os._exit(0)
    os.waitpid(kid, 0)
signal.signal(signal.SIGUSR1, fork)
print('ready', flush=True)
while True:
    for _ in range(1000):
        data[random.randrange(len(data))] = 1
    time.sleep(0.001)
"#;
    let py = python_ready(script, &out);
    let pid = py.pid();
    let cap = dolly.capture_with(pid, &["--fork", "always"]);
    assert_eq!(cap["forked"], 0, "{cap}");
    assert_eq!(ask(pid, &out, "child"), "child 1");
}

/// The capture's trace (`DOLLY_TRACE`, with the worker's steps after the thaw) and record of
/// `pid`, with `extra` arguments, its waits as `DOLLY_WAIT` says (unset if empty); fails if
/// it takes more than a minute.
fn capture_traced(
    dolly: &Dolly,
    pid: i32,
    wait: &str,
    extra: &[&str],
) -> (String, std::process::Output) {
    let pid_arg = pid.to_string();
    let mut cmd = dolly.cmd();
    if !wait.is_empty() {
        cmd.env("DOLLY_WAIT", wait);
    }
    let child = cmd
        .env("DOLLY_TRACE", "1")
        .args(["--json", "snapshot", "capture", "--pid", &pid_arg])
        .args(["--wait", "created"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cli = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = kill(Pid::from_raw(cli), Signal::SIGKILL);
        panic!("the capture of {pid} did not return within a minute");
    };
    (String::from_utf8_lossy(&out.stderr).into_owned(), out)
}

/// A capture whose waits for the process's stops all block (as they do on a busy machine;
/// `DOLLY_WAIT=block` here, the machine being what it is) is as sound as one that polls:
/// the trace says every freeze blocked, and the snapshot, restored, holds one instant of a
/// process that rewrote its memory all the while.
#[test]
fn a_capture_that_blocks_in_its_waits_holds_one_instant() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut prog = start_scribbler(dir.path(), &["--mib", "64"]);
    let pid = prog.pid();
    std::thread::sleep(Duration::from_millis(200));
    let (trace, out) = capture_traced(&dolly, pid, "block", &["--fork", "always"]);
    assert!(out.status.success(), "{trace}");
    // The freeze that sets up tracking, the final one, and the stop that reaps the fork.
    let blocked = trace
        .lines()
        .filter(|l| l.contains("wait: blocking (DOLLY_WAIT)"))
        .count();
    assert_eq!(blocked, 3, "{trace}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["forked"], 1, "{record}");
    let after = verify(pid, &log);
    assert!(after.starts_with("verify ok"), "{after}");
    prog.kill_and_reap();
    let _restored = restore_verified(&dolly, record["id"].as_str().unwrap(), pid, &log);
}

/// A process no stop can reach (waiting in uninterruptible sleep for its vfork child, which
/// waits for a signal) is refused once the freeze's 5 s are over, with the cause and what
/// to do, whether dolly polls for the stop to the end (`DOLLY_WAIT=poll`) or, as it does by
/// default for a thread that has not stopped within 0.1 ms (or on a busy machine), blocks:
/// never an endless wait. It is left as it was (untraced once the capture's worker has ended, still
/// waiting), no snapshot is listed, and once its child ends it goes on.
#[test]
fn a_process_in_uninterruptible_sleep_is_refused_in_time_and_left_as_it_was() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut blocker = blocker("vfork", &out);
    let pid = blocker.pid();
    wait_until("the vfork", Duration::from_secs(10), || {
        proc_status(pid, "State").is_some_and(|s| s.starts_with('D'))
    });
    /// Its child, killed whatever happens.
    struct Child(i32);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
    let child = Child(tree(pid)[1]);
    for wait in ["poll", ""] {
        let (trace, output) = capture_traced(&dolly, pid, wait, &[]);
        assert!(!output.status.success(), "{trace}");
        assert!(
            trace.contains(&format!("process {pid} did not stop within 5s"))
                && trace.contains("uninterruptible sleep"),
            "{trace}"
        );
        // (By default it blocks: from the start on a busy machine, else once the thread has
        // not stopped within 0.1 ms.)
        assert_eq!(trace.contains("wait: blocking"), wait.is_empty(), "{trace}");
        // (Let go as the worker ends: a thread that never stopped cannot be detached.)
        wait_until("the tracer to let go", Duration::from_secs(5), || {
            proc_status(pid, "TracerPid").as_deref() == Some("0")
        });
        assert!(proc_status(pid, "State").is_some_and(|s| s.starts_with('D')));
        assert!(dolly.list().is_empty(), "{:?}", dolly.list());
    }
    // Through the library, in this process, which goes on: let go as the capture's own
    // thread ends (else it would stay traced by this process, to stop in a trap with nobody
    // to let it go once it wakes).
    let store = snapshot::Store::open(dolly.root.path(), dolly.pool.path()).unwrap();
    let opts = snapshot::CaptureOptions {
        pid,
        ..Default::default()
    };
    let err = snapshot::capture(&store, &opts, &snapshot::Checkpoints::none()).unwrap_err();
    assert!(
        err.message()
            .contains(&format!("process {pid} did not stop within 5s"))
            && err
                .remedy()
                .is_some_and(|r| r.contains("uninterruptible sleep")),
        "{err}"
    );
    // (At once: the capture returns once its thread is gone.)
    assert_eq!(proc_status(pid, "TracerPid").as_deref(), Some("0"));
    assert!(proc_status(pid, "State").is_some_and(|s| s.starts_with('D')));
    assert!(dolly.list().is_empty(), "{:?}", dolly.list());
    drop(child);
    let status = blocker.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(read(&out).contains("vfork returned"), "{}", read(&out));
}
