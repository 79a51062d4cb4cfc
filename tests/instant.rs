//! Near-instant capture: memory is copied while the process runs and only what changed is
//! copied at the freeze; what is stored is the memory of one instant.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Asks the scribbler at `pid` to check its memory; returns the verdict line.
fn verify(pid: i32, log: &Path) -> String {
    let before = read(log).matches("verify").count();
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("the check", Duration::from_secs(20), || {
        read(log).matches("verify").count() > before
    });
    read(log)
        .lines()
        .rfind(|l| l.starts_with("verify"))
        .unwrap()
        .to_string()
}

/// A process that rewrites its memory as fast as it can while it is captured (pages written,
/// dropped with MADV_DONTNEED, mapped over with MAP_FIXED during the pre-copy): the restored
/// copy and a clone hold every page as it was at one single instant, and go on writing.
#[test]
fn memory_rewritten_during_the_capture_is_stored_as_of_one_instant() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = Command::new(example_bin("scribbler"));
    cmd.args(["--dir", dir.path().to_str().unwrap(), "--mib", "64"]);
    let mut prog = Spawned(spawn_detached(&mut cmd, &dir.path().join("out")));
    wait_until("the scribbler", Duration::from_secs(20), || {
        read(&log).contains("ready")
    });
    let pid = prog.pid();
    assert!(verify(pid, &log).starts_with("verify ok"));
    std::thread::sleep(Duration::from_millis(300)); // well into its scribbling
    let id = dolly.capture(pid);
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

    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    let inside = clone.inside(&log);
    let verdict = verify(clone.host, &inside);
    assert!(verdict.starts_with("verify ok"), "{verdict}");
    dolly.kill_clones(&clone);
    drop(restored);
}
