//! Every refusal names its cause and remedy, exits 1, leaves the target running exactly as
//! before, and leaves no usable snapshot behind.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The target is still running, untraced, and no usable snapshot exists.
fn assert_untouched(dolly: &Dolly, w: &Workload) {
    assert_eq!(proc_status(w.pid(), "TracerPid").as_deref(), Some("0"));
    w.wait_ticks(2);
    assert_report_ok(&w.report(w.pid()));
    assert!(usable(dolly).is_empty(), "{:?}", dolly.list());
}

#[test]
fn refuses_a_pid_that_does_not_exist() {
    let dolly = Dolly::new();
    let err = dolly.refused(&["snapshot", "capture", "--pid", "999999"]);
    assert!(err.contains("no process 999999"), "{err}");
    assert!(dolly.list().is_empty());
}

#[test]
fn refuses_kernel_threads_and_zombies() {
    let dolly = Dolly::new();
    let err = dolly.refused(&["snapshot", "capture", "--pid", "2"]);
    assert!(err.contains("kernel thread"), "{err}");
    // A zombie: a child its parent never reaps.
    let dir = tempfile::tempdir().unwrap();
    let script = "import os, time\npid = os.fork()\nif pid == 0:\n    os._exit(3)\nprint(pid, flush=True)\ntime.sleep(60)\n";
    let out = dir.path().join("out");
    let _parent = Spawned(spawn_detached(
        Command::new("python3").args(["-c", script]),
        &out,
    ));
    wait_until("the zombie", Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s.ends_with('\n'))
    });
    let zombie: i32 = std::fs::read_to_string(&out)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the child to exit", Duration::from_secs(5), || {
        proc_status(zombie, "State").is_some_and(|s| s.starts_with('Z'))
    });
    let err = dolly.refused(&["snapshot", "capture", "--pid", &zombie.to_string()]);
    assert!(err.contains("zombie"), "{err}");
}

