//! Fds to kernel objects whose state only the kernel holds: eventfds, timerfds, signalfds and
//! epoll instances come back with their counters, timers, masks and registrations.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `key=value` of the last log line starting with `prefix`.
fn field(log: &str, prefix: &str, key: &str) -> Option<u64> {
    let line = log.lines().rfind(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
}

/// Whether fd `a` of process `p` and fd `b` of process `q` are one open file description.
fn same_description(p: i32, a: i32, q: i32, b: i32) -> bool {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp takes integers.
    unsafe { libc::syscall(libc::SYS_kcmp, p, q, KCMP_FILE, a, b) == 0 }
}

/// Sends SIGUSR1 to `pid` and waits until the program has counted it (standard signals sent
/// together would merge).
fn usr1(pid: i32, log: &Path, total: u64) {
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("the SIGUSR1 to be counted", Duration::from_secs(10), || {
        field(&read(log), "usr1", "total") == Some(total)
    });
}

/// Sends SIGUSR2 and returns the `report` line's fields that follow.
fn report(pid: i32, log: &Path) -> (u64, u64, u64, u64, u64) {
    let before = read(log)
        .lines()
        .filter(|l| l.starts_with("report"))
        .count();
    kill(Pid::from_raw(pid), Signal::SIGUSR2).unwrap();
    wait_until("the report", Duration::from_secs(10), || {
        read(log)
            .lines()
            .filter(|l| l.starts_with("report"))
            .count()
            > before
    });
    let log = read(log);
    let f = |k| field(&log, "report", k).unwrap();
    (f("reads"), f("expired"), f("left_ms"), f("ticks"), f("bad"))
}

/// The event loop (examples/events.rs): after a restore its epoll instance still delivers the
/// timer's ticks and the signals with the data they were registered with; the semaphore
/// eventfd holds the count from before the capture plus what came after; the fired one-shot
/// timer's expiration is still pending; the one-hour timer has not been re-armed; the child
/// shares the very same descriptions. A clone of it has the same state.
#[test]
fn eventfd_timerfd_signalfd_and_epoll_keep_their_state() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = Command::new(example_bin("events"));
    cmd.args(["--dir", dir.path().to_str().unwrap()]);
    let mut prog = Spawned(spawn_detached(&mut cmd, &dir.path().join("out")));
    let pid = prog.pid();
    wait_until("the event loop", Duration::from_secs(10), || {
        read(&log).contains("ready")
    });
    let ready = std::time::Instant::now(); // the one-hour timer was armed 100 ms before
    let child = field(&read(&log), "ready", "child").unwrap() as i32;
    let epfd = field(&read(&log), "ready", "epfd").unwrap() as i32;
    for n in 1..=3 {
        usr1(pid, &log, n);
    }
    std::thread::sleep(Duration::from_millis(100)); // some ticks
    let id = dolly.capture(pid);
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    prog.kill_and_reap();
    reap_until_gone(child);

    let restored = dolly.restore(&id);
    assert!(
        same_description(pid, epfd, child, epfd),
        "parent and child share one epoll instance"
    );
    for n in 4..=5 {
        usr1(pid, &log, n);
    }
    // Armed 100 ms before `ready`, the one-hour timer has at most 1 h - 100 ms - (time since)
    // left when reported; re-armed by the restore it would have more.
    let bound = 3_600_000 - 100 - ready.elapsed().as_millis() as u64;
    let (reads, expired, left_ms, ticks, bad) = report(pid, &log);
    assert_eq!(
        reads, 5,
        "the eventfd counted 3 before and 2 after, as a semaphore"
    );
    assert_eq!(
        expired, 1,
        "the fired one-shot timer's expiration was still pending"
    );
    assert!(
        (3_000_000..=bound).contains(&left_ms),
        "the one-hour timer kept running, not re-armed: {left_ms} ms left, at most {bound}"
    );
    assert!(ticks >= 5, "the periodic timer ticked: {ticks}");
    assert_eq!(bad, 0, "every epoll event came with its registered data");
    std::thread::sleep(Duration::from_millis(200));
    let (_, _, _, later, _) = report(pid, &log);
    assert!(later > ticks, "the periodic timer goes on ticking");

    // A clone has the captured state too: 3 counted, one expiration pending.
    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    let inside = clone.inside(&log);
    usr1(clone.host, &inside, 4);
    let (reads, expired, _, _, bad) = report(clone.host, &inside);
    assert_eq!(
        (reads, expired, bad),
        (4, 1, 0),
        "the clone's kernel objects"
    );
    dolly.kill_clones(&clone);

    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    drop(restored);
    reap_until_gone(child);
}

