//! Real programs captured and restored whole, each shown to go on from its captured state.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A shell feeding an interactive program the commands dropped into DIR/cmd, one batch at
/// a time, through a pipe inside the tree.
struct Fed {
    dir: tempfile::TempDir,
    sh: Spawned,
}

impl Fed {
    fn start(program: &str) -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "cd {0}; while :; do if [ -f cmd ]; then cat cmd; rm cmd; fi; sleep 0.05; done | {program}",
            dir.path().display()
        );
        let sh = Spawned(spawn_detached(
            Command::new("sh").args(["-c", &script]),
            &dir.path().join("out"),
        ));
        Fed { dir, sh }
    }

    /// Sends commands and waits until the output has `until`.
    fn send(&self, commands: &str, until: &str) -> String {
        let tmp = self.dir.path().join("cmd.tmp");
        std::fs::write(&tmp, commands).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("cmd")).unwrap();
        let out = self.dir.path().join("out");
        wait_until(until, Duration::from_secs(10), || {
            read(&out).contains(until)
        });
        read(&out)
    }
}

/// sqlite3 with a database open and a TEMP table that lives only in its memory: after the
/// restore it answers from both, and writes to the database again.
#[test]
fn sqlite3_with_an_open_database() {
    let dolly = Dolly::new();
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("kv.db");
    let fed = Fed::start(&format!("sqlite3 {}", db.display()));
    fed.send(
        "CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT);\n\
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)\n\
         INSERT INTO kv SELECT i, hex(randomblob(16)) FROM n;\n\
         CREATE TEMP TABLE scratch(x);\n\
         INSERT INTO scratch VALUES (41);\n\
         SELECT 'ready';\n",
        "ready",
    );
    let root = fed.sh.pid();
    let pids = tree(root);
    let sqlite = *pids
        .iter()
        .find(|&&p| read(Path::new(&format!("/proc/{p}/comm"))).trim() == "sqlite3")
        .expect("sqlite3 in the tree");
    let id = dolly.capture(root);
    kill_tree(&pids);
    // The feeding shell may have started another `sleep` since `pids` was read: it keeps
    // the session's PID taken.
    dolly.end_originals(&id);

    let restored = dolly.restore(&id);
    assert!(Path::new(&format!("/proc/{sqlite}")).exists());
    let out = fed.send(
        "INSERT INTO scratch VALUES (1);\n\
         SELECT 'sum=' || sum(x) FROM scratch;\n\
         INSERT INTO kv(v) VALUES ('after');\n\
         SELECT 'rows=' || count(*) FROM kv;\n",
        "rows=",
    );
    assert!(out.contains("sum=42"), "the TEMP table survived: {out}");
    assert!(
        out.contains("rows=1001"),
        "the database is open and writable: {out}"
    );
    drop(restored);
    kill_tree(&tree(root));
    let check = Command::new("sqlite3")
        .arg(&db)
        .arg("SELECT count(*) FROM kv; PRAGMA integrity_check;")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout), "1001\nok\n");
}