#[test]
fn refuses_a_traced_process_and_names_the_tracer() {
    let dolly = Dolly::new();
    let w = Workload::start(1);
    let mut strace = Command::new("strace")
        .args(["-p", &w.pid().to_string(), "-o", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace is installed (.ci/run installs it)");
    wait_until("strace to attach", Duration::from_secs(10), || {
        proc_status(w.pid(), "TracerPid").is_some_and(|t| t != "0")
    });
    let err = dolly.refused(&["snapshot", "capture", "--pid", &w.pid().to_string()]);
    assert!(err.contains("traced by strace"), "{err}");
    assert!(err.contains("detach"), "{err}");
    kill(Pid::from_raw(strace.id() as i32), Signal::SIGTERM).unwrap();
    strace.wait().unwrap();
    assert_untouched(&dolly, &w);
    dolly.capture(w.pid());
}

#[test]
fn refuses_another_users_process_when_not_root() {
    let dolly = Dolly::new();
    for dir in [dolly.root.path(), dolly.pool.path()] {
        nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    }
    let w = Workload::start(1);
    let out = dolly
        .cmd()
        .args(["snapshot", "capture", "--pid", &w.pid().to_string()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to user 0") && err.contains("run dolly as root"),
        "{err}"
    );
    assert_untouched(&dolly, &w);
}

fn python_with(code: &str, out: &std::path::Path) -> Spawned {
    let script = format!(
        "import os, time, threading, socket\n{code}\nprint('ready', flush=True)\ntime.sleep(60)\n"
    );
    python_ready(&script, out)
}

#[test]
fn refuses_what_it_cannot_restore_yet_naming_fd_and_kind() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    // A server outside the tree, with a connection accepted and one not.
    let server_path = dir.path().join("outside.sock");
    let server = std::os::unix::net::UnixListener::bind(&server_path).unwrap();
    let connect = format!(
        "s = socket.socket(socket.AF_UNIX)\ns.connect('{}')\nos.dup2(s.fileno(), 10)\ns.close()",
        server_path.display()
    );
    let accepted_case = format!("{connect}\n# accepted by the test");
    let tcp_server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_case = format!(
        "s = socket.create_connection(('127.0.0.1', {}))\nos.dup2(s.fileno(), 9)\ns.close()",
        tcp_server.local_addr().unwrap().port()
    );
    let cases = [
        (
            "p = os.pidfd_open(os.getpid())\nos.dup2(p, 8)\nos.close(p)",
            "fd 8, a pidfd",
        ),
        (
            accepted_case.as_str(),
            "fd 10, a unix socket connected to process",
        ),
        (connect.as_str(), "fd 10, a unix socket whose connection to"),
        (
            "n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nos.dup2(n.fileno(), 5)\nn.close()",
            "fd 5, a netlink socket",
        ),
        (
            "import ctypes\nu = ctypes.CDLL(None).syscall(323, 0)\nos.dup2(u, 6)\nos.close(u)",
            "fd 6, a userfaultfd",
        ),
        (
            "import ctypes\nctypes.CDLL(None).unshare(0x00020000)",
            "another mnt namespace",
        ),
    ];
    let mut server_ends = Vec::new();
    for (i, (code, expect)) in cases.iter().enumerate() {
        let p = python_with(code, &dir.path().join(format!("out{i}")));
        if code.ends_with("# accepted by the test") {
            // The peer stays with this test process: outside the captured tree.
            server_ends.push(server.accept().unwrap().0);
        }
        let err = dolly.refused(&["snapshot", "capture", "--pid", &p.pid().to_string()]);
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
        assert!(err.contains("not supported yet"), "{err}");
        assert_eq!(proc_status(p.pid(), "TracerPid").as_deref(), Some("0"));
        let state = proc_status(p.pid(), "State").unwrap();
        assert!(state.starts_with('S') || state.starts_with('R'), "{state}");
    }
    // With --tcp-established, a connection to outside the tree is still refused.
    let p = python_with(&tcp_case, &dir.path().join("out-tcp"));
    let err = dolly.refused(&[
        "snapshot",
        "capture",
        "--pid",
        &p.pid().to_string(),
        "--tcp-established",
    ]);
    assert!(
        err.contains("fd 9, a TCP connection from 127.0.0.1:")
            && err.contains("other end is outside the captured tree: not supported yet"),
        "{err}"
    );
    assert_eq!(proc_status(p.pid(), "TracerPid").as_deref(), Some("0"));
    assert!(
        dolly.list().is_empty(),
        "refusals leave no snapshot: {:?}",
        dolly.list()
    );
}

/// Python code that maps 8 KiB of the file at `path` shared (read only, or writable) and
/// keeps no fd of it: libc's mmap, as Python's mmap module keeps an fd open.
fn python_maps(path: &Path, writable: bool) -> String {
    let (mode, prot) = if writable {
        ("O_RDWR", 3)
    } else {
        ("O_RDONLY", 1)
    };
    format!(
        "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.mmap.restype = ctypes.c_void_p\n\
         libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n\
         fd = os.open('{}', os.{mode})\nassert libc.mmap(None, 8192, {prot}, 1, fd, 0) != 2**64 - 1\nos.close(fd)",
        path.display()
    )
}

/// A mount over a file, made after a process mapped it.
struct MountedOver(std::path::PathBuf);

impl Drop for MountedOver {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A process that maps a file which dolly no longer reaches by its path (another file
/// mounted over it since) is refused, the file named; nothing of dolly's is left in it.
#[test]
fn refuses_a_mapped_file_another_is_mounted_over() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let code = python_maps(&path, false);
    let p = python_with(&code, &dir.path().join("out"));
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"another file").unwrap();
    nix::mount::mount(
        Some(&other),
        &path,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _mounted = MountedOver(path.clone());
    let err = dolly.refused(&["snapshot", "capture", "--pid", &p.pid().to_string()]);
    assert!(
        err.contains("data.bin") && err.contains("cannot reach by that path"),
        "{err}"
    );
    assert_eq!(proc_status(p.pid(), "TracerPid").as_deref(), Some("0"));
    assert!(capture_traces(p.pid()).1.is_empty(), "dolly's memory left");
    assert!(dolly.list().is_empty(), "{:?}", dolly.list());
}

/// A file shown deleted that another name still holds (a file renamed over its path, a
/// hard link kept elsewhere) is refused when the process writes to it, mapped shared (also
/// where an area that only reads it comes first) or through an fd: a restore would give it
/// a copy, cut off from that file. Read only, or with no name left, it is captured as a
/// deleted file; linked at its path again, as the file there.
#[test]
fn refuses_writing_to_a_replaced_file_that_another_name_keeps() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            python_maps(Path::new("PATH"), true),
            "mapped shared (writable)",
        ),
        (
            // (mmap places the second mapping below the first: the area that only reads
            // the file is met first.)
            format!(
                "{}\n{}",
                python_maps(Path::new("PATH"), true),
                python_maps(Path::new("PATH"), false)
            ),
            "mapped shared (writable)",
        ),
        (
            "fd = os.open('PATH', os.O_WRONLY)\nos.dup2(fd, 7)\nos.close(fd)".to_string(),
            "fd 7 open for writing on",
        ),
    ];
    for (i, (code, expect)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("data{i}.bin"));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        std::fs::hard_link(&path, dir.path().join(format!("kept{i}.bin"))).unwrap();
        let code = code.replace("PATH", path.to_str().unwrap());
        let p = python_with(&code, &dir.path().join(format!("out{i}")));
        let fresh = dir.path().join("fresh.bin");
        std::fs::write(&fresh, b"another file").unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        let err = dolly.refused(&["snapshot", "capture", "--pid", &p.pid().to_string()]);
        assert!(
            err.contains(expect)
                && err.contains(&format!("data{i}.bin"))
                && err.contains("still has another name"),
            "{err}"
        );
        assert_eq!(proc_status(p.pid(), "TracerPid").as_deref(), Some("0"));
        assert!(capture_traces(p.pid()).1.is_empty(), "dolly's memory left");
    }
    assert!(dolly.list().is_empty(), "{:?}", dolly.list());
    // Read only, the same file is captured (as a deleted one, its content kept).
    let path = dir.path().join("read.bin");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    std::fs::hard_link(&path, dir.path().join("kept-read.bin")).unwrap();
    let code = format!(
        "fd = os.open('{}', os.O_RDONLY)\nos.dup2(fd, 7)\nos.close(fd)",
        path.display()
    );
    let p = python_with(&code, &dir.path().join("out-read"));
    std::fs::write(dir.path().join("fresh.bin"), b"another file").unwrap();
    std::fs::rename(dir.path().join("fresh.bin"), &path).unwrap();
    dolly.capture(p.pid());
    // Written to, removed from its path and linked there again, it is captured (the file at
    // its path).
    let path = dir.path().join("back.bin");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let kept = dir.path().join("kept-back.bin");
    std::fs::hard_link(&path, &kept).unwrap();
    let code = format!(
        "fd = os.open('{}', os.O_RDWR)\nos.dup2(fd, 7)\nos.close(fd)",
        path.display()
    );
    let p = python_with(&code, &dir.path().join("out-back"));
    std::fs::remove_file(&path).unwrap();
    std::fs::hard_link(&kept, &path).unwrap();
    dolly.capture(p.pid());
    // Written to but deleted for good (no name left), it is captured too.
    let path = dir.path().join("gone.bin");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let code = format!(
        "fd = os.open('{}', os.O_RDWR)\nos.dup2(fd, 7)\nos.close(fd)",
        path.display()
    );
    let p = python_with(&code, &dir.path().join("out-gone"));
    std::fs::remove_file(&path).unwrap();
    dolly.capture(p.pid());
}