/// memfds (one with an fd and a file offset, one only mapped, both sealed) and a POSIX shared
/// memory object, shared by a parent and its child: after the restore they hold their data,
/// names, offsets and seals, and what the child writes the parent still sees.
#[test]
fn memfd_and_posix_shm_keep_data_seals_and_sharing() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let shm_name = format!("dolly-test-{}", std::process::id());
    let script = format!(
        r#"import os, mmap, time, struct, fcntl, signal
fd = os.memfd_create('dolly-mem', os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 1 << 20)
os.pwrite(fd, b'hello memfd', 0)
os.lseek(fd, 5, os.SEEK_SET)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
m = mmap.mmap(fd, 1 << 20)
fd2 = os.memfd_create('dolly-sealed', os.MFD_ALLOW_SEALING)
os.write(fd2, b'S' * 4096)
fcntl.fcntl(fd2, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
m2 = mmap.mmap(fd2, 4096)
os.close(fd2)
sfd = os.open('/dev/shm/{shm_name}', os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(sfd, 4096)
shm = mmap.mmap(sfd, 4096)
os.close(sfd)
os.unlink('/dev/shm/{shm_name}')
if os.fork() == 0:
    n = 0
    while True:
        n += 1
        m[100:108] = struct.pack('Q', n)
        shm[0:8] = struct.pack('Q', n)
        time.sleep(0.01)
def sealed_seals():
    for line in open('/proc/self/maps'):
        if 'dolly-sealed' in line:
            f = os.open('/proc/self/map_files/' + line.split()[0], os.O_RDONLY)
            try:
                return fcntl.fcntl(f, fcntl.F_GET_SEALS)
            finally:
                os.close(f)
def report(*_):
    a = struct.unpack('Q', m[100:108])[0]
    b = struct.unpack('Q', shm[0:8])[0]
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    print(f"report mem={{m[0:11].decode()}} pos={{pos}} seals={{fcntl.fcntl(fd, fcntl.F_GET_SEALS)}} "
          f"sealed={{m2[0:4].decode()}} sealed_seals={{sealed_seals()}} link={{os.readlink(f'/proc/self/fd/{{fd}}')}} "
          f"memfd_n={{a}} shm_n={{b}}", flush=True)
signal.signal(signal.SIGUSR1, report)
print('ready', flush=True)
while True:
    time.sleep(1)
"#
    );
    let py = python_ready(&script, &out);
    let pid = py.pid();
    let report = |pid: i32| -> String {
        let before = read(&out).matches("report").count();
        kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
        wait_until("the report", Duration::from_secs(10), || {
            read(&out).matches("report").count() > before
        });
        read(&out)
            .lines()
            .rfind(|l| l.starts_with("report"))
            .unwrap()
            .to_string()
    };
    let num = |line: &str, key: &str| -> u64 {
        field(line, "report", key).unwrap_or_else(|| panic!("{key} in {line}"))
    };
    let first = report(pid);
    let (id, child) = capture_and_end(&dolly, py);

    let restored = dolly.restore(&id);
    let a = report(pid);
    std::thread::sleep(Duration::from_millis(200));
    let b = report(pid);
    for want in [
        "mem=hello memfd",
        "pos=5",
        "seals=2", // F_SEAL_SHRINK
        "sealed=SSSS",
        "sealed_seals=6", // F_SEAL_SHRINK | F_SEAL_GROW
        "link=/memfd:dolly-mem (deleted)",
    ] {
        assert!(a.contains(want), "{want} in {a}");
    }
    assert!(num(&a, "memfd_n") >= num(&first, "memfd_n"));
    assert!(
        num(&b, "memfd_n") > num(&a, "memfd_n") && num(&b, "shm_n") > num(&a, "shm_n"),
        "the parent sees the restored child's writes through the memfd and the shm: {a} / {b}"
    );
    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    drop(restored);
    reap_until_gone(child);
}

/// Unix sockets of every kind in one python3 process and its child: a listener with an
/// accepted connection (data in flight both ways) and a connection not accepted yet, a
/// seqpacket pair with messages queued, a datagram server on an abstract name with datagrams
/// queued from a connected client, a stream whose peer closed after writing, and a pair
/// shared with a child that echoes. After the restore every byte and message is there once,
/// the names are the same, the child echoes, and a new client reaches the listener at its
/// path.
#[test]
fn unix_sockets_keep_connections_queues_and_names() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let path = dir.path().join("srv.sock");
    let abstract_name = format!("dolly-test-{}", std::process::id());
    let script = format!(
        r#"import os, socket, signal, time
U = socket.AF_UNIX
path = '{path}'
l = socket.socket(U, socket.SOCK_STREAM); l.bind(path); l.listen(7)
c1 = socket.socket(U, socket.SOCK_STREAM); c1.connect(path); a1, _ = l.accept()
c1.sendall(b'c1 to a1'); a1.sendall(b'a1 to c1')
c2 = socket.socket(U, socket.SOCK_STREAM); c2.connect(path)
p1, p2 = socket.socketpair(U, socket.SOCK_SEQPACKET)
p1.send(b'first'); p1.send(b'second message')
srv = socket.socket(U, socket.SOCK_DGRAM); srv.bind('\0{abstract_name}')
cli = socket.socket(U, socket.SOCK_DGRAM); cli.connect('\0{abstract_name}')
cli.send(b'dgram one'); cli.send(b'dgram two')
q1, q2 = socket.socketpair(U, socket.SOCK_STREAM); q2.sendall(b'last words'); q2.close()
e1, e2 = socket.socketpair(U, socket.SOCK_STREAM)
if os.fork() == 0:
    e1.close()
    while True:
        data = e2.recv(100)
        if not data:
            os._exit(0)
        e2.sendall(data.upper())
e2.close()
def report(*_):
    r = {{}}
    r['a1'] = a1.recv(100); r['c1'] = c1.recv(100)
    a2, _ = l.accept(); a2.sendall(b'to c2'); r['c2'] = c2.recv(100)
    a3, _ = l.accept(); r['outsider'] = a3.recv(100); a3.sendall(b'welcome')
    r['seq'] = [p2.recv(100), p2.recv(100)]
    r['dgram'] = [srv.recv(100), srv.recv(100)]
    r['closed'] = [q1.recv(100), q1.recv(100)]
    e1.sendall(b'ping'); r['echo'] = e1.recv(100)
    r['names'] = [a1.getsockname(), c1.getpeername(), srv.getsockname()]
    print('report', repr(r), flush=True)
signal.signal(signal.SIGUSR1, report)
print('ready', flush=True)
while True:
    time.sleep(1)
"#,
        path = path.display()
    );
    let py = python_ready(&script, &out);
    let pid = py.pid();
    let (id, child) = capture_and_end(&dolly, py);
    assert!(path.exists(), "the original left its socket file behind");

    let restored = dolly.restore(&id);
    talk_to_restored_sockets(pid, &path, &out, &abstract_name);

    // A clone beside it: its own listener at the same path (in its overlay) and its own
    // abstract name (in its network namespace).
    let err = dolly.refused(&["clone", "--snapshot", &id]);
    assert!(err.contains("in use") && err.contains("--overlay"), "{err}");
    let clone = dolly.clone_over(&["--snapshot", &id, "--net", "none"], dir.path());
    talk_to_restored_sockets(
        clone.host,
        &clone.inside(&path),
        &clone.inside(&out),
        &abstract_name,
    );
    dolly.kill_clones(&clone);

    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    drop(restored);
    reap_until_gone(child);
}

