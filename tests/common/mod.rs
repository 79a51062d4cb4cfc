//! Helpers for the end-to-end tests: a private dolly store, the real `dolly` binary, the
//! example workload, and processes that are killed and reaped whatever happens.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

/// The `dolly` binary under test.
pub fn dolly_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dolly"))
}

/// An example program, built by `cargo test` beside the binary.
pub fn example_bin(name: &str) -> PathBuf {
    dolly_bin().parent().unwrap().join("examples").join(name)
}

static SUBREAPER: Once = Once::new();

/// Makes the test process a child subreaper, so a restored process (whose parent, dolly,
/// exits) becomes our child: we can wait for it and read its exit status.
pub fn become_subreaper() {
    SUBREAPER.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    });
}

/// A private store (durable root on disk, pool on tmpfs) and the dolly binary.
pub struct Dolly {
    pub root: tempfile::TempDir,
    pub pool: tempfile::TempDir,
}

impl Dolly {
    pub fn new() -> Dolly {
        become_subreaper();
        Dolly {
            root: tempfile::Builder::new()
                .prefix("dolly-root-")
                .tempdir()
                .unwrap(),
            pool: tempfile::Builder::new()
                .prefix("dolly-pool-")
                .tempdir_in("/dev/shm")
                .unwrap(),
        }
    }

    /// `dolly` with this store.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(dolly_bin());
        c.env("DOLLY_ROOT", self.root.path())
            .env("DOLLY_POOL", self.pool.path());
        c.env_remove("DOLLY_PAUSE_AT");
        c
    }

    /// Runs dolly with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs dolly, expecting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dolly {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs dolly, expecting a refusal (exit 1, nothing on stdout); returns stderr.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "dolly {args:?} should have been refused:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("hint:"), "a refusal names the remedy: {err}");
        err
    }

    /// Captures `pid` and waits until the snapshot is created; returns its id (the last line
    /// of stdout).
    pub fn capture(&self, pid: i32) -> String {
        let out = self.ok(&[
            "snapshot",
            "capture",
            "--pid",
            &pid.to_string(),
            "--wait",
            "created",
        ]);
        out.lines().last().unwrap().to_string()
    }

    /// Captures `pid` with `extra` options (waiting until the snapshot is created, unless
    /// they say `--wait`); returns the `--json` record.
    pub fn capture_with(&self, pid: i32, extra: &[&str]) -> Value {
        let pid = pid.to_string();
        let mut args = vec!["--json", "snapshot", "capture", "--pid", &pid];
        args.extend_from_slice(extra);
        if !extra.contains(&"--wait") {
            args.extend(["--wait", "created"]);
        }
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// Restores `id`; returns the restored process (killed and reaped on drop).
    pub fn restore(&self, id: &str) -> Restored {
        let out = self.ok(&["snapshot", "restore", id]);
        Restored(out.lines().last().unwrap().parse().unwrap())
    }

    /// `snapshot list --json`.
    pub fn list(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.ok(&["snapshot", "list", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// The directory of a snapshot in the durable tier.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root.path().join("snapshots").join(id)
    }

    /// The PIDs a snapshot holds (live processes and zombies), from its manifest.
    pub fn snapshot_pids(&self, id: &str) -> Vec<i32> {
        let text = std::fs::read_to_string(self.snapshot_dir(id).join("manifest.json")).unwrap();
        let manifest: Value = serde_json::from_str(&text).unwrap();
        ["processes", "zombies"]
            .iter()
            .flat_map(|k| manifest[k].as_array().unwrap().clone())
            .map(|p| p["pid"].as_i64().unwrap() as i32)
            .collect()
    }

    /// Kills whatever still runs at the snapshot's PIDs (the originals), and whatever runs
    /// in their process groups and sessions (which keep those PIDs taken), and waits until
    /// every one is free for a restore.
    pub fn end_originals(&self, id: &str) {
        let pids = self.snapshot_pids(id);
        let holders = || -> Vec<i32> {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&p| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                        return false;
                    };
                    let f: Vec<i32> = rest
                        .split_whitespace()
                        .skip(2)
                        .take(2)
                        .filter_map(|v| v.parse().ok())
                        .collect();
                    pids.contains(&p) || f.iter().any(|g| pids.contains(g))
                })
                .collect()
        };
        wait_until("the originals to be gone", Duration::from_secs(10), || {
            let left = holders();
            for &p in &left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                let _ = waitpid(
                    Pid::from_raw(p),
                    Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
                );
            }
            left.is_empty()
        });
    }

    /// The pool directory of a snapshot.
    pub fn pool_dir(&self, id: &str) -> PathBuf {
        self.pool.path().join(id)
    }
}

/// One clone started with `--overlay DIR` (its writes under DIR stay in the clone).
pub struct OverlayClone {
    /// The cloned root process, as the host sees it.
    pub host: i32,
    /// The clone's init (PID 1 of its namespace), as the host sees it.
    pub init: i32,
}