#[test]
fn restore_refuses_while_the_original_holds_the_pid() {
    let dolly = Dolly::new();
    let w = Workload::start(1);
    let id = dolly.capture(w.pid());
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains(&format!("PID {} is in use", w.pid())), "{err}");
    assert!(err.contains("stop the original first"), "{err}");
    assert_report_ok(&w.report(w.pid()));
}

#[test]
fn restore_refuses_unknown_and_unrestorable_snapshots() {
    let dolly = Dolly::new();
    let err = dolly.refused(&["snapshot", "restore", "0123456789abcdef"]);
    assert!(err.contains("no snapshot"), "{err}");
    let err = dolly.refused(&["snapshot", "delete", "nosuchname"]);
    assert!(err.contains("no snapshot"), "{err}");
    let err = dolly.refused(&["snapshot", "info", "nosuchname"]);
    assert!(err.contains("no snapshot"), "{err}");
}

fn captured_and_killed(dolly: &Dolly) -> (Workload, String) {
    let mut w = Workload::start(2);
    // Persisted: no persister left to rewrite the record the tests tamper with.
    let record = dolly.capture_with(w.pid(), &["--wait", "persisted"]);
    let id = record["id"].as_str().unwrap().to_string();
    w.proc.kill_and_reap();
    (w, id)
}