/// Connects to the restored python3's listener, makes it report, and checks the report.
fn talk_to_restored_sockets(pid: i32, path: &Path, out: &Path, abstract_name: &str) {
    let mut outsider = std::os::unix::net::UnixStream::connect(path).unwrap();
    std::io::Write::write_all(&mut outsider, b"hello from outside").unwrap();
    let before = read(out).matches("report").count();
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("the report", Duration::from_secs(10), || {
        read(out).matches("report").count() > before
    });
    let text = read(out);
    let report = text.lines().rfind(|l| l.starts_with("report")).unwrap();
    for want in [
        "'a1': b'c1 to a1'",
        "'c1': b'a1 to c1'",
        "'c2': b'to c2'",
        "'outsider': b'hello from outside'",
        "'seq': [b'first', b'second message']",
        "'dgram': [b'dgram one', b'dgram two']",
        "'closed': [b'last words', b'']",
        "'echo': b'PING'",
    ] {
        assert!(report.contains(want), "{want} in {report}");
    }
    // The names are the captured ones (the path as the process bound it).
    let names = format!(
        "'names': ['{0}', '{0}', b'\\x00{abstract_name}']",
        path_as_bound(path)
    );
    assert!(report.contains(&names), "{names} in {report}");
    let mut reply = [0u8; 7];
    std::io::Read::read_exact(&mut outsider, &mut reply).unwrap();
    assert_eq!(&reply, b"welcome");
}