impl OverlayClone {
    /// Where the clone sees `path` (a path under its overlay directory).
    pub fn inside(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.host)).join(path.strip_prefix("/").unwrap())
    }
}

impl Dolly {
    /// Starts one clone of `source` (`["--pid", P]` or `["--snapshot", ID]`) over `dir`.
    pub fn clone_over(&self, source: &[&str], dir: &Path) -> OverlayClone {
        let mut args = vec!["--json", "clone"];
        args.extend_from_slice(source);
        args.extend_from_slice(&["--overlay", dir.to_str().unwrap()]);
        let out: Value = serde_json::from_str(&self.ok(&args)).unwrap();
        OverlayClone {
            host: out[0]["host_pid"].as_i64().unwrap() as i32,
            init: out[0]["init_pid"].as_i64().unwrap() as i32,
        }
    }

    /// Ends every clone and waits until `clone`'s init is gone.
    pub fn kill_clones(&self, clone: &OverlayClone) {
        self.ok(&["clone", "kill", "--all"]);
        reap_until_gone(clone.init);
    }
}

impl Drop for Dolly {
    /// Ends the store's clones whatever happened in the test, so none runs on, then deletes
    /// its snapshots: that stops (or waits for) the workers still draining or persisting
    /// them, which would otherwise write into the store after its directories are removed.
    fn drop(&mut self) {
        let _ = self.cmd().args(["clone", "kill", "--all"]).output();
        let listed = self.cmd().args(["--json", "snapshot", "list"]).output();
        let records: Vec<Value> = listed
            .ok()
            .and_then(|out| serde_json::from_slice(&out.stdout).ok())
            .unwrap_or_default();
        for id in records.iter().filter_map(|r| r["id"].as_str()) {
            let _ = self.cmd().args(["snapshot", "delete", id]).output();
        }
    }
}

/// A restored process: our child once dolly exits; killed and reaped on drop.
pub struct Restored(pub i32);

impl Restored {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.0)
    }

    /// Waits for it to exit; returns how it ended.
    pub fn wait(&self, timeout: Duration) -> WaitStatus {
        wait_child(self.pid(), timeout)
            .unwrap_or_else(|| panic!("process {} did not exit in {timeout:?}", self.0))
    }
}

impl Drop for Restored {
    /// Kills the restored process and all its descendants (killed alone, a restored shell
    /// would leave its pipeline running, reparented away from the test).
    fn drop(&mut self) {
        kill_tree(&tree(self.0));
    }
}

/// Sends SIGUSR1 to `pid` and waits for a new line starting with `what` in `out` (a
/// process reporting on its state); returns that line.
pub fn ask(pid: i32, out: &Path, what: &str) -> String {
    let before = read(out).matches(what).count();
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    // The whole line (a program may write it in pieces: python with PYTHONUNBUFFERED).
    let complete = |text: &str| {
        text.matches(what).count() > before
            && text.rfind(what).is_some_and(|at| text[at..].contains('\n'))
    };
    wait_until(what, Duration::from_secs(20), || complete(&read(out)));
    read(out)
        .lines()
        .rfind(|l| l.starts_with(what))
        .unwrap()
        .to_string()
}

/// A file's text, or nothing if it cannot be read (a process gone meanwhile).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Every PID of the tree under `root`, parents first (the children of each of a process's
/// threads).
pub fn tree(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", out[i]))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for task in tasks {
            let kids = read(&task.join("children"));
            out.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
        i += 1;
    }
    out
}

