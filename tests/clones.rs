//! Clones: copies of a process in fresh namespaces, running beside the original, each from
//! the captured state and each isolated from the others.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn start_clones(dolly: &Dolly, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json", "clone"];
    all.extend_from_slice(args);
    let out = dolly.ok(&all);
    let clones: Vec<Value> = serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    for c in &clones {
        for key in ["id", "host_pid", "init_pid", "snapshot", "pid"] {
            assert!(!c[key].is_null(), "clone output lacks {key}: {c}");
        }
    }
    clones
}

fn host_pid(c: &Value) -> i32 {
    c["host_pid"].as_i64().unwrap() as i32
}

/// A path inside a running clone, seen from the host.
fn inside(c: &Value, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", host_pid(c))).join(path.strip_prefix("/").unwrap())
}

fn report_in(c: &Value, dir: &Path) -> Value {
    let path = inside(c, &dir.join("report.json"));
    std::fs::write(&path, b"").unwrap();
    kill(Pid::from_raw(host_pid(c)), Signal::SIGUSR1).unwrap();
    let mut report = Value::Null;
    wait_until(
        "a clone's report",
        Duration::from_secs(20),
        || match std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        {
            Some(v) => {
                report = v;
                true
            }
            None => false,
        },
    );
    report
}

/// `(tick, digest, PID namespace)` of each line of a workload log.
fn ticks_in(path: &Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let tick = f.next()?.strip_prefix("tick=")?.parse().ok()?;
            let digest = f.next()?.strip_prefix("digest=")?.to_string();
            let ns = f.nth(1)?.strip_prefix("ns=")?.to_string();
            Some((tick, digest, ns))
        })
        .collect()
}

/// Every process in a PID namespace, by the namespace's inode.
fn processes_in_namespace(ns: u64) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| runtime::ns::namespace_id(p, "pid") == Some(ns))
        .collect()
}

fn kill_all(dolly: &Dolly, clones: &[Value]) {
    dolly.ok(&["clone", "kill", "--all"]);
    for c in clones {
        reap_until_gone(c["init_pid"].as_i64().unwrap() as i32);
    }
}

/// Three clones of the workload run beside it: each at the original PID inside its own
/// namespace, /proc/self is the clone, every self-check holds, each continues from the
/// captured state (its digests equal the original's tick for tick), and what one does is
/// not seen by another. `clone kill` leaves no process, namespace or directory behind.
#[test]
fn workload_clones_run_beside_the_original_each_from_the_captured_state() {
    let dolly = Dolly::new();
    let w = Workload::start(4);
    let pid = w.pid();
    let dir = w.dir.path().to_path_buf();
    let before = w.last_tick();
    let clones = start_clones(
        &dolly,
        &[
            "--pid",
            &pid.to_string(),
            "--count",
            "3",
            "--overlay",
            dir.to_str().unwrap(),
        ],
    );
    let after = w.last_tick();
    assert_eq!(clones.len(), 3);
    let host_ns = runtime::ns::namespace_id(pid, "pid").unwrap();
    let mut namespaces = Vec::new();
    for c in &clones {
        assert_eq!(
            c["pid"], pid,
            "the restored process has the original PID inside"
        );
        assert_ne!(host_pid(c), pid);
        let ns = runtime::ns::namespace_id(host_pid(c), "pid").unwrap();
        assert_ne!(ns, host_ns);
        assert!(
            !namespaces.contains(&ns),
            "each clone has a namespace of its own"
        );
        namespaces.push(ns);
        let nspid = proc_status(host_pid(c), "NSpid").unwrap();
        assert_eq!(nspid, format!("{}\t{pid}", host_pid(c)));
    }
    // Each clone: all its checks hold, getpid() and /proc/self are the original PID.
    for c in &clones {
        let log = inside(c, &dir.join("log"));
        let seen = ticks_in(&log).len();
        wait_until("clone ticks", Duration::from_secs(20), || {
            ticks_in(&log).len() > seen + 3
        });
        let report = report_in(c, &dir);
        assert_report_ok(&report);
        assert_eq!(report["pid"], pid);
        assert_eq!(report["proc_self"], pid.to_string());
    }
    // Each continued from the captured state: its first tick is the one after the capture,
    // and tick for tick it writes the digests the original wrote.
    w.wait_ticks(6);
    let original = ticks_in(&dir.join("log"));
    for (c, ns) in clones.iter().zip(&namespaces) {
        let mine: Vec<_> = ticks_in(&inside(c, &dir.join("log")))
            .into_iter()
            .filter(|t| t.2 == format!("pid:[{ns}]"))
            .collect();
        assert!(mine.len() >= 3, "the clone logged from its own namespace");
        let first = mine[0].0;
        assert!(
            first > before && first <= after + 1,
            "the clone started at tick {first}; captured between {before} and {after}"
        );
        let mut compared = 0;
        for (tick, digest, _) in &mine {
            if let Some(o) = original.iter().find(|o| o.0 == *tick) {
                assert_eq!(&o.1, digest, "tick {tick}");
                compared += 1;
            }
        }
        assert!(compared >= 2, "compared {compared} ticks");
    }
    // The original never saw the clones' lines (they went to their own overlays).
    let host_ticks: Vec<u64> = original.iter().map(|t| t.0).collect();
    assert!(
        host_ticks.windows(2).all(|p| p[1] == p[0] + 1),
        "the original's log is its own"
    );
    // What one clone does, the others do not see.
    kill(Pid::from_raw(host_pid(&clones[0])), Signal::SIGUSR2).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let usr2: Vec<u64> = clones
        .iter()
        .map(|c| report_in(c, &dir)["usr2"].as_u64().unwrap())
        .collect();
    assert_eq!(usr2, vec![1, 0, 0]);
    assert_eq!(w.report(pid)["usr2"], 0);
    assert_report_ok(&w.report(pid));

    kill_all(&dolly, &clones);
    for (c, ns) in clones.iter().zip(&namespaces) {
        assert!(
            processes_in_namespace(*ns).is_empty(),
            "processes left in clone {}",
            c["id"]
        );
        assert!(!Path::new(&format!("/proc/{}", host_pid(c))).exists());
        assert!(!dolly
            .root
            .path()
            .join("clones")
            .join(c["id"].as_str().unwrap())
            .exists());
    }
    assert!(
        serde_json::from_str::<Value>(&dolly.ok(&["--json", "clone", "list"]))
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(" overlay "),
        "no overlay mount reached the host"
    );
    w.wait_ticks(2);
}