/// A path under /proc/PID/root as the process inside sees it.
fn path_as_bound(path: &Path) -> String {
    let s = path.to_str().unwrap();
    match s.strip_prefix("/proc/") {
        Some(rest) => rest[rest.find("/root").unwrap() + 5..].to_string(),
        None => s.to_string(),
    }
}

/// Captures a spawned process that has one child, then ends both and waits until their PIDs
/// are free; returns the snapshot id and the child's PID.
fn capture_and_end(dolly: &Dolly, parent: Spawned) -> (String, i32) {
    let pid = parent.pid();
    let child = read(Path::new(&format!("/proc/{pid}/task/{pid}/children")))
        .trim()
        .parse::<i32>()
        .unwrap();
    let id = dolly.capture(pid);
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    drop(parent);
    reap_until_gone(pid);
    reap_until_gone(child);
    (id, child)
}

/// An inotify instance watching two directories (one watch removed between them, so the
/// descriptors have a gap): after the restore it reports new events under the same watch
/// descriptors, and nothing else.
#[test]
fn inotify_watches_keep_their_descriptors() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for d in [&a, &b, &c] {
        std::fs::create_dir(d).unwrap();
    }
    let script = format!(
        r#"import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
IN_CREATE = 0x100
wa = libc.inotify_add_watch(fd, b'{a}', IN_CREATE)
wb = libc.inotify_add_watch(fd, b'{b}', IN_CREATE)
wc = libc.inotify_add_watch(fd, b'{c}', IN_CREATE)
libc.inotify_rm_watch(fd, wb)
print('ready', wa, wb, wc, flush=True)
while True:
    data = os.read(fd, 4096)
    at = 0
    while at < len(data):
        wd, mask, cookie, n = struct.unpack_from('iIII', data, at)
        name = data[at + 16:at + 16 + n].rstrip(b'\0').decode()
        print(f'event wd={{wd}} mask={{mask:#x}} name={{name}}', flush=True)
        at += 16 + n
"#,
        a = a.display(),
        b = b.display(),
        c = c.display()
    );
    let py = python_ready(&script, &out);
    wait_until(
        "the IN_IGNORED of the removed watch",
        Duration::from_secs(10),
        || read(&out).contains("event wd=2 mask=0x8000"),
    );
    assert!(read(&out).contains("ready 1 2 3"));
    let pid = py.pid();
    let id = dolly.capture(pid);
    drop(py);
    reap_until_gone(pid);

    let restored = dolly.restore(&id);
    let before = read(&out).lines().count();
    std::fs::write(a.join("new-in-a"), b"").unwrap();
    std::fs::write(c.join("new-in-c"), b"").unwrap();
    std::fs::write(b.join("new-in-b"), b"").unwrap();
    wait_until("the events", Duration::from_secs(10), || {
        read(&out).contains("name=new-in-c")
    });
    std::thread::sleep(Duration::from_millis(100));
    let text = read(&out);
    let after: Vec<&str> = text.lines().skip(before).collect();
    assert_eq!(
        after,
        [
            "event wd=1 mask=0x100 name=new-in-a",
            "event wd=3 mask=0x100 name=new-in-c"
        ],
        "the same watch descriptors, no stray events, nothing from the removed watch"
    );
    drop(restored);
}