/// `GET path` over HTTP/1.0 at `addr`; the whole response.
fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `python3 -m http.server`: after the restore it serves again on its port; a clone beside
/// it with `--net none` serves on the same port inside its own network namespace, while a
/// clone sharing the host's network is refused, naming the port.
#[test]
fn python_http_server_serves_after_restore_and_in_a_clone() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello from dolly\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = Spawned(spawn_detached(
        Command::new("python3").args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            site.to_str().unwrap(),
        ]),
        &dir.path().join("out"),
    ));
    wait_until("the server", Duration::from_secs(10), || {
        http_get(addr, "/hello.txt").is_ok()
    });
    let pid = server.pid();
    let id = dolly.capture(pid);
    drop(server);
    reap_until_gone(pid);
    assert!(
        http_get(addr, "/hello.txt").is_err(),
        "the original is gone"
    );

    let restored = dolly.restore(&id);
    let page = http_get(addr, "/hello.txt").unwrap();
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert!(page.ends_with("hello from dolly\n"), "{page}");

    let err = dolly.refused(&["clone", "--snapshot", &id]);
    assert!(
        err.contains(&format!("127.0.0.1:{port} is in use")) && err.contains("--net none"),
        "{err}"
    );
    let out = dolly.ok(&["--json", "clone", "--snapshot", &id, "--net", "none"]);
    let clone: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone();
    let host = clone["host_pid"].as_i64().unwrap() as i32;
    let netns = std::fs::File::open(format!("/proc/{host}/ns/net")).unwrap();
    let inside = std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        http_get(addr, "/hello.txt")
    })
    .join()
    .unwrap()
    .unwrap();
    assert!(inside.ends_with("hello from dolly\n"), "{inside}");
    dolly.ok(&["clone", "kill", "--all"]);
    reap_until_gone(clone["init_pid"].as_i64().unwrap() as i32);
    drop(restored);
}

/// Runs `tmux -S SOCKET ARGS...`; its stdout.
fn tmux(socket: &Path, args: &[&str]) -> String {
    run_ok(Command::new("tmux").arg("-S").arg(socket).args(args))
}