fn numbers(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Clones of python3 each continue the interpreter's counter from the captured value,
/// writing to their own copy of its output (--overlay); the original's file is untouched.
#[test]
fn python_clones_continue_independently_behind_overlays() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = "import time\nd = {'n': 0}\nwhile True:\n    d['n'] += 1\n    print(d['n'], flush=True)\n    time.sleep(0.02)\n";
    let py = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    wait_until("python output", Duration::from_secs(10), || {
        numbers(&out).len() >= 10
    });
    let before = *numbers(&out).last().unwrap();
    let id = dolly.capture(py.pid());
    let after = *numbers(&out).last().unwrap();
    // Let the original write on, so each clone's copy of its output shows where it resumed.
    wait_until("more python output", Duration::from_secs(10), || {
        numbers(&out).len() as u64 > after + 10
    });
    let clones = start_clones(
        &dolly,
        &[
            "--snapshot",
            &id,
            "--count",
            "2",
            "--overlay",
            dir.path().to_str().unwrap(),
        ],
    );
    for c in &clones {
        let theirs = inside(c, &out);
        wait_until("clone output", Duration::from_secs(10), || {
            let v = numbers(&theirs);
            (1..v.len())
                .find(|&i| v[i] <= v[i - 1])
                .is_some_and(|r| v.len() > r + 5)
        });
        let v = numbers(&theirs);
        let restart = (1..v.len()).find(|&i| v[i] <= v[i - 1]).unwrap();
        assert!(
            v[restart] > before && v[restart] <= after + 1,
            "the clone resumed at {} (captured between {before} and {after})",
            v[restart]
        );
        assert!(v[restart..].windows(2).all(|p| p[1] == p[0] + 1));
    }
    let mine = numbers(&out);
    assert!(
        mine.windows(2).all(|p| p[1] == p[0] + 1),
        "the original's output has no clone lines"
    );
    kill_all(&dolly, &clones);
    // The original runs on.
    let n = numbers(&out).len();
    wait_until("original output", Duration::from_secs(10), || {
        numbers(&out).len() > n + 3
    });
}

/// --net none: the clone's network has only lo, up; --hostname names its UTS namespace.
#[test]
fn net_none_has_only_loopback_and_hostname_is_private() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let sleeper = Spawned(spawn_detached(
        Command::new("sleep").arg("60"),
        &dir.path().join("out"),
    ));
    let clones = start_clones(
        &dolly,
        &[
            "--pid",
            &sleeper.pid().to_string(),
            "--net",
            "none",
            "--hostname",
            "clone-one",
        ],
    );
    let h = host_pid(&clones[0]);
    assert_ne!(
        runtime::ns::namespace_id(h, "net"),
        runtime::ns::namespace_id(sleeper.pid(), "net")
    );
    let (names, lo_up, hostname) = std::thread::spawn(move || {
        for (kind, flag) in [
            ("net", nix::sched::CloneFlags::CLONE_NEWNET),
            ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
        ] {
            let f = std::fs::File::open(format!("/proc/{h}/ns/{kind}")).unwrap();
            nix::sched::setns(f, flag).unwrap();
        }
        let names: Vec<String> = nix::net::if_::if_nameindex()
            .unwrap()
            .iter()
            .map(|i| i.name().to_string_lossy().into_owned())
            .collect();
        let lo = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
        let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();
        (names, lo.contains("lo:"), hostname)
    })
    .join()
    .unwrap();
    assert_eq!(names, vec!["lo".to_string()]);
    assert!(lo_up);
    assert_eq!(hostname, "clone-one");
    assert_ne!(
        nix::unistd::gethostname().unwrap(),
        "clone-one",
        "the host keeps its name"
    );
    kill_all(&dolly, &clones);
}