/// Kills a whole tree (children first) and waits until every PID is free.
pub fn kill_tree(pids: &[i32]) {
    for &p in pids.iter().rev() {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    for &p in pids {
        reap_until_gone(p);
    }
}

/// Waits up to `timeout` for child `pid` to end.
pub fn wait_child(pid: Pid, timeout: Duration) -> Option<WaitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Some(s),
            Ok(_) => {}
            Err(e) => panic!("waitpid({pid}): {e}"),
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until PID `pid` is free, reaping it if it became our (a subreaper's) zombie.
pub fn reap_until_gone(pid: i32) {
    wait_until("the PID to be free", Duration::from_secs(5), || {
        let _ = waitpid(
            Pid::from_raw(pid),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        );
        !Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// Waits until `cond` holds, up to `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a capture must not leave in a process: threads (its thread count) or writable and
/// executable areas (dolly's scratch memory is one) of its own.
pub fn capture_traces(pid: i32) -> (Option<String>, Vec<String>) {
    let rwx = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("rwxp"))
        .map(str::to_string)
        .collect();
    (proc_status(pid, "Threads"), rwx)
}

/// A line of /proc/PID/status, e.g. `State` or `TracerPid`.
pub fn proc_status(pid: i32, key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
}

/// Spawns a command in its own session with stdin from /dev/null, stdout/stderr to `out`
/// and no other fd (nothing inherited from the test harness, which a capture would refuse).
pub fn spawn_detached(cmd: &mut Command, out: &Path) -> Child {
    let log = File::options().create(true).append(true).open(out).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Nothing inherited beyond stdin/stdout/stderr.
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// The blocker example (examples/blocker.rs) in `mode`, its output into `out`.
pub fn blocker(mode: &str, out: &Path) -> Spawned {
    Spawned(spawn_detached(
        Command::new(example_bin("blocker")).arg(mode),
        out,
    ))
}

/// A spawned process, killed and reaped on drop.
pub struct Spawned(pub Child);

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Kills it and waits until its PID is free again.
    pub fn kill_and_reap(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        reap_until_gone(self.pid());
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The example workload (examples/workload) in a directory of its own.
pub struct Workload {
    pub proc: Spawned,
    pub dir: tempfile::TempDir,
}

impl Workload {
    pub fn start(mem_mib: usize) -> Workload {
        let dir = tempfile::Builder::new()
            .prefix("dolly-wl-")
            .tempdir()
            .unwrap();
        let mut cmd = Command::new(example_bin("workload"));
        cmd.args([
            "--dir",
            dir.path().to_str().unwrap(),
            "--mem-mib",
            &mem_mib.to_string(),
        ]);
        let child = spawn_detached(&mut cmd, &dir.path().join("out"));
        let w = Workload {
            proc: Spawned(child),
            dir,
        };
        w.wait_ticks(3);
        w
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// `(tick, digest, pid)` of every tick logged so far, in order.
    pub fn ticks(&self) -> Vec<(u64, String, i32)> {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let tick = f.next()?.strip_prefix("tick=")?.parse().ok()?;
                let digest = f.next()?.strip_prefix("digest=")?.to_string();
                let pid = f.next()?.strip_prefix("pid=")?.parse().ok()?;
                Some((tick, digest, pid))
            })
            .collect()
    }

    pub fn last_tick(&self) -> u64 {
        self.ticks().last().map_or(0, |t| t.0)
    }

    /// Waits until `n` more ticks are logged.
    pub fn wait_ticks(&self, n: usize) {
        let start = self.ticks().len();
        wait_until("workload ticks", Duration::from_secs(20), || {
            self.ticks().len() >= start + n
        });
        let out = std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default();
        assert!(!out.contains("panicked"), "workload failed: {out}");
    }

    /// Asks the process at `pid` (the original or its restored copy) for its report.
    pub fn report(&self, pid: i32) -> Value {
        let path = self.dir.path().join("report.json");
        std::fs::write(&path, b"").unwrap();
        kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
        let mut report = Value::Null;
        wait_until(
            "a workload report",
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
}

/// Asserts every check of a workload report passed, naming the ones that failed.
pub fn assert_report_ok(report: &Value) {
    let failures = report["failures"].as_array().unwrap();
    assert!(failures.is_empty(), "workload checks failed: {failures:#?}");
    let checks = report["checks"].as_object().unwrap();
    assert!(
        checks.len() >= 44,
        "the report has all its checks: {}",
        checks.len()
    );
}

/// A dolly run paused at checkpoint `at` (DOLLY_PAUSE_AT); returns the running command and
/// the PID of the process that paused (the CLI, or its capture worker).
#[allow(clippy::zombie_processes)] // the caller kills and waits for it
pub fn start_paused(dolly: &Dolly, args: &[&str], at: &str) -> (Child, i32) {
    start_paused_with(dolly, args, at, &[])
}

/// Like [`start_paused`], with more environment variables (e.g. `DOLLY_PAUSE_UNTIL`).
#[allow(clippy::zombie_processes)] // the caller kills and waits for it
pub fn start_paused_with(
    dolly: &Dolly,
    args: &[&str],
    at: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> (Child, i32) {
    use std::io::{BufRead, BufReader};
    let mut child = dolly
        .cmd()
        .args(args)
        .envs(env.iter().copied())
        .env("DOLLY_PAUSE_AT", at)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "dolly {args:?} ended before pausing at {at}"
        );
        if let Some(rest) = line
            .trim()
            .strip_prefix(&format!("dolly: paused at {at} (pid "))
        {
            let pid = rest.trim_end_matches(')').parse().unwrap();
            // Keep reading, so dolly can still report on stderr.
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return (child, pid);
        }
    }
}

/// Snapshots of a store that a restore would accept.
pub fn usable(dolly: &Dolly) -> Vec<Value> {
    dolly
        .list()
        .into_iter()
        .filter(|r| r["status"] == "created" || r["status"] == "persisted")
        .collect()
}

/// Starts `python3 -c script` detached with its output to `out`, and waits until it has
/// printed `ready`.
pub fn python_ready(script: &str, out: &Path) -> Spawned {
    let p = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        out,
    ));
    // The whole line: with PYTHONUNBUFFERED set, print writes it in pieces.
    wait_until("python to be ready", Duration::from_secs(10), || {
        std::fs::read_to_string(out)
            .is_ok_and(|s| s.find("ready").is_some_and(|at| s[at..].contains('\n')))
    });
    p
}

/// Runs `cmd` with stdin from /dev/null, asserts it succeeded, and returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
