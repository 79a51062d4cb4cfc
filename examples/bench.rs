//! The benchmark: capture (frozen time and total) and restore time for processes with
//! 64 MiB, 512 MiB and 2 GiB of touched memory, beside fork() of a process with the same
//! memory and a memcpy of the same bytes, all measured in this run.
//!
//! ```text
//! cargo build --release --bin dolly --examples && target/release/examples/bench [MiB ...]
//! ```
//! (scripts/bench does exactly that.) Run as root. It uses a private store it removes.

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

/// Starts memhog and returns its PID; `end` kills and reaps it (by PID, since its restored
/// copies are reaped the same way).
#[allow(clippy::zombie_processes)]
fn start_memhog(mib: usize, dir: &Path) -> Pid {
    let ready = dir.join(format!("memhog-{mib}"));
    let out = std::fs::File::create(&ready).unwrap();
    let mut cmd = Command::new(bin("memhog"));
    cmd.args(["--mib", &mib.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    // SAFETY: setsid and close_range are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let t = Instant::now();
    while !std::fs::read_to_string(&ready).unwrap().contains("ready") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "memhog did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Pid::from_raw(child.id() as i32)
}

fn end(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Row {
    mib: usize,
    fork: f64,
    memcpy: f64,
    frozen: f64,
    capture: f64,
    restore: f64,
}

fn measure(mib: usize, store: &Store, dir: &Path) -> Row {
    let words = mib << 17;
    let runs = if mib >= 1024 { 3 } else { 5 };
    let (fork, memcpy) = {
        let src: Vec<u64> = (0..words as u64).map(|i| i | 1).collect();
        let mut dst = vec![1u64; words];
        (fork_ms(&src, runs), memcpy_ms(&src, &mut dst, runs))
    };
    let reps = if mib >= 1024 { 1 } else { 3 };
    let (mut frozen, mut capture, mut restore) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let pid = start_memhog(mib, dir);
        let (out, total) =
            store.dolly(&["--json", "snapshot", "capture", "--pid", &pid.to_string()]);
        let record: serde_json::Value = serde_json::from_str(&out).unwrap();
        frozen.push(record["frozen_ms"].as_f64().unwrap());
        capture.push(total);
        end(pid);
        let id = record["id"].as_str().unwrap();
        let (_, ms) = store.dolly(&["snapshot", "restore", id]);
        restore.push(ms);
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the restored process runs"
        );
        end(pid);
        store.dolly(&["snapshot", "delete", id]);
    }
    Row {
        mib,
        fork,
        memcpy,
        frozen: median(frozen),
        capture: median(capture),
        restore: median(restore),
    }
}

fn main() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes in MiB"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![64, 512, 2048]
    } else {
        sizes
    };
    let dir = tempfile::tempdir().unwrap();
    let pool = tempfile::tempdir_in("/dev/shm").unwrap();
    let store = Store {
        root: dir.path().join("root"),
        pool: pool.path().to_path_buf(),
    };
    let rows: Vec<Row> = sizes
        .iter()
        .map(|&mib| measure(mib, &store, dir.path()))
        .collect();
    println!("| touched memory | fork() | memcpy | capture: frozen | capture: total | restore | frozen / fork | restore / fork |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let size = if r.mib >= 1024 {
            format!("{} GiB", r.mib / 1024)
        } else {
            format!("{} MiB", r.mib)
        };
        println!(
            "| {size} | {:.2} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1}× | {:.1}× |",
            r.fork,
            r.memcpy,
            r.frozen,
            r.capture,
            r.restore,
            r.frozen / r.fork,
            r.restore / r.fork
        );
    }
}