/// Tries to take a lock the way `kind` says on `path`, without waiting: whether it was free.
fn lock_is_free(path: &Path, kind: &str) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let fd = f.as_raw_fd();
    let range = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 10,
        l_pid: 0,
    };
    // SAFETY: plain lock calls on an fd this function owns.
    let rc = unsafe {
        match kind {
            "flock" => libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB),
            "posix" => libc::fcntl(fd, libc::F_SETLK, &range),
            _ => libc::fcntl(fd, libc::F_OFD_SETLK, &range),
        }
    };
    rc == 0
}

/// With `--file-locks` a process's flock, POSIX and OFD locks are captured and taken again
/// by the restored process (others find them held, until it ends); without it the capture is
/// refused, naming the flag.
#[test]
fn file_locks_are_taken_again_with_file_locks() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let files: Vec<_> = ["flock", "posix", "ofd"]
        .iter()
        .map(|k| dir.path().join(k))
        .collect();
    for f in &files {
        std::fs::write(f, b"0123456789abcdef").unwrap();
    }
    let script = format!(
        r#"import fcntl, os, struct, time
a = open('{}', 'r+'); fcntl.flock(a, fcntl.LOCK_EX)
b = open('{}', 'r+'); fcntl.lockf(b, fcntl.LOCK_EX, 10, 0)
c = open('{}', 'r+'); fcntl.fcntl(c, 37, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 10, 0))
print('ready', flush=True)
while True:
    time.sleep(1)
"#,
        files[0].display(),
        files[1].display(),
        files[2].display()
    );
    let py = python_ready(&script, &out);
    let pid = py.pid();
    for (f, k) in files.iter().zip(["flock", "posix", "ofd"]) {
        assert!(!lock_is_free(f, k), "{k} is held by the original");
    }
    let err = dolly.refused(&["snapshot", "capture", "--pid", &pid.to_string()]);
    assert!(
        err.contains("holds a file lock") && err.contains("--file-locks"),
        "{err}"
    );

    let id = dolly.capture_with(pid, &["--file-locks"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    drop(py);
    reap_until_gone(pid);
    for (f, k) in files.iter().zip(["flock", "posix", "ofd"]) {
        assert!(lock_is_free(f, k), "{k} was released with the original");
    }

    let restored = dolly.restore(&id);
    for (f, k) in files.iter().zip(["flock", "posix", "ofd"]) {
        assert!(
            !lock_is_free(f, k),
            "{k} is held again by the restored process"
        );
    }
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks
            .lines()
            .any(|l| l.contains("POSIX") && l.contains(&format!(" {pid} "))),
        "the POSIX lock is the restored process's own: {locks}"
    );
    drop(restored);
    reap_until_gone(pid);
    for (f, k) in files.iter().zip(["flock", "posix", "ofd"]) {
        assert!(lock_is_free(f, k), "{k} goes with the restored process");
    }
}

