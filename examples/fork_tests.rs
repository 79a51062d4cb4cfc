//! Prepare once, fork per test: a python3 process imports its modules and builds its data
//! (the slow part of every test run), dolly captures it, and each test case then runs in a
//! clone of that prepared process — isolated, and started in milliseconds instead of seconds.
//!
//! ```text
//! cargo run --release --example fork_tests          (as root)
//! ```
//!
//! Each clone sees the work directory through its own copy-on-write overlay: the case to run
//! is written into that private view, and the clone writes its result there too.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtime::clone::{CloneOptions, Template};

/// The prepared environment: imports, a data table, then waits for a case in ./case.
const PREPARE: &str = r#"
import os, time, json, decimal, fractions, statistics, sqlite3, email.parser, xml.dom.minidom
table = {n: pow(3, n, 1_000_003) for n in range(300_000)}
print("ready", flush=True)
while not os.path.exists("case"):
    time.sleep(0.002)
n = int(open("case").read())
open("result", "w").write(json.dumps({"case": n, "value": table[n], "mean": statistics.mean([table[n], n])}))
"#;

fn wait_for(path: &Path, what: &str, timeout: Duration) {
    let t = Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains(what)) {
        assert!(
            t.elapsed() < timeout,
            "timed out waiting for {what} in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = tempfile::tempdir()?;
    let pool = tempfile::tempdir_in("/dev/shm")?;
    let store = snapshot::Store::open(work.path().join(".dolly"), pool.path())?;
    let cases = [7u64, 1_000, 123_456, 299_999];

    // A cold start, as every test would pay it without dolly.
    let cold = Instant::now();
    let log = work.path().join("prepare.log");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PREPARE])
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe. (Only its own files: whatever this program
    // inherited, a pipe from a shell say, is not the environment's to keep.)
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    let mut python = cmd.spawn()?;
    wait_for(&log, "ready", Duration::from_secs(60));
    let cold = cold.elapsed();

    let template = Template::capture(&store, python.id() as i32)?;
    python.kill()?;
    python.wait()?;
    println!(
        "prepared python3 in {cold:.2?}; captured it as snapshot {}",
        template.snapshot()
    );

    let opts = CloneOptions {
        overlays: vec![work.path().to_path_buf()],
        ..Default::default()
    };
    println!("| case | clone started in | test ran in | result |");
    println!("|---:|---:|---:|---|");
    for n in cases {
        let t = Instant::now();
        let clone = template.spawn(&opts)?;
        let started = t.elapsed();
        // Written whole, then named: the clone reads it as soon as the name appears.
        let part = clone.path(work.path().join("case.part"));
        std::fs::write(&part, n.to_string())?;
        std::fs::rename(&part, clone.path(work.path().join("case")))?;
        let exit = clone.wait(Duration::from_secs(30))?;
        let result = clone
            .written(work.path().join("result"))
            .map(std::fs::read_to_string)
            .transpose()?
            .unwrap_or_default();
        println!(
            "| {n} | {started:.2?} | {:.2?} | {result} (exit {}) |",
            t.elapsed(),
            exit.status()
        );
        let want = (0..n).fold(1u64, |v, _| v * 3 % 1_000_003);
        assert!(
            result.contains(&format!("\"value\": {want}")),
            "case {n}: {result}"
        );
    }
    assert!(
        !work.path().join("case").exists(),
        "each case stayed in its clone's private view"
    );
    println!(
        "every case ran in its own clone of the prepared process; the work directory is untouched"
    );
    Ok(())
}