/// A tmux server with a session whose pane runs an interactive bash (a unix listener, a pty
/// whose both ends are in the tree, the pane's session and foreground group): after the
/// restore the pane shows what it showed, the shell still has its variable, runs commands
/// typed into it on the same /dev/pts/N, and a client attaches on a terminal.
#[test]
fn tmux_server_with_a_session_is_restored_and_attached_to() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tmux.sock");
    let mut start = Command::new("tmux");
    start.arg("-S").arg(&socket).args([
        "new-session",
        "-d",
        "-s",
        "main",
        "-x",
        "100",
        "-y",
        "30",
        "bash --norc --noprofile -i",
    ]);
    let status = spawn_detached(&mut start, &dir.path().join("out"))
        .wait()
        .unwrap();
    assert!(status.success());
    let pane = |what: &str| {
        tmux(&socket, &["display", "-p", "-t", "main", what])
            .trim()
            .to_string()
    };
    let screen = || tmux(&socket, &["capture-pane", "-p", "-t", "main"]);
    tmux(
        &socket,
        &["send-keys", "-t", "main", "X=42; echo hello-$X", "Enter"],
    );
    wait_until("the pane", Duration::from_secs(10), || {
        screen().contains("hello-42")
    });
    let server: i32 = pane("#{pid}").parse().unwrap();
    let tty = pane("#{pane_tty}");
    let shell: i32 = pane("#{pane_pid}").parse().unwrap();

    let id = dolly.capture(server);
    dolly.end_originals(&id);
    let restored = dolly.restore(&id);
    assert_eq!(restored.0, server);
    assert!(
        screen().contains("hello-42"),
        "the pane kept its screen: {}",
        screen()
    );
    assert_eq!(pane("#{pane_tty}"), tty, "the same pseudo-terminal");
    assert_eq!(pane("#{pane_pid}"), shell.to_string());
    let stat = std::fs::read_to_string(format!("/proc/{shell}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // state ppid pgrp session tty_nr tpgid
    assert_eq!(
        fields[2], fields[5],
        "the shell leads its terminal's foreground group"
    );
    assert_ne!(fields[4], "0", "the shell has its controlling terminal");
    tmux(
        &socket,
        &["send-keys", "-t", "main", "echo again-$X", "Enter"],
    );
    wait_until("the shell to answer", Duration::from_secs(10), || {
        screen().contains("again-42")
    });

    // A client attaches on a terminal (script gives it one), sees the pane drawn, detaches.
    let attach = Command::new("script")
        .args(["-q", "-c"])
        .arg(format!(
            "tmux -S {} attach -t main \\; run-shell 'sleep 0.5' \\; detach-client",
            socket.display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&attach.stdout);
    assert!(attach.status.success(), "{seen}");
    assert!(
        seen.contains("again-42") && seen.contains("detached"),
        "{seen}"
    );

    // A clone beside it: its own socket (in its overlay) and its own /dev/pts, where the
    // pane gets the same number.
    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    let inside = clone.inside(&socket);
    let clone_screen = || tmux(&inside, &["capture-pane", "-p", "-t", "main"]);
    assert!(clone_screen().contains("hello-42") && !clone_screen().contains("again-42"));
    assert_eq!(
        tmux(&inside, &["display", "-p", "-t", "main", "#{pane_tty}"]).trim(),
        tty
    );
    tmux(
        &inside,
        &["send-keys", "-t", "main", "echo clone-$X", "Enter"],
    );
    wait_until(
        "the clone's shell to answer",
        Duration::from_secs(10),
        || clone_screen().contains("clone-42"),
    );
    assert!(
        !screen().contains("clone-42"),
        "the original's pane is its own"
    );
    dolly.kill_clones(&clone);

    let _ = tmux(&socket, &["kill-server"]);
    drop(restored);
    reap_until_gone(shell);
}

/// Established TCP connections within the tree (`--tcp-established`): a server process and
/// its child, connected over loopback with bytes in flight both ways. After the restore each
/// side reads exactly what was in flight, then they exchange more (a megabyte each way) over
/// the same connection; a clone with `--net none` has the connection too, inside its own
/// network namespace. Without the flag the capture is refused, naming it.
#[test]
fn tcp_connections_within_the_tree_survive() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"import os, signal, socket, time
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(4)
c = socket.create_connection(l.getsockname())
s, _ = l.accept()
c.sendall(b'client to server, in flight')
s.sendall(b'server to client, in flight')
def take(sock, n):
    # Exactly n bytes: the peer's next message may already be queued behind these.
    got = b''
    while len(got) < n:
        got += sock.recv(n - len(got))
    return got
r, w = os.pipe()
if os.fork() == 0:
    # The client side: on each byte from the pipe, read what waits, then talk.
    s.close(); l.close(); os.close(w)
    while os.read(r, 1):
        got = take(c, 27)
        c.sendall(b'x' * (1 << 20))
        big = take(c, 1 << 20)
        print('client got', got, len(big), flush=True)
    os._exit(0)
c.close(); os.close(r)
def report(*_):
    os.write(w, b'!')
    got = take(s, 27)
    big = take(s, 1 << 20)
    s.sendall(b'y' * (1 << 20))
    print('server got', got, len(big), flush=True)
signal.signal(signal.SIGUSR1, report)
print('ready', l.getsockname()[1], flush=True)
while True:
    time.sleep(1)
"#;
    let py = python_ready(script, &out);
    let pid = py.pid();
    let err = dolly.refused(&["snapshot", "capture", "--pid", &pid.to_string()]);
    assert!(
        err.contains("a TCP connection from 127.0.0.1:") && err.contains("--tcp-established"),
        "{err}"
    );
    let id = dolly.capture_with(pid, &["--tcp-established"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let check = |pid: i32, out: &Path| {
        // The clone's output starts as a copy of the restored one's: count new lines only,
        // whole ones (a line may be read while it is being written).
        let wants = [
            "server got b'client to server, in flight' 1048576\n",
            "client got b'server to client, in flight' 1048576\n",
        ];
        let seen = || wants.map(|want| read(out).matches(want).count());
        let before = seen();
        kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
        wait_until("both sides to talk", Duration::from_secs(20), || {
            seen().iter().zip(before).all(|(now, was)| *now > was)
        });
        assert_eq!(seen(), before.map(|was| was + 1), "{}", read(out));
    };
    dolly.end_originals(&id);

    let restored = dolly.restore(&id);
    check(pid, &out);
    let clone = dolly.clone_over(&["--snapshot", &id, "--net", "none"], dir.path());
    check(clone.host, &clone.inside(&out));
    dolly.kill_clones(&clone);
    drop(restored);
    dolly.end_originals(&id);
}
