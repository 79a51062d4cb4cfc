//! The table beside CRIU, the checkpoint/restore tool of the field, in the same run and on the
//! same processes: a process spinning on the clock (examples/scribbler, quiet) of each size is
//! captured by dolly (`snapshot capture --wait created`) and dumped by CRIU (`criu dump
//! --leave-running`, into a directory on the same tmpfs as dolly's pool), then restored in
//! place by each; every restored process checks every page of its memory.
//!
//! CRIU is the one `scripts/criu` builds (target/criu/criu). Without dirty tracking on this
//! kernel (no soft-dirty), CRIU cannot pre-dump (`criu pre-dump` aborts): its dump copies the
//! whole memory while the process is frozen.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{ask, ask_ms, bin, end, median, size_label, start_ready_in, wait_persisted, Store};

/// target/criu/criu, as scripts/criu builds it, if it is there.
fn criu() -> Option<PathBuf> {
    let examples = bin("dolly").parent()?.to_path_buf();
    let path = examples.parent()?.join("criu").join("criu");
    path.exists().then_some(path)
}

/// Runs CRIU with `args` (its log into `dir`/`log`); the wall time in ms, or the end of its
/// log if it failed.
fn run_criu(criu: &Path, dir: &Path, log: &str, args: &[&str]) -> Result<f64, String> {
    let t = Instant::now();
    let out = Command::new(criu)
        .args(args)
        .arg("-D")
        .arg(dir)
        .args(["-o", log])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", criu.display()))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if out.status.success() {
        return Ok(ms);
    }
    let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
    let last: Vec<&str> = text.lines().rev().take(3).collect();
    Err(format!("criu {args:?} failed: {}", last.join(" / ")))
}

/// Asks restored scribbler `pid` to check every page (SIGUSR1); panics unless it says ok.
fn verify(pid: Pid, log: &Path, by: &str) {
    let answer = ask(pid, Signal::SIGUSR1, log, "verify ");
    assert!(
        answer.starts_with("verify ok"),
        "the process {by} restored: {answer}"
    );
}

/// One size's figures: medians of the stalls and of the times until the snapshot is whole
/// (the wall time of each command), and one restore by each.
struct Row {
    stall_criu: f64,
    stall_dolly: f64,
    /// The longest stall it saw while dolly persisted the snapshot (after created).
    stall_persisting: f64,
    done_criu: f64,
    created_dolly: f64,
    restore_criu: f64,
    restore_dolly: f64,
}

fn measure(criu: &Path, mib: usize, store: &Store, dir: &Path) -> Result<Row, String> {
    let at = dir.join(format!("criu-{mib}"));
    std::fs::create_dir_all(&at).unwrap();
    let log = at.join("log");
    let mut cmd = Command::new(bin("scribbler"));
    cmd.arg("--dir").arg(&at);
    cmd.args(["--mib", &mib.to_string(), "--quiet-after-ms", "0"]);
    let pid = start_ready_in(&mut cmd, &at.join("out"), &log);
    std::fs::write(at.join("steady"), b"").unwrap();
    let report = || ask_ms(pid, Signal::SIGUSR2, &log, "stall max_us=");
    let settle = || {
        nix::unistd::sync();
        std::thread::sleep(Duration::from_millis(500));
        report(); // starts a new measurement
    };
    let images = tempfile::tempdir_in(&store.pool).unwrap();
    let (mut stall_criu, mut stall_dolly, mut stall_persisting) = (vec![], vec![], vec![]);
    let (mut done_criu, mut created_dolly) = (vec![], vec![]);
    let mut snapshot = None;
    let captures = if mib <= 512 { 3 } else { 1 };
    let measured = (|| {
        for _ in 0..captures {
            settle();
            let pid_arg = pid.to_string();
            // (The wall time of the command, as CRIU's is.)
            let (out, ms) = store.dolly(&[
                "--json", "snapshot", "capture", "--pid", &pid_arg, "--wait", "created",
            ]);
            stall_dolly.push(report());
            created_dolly.push(ms);
            let record: serde_json::Value = serde_json::from_str(&out).unwrap();
            let id = record["id"].as_str().unwrap().to_string();
            wait_persisted(store, &id);
            stall_persisting.push(report());
            if let Some(old) = snapshot.replace(id) {
                store.dolly(&["snapshot", "delete", &old]);
            }
            settle();
            let _ = std::fs::remove_dir_all(images.path());
            std::fs::create_dir(images.path()).unwrap();
            done_criu.push(run_criu(
                criu,
                images.path(),
                "dump.log",
                &["dump", "-t", &pid_arg, "--leave-running"],
            )?);
            stall_criu.push(report());
        }
        end(pid);
        let restore_criu = run_criu(criu, images.path(), "restore.log", &["restore", "-d"])?;
        verify(pid, &log, "CRIU");
        end(pid);
        // (Its memory back before dolly's restore.)
        let _ = std::fs::remove_dir_all(images.path());
        let id = snapshot.clone().unwrap();
        let (_, restore_dolly) = store.dolly(&["snapshot", "restore", &id]);
        verify(pid, &log, "dolly");
        Ok(Row {
            stall_criu: median(stall_criu),
            stall_dolly: median(stall_dolly),
            stall_persisting: median(stall_persisting),
            done_criu: median(done_criu),
            created_dolly: median(created_dolly),
            restore_criu,
            restore_dolly,
        })
    })();
    end(pid);
    if let Some(id) = snapshot {
        store.dolly(&["snapshot", "delete", &id]);
    }
    measured
}

/// Prints the table beside CRIU for `sizes` (MiB), or why there is none.
pub fn table(sizes: &[usize], store: &Store, dir: &Path) {
    let Some(criu) = criu() else {
        println!("(no table beside CRIU: target/criu/criu is missing; scripts/criu builds it)");
        return;
    };
    println!(
        "| touched memory | stall: CRIU dump | stall: dolly capture | CRIU / dolly \
         | complete: CRIU dump | created: dolly | CRIU / dolly \
         | restore: CRIU | restore: dolly | CRIU / dolly | stall: dolly persisting |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &mib in sizes {
        match measure(&criu, mib, store, dir) {
            Ok(r) => println!(
                "| {} | {:.2} ms | {:.2} ms | {:.0}× | {:.0} ms | {:.0} ms | {:.1}× \
                 | {:.1} ms | {:.1} ms | {:.1}× | {:.2} ms |",
                size_label(mib),
                r.stall_criu,
                r.stall_dolly,
                r.stall_criu / r.stall_dolly,
                r.done_criu,
                r.created_dolly,
                r.done_criu / r.created_dolly,
                r.restore_criu,
                r.restore_dolly,
                r.restore_criu / r.restore_dolly,
                r.stall_persisting,
            ),
            Err(e) => println!("| {} | {e} |", size_label(mib)),
        }
    }
}