/// System V shared memory: a keyed segment and a private one already marked removed, both
/// shared by a parent and its child. After the restore (in place: the keyed segment
/// outlived its processes and is taken over, the removed one is made again at its id) and in
/// a clone (its own IPC namespace), they hold their data at their ids and stay shared.
#[test]
fn sysv_shared_memory_keeps_ids_data_and_sharing() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let key = 0x0d0_0000 + (std::process::id() as i32 & 0xffff);
    let script = format!(
        r#"import ctypes, os, signal, struct, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
keyed = libc.shmget({key}, 8192, 0o1000 | 0o640)
gone = libc.shmget(0, 4096, 0o1000 | 0o600)
a = (ctypes.c_char * 8192).from_address(libc.shmat(keyed, None, 0))
b = (ctypes.c_char * 4096).from_address(libc.shmat(gone, None, 0))
libc.shmctl(gone, 0, None)
a[0:5] = b'hello'
b[0:5] = b'world'
if os.fork() == 0:
    n = 0
    while True:
        n += 1
        a[100:108] = struct.pack('Q', n)
        b[100:108] = struct.pack('Q', n)
        time.sleep(0.01)
def report(*_):
    na = struct.unpack('Q', a[100:108])[0]
    nb = struct.unpack('Q', b[100:108])[0]
    print(f'report keyed={{keyed}} gone={{gone}} a={{a[0:5].decode()}} b={{b[0:5].decode()}} na={{na}} nb={{nb}}', flush=True)
signal.signal(signal.SIGUSR1, report)
print('ready', keyed, gone, flush=True)
while True:
    time.sleep(1)
"#
    );
    let py = python_ready(&script, &out);
    let ids: Vec<i32> = read(&out)
        .split_whitespace()
        .skip(1)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    let (keyed, gone) = (ids[0], ids[1]);
    let report = |pid: i32, out: &Path| ask(pid, out, "report");
    let check = |pid: i32, out: &Path| {
        let first = report(pid, out);
        std::thread::sleep(Duration::from_millis(100));
        let second = report(pid, out);
        let want = format!("report keyed={keyed} gone={gone} a=hello b=world");
        assert!(first.starts_with(&want), "{want} in {first}");
        for k in ["na", "nb"] {
            assert!(
                field(&second, "report", k) > field(&first, "report", k),
                "the child's writes reach the parent through {k}: {first} / {second}"
            );
        }
    };
    let (id, child) = capture_and_end(&dolly, py);
    let segments = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    assert!(
        segments.split_whitespace().any(|w| w == keyed.to_string()),
        "keyed survives"
    );

    let restored = dolly.restore(&id);
    check(restored.0, &out);
    // Both at their ids, attached by both processes; the removed one marked removed again.
    let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    for (shmid, removed) in [(keyed, false), (gone, true)] {
        let row: Vec<&str> = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(1) == Some(&shmid.to_string().as_str()))
            .unwrap_or_else(|| panic!("segment {shmid} in {table}"));
        let perms = u32::from_str_radix(row[2], 8).unwrap();
        assert_eq!(perms & 0o1000 != 0, removed, "{row:?}");
        assert_eq!(row[6], "2", "attached by parent and child: {row:?}");
    }
    let clone = dolly.clone_over(&["--snapshot", &id], dir.path());
    check(clone.host, &clone.inside(&out));
    dolly.kill_clones(&clone);

    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    drop(restored);
    reap_until_gone(child);
    // SAFETY: removes the segment this test made, by id.
    unsafe { libc::shmctl(keyed, libc::IPC_RMID, std::ptr::null_mut()) };
}

/// A FIFO between a parent and its child, full when captured: after the restore the reader
/// goes on from the next number, nothing lost or repeated, and both ends are the FIFO at its
/// path again.
#[test]
fn fifo_between_processes_keeps_its_data() {
    let dolly = Dolly::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let fifo = dir.path().join("fifo");
    let script = format!(
        r#"import os, time
os.mkfifo('{fifo}')
if os.fork() == 0:
    w = os.open('{fifo}', os.O_WRONLY)
    n = 0
    while True:
        n += 1
        os.write(w, f'{{n}}\n'.encode())
r = open('{fifo}')
print('ready', flush=True)
want = 1
for line in r:
    n = int(line)
    if n != want:
        print('GAP', want, n, flush=True)
    want = n + 1
    if n % 500 == 0:
        print(n, flush=True)
        time.sleep(0.01)
"#,
        fifo = fifo.display()
    );
    let py = python_ready(&script, &out);
    let numbers = || -> Vec<u64> { read(&out).lines().filter_map(|l| l.parse().ok()).collect() };
    wait_until("the reader", Duration::from_secs(10), || {
        numbers().len() > 3
    });
    let pid = py.pid();
    let before = *numbers().last().unwrap();
    let (id, child) = capture_and_end(&dolly, py);
    let seen = numbers().len();

    let restored = dolly.restore(&id);
    wait_until("the restored reader", Duration::from_secs(10), || {
        numbers().len() > seen + 3
    });
    let text = read(&out);
    assert!(!text.contains("GAP"), "{text}");
    assert!(numbers()[seen] > before, "resumed after {before}");
    for p in [pid, child] {
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{p}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .map(|l| l.display().to_string())
            .collect();
        assert!(
            links.contains(&fifo.display().to_string()),
            "{p}: {links:?}"
        );
    }
    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    drop(restored);
    reap_until_gone(child);
}