#[test]
fn restore_refuses_a_damaged_manifest() {
    let dolly = Dolly::new();
    let (_w, id) = captured_and_killed(&dolly);
    let manifest = dolly.snapshot_dir(&id).join("manifest.json");
    let good = std::fs::read(&manifest).unwrap();

    std::fs::write(&manifest, &good[..good.len() / 2]).unwrap();
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains("checksum"), "{err}");

    // A manifest of another version (with a matching checksum, as a newer dolly would write).
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["version"] = 99.into();
    let text = serde_json::to_vec_pretty(&v).unwrap();
    std::fs::write(&manifest, &text).unwrap();
    let record_path = dolly.snapshot_dir(&id).join("record.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["manifest_hash"] = blake3::hash(&text).to_hex().to_string().into();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains("version 99"), "{err}");
}

/// A persisted snapshot whose memory tier lost pages is repaired from its durable copy; once
/// that copy is gone too, a restore refuses, naming what is missing.
#[test]
fn restore_repairs_lost_pages_from_the_durable_tier_and_refuses_without_it() {
    let dolly = Dolly::new();
    let mut w = Workload::start(2);
    let pid = w.pid();
    let record = dolly.capture_with(pid, &["--wait", "persisted"]);
    assert_eq!(record["status"], "persisted", "{record}");
    let id = record["id"].as_str().unwrap().to_string();
    w.proc.kill_and_reap();
    reap_until_gone(pid);
    let pool = dolly.pool_dir(&id).join(format!("{pid}.dolly-pages"));
    let size = std::fs::metadata(&pool).unwrap().len();

    // Truncated in the memory tier, persisted: the pages are put back and the restore runs.
    let file = std::fs::OpenOptions::new().write(true).open(&pool).unwrap();
    file.set_len(size / 2).unwrap();
    drop(file);
    let restored = dolly.restore(&id);
    assert_report_ok(&w.report(pid));
    assert_eq!(std::fs::metadata(&pool).unwrap().len(), size);
    drop(restored);
    reap_until_gone(pid);

    // Without the durable copy, damage in the memory tier is refused.
    std::fs::remove_dir_all(dolly.snapshot_dir(&id).join("pages")).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&pool).unwrap();
    file.set_len(size / 2).unwrap();
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains("truncated"), "{err}");
    // Pages gone but the size kept: a hole where the data was.
    file.set_len(0).unwrap();
    file.set_len(size).unwrap();
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains("missing pages"), "{err}");
    std::fs::remove_file(&pool).unwrap();
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains("missing"), "{err}");
    // The whole pool directory wiped (as a reboot would): the snapshot is incomplete.
    std::fs::remove_dir_all(dolly.pool_dir(&id)).unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&dolly.ok(&["snapshot", "info", &id, "--json"])).unwrap();
    assert_eq!(record["status"], "incomplete");
    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(err.contains("incomplete"), "{err}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "no process was started"
    );
}

