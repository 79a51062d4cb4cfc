//! The benchmark: for processes with 64 MiB, 512 MiB, 2 GiB and 4 GiB of touched memory,
//! full and incremental captures (frozen time, time to created and to persisted, bytes
//! written), the longest stall a process spinning on the clock sees while it is captured
//! (with the CPU time the host took from the VM meanwhile), the freeze of a process
//! rewriting its memory at full speed (forked at the freeze, and not), and restores,
//! beside fork() of a process with the same memory and a memcpy of the same
//! bytes, all measured in this run; then captures of a process tree and of many threads,
//! the 64 MiB writer's freeze with another busy process beside it, dolly beside CRIU (see
//! `criu`), and clones.
//!
//! ```text
//! cargo build --release --bin dolly --examples && target/release/examples/bench [capture|busy|criu|clone] [MiB ...]
//! ```
//! (scripts/bench does that, after scripts/criu.) Run as root. It uses a private store it
//! removes.

mod criu;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{fork, ForkResult, Pid};

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let path = if name == "dolly" {
        dir.parent().unwrap().join(name)
    } else {
        dir.join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --bin dolly --examples` first",
        path.display()
    );
    path
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Time of fork() in a process holding `bytes` of touched memory (the parent's side: the
/// call returns once the child's address space is set up, copy-on-write).
fn fork_ms(memory: &[u64], runs: usize) -> f64 {
    std::hint::black_box(memory);
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: the child only calls _exit.
                match unsafe { fork() }.unwrap() {
                    ForkResult::Child => unsafe { libc::_exit(0) },
                    ForkResult::Parent { child } => {
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        waitpid(child, None).unwrap();
                        ms
                    }
                }
            })
            .collect(),
    )
}

fn memcpy_ms(src: &[u64], dst: &mut [u64], runs: usize) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(src);
                std::hint::black_box(&dst);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

struct Store {
    root: PathBuf,
    pool: PathBuf,
}

impl Store {
    fn dolly(&self, args: &[&str]) -> (String, f64) {
        let t = Instant::now();
        let out = Command::new(bin("dolly"))
            .env("DOLLY_ROOT", &self.root)
            .env("DOLLY_POOL", &self.pool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(
            out.status.success(),
            "dolly {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (String::from_utf8(out.stdout).unwrap(), ms)
    }
}

/// Sends `signal` to example program `pid` and waits for its answer in `log`: a new line
/// starting with `prefix`, which it returns.
fn ask(pid: Pid, signal: Signal, log: &Path, prefix: &str) -> String {
    let answers = || -> Vec<String> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines = text.lines().filter(|l| l.starts_with(prefix));
        lines.map(str::to_string).collect()
    };
    let before = answers().len();
    kill(pid, signal).unwrap();
    let t = Instant::now();
    loop {
        if let Some(answer) = answers().into_iter().nth(before) {
            return answer;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no {prefix:?} from {pid}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`ask`], for an answer whose first field after `prefix` is a number of µs: that, in ms.
fn ask_ms(pid: Pid, signal: Signal, log: &Path, prefix: &str) -> f64 {
    let answer = ask(pid, signal, log, prefix);
    let number = answer[prefix.len()..].split_whitespace().next();
    number
        .and_then(|n| n.parse::<f64>().ok())
        .expect("a number")
        / 1e3
}

/// The fork() of an example program timed by itself, in ms: see `examples/common/fork_time.rs`.
#[derive(Clone, Copy, Default)]
struct OwnFork {
    /// One fork as it runs: what the process pays for a fork.
    first: f64,
    /// The median of 3 forks made right after it, in a row (a third to a half as long at
    /// 64 MiB here).
    in_a_row: f64,
}

impl OwnFork {
    /// The median of each.
    fn median(all: &[OwnFork]) -> OwnFork {
        OwnFork {
            first: median(all.iter().map(|f| f.first).collect()),
            in_a_row: median(all.iter().map(|f| f.in_a_row).collect()),
        }
    }
}

/// The fork() of example program `pid` timed by itself (asked with SIGWINCH; it writes
/// `fork us=U in_a_row_us=R` into `log`).
fn own_fork(pid: Pid, log: &Path) -> OwnFork {
    let last = ask(pid, Signal::SIGWINCH, log, "fork us=");
    let field = |name: &str| -> f64 {
        let at = last.find(name).expect("a field of the answer") + name.len();
        let number = last[at..].split_whitespace().next().unwrap_or_default();
        number.parse::<f64>().expect("a number of µs") / 1e3
    };
    OwnFork {
        first: field("fork us="),
        in_a_row: field(" in_a_row_us="),
    }
}

/// Starts memhog and returns its PID; `end` kills and reaps it (by PID, since its restored
/// copies are reaped the same way).
fn start_memhog(mib: usize, dir: &Path) -> Pid {
    let mut cmd = Command::new(bin("memhog"));
    cmd.args(["--mib", &mib.to_string()]);
    start_ready(&mut cmd, &dir.join(format!("memhog-{mib}")))
}

/// Every process the bench started, in its own session (restored ones keep their PIDs):
/// killed with their sessions if the bench panics, so that no workload outlives it to
/// load the machine.
static STARTED: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Records a started process; returns its PID.
fn started(pid: u32) -> Pid {
    STARTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pid as i32);
    Pid::from_raw(pid as i32)
}

/// Kills what the bench started, then panics on as before.
fn kill_started_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        for &pid in STARTED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        report(info);
    }));
}

fn end(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One capture as `--json` reports it.
#[derive(Default, Clone, Copy)]
struct Capture {
    frozen: f64,
    created: f64,
    persisted: f64,
    bytes: f64,
    shared: f64,
}

impl Capture {
    fn of(record: &serde_json::Value) -> Capture {
        let f = |k: &str| record[k].as_f64().unwrap_or(0.0);
        Capture {
            frozen: f("frozen_ms"),
            created: f("created_ms"),
            persisted: f("persisted_ms"),
            bytes: f("bytes"),
            shared: f("shared_bytes"),
        }
    }

    /// The median of each figure.
    fn median(all: &[Capture]) -> Capture {
        let m = |f: fn(&Capture) -> f64| median(all.iter().map(f).collect());
        Capture {
            frozen: m(|c| c.frozen),
            created: m(|c| c.created),
            persisted: m(|c| c.persisted),
            bytes: m(|c| c.bytes),
            shared: m(|c| c.shared),
        }
    }
}

struct Row {
    mib: usize,
    fork: f64,
    /// The fork() of the process captured (memhog), timed by itself before its capture.
    own_fork: OwnFork,
    memcpy: f64,
    full: Capture,
    incremental: Capture,
    restore_full: f64,
    restore_incremental: f64,
    /// A capture of the restored process, against the snapshot it came from.
    of_restored: Capture,
    /// A process spinning on the clock, captured: the longest stall it saw.
    quiet: Scribbled,
    /// A process rewriting all its memory at full speed, captured (it is forked at the
    /// freeze): how long it was frozen.
    rewriting: Scribbled,
    /// The same with `--fork never`.
    rewriting_unforked: Scribbled,
}

/// Medians of the captures of examples/scribbler (see [`scribbler_captures`]).
struct Scribbled {
    /// The longest stall it saw (quiet), or how long it was frozen (rewriting), in ms.
    ms: f64,
    /// CPU time the host took from this VM during the capture (steal), in ms.
    steal_ms: f64,
    /// The longest stall it saw itself during the capture (between two of its turns), ms.
    stall_ms: f64,
    /// Bytes read from its fork after the thaw.
    forked_bytes: f64,
    /// Its own fork() (asked before each capture, each fork with its pages just written;
    /// the median of those).
    own_fork: OwnFork,
}

/// CPU time the hypervisor has taken from this machine so far (`steal` in /proc/stat), ms.
fn steal_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e3 / hz
}

/// Captures `pid` (with `extra` options, waiting until persisted); returns the record.
fn capture(store: &Store, pid: Pid, extra: &[&str]) -> serde_json::Value {
    let pid = pid.to_string();
    let mut args = vec![
        "--json",
        "snapshot",
        "capture",
        "--pid",
        &pid,
        "--wait",
        "persisted",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&store.dolly(&args).0).unwrap()
}

/// Restores `id` in place (its process must be gone); returns the wall time. The restored
/// process runs on.
fn restore_ms(store: &Store, id: &str, pid: Pid) -> f64 {
    let (_, ms) = store.dolly(&["snapshot", "restore", id]);
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the restored process runs"
    );
    ms
}

fn measure(mib: usize, store: &Store, dir: &Path) -> Row {
    let words = mib << 17;
    let runs = if mib >= 1024 { 3 } else { 5 };
    let (fork, memcpy) = {
        let src: Vec<u64> = (0..words as u64).map(|i| i | 1).collect();
        // fork() first, while the process holds only `bytes` of touched memory.
        let fork = fork_ms(&src, runs);
        let mut dst = vec![1u64; words];
        (fork, memcpy_ms(&src, &mut dst, runs))
    };
    let reps = if mib >= 1024 {
        1
    } else if mib >= 512 {
        3
    } else {
        5
    };
    let (mut full, mut incremental) = (vec![], vec![]);
    let (mut restore_full, mut restore_incremental) = (vec![], vec![]);
    let mut of_restored = vec![];
    let mut own_forks = vec![];
    for _ in 0..reps {
        let pid = start_memhog(mib, dir);
        own_forks.push(own_fork(pid, &dir.join(format!("memhog-{mib}"))));
        let parent = capture(store, pid, &[]);
        let parent_id = parent["id"].as_str().unwrap().to_string();
        // memhog writes a word every 10 ms: the child has a few pages of its own.
        std::thread::sleep(Duration::from_millis(200));
        let child = capture(store, pid, &["--parent", &parent_id]);
        let child_id = child["id"].as_str().unwrap();
        full.push(Capture::of(&parent));
        incremental.push(Capture::of(&child));
        end(pid);
        restore_full.push(restore_ms(store, &parent_id, pid));
        std::thread::sleep(Duration::from_millis(200));
        let again = capture(store, pid, &["--parent", "auto"]);
        of_restored.push(Capture::of(&again));
        store.dolly(&["snapshot", "delete", again["id"].as_str().unwrap()]);
        end(pid);
        restore_incremental.push(restore_ms(store, child_id, pid));
        end(pid);
        store.dolly(&["snapshot", "delete", child_id]);
        store.dolly(&["snapshot", "delete", &parent_id]);
    }
    Row {
        mib,
        fork,
        own_fork: OwnFork::median(&own_forks),
        memcpy,
        full: Capture::median(&full),
        incremental: Capture::median(&incremental),
        restore_full: median(restore_full),
        restore_incremental: median(restore_incremental),
        of_restored: Capture::median(&of_restored),
        quiet: scribbler_captures(mib, store, dir, true, &[], None),
        rewriting: scribbler_captures(mib, store, dir, false, &[], None),
        rewriting_unforked: scribbler_captures(mib, store, dir, false, &["--fork", "never"], None),
    }
}

/// Captures examples/scribbler holding `mib` of touched memory, 7 times (3 from 1 GiB up;
/// with `extra` options): in quiet mode (it does nothing but read the clock) the median of
/// the longest time it saw go by between two of its turns during a capture; rewriting its
/// pages at full speed (`quiet` false), the median time it was frozen. With `beside`, a
/// busy loop runs at that nice value all the while (another process keeping a CPU busy).
fn scribbler_captures(
    mib: usize,
    store: &Store,
    dir: &Path,
    quiet: bool,
    extra: &[&str],
    beside: Option<i32>,
) -> Scribbled {
    let at = dir.join(format!(
        "scribbler-{mib}-{quiet}-{}-{beside:?}",
        extra.join("")
    ));
    std::fs::create_dir_all(&at).unwrap();
    let log = at.join("log");
    let mut cmd = Command::new(bin("scribbler"));
    cmd.arg("--dir").arg(&at).args(["--mib", &mib.to_string()]);
    if quiet {
        cmd.args(["--quiet-after-ms", "0"]);
    }
    let pid = start_ready_in(&mut cmd, &at.join("out"), &log);
    let busy = beside.map(|nice| {
        let mut loop_cmd = Command::new("nice");
        loop_cmd.args(["-n", &nice.to_string(), "sh", "-c", "while :; do :; done"]);
        started(loop_cmd.spawn().unwrap().id())
    });
    // Rewriting pages only (no dropping or mapping over them: see examples/scribbler.rs).
    std::fs::write(at.join("steady"), b"").unwrap();
    // (A new measurement starts with each report.)
    let report = || ask_ms(pid, Signal::SIGUSR2, &log, "stall max_us=");
    let (mut seen, mut steal, mut forked, mut stalls_seen, mut own_forks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // (More captures where a capture is quick and the machine's noise is a large part of it.)
    let captures = if mib <= 512 { 7 } else { 3 };
    for _ in 0..captures {
        // Its own fork(), timed by itself with its pages just written (as a process that
        // writes has them): the fork the freeze makes inside it. Timed before each capture,
        // in the same state of the machine (a fork's time varies by a third from one minute
        // to the next on this VM).
        if !quiet {
            own_forks.push(own_fork(pid, &log));
        }
        // Settled: no writeback or persister of earlier work left running.
        nix::unistd::sync();
        std::thread::sleep(Duration::from_millis(500));
        report(); // starts a new measurement
        let pid_arg = pid.to_string();
        // (Until created: the record then has the bytes read from the fork.)
        let mut args = vec![
            "--json", "snapshot", "capture", "--pid", &pid_arg, "--wait", "created",
        ];
        args.extend_from_slice(extra);
        let stolen = steal_ms();
        let (out, _) = store.dolly(&args);
        steal.push(steal_ms() - stolen);
        let stall = report();
        stalls_seen.push(stall);
        let record: serde_json::Value = serde_json::from_str(&out).unwrap();
        seen.push(if quiet {
            stall
        } else {
            record["frozen_ms"].as_f64().unwrap()
        });
        forked.push(record["forked_bytes"].as_f64().unwrap_or(0.0));
        let id = record["id"].as_str().unwrap();
        // The persister goes on in the background: wait for it before the next capture.
        wait_persisted(store, id);
        store.dolly(&["snapshot", "delete", id]);
    }
    end(pid);
    if let Some(busy) = busy {
        end(busy);
    }
    Scribbled {
        ms: median(seen),
        steal_ms: median(steal),
        stall_ms: median(stalls_seen),
        forked_bytes: median(forked),
        own_fork: if quiet {
            OwnFork::default()
        } else {
            OwnFork::median(&own_forks)
        },
    }
}

/// Waits until snapshot `id` is persisted (its persister ran in the background), reading its
/// record (`ROOT/snapshots/ID/record.json`, see specs/image-format.md) rather than starting
/// a `dolly snapshot info` again and again beside what is measured.
fn wait_persisted(store: &Store, id: &str) {
    let record = store.root.join("snapshots").join(id).join("record.json");
    let t = Instant::now();
    while !std::fs::read_to_string(&record)
        .unwrap_or_default()
        .contains("\"persisted\"")
    {
        assert!(t.elapsed() < Duration::from_secs(300), "not persisted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `cmd` in its own session, stdout to `out`, and waits until `log` says `ready`.
fn start_ready_in(cmd: &mut Command, out: &Path, log: &Path) -> Pid {
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null());
    // SAFETY: setsid and close_range are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::setsid();
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    // Reaped by PID (`end`).
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().unwrap();
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{cmd:?} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started(child.id())
}

/// Starts a program in its own session with stdout to `out`, waits until it printed
/// `ready`, and returns its PID.
fn start_ready(cmd: &mut Command, out: &Path) -> Pid {
    start_ready_in(cmd, out, out)
}

fn end_tree(pids: &[Pid]) {
    for p in pids.iter().rev() {
        let _ = kill(*p, Signal::SIGKILL);
    }
    for p in pids {
        end(*p);
    }
}

/// Every PID of the tree under `root`.
fn tree_pids(root: Pid) -> Vec<Pid> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", out[i]))
            .unwrap_or_default();
        out.extend(
            kids.split_whitespace()
                .map(|k| Pid::from_raw(k.parse().unwrap())),
        );
        i += 1;
    }
    out
}

/// Capture (frozen, total) and restore time of a tree of 10 processes and of a process of 50
/// threads, each the median of 3.
fn shapes_table(store: &Store, dir: &Path) {
    println!("| process | capture: frozen | capture: total | restore |");
    println!("|---|---:|---:|---:|");
    let tree = "import os, time\nfor i in range(9):\n    if os.fork() == 0:\n        time.sleep(1e6)\nprint('ready', flush=True)\ntime.sleep(1e6)\n";
    let threads_dir = dir.join("threads");
    std::fs::create_dir_all(&threads_dir).unwrap();
    type Start<'a> = Box<dyn Fn() -> Pid + 'a>;
    let shapes: [(&str, Start); 2] = [
        (
            "tree of 10 processes (python3)",
            Box::new(|| {
                start_ready(
                    Command::new("python3").args(["-c", tree]),
                    &dir.join("tree.out"),
                )
            }),
        ),
        (
            "50 threads (examples/threads)",
            Box::new(|| {
                let mut cmd = Command::new(bin("threads"));
                cmd.args(["--dir", threads_dir.to_str().unwrap(), "--workers", "46"]);
                let pid = start_ready(cmd.arg("--ready"), &dir.join("threads.out"));
                assert_eq!(
                    std::fs::read_dir(format!("/proc/{pid}/task"))
                        .unwrap()
                        .count(),
                    50
                );
                pid
            }),
        ),
    ];
    for (name, start) in shapes {
        let (mut frozen, mut capture, mut restore) = (vec![], vec![], vec![]);
        for _ in 0..3 {
            let pid = start();
            let (out, total) =
                store.dolly(&["--json", "snapshot", "capture", "--pid", &pid.to_string()]);
            let record: serde_json::Value = serde_json::from_str(&out).unwrap();
            frozen.push(record["frozen_ms"].as_f64().unwrap());
            capture.push(total);
            end_tree(&tree_pids(pid));
            let id = record["id"].as_str().unwrap();
            let (_, ms) = store.dolly(&["snapshot", "restore", id]);
            restore.push(ms);
            end_tree(&tree_pids(pid));
            store.dolly(&["snapshot", "delete", id]);
        }
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms |",
            median(frozen),
            median(capture),
            median(restore)
        );
    }
}

/// The 64 MiB writer's freeze (forked) with another process keeping a CPU busy beside it,
/// at two nice values, and with nothing beside it, in one series.
fn busy_table(store: &Store, dir: &Path) {
    println!("Freeze of the 64 MiB writer (`--fork always`) with another process keeping a CPU busy beside it (a shell loop: batch work at nice +10, or a process at the same priority), and with nothing beside it: its own fork() timed in the same state, the freeze, and the longest stall it saw itself.");
    println!();
    println!("| beside it | its fork() | its forks in a row | frozen (forked) | frozen / its fork | frozen / its forks in a row | longest stall it saw |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let rows = [
        ("nothing", None),
        ("a busy loop at nice +10", Some(10)),
        ("a busy loop at nice 0", Some(0)),
    ];
    for (name, beside) in rows {
        let r = scribbler_captures(64, store, dir, false, &["--fork", "always"], beside);
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}× | {:.2}× | {:.2} ms |",
            r.own_fork.first,
            r.own_fork.in_a_row,
            r.ms,
            r.ms / r.own_fork.first,
            r.ms / r.own_fork.in_a_row,
            r.stall_ms,
        );
    }
}

fn size_label(mib: usize) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn mib_of(bytes: f64) -> String {
    let mib = bytes / (1 << 20) as f64;
    if mib >= 10.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{mib:.2} MiB")
    }
}

fn capture_table(sizes: &[usize], store: &Store, dir: &Path) {
    let rows: Vec<Row> = sizes.iter().map(|&mib| measure(mib, store, dir)).collect();
    println!("Freeze of a process that only reads memory: how long it is stopped (full capture, and incremental against it), beside fork() of a process with as much memory (forks in a row), the fork() of the process captured itself (timed by it just before its capture: one fork as it runs, and forks in a row right after) and a memcpy of its memory; then the longest stall a process spinning on the clock saw during a capture, and the CPU time the host took from this VM (steal) meanwhile.");
    println!();
    println!("| touched memory | fork() | its fork() | its forks in a row | memcpy | frozen: full | frozen: incremental | full / fork | full / its fork | full / its forks in a row | incremental / its fork | longest stall seen | host steal during it |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} ms | {:.2} ms | {:.2} ms | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2} ms | {:.0} ms |",
            size_label(r.mib),
            r.fork,
            r.own_fork.first,
            r.own_fork.in_a_row,
            r.memcpy,
            r.full.frozen,
            r.incremental.frozen,
            r.full.frozen / r.fork,
            r.full.frozen / r.own_fork.first,
            r.full.frozen / r.own_fork.in_a_row,
            r.incremental.frozen / r.own_fork.first,
            r.quiet.ms,
            r.quiet.steal_ms,
        );
    }
    println!();
    println!("Freeze of a process rewriting pages all over its memory at full speed (faster than pre-copy copies): forked at the freeze and read from its fork after the thaw (`--fork auto`, the default), beside fork() of a process with as much memory (forks in a row) and the fork() of the writer itself (timed by it with its pages just written, as they are when it is captured: one fork as it runs, and forks in a row right after, each after writing every page again); the longest stall the writer itself saw between two of its turns during the capture (it reads the clock every turn: the freeze seen from outside, with whatever else stopped it meanwhile); and without the fork (`--fork never`: the freeze copies what it wrote since the last round).");
    println!();
    println!("| touched memory | fork() | its fork() | its forks in a row | frozen (forked) | forked / fork | forked / its fork | forked / its forks in a row | longest stall it saw | host steal during it | read from the fork | frozen, --fork never | never / fork |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}× | {:.2}× | {:.2}× | {:.2} ms | {:.0} ms | {:.0} MiB | {:.2} ms | {:.2}× |",
            size_label(r.mib),
            r.fork,
            r.rewriting.own_fork.first,
            r.rewriting.own_fork.in_a_row,
            r.rewriting.ms,
            r.rewriting.ms / r.fork,
            r.rewriting.ms / r.rewriting.own_fork.first,
            r.rewriting.ms / r.rewriting.own_fork.in_a_row,
            r.rewriting.stall_ms,
            r.rewriting.steal_ms,
            r.rewriting.forked_bytes / (1 << 20) as f64,
            r.rewriting_unforked.ms,
            r.rewriting_unforked.ms / r.fork,
        );
    }
    println!();
    println!("Statuses and bytes: from the start of `capture` to `created` (restorable) and to `persisted` (durable: copied from tmpfs to disk), and the bytes each capture wrote (an incremental one shares the rest with its parent).");
    println!();
    println!("| touched memory | full: created | full: persisted | full: written | incremental: created | incremental: persisted | incremental: written | incremental: shared | memcpy |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} ms | {:.0} ms | {} | {:.0} ms | {:.0} ms | {} | {} | {:.1} ms |",
            size_label(r.mib),
            r.full.created,
            r.full.persisted,
            mib_of(r.full.bytes),
            r.incremental.created,
            r.incremental.persisted,
            mib_of(r.incremental.bytes),
            mib_of(r.incremental.shared),
            r.memcpy,
        );
    }
    println!();
    println!("Restore in place (wall time of `dolly snapshot restore`), of the full snapshot and of the incremental one; then the process restored from the full one, captured again 200 ms later with `--parent auto` (the snapshot it came from).");
    println!();
    println!("| touched memory | fork() | restore: full | restore: incremental | full / fork | incremental / fork | restored, captured again: frozen | written | shared |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} ms | {:.1} ms | {:.1} ms | {:.1}× | {:.1}× | {:.2} ms | {} | {} |",
            size_label(r.mib),
            r.fork,
            r.restore_full,
            r.restore_incremental,
            r.restore_full / r.fork,
            r.restore_incremental / r.fork,
            r.of_restored.frozen,
            mib_of(r.of_restored.bytes),
            mib_of(r.of_restored.shared),
        );
    }
}

/// Wall time of `dolly clone --snapshot ID` until the clone runs, beside fork() of a
/// process with the same memory.
fn clone_start(mib: usize, store: &Store, dir: &Path) -> (f64, f64) {
    let words = mib << 17;
    let fork = {
        let src: Vec<u64> = (0..words as u64).map(|i| i | 1).collect();
        fork_ms(&src, 5)
    };
    let pid = start_memhog(mib, dir);
    let (out, _) = store.dolly(&["--json", "snapshot", "capture", "--pid", &pid.to_string()]);
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut times = Vec::new();
    // The first clone of a run pays for loading dolly and the snapshot's files; not counted.
    for round in 0..8 {
        let (out, ms) = store.dolly(&["--json", "clone", "--snapshot", &id]);
        if round > 0 {
            times.push(ms);
        }
        let clone: serde_json::Value = serde_json::from_str(&out).unwrap();
        store.dolly(&["clone", "kill", clone[0]["id"].as_str().unwrap()]);
        let _ = waitpid(
            Pid::from_raw(clone[0]["init_pid"].as_i64().unwrap() as i32),
            None,
        );
    }
    end(pid);
    store.dolly(&["snapshot", "delete", &id]);
    (fork, median(times))
}

/// Memory in use that copies of a process can add: anonymous pages, shared memory, page
/// tables, kernel stacks and unreclaimable slab (from /proc/meminfo, in MiB). Page cache
/// that can be dropped is left out: it is not what a copy costs.
fn memory_in_use_mib() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0)
    };
    [
        "AnonPages:",
        "Shmem:",
        "PageTables:",
        "KernelStack:",
        "SUnreclaim:",
    ]
    .iter()
    .map(|f| field(f))
    .sum::<f64>()
        / 1024.0
}

/// Waits (up to 3 s) until the memory in use stops moving, by less than 1 MiB in 200 ms:
/// what ended just before (clones killed, their namespaces torn down) is still being freed
/// for a while, which made a measure that follows read less than nothing.
fn settle() {
    let mut last = memory_in_use_mib();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let now = memory_in_use_mib();
        if (now - last).abs() < 1.0 {
            return;
        }
        last = now;
    }
}

/// Memory taken by `n` running copies, measured as the rise of memory in use after they
/// have run (touching a page every 10 ms, as memhog does) for a second, against the lower
/// of the memory in use before they started and once they are gone (each settled): memory
/// still being freed by what ran before (a process killed, the persister of a capture)
/// lowers the first, memory a copy would leave behind raises the second.
fn added_by(start: impl FnOnce() -> Vec<Pid>, stop: impl FnOnce(&[Pid])) -> f64 {
    settle();
    let before = memory_in_use_mib();
    let pids = start();
    std::thread::sleep(Duration::from_secs(1));
    let during = memory_in_use_mib();
    stop(&pids);
    settle();
    let after = memory_in_use_mib();
    during - before.min(after)
}

/// Memory added by 1, 10 and 50 clones of a 1 GiB process, and by as many fork()ed copies.
fn clone_memory(store: &Store, dir: &Path) -> Vec<(usize, f64, f64)> {
    let pid = start_memhog(1024, dir);
    let (out, _) = store.dolly(&["--json", "snapshot", "capture", "--pid", &pid.to_string()]);
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    end(pid);
    let mut rows = Vec::new();
    for n in [1usize, 10, 50] {
        let clones = added_by(
            || {
                let (out, _) = store.dolly(&[
                    "--json",
                    "clone",
                    "--snapshot",
                    &id,
                    "--count",
                    &n.to_string(),
                ]);
                let list: serde_json::Value = serde_json::from_str(&out).unwrap();
                list.as_array()
                    .unwrap()
                    .iter()
                    .map(|c| Pid::from_raw(c["init_pid"].as_i64().unwrap() as i32))
                    .collect()
            },
            |inits| {
                store.dolly(&["clone", "kill", "--all"]);
                for p in inits {
                    let _ = waitpid(*p, None);
                }
            },
        );
        // The original of the forks: this process with 1 GiB touched, before measuring.
        let mut memory = vec![0u64; 1 << 27];
        for (i, w) in memory.iter_mut().enumerate() {
            *w = (i as u64) | 1;
        }
        let forks = added_by(
            || {
                (0..n)
                    // SAFETY: the child only touches its memory and sleeps, like memhog.
                    .map(|_| match unsafe { fork() }.unwrap() {
                        ForkResult::Child => {
                            let mut i = 0usize;
                            loop {
                                let len = memory.len();
                                memory[i % len] += 1;
                                i += 4096;
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                        ForkResult::Parent { child } => child,
                    })
                    .collect()
            },
            |pids| {
                for p in pids {
                    end(*p);
                }
            },
        );
        drop(memory);
        rows.push((n, clones, forks));
    }
    store.dolly(&["snapshot", "delete", &id]);
    rows
}

fn clone_tables(sizes: &[usize], store: &Store, dir: &Path) {
    println!("| touched memory | fork() | dolly clone (start to running) | clone / fork |");
    println!("|---:|---:|---:|---:|");
    for &mib in sizes {
        let (fork, clone) = clone_start(mib, store, dir);
        println!(
            "| {} | {fork:.2} ms | {clone:.1} ms | {:.2}× |",
            size_label(mib),
            clone / fork
        );
    }
    println!();
    println!(
        "| copies of a 1 GiB process | memory added by clones | memory added by fork()ed copies |"
    );
    println!("|---:|---:|---:|");
    for (n, clones, forks) in clone_memory(store, dir) {
        println!("| {n} | {clones:.0} MiB | {forks:.0} MiB |");
    }
}

/// `bench [capture|busy|criu|clone|all] [MiB ...]`
fn main() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    kill_started_on_panic();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let what = if args.first().is_some_and(|a| a.parse::<usize>().is_err()) {
        args.remove(0)
    } else {
        "all".to_string()
    };
    let sizes: Vec<usize> = args
        .iter()
        .map(|a| a.parse().expect("sizes in MiB"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![64, 512, 2048, 4096]
    } else {
        sizes
    };
    let dir = tempfile::tempdir().unwrap();
    let pool = tempfile::tempdir_in("/dev/shm").unwrap();
    let store = Store {
        root: dir.path().join("root"),
        pool: pool.path().to_path_buf(),
    };
    if what == "capture" || what == "all" {
        capture_table(&sizes, &store, dir.path());
        println!();
        shapes_table(&store, dir.path());
        println!();
        busy_table(&store, dir.path());
        println!();
    }
    if what == "busy" {
        busy_table(&store, dir.path());
    }
    if what == "criu" || what == "all" {
        criu::table(&sizes, &store, dir.path());
        println!();
    }
    if what == "clone" || what == "all" {
        // (Clones of 4 GiB would only repeat what 2 GiB shows, at length.)
        let sizes: Vec<usize> = sizes.into_iter().filter(|&m| m <= 2048).collect();
        clone_tables(&sizes, &store, dir.path());
    }
}