/// A clone started from a snapshot; SIGTERM to its init reaches the restored process, and
/// the clone ends with it, recording how.
#[test]
fn clone_from_snapshot_forwards_sigterm_and_ends_with_its_process() {
    let dolly = Dolly::new();
    let w = Workload::start(1);
    let id = dolly.capture(w.pid());
    let clones = start_clones(
        &dolly,
        &[
            "--snapshot",
            &id,
            "--overlay",
            w.dir.path().to_str().unwrap(),
        ],
    );
    let init = clones[0]["init_pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    let status = wait_child(Pid::from_raw(init), Duration::from_secs(10)).expect("the clone ended");
    assert!(
        matches!(status, nix::sys::wait::WaitStatus::Exited(_, 143)),
        "{status:?}"
    );
    let list: Value = serde_json::from_str(&dolly.ok(&["--json", "clone", "list"])).unwrap();
    assert_eq!(list[0]["running"], false);
    assert_eq!(list[0]["exit"]["signal"], 15);
    dolly.ok(&["clone", "kill", clones[0]["id"].as_str().unwrap()]);
    assert_report_ok(&w.report(w.pid()));
}

#[test]
fn clone_refusals() {
    let dolly = Dolly::new();
    let err = dolly.refused(&["clone", "--snapshot", "0123456789abcdef"]);
    assert!(err.contains("no snapshot"), "{err}");
    let err = dolly.refused(&["clone", "--pid", "999999"]);
    assert!(err.contains("no process 999999"), "{err}");
    let out = dolly.run(&["clone", "--pid", "1", "--count", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--count"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = dolly.refused(&["clone", "kill", "feedfacefeedface"]);
    assert!(err.contains("no clone"), "{err}");
    // An incomplete snapshot (its pool wiped, and no durable copy to put it back from) is
    // never cloned. (Persisted first: a persister that finished after the wipe would have
    // made it restorable again from the durable tier.)
    let w = Workload::start(1);
    let id = dolly.capture_with(w.pid(), &["--wait", "persisted"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_dir_all(dolly.snapshot_dir(&id).join("pages")).unwrap();
    std::fs::remove_dir_all(dolly.pool_dir(&id)).unwrap();
    let err = dolly.refused(&["clone", "--snapshot", &id]);
    assert!(err.contains("incomplete"), "{err}");
    assert!(std::fs::read_dir(dolly.root.path().join("clones"))
        .map_or(true, |mut d| d.next().is_none()));
}

/// The library API: capture a warmed-up python once, then run one test case per clone; each
/// case gets its input in its own private view of the work directory.
#[test]
fn template_api_forks_a_prepared_python_per_test_case() {
    use runtime::clone::{CloneOptions, Template};
    become_subreaper();
    let dolly = Dolly::new();
    let store = snapshot::Store::open(dolly.root.path(), dolly.pool.path()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let script = "import os, time, math\n\
                  table = {n: math.factorial(n) % 1000003 for n in range(2000)}\n\
                  print('ready', flush=True)\n\
                  while not os.path.exists('case'):\n    time.sleep(0.005)\n\
                  n = int(open('case').read())\n\
                  open('result', 'w').write(str(table[n]))\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).current_dir(work.path());
    let py = Spawned(spawn_detached(&mut cmd, &work.path().join("out")));
    wait_until("python to warm up", Duration::from_secs(20), || {
        std::fs::read_to_string(work.path().join("out"))
            .unwrap_or_default()
            .contains("ready")
    });
    let template = Template::capture(&store, py.pid()).unwrap();
    let opts = CloneOptions {
        overlays: vec![work.path().to_path_buf()],
        ..Default::default()
    };
    for n in [5u64, 99, 1999] {
        let clone = template.spawn(&opts).unwrap();
        // Written whole, then named: the clone polls for the name and reads it at once.
        let (part, case) = (
            clone.path(work.path().join("case.part")),
            clone.path(work.path().join("case")),
        );
        std::fs::write(&part, n.to_string()).unwrap();
        std::fs::rename(&part, &case).unwrap();
        let exit = clone.wait(Duration::from_secs(20)).unwrap();
        assert_eq!(exit.status(), 0);
        let result: u64 =
            std::fs::read_to_string(clone.written(work.path().join("result")).unwrap())
                .unwrap()
                .parse()
                .unwrap();
        let want = (1..=n).fold(1u128, |f, k| f * k as u128 % 1_000_003) as u64;
        assert_eq!(result, want, "case {n}");
        reap_until_gone(clone.record().init_pid);
    }
    assert!(
        !work.path().join("case").exists(),
        "the cases went to the clones' views only"
    );
    assert!(std::fs::read_to_string(work.path().join("out"))
        .unwrap()
        .contains("ready"));
}