#[test]
fn terminal_needs_shell_job_and_a_restore_takes_dollys_terminal() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    // A python counting on a terminal (script gives it a pty; `exec`, as the shell script
    // starts it with, $SHELL or /bin/sh, may keep itself as python's parent).
    let counter = "import time\nfor i in range(1, 100000):\n    print(i, flush=True)\n    time.sleep(0.02)\n    if i == 400: break\n";
    let first_tty = dir.path().join("tty1");
    let mut original = Spawned(spawn_detached(
        Command::new("script").args([
            "-qfec",
            &format!("exec python3 -c '{counter}'"),
            first_tty.to_str().unwrap(),
        ]),
        &dir.path().join("script1"),
    ));
    let py = || {
        std::fs::read_to_string(format!("/proc/{}/task/{0}/children", original.pid()))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<i32>().ok())
            })
    };
    wait_until("python on a terminal", Duration::from_secs(10), || {
        py().is_some() && std::fs::read_to_string(&first_tty).is_ok_and(|s| s.lines().count() > 20)
    });
    let pid = py().unwrap();
    let err = dolly.refused(&["snapshot", "capture", "--pid", &pid.to_string()]);
    assert!(
        err.contains("has a terminal open") && err.contains("--shell-job"),
        "{err}"
    );
    assert!(dolly.list().is_empty());

    let out = dolly.ok(&[
        "snapshot",
        "capture",
        "--pid",
        &pid.to_string(),
        "--shell-job",
    ]);
    let id = out.lines().last().unwrap().to_string();
    let at_capture: u64 = std::fs::read_to_string(&first_tty)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    original.kill_and_reap();
    reap_until_gone(pid);

    let err = dolly.refused(&["snapshot", "restore", &id]);
    assert!(
        err.contains("holds a terminal") && err.contains("--shell-job"),
        "{err}"
    );

    // Restored from another terminal, in the foreground: it prints there and ends.
    let second_tty = dir.path().join("tty2");
    let restore = format!(
        "{} --root {} --pool {} snapshot restore --shell-job {id}",
        dolly_bin().display(),
        dolly.root.path().display(),
        dolly.pool.path().display()
    );
    let mut second = Spawned(spawn_detached(
        Command::new("script").args(["-qfec", &restore, second_tty.to_str().unwrap()]),
        &dir.path().join("script2"),
    ));
    let status = second.0.wait().unwrap();
    // What the restored python printed (dolly leaves the terminal to it).
    let printed: Vec<u64> = std::fs::read_to_string(&second_tty)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let raw = std::fs::read_to_string(&second_tty).unwrap();
    assert!(
        status.success(),
        "the restored job ended well: {status}; printed {:?}",
        &raw[raw.len().saturating_sub(600)..]
    );
    assert!(
        printed
            .first()
            .is_some_and(|&f| f > 20 && f <= at_capture + 1),
        "{:?} (captured at {at_capture})",
        &raw[raw.len().saturating_sub(600)..]
    );
    assert_eq!(
        printed.last(),
        Some(&400),
        "it ran to its end on the new terminal"
    );
}

/// A pipe whose other end another process holds cannot be restored with this process alone.
#[test]
fn refuses_a_pipe_shared_with_another_process() {
    let dolly = Dolly::new();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import time\nprint('ready', flush=True)\ntime.sleep(60)",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // SAFETY: setsid and close_range are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    let mut child = Spawned(cmd.spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let me = std::process::id();
    let err = dolly.refused(&["snapshot", "capture", "--pid", &child.pid().to_string()]);
    assert!(
        err.contains("fd 1, a pipe") && err.contains(&format!("process {me}")),
        "{err}"
    );
    assert!(err.contains("holds too"), "{err}");
    assert_eq!(proc_status(child.pid(), "TracerPid").as_deref(), Some("0"));
    assert!(dolly.list().is_empty());
}
