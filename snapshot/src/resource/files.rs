//! Files: the fd table, the open file descriptions behind it (flags, offsets, sharing),
//! and the files (inodes) they and the memory mappings refer to. Regular files and
//! directories are opened again by path; deleted files are carried in the snapshot and
//! recreated (then unlinked again); `/dev/null`-like devices are reopened; terminals are
//! replaced by dolly's own (`--shell-job`).

use std::collections::{HashMap, HashSet};
use std::fs::File as StdFile;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::stat::{major, minor};
use nix::unistd::Pid;

use crate::error::{Context, Error, Result};
use crate::image::{
    AreaKind, EpollItem, Fd, File, FileKind, FileLock, LockKind, Manifest, OpenFile, Process,
};
use crate::proc::{MapsEntry, ProcDir};
use crate::sys::process::same_file_description;

/// Character devices that are the same on every machine and carry no state.
const STATELESS_DEVICES: &[(u64, u64, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

/// The path of a stateless character device, by device number.
fn stateless_device(rdev: u64) -> Option<&'static str> {
    STATELESS_DEVICES
        .iter()
        .find(|&&(ma, mi, _)| major(rdev) == ma && minor(rdev) == mi)
        .map(|&(_, _, p)| p)
}

/// Whether a character device number is a terminal (virtual consoles, /dev/tty,
/// /dev/console, ptmx, pseudo-terminal slaves).
fn is_terminal(rdev: u64) -> bool {
    matches!(major(rdev), 4 | 5 | 136..=143)
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// The files of a process being captured, each once per inode.
#[derive(Debug)]
pub struct FileTable {
    files: Vec<File>,
    by_inode: HashMap<(u64, u64), u32>,
    /// Mapped files found already, by what `/proc/PID/maps` says of them (device, inode,
    /// path): the areas of one file need only one look at it.
    by_mapping: HashMap<(u64, u64, String), u32>,
    pool_dir: PathBuf,
}

impl FileTable {
    /// An empty table whose deleted-file contents go to `pool_dir`.
    pub fn new(pool_dir: &Path) -> FileTable {
        FileTable {
            files: Vec::new(),
            by_inode: HashMap::new(),
            by_mapping: HashMap::new(),
            pool_dir: pool_dir.to_path_buf(),
        }
    }

    /// The files found.
    pub fn into_files(self) -> Vec<File> {
        self.files
    }

    /// Adds a file once per inode. `open` opens it (through /proc) when its content must be
    /// saved: a deleted file's data, or the bytes buffered in a pipe.
    fn add(&mut self, mut file: File, open: impl FnOnce() -> Result<StdFile>) -> Result<u32> {
        if let Some(&id) = self.by_inode.get(&(file.dev, file.inode)) {
            return Ok(id);
        }
        let id = self.files.len() as u32;
        let pipe = matches!(file.kind, FileKind::Pipe { .. } | FileKind::Fifo { .. });
        let memfd = matches!(file.kind, FileKind::Memfd { .. });
        if file.deleted && file.kind == FileKind::Regular || pipe || memfd {
            let name = format!("file-{id}.data");
            let dst_path = self.pool_dir.join(&name);
            let mut dst = StdFile::create(&dst_path)
                .with_context(|| format!("creating {}", dst_path.display()))?;
            if pipe {
                let (data, capacity) = pipe_content(&open()?)
                    .with_context(|| format!("reading the data buffered in {}", file.path))?;
                std::io::Write::write_all(&mut dst, &data).context("saving pipe data")?;
                file.kind = match file.kind {
                    FileKind::Pipe { .. } => FileKind::Pipe { capacity },
                    _ => FileKind::Fifo { capacity },
                };
            } else {
                copy_data(&open()?, &dst, file.size)
                    .with_context(|| format!("saving the content of {}", file.path))?;
            }
            file.content = Some(name);
        }
        self.files.push(file);
        self.by_inode.insert(
            (self.files[id as usize].dev, self.files[id as usize].inode),
            id,
        );
        Ok(id)
    }

    /// The file with this device and inode, if already added.
    pub fn find(&self, dev: u64, inode: u64) -> Option<u32> {
        self.by_inode.get(&(dev, inode)).copied()
    }

    /// Adds a file whose content (`data`, saved when not empty) dolly read itself: the
    /// bytes queued in a socket.
    fn add_with_data(&mut self, mut file: File, data: &[u8]) -> Result<u32> {
        let id = self.files.len() as u32;
        if !data.is_empty() {
            let name = format!("file-{id}.data");
            let path = self.pool_dir.join(&name);
            std::fs::write(&path, data)
                .with_context(|| format!("saving the data queued in {}", file.path))?;
            file.content = Some(name);
        }
        self.by_inode.insert((file.dev, file.inode), id);
        self.files.push(file);
        Ok(id)
    }

    /// Adds a kernel object that is its own file (an eventfd, a timerfd...: they all share
    /// one anonymous inode, so they are not told apart by inode).
    fn add_object(&mut self, file: File) -> u32 {
        self.files.push(file);
        (self.files.len() - 1) as u32
    }

    /// Adds the file a memory area maps.
    pub fn intern_mapping(&mut self, proc: &ProcDir, m: &MapsEntry) -> Result<u32> {
        // (Each area that writes to a file shown deleted, not only the first that maps it.)
        if m.deleted && !m.path.starts_with("/memfd:") && m.shared && (m.write || m.flags.may_write)
        {
            let (_, meta) = mapped_file(proc, m)?;
            check_gone(proc.pid(), "mapped shared (writable)", &m.path, &meta)?;
        }
        let key = (m.dev, m.inode, m.path.clone());
        if let Some(&id) = self.by_mapping.get(&key) {
            return Ok(id);
        }
        let id = self.look_at_mapping(proc, m)?;
        self.by_mapping.insert(key, id);
        Ok(id)
    }

    fn look_at_mapping(&mut self, proc: &ProcDir, m: &MapsEntry) -> Result<u32> {
        // The file at its path, if it is the one mapped (the device and inode the process's
        // maps give): that is the check, and its metadata are the mapped file's. Else (a
        // deleted file or a memfd, another mount namespace, a file system whose device in
        // maps is not the one stat gives) through map_files, whose lookup takes the
        // process's mmap lock: it waits for a fork the process is making.
        let at_path = (!m.deleted)
            .then(|| std::fs::metadata(&m.path).ok())
            .flatten()
            .filter(|meta| (meta.dev(), meta.ino()) == (m.dev, m.inode));
        let (link, meta) = match at_path {
            Some(meta) => (proc.map_file(m), meta),
            None => {
                let (link, meta) = mapped_file(proc, m)?;
                if !m.deleted {
                    check_reachable(proc.pid(), &m.path, &meta)?;
                }
                (link, meta)
            }
        };
        let memfd = m.path.starts_with("/memfd:");
        let kind = if memfd {
            FileKind::Memfd {
                seals: memfd_seals(&link)?,
            }
        } else {
            FileKind::Regular
        };
        let file = File {
            path: m.path.clone(),
            kind,
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            deleted: m.deleted && !memfd && !still_at(&m.path, &meta),
            content: None,
        };
        self.add(file, || {
            StdFile::open(&link).with_context(|| format!("opening mapped file {}", m.path))
        })
    }
}

/// The seals of a memfd, through a /proc link to it; refuses hugetlbfs memfds.
fn memfd_seals(link: &Path) -> Result<u32> {
    let f = StdFile::open(link).with_context(|| format!("opening memfd {}", link.display()))?;
    let fs =
        nix::sys::statfs::fstatfs(&f).with_context(|| format!("inspecting {}", link.display()))?;
    if fs.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC {
        return Err(Error::refused(
            format!("{} is a hugetlb memfd: not supported yet", link.display()),
            "capture a process without hugetlb memory",
        ));
    }
    let seals = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GET_SEALS)
        .with_context(|| format!("reading the seals of {}", link.display()))?;
    Ok(seals as u32)
}

/// Copies the first `len` bytes of `src` to `dst`, data only: holes stay holes.
fn copy_data(src: &StdFile, dst: &StdFile, len: u64) -> Result<()> {
    use nix::unistd::{lseek, Whence};
    dst.set_len(len).context("sizing a copy")?;
    let mut at = 0i64;
    while (at as u64) < len {
        let start = match lseek(src, at, Whence::SeekData) {
            Ok(o) => o,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(Error::sys("seeking data", e)),
        };
        let end = lseek(src, start, Whence::SeekHole)
            .map_err(|e| Error::sys("seeking a hole", e))?
            .min(len as i64);
        copy_range(src, dst, start as u64, end as u64)?;
        at = end;
    }
    Ok(())
}

/// Copies bytes `[start, end)` of `src` to the same offsets of `dst`: in the kernel where the
/// two filesystems allow it, else through a buffer.
fn copy_range(src: &StdFile, dst: &StdFile, start: u64, end: u64) -> Result<()> {
    use nix::errno::Errno;
    use std::os::unix::fs::FileExt;
    let (mut from, mut to) = (start as i64, start as i64);
    while (from as u64) < end {
        let want = (end - from as u64) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // Across filesystems that do not implement it (tmpfs to tmpfs, for one).
            Err(Errno::EXDEV | Errno::EOPNOTSUPP | Errno::EINVAL) => break,
            Err(e) => return Err(Error::sys("copying data", e)),
        }
    }
    let mut buf = vec![0u8; (1u64 << 20).min(end.saturating_sub(from as u64)) as usize];
    let mut at = from as u64;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        let got = src
            .read_at(&mut buf[..n], at)
            .context("reading data to copy")?;
        if got == 0 {
            break;
        }
        dst.write_all_at(&buf[..got], at)
            .context("writing copied data")?;
        at += got as u64;
    }
    Ok(())
}

/// Refuses a file whose path does not lead dolly to the same inode (another mount
/// namespace or root): a restore could not open it again.
fn check_reachable(pid: Pid, path: &str, meta: &std::fs::Metadata) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.dev() == meta.dev() && m.ino() == meta.ino() => Ok(()),
        _ => Err(Error::refused(
            format!("process {pid} uses {path}, which dolly cannot reach by that path (another mount namespace, or replaced)"),
            "capture processes that share dolly's mount namespace",
        )),
    }
}

/// The file area `m` of a process maps, through its `map_files` link (whose lookup takes
/// the process's mmap lock): the link and the file's metadata.
fn mapped_file(proc: &ProcDir, m: &MapsEntry) -> Result<(PathBuf, std::fs::Metadata)> {
    let link = proc.map_file(m);
    let meta = std::fs::metadata(&link)
        .with_context(|| format!("reading the file mapped at {:#x} ({})", m.start, m.path))?;
    Ok((link, meta))
}

/// Whether the file at `path` is the one `meta` describes (a file shown deleted may have
/// been linked at its path again).
fn still_at(path: &str, meta: &std::fs::Metadata) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
}

/// Refuses a file shown deleted that still has a name elsewhere (one of its hard links
/// removed, or another file renamed over its path while a hard link kept it), which the
/// process writes to (`how` it uses it): a restore gives a process a copy of a deleted file,
/// so its writes would no longer reach that file.
fn check_gone(pid: Pid, how: &str, path: &str, meta: &std::fs::Metadata) -> Result<()> {
    if meta.nlink() == 0 || still_at(path, meta) {
        return Ok(());
    }
    Err(Error::refused(
        format!("process {pid} has {how} {path}, which is no longer at that path but still has another name (a hard link): a restore would give it a copy of the file, and its writes would no longer reach the file"),
        "capture it before the file loses that path, or have the process open the file again",
    ))
}

/// The bytes buffered in a pipe, read without taking them (`tee` into a private pipe), and
/// its capacity. `pipe` is a read-only open of it.
fn pipe_content(pipe: &StdFile) -> Result<(Vec<u8>, u64)> {
    use nix::fcntl::{fcntl, tee, FcntlArg, OFlag, SpliceFFlags};
    let capacity = fcntl(pipe, FcntlArg::F_GETPIPE_SZ).context("reading the pipe's capacity")?;
    let (copy_r, copy_w) =
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).context("creating a pipe")?;
    fcntl(&copy_w, FcntlArg::F_SETPIPE_SZ(capacity)).context("sizing a pipe")?;
    let n = match tee(
        pipe,
        &copy_w,
        capacity as usize,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => return Err(Error::sys("copying pipe data (tee)", e)),
    };
    let mut data = vec![0u8; n];
    std::io::Read::read_exact(&mut StdFile::from(copy_r), &mut data)
        .context("reading pipe data")?;
    Ok((data, capacity as u64))
}

/// Refuses a pipe or FIFO that another process also holds: restoring this process alone
/// would cut it off from the other end.
fn check_pipe_private(pid: Pid, fd: i32, link: &str, tree: &HashSet<i32>) -> Result<()> {
    if let Some((other, comm)) = holder_outside(pid, link, tree) {
        return Err(Error::refused(
            format!(
                "process {pid} has fd {fd}, a pipe ({link}) that process {other} ({comm}), outside the captured tree, holds too"
            ),
            "capture the tree that holds both ends (its common ancestor), or redirect the pipe to a file",
        ));
    }
    Ok(())
}

/// What a capture accepts beyond the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct FdPolicy {
    /// Terminals from outside the tree (`--shell-job`).
    pub shell_job: bool,
    /// File locks (`--file-locks`).
    pub file_locks: bool,
    /// Established TCP connections within the tree (`--tcp-established`).
    pub tcp_established: bool,
}

/// The file locks process `proc` holds, from its fds' fdinfo (a lock shows on every fd of
/// the process that reaches the locked file: each is kept once). Locks it waits for are not
/// held: the wait restarts after a restore.
pub fn capture_locks(proc: &ProcDir, fds: &[Fd]) -> Result<Vec<FileLock>> {
    let pid = proc.pid();
    let mut out: Vec<(FileLock, String)> = Vec::new();
    for fd in fds {
        let info = proc.fdinfo(fd.fd)?;
        for line in info.lines.iter().filter_map(|l| l.strip_prefix("lock:")) {
            // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF" ("1: -> ..." for a waiter)
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            if words.first() == Some(&"->") {
                continue;
            }
            let bad = || {
                Error::new(
                    crate::ErrorKind::System,
                    format!(
                        "unexpected lock line in fdinfo {} of process {pid}: {line}",
                        fd.fd
                    ),
                )
            };
            let [kind, _, mode, _, file, start, end] = words[..] else {
                return Err(bad());
            };
            let kind = match kind {
                "FLOCK" => LockKind::Flock,
                "POSIX" => LockKind::Posix,
                "OFDLCK" => LockKind::Ofd,
                other => {
                    return Err(Error::refused(
                        format!(
                            "process {pid} holds a {other} on fd {}: not supported yet",
                            fd.fd
                        ),
                        "release it before capturing",
                    ))
                }
            };
            let lock = FileLock {
                fd: fd.fd,
                kind,
                write: mode == "WRITE",
                start: start.parse().map_err(|_| bad())?,
                end: match end {
                    "EOF" => None,
                    e => Some(e.parse().map_err(|_| bad())?),
                },
            };
            // flock and OFD locks belong to the description, POSIX ones to the process.
            let owner = match kind {
                LockKind::Posix => file.to_string(),
                _ => format!("{file}/{}", fd.open_file),
            };
            let same = |(l, o): &(FileLock, String)| {
                *o == owner && l.kind == lock.kind && l.start == lock.start && l.end == lock.end
            };
            if !out.iter().any(same) {
                out.push((lock, owner));
            }
        }
    }
    Ok(out.into_iter().map(|(l, _)| l).collect())
}

/// Takes the flock and OFD locks of the snapshot's processes again, on the descriptions
/// about to be handed to them (POSIX locks are taken by each process itself).
fn take_description_locks(manifest: &Manifest, descriptions: &[OwnedFd]) -> Result<()> {
    let mut done = HashSet::new();
    for p in &manifest.processes {
        for lock in p.locks.iter().filter(|l| l.kind != LockKind::Posix) {
            let Some(fd) = p.fds.iter().find(|f| f.fd == lock.fd) else {
                continue;
            };
            if !done.insert((fd.open_file, lock.start, lock.end)) {
                continue;
            }
            let file = &manifest.files[manifest.open_files[fd.open_file as usize].file as usize];
            let d = &descriptions[fd.open_file as usize];
            let taken = match lock.kind {
                LockKind::Flock => crate::sys::process::flock(d, lock.write),
                _ => crate::sys::process::set_lock(
                    d,
                    libc::F_OFD_SETLK,
                    lock.write,
                    lock.start,
                    lock.end,
                ),
            };
            taken.map_err(|e| {
                Error::refused(
                    format!("cannot lock {} again ({e}): another process holds a lock on it now", file.path),
                    "stop the process that holds it (the original?) first; a clone beside the original needs the file in its --overlay",
                )
            })?;
        }
    }
    Ok(())
}

/// The entry of a file a restore makes rather than opens (a socket, an eventfd...), found
/// at fd link `link` with metadata `meta`; `size`: bytes of its saved content.
fn made_file(link: &str, kind: FileKind, meta: &std::fs::Metadata, size: u64) -> File {
    File {
        path: link.to_string(),
        kind,
        dev: meta.dev(),
        inode: meta.ino(),
        size,
        mtime_ns: 0,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        deleted: false,
        content: None,
    }
}

/// A process outside the tree (and other than `pid`) with an fd whose link reads `link`:
/// its PID and name. A process dolly traces that is not in the tree is a fork dolly made of
/// a process of the tree at the freeze: it shares that process's fds, and is not one.
pub fn holder_outside(pid: Pid, link: &str, tree: &HashSet<i32>) -> Option<(i32, String)> {
    for p in std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()) {
        let Some(other) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if other == pid.as_raw() || tree.contains(&other) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.filter_map(|e| e.ok()) {
            if std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == link) {
                if traced_by_dolly(other) {
                    break;
                }
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some((other, comm.trim().to_string()));
            }
        }
    }
    None
}

/// Whether process `pid` is traced by a thread of this process.
fn traced_by_dolly(pid: i32) -> bool {
    crate::proc::ProcDir::new(Pid::from_raw(pid))
        .status()
        .is_ok_and(|s| {
            s.tracer_pid != 0
                && std::path::Path::new(&format!("/proc/self/task/{}", s.tracer_pid)).exists()
        })
}

/// Reads a kernel object behind an fd (`anon_inode:[KIND]`) from its fdinfo: its state, or a
/// refusal naming it when dolly cannot restore it.
fn kernel_object(
    proc: &ProcDir,
    fd: i32,
    object: &str,
    info: &crate::proc::FdInfo,
) -> Result<FileKind> {
    let pid = proc.pid();
    let bad = |what: &str| {
        Error::new(
            crate::ErrorKind::System,
            format!("unexpected fdinfo of fd {fd} of process {pid} ({object}): {what}"),
        )
    };
    let hex = |key: &str| -> Result<u64> {
        info.get(key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| bad(key))
    };
    let dec = |key: &str| -> Result<i64> {
        info.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(key))
    };
    // "(seconds, nanoseconds)"
    let duration = |key: &str| -> Result<u64> {
        let v = info.get(key).ok_or_else(|| bad(key))?;
        let (s, ns) = v
            .trim_matches(|c| c == '(' || c == ')')
            .split_once(',')
            .ok_or_else(|| bad(key))?;
        let s: u64 = s.trim().parse().map_err(|_| bad(key))?;
        let ns: u64 = ns.trim().parse().map_err(|_| bad(key))?;
        Ok(s * 1_000_000_000 + ns)
    };
    Ok(match object {
        "[eventfd]" => FileKind::EventFd {
            count: hex("eventfd-count")?,
            semaphore: info.get("eventfd-semaphore") == Some("1"),
        },
        "[timerfd]" => {
            let clock = dec("clockid")? as i32;
            let value_ns = duration("it_value")?;
            let deadline_ns = if value_ns == 0 {
                0
            } else {
                let now = nix::time::clock_gettime(nix::time::ClockId::from_raw(clock))
                    .with_context(|| format!("reading clock {clock} of a timerfd"))?;
                Duration::from(now).as_nanos() as u64 + value_ns
            };
            FileKind::TimerFd {
                clock,
                ticks: dec("ticks")? as u64,
                interval_ns: duration("it_interval")?,
                value_ns,
                deadline_ns,
            }
        }
        "inotify" => super::inotify::capture(pid, fd, info)?,
        "[signalfd]" => FileKind::SignalFd {
            mask: hex("sigmask")?,
        },
        "[eventpoll]" => {
            let mut items = Vec::new();
            for line in info.lines.iter().filter(|l| l.starts_with("tfd:")) {
                // tfd: N events: HEX data: HEX  pos:P ino:HEX sdev:HEX
                let words: Vec<&str> = line.split_whitespace().collect();
                let field = |name: &str| {
                    words
                        .iter()
                        .position(|w| *w == name)
                        .and_then(|i| words.get(i + 1))
                };
                let target: i32 = field("tfd:")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad(line))?;
                let events = field("events:")
                    .and_then(|v| u32::from_str_radix(v, 16).ok())
                    .ok_or_else(|| bad(line))?;
                let data = field("data:")
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .ok_or_else(|| bad(line))?;
                let ino = words
                    .iter()
                    .find_map(|w| w.strip_prefix("ino:"))
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .ok_or_else(|| bad(line))?;
                // The registration is by this fd number: it must still name the watched file.
                let same = std::fs::metadata(proc.path(&format!("fd/{target}")))
                    .is_ok_and(|m| m.ino() == ino);
                if !same {
                    return Err(Error::refused(
                        format!("process {pid} has fd {fd}, an epoll instance watching fd {target}, which no longer names the watched file: not supported yet"),
                        "capture a process whose epoll registrations are for fds it still has",
                    ));
                }
                items.push(EpollItem {
                    fd: target,
                    events,
                    data,
                });
            }
            FileKind::Epoll { items }
        }
        _ => {
            return Err(Error::refused(
                format!(
                    "process {pid} has fd {fd}, {} (anon_inode:{object}): not supported yet",
                    describe_fd(&format!("anon_inode:{object}"))
                ),
                "close it before capturing",
            ))
        }
    })
}

fn describe_fd(link: &str) -> &'static str {
    if link.starts_with("pipe:") {
        "a pipe"
    } else if link.starts_with("socket:") {
        "a socket"
    } else if link.starts_with("anon_inode:") {
        match link {
            l if l.contains("eventfd") => "an eventfd",
            l if l.contains("eventpoll") => "an epoll instance",
            l if l.contains("signalfd") => "a signalfd",
            l if l.contains("timerfd") => "a timerfd",
            l if l.contains("inotify") => "an inotify instance",
            l if l.contains("pidfd") => "a pidfd",
            l if l.contains("userfaultfd") => "a userfaultfd",
            l if l.contains("io_uring") => "an io_uring",
            _ => "a kernel object (anon inode)",
        }
    } else if link.starts_with("/memfd:") {
        "a memfd"
    } else {
        "a file of an unsupported kind"
    }
}

/// Reads the fd table of a stopped process into `table`; refuses what cannot be restored.
pub fn capture_fds(
    proc: &ProcDir,
    table: &mut FileTable,
    open_files: &mut OpenFiles,
    policy: FdPolicy,
    tree: &super::tree::TreeView,
) -> Result<Vec<Fd>> {
    let shell_job = policy.shell_job;
    let pid = proc.pid();
    let mut fds = Vec::new();
    for fd in proc.fds()? {
        let name = format!("fd/{fd}");
        let link = proc.read_link(&name)?;
        let meta = std::fs::metadata(proc.path(&name))
            .with_context(|| format!("reading fd {fd} of process {pid}"))?;
        let info = proc.fdinfo(fd)?;
        if info.locked && !policy.file_locks {
            return Err(Error::refused(
                format!("process {pid} holds a file lock on fd {fd} ({link})"),
                "pass --file-locks to capture it with its locks (a restore takes them again), or release the lock before capturing",
            ));
        }
        if info.flags & libc::O_ASYNC as u32 != 0 {
            return Err(Error::refused(
                format!("process {pid} has fd {fd} ({link}) in O_ASYNC mode: not supported yet"),
                "clear O_ASYNC before capturing",
            ));
        }
        let refuse = |kind: &str, remedy: &str| {
            Error::refused(
                format!("process {pid} has fd {fd}, {kind} ({link}): not supported yet"),
                remedy.to_string(),
            )
        };
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let flags = info.flags & !(libc::O_CLOEXEC as u32);
        let ftype = meta.mode() & libc::S_IFMT;
        let ptmx = ftype == libc::S_IFCHR && super::tty::is_ptmx(meta.rdev());
        if ptmx || link.starts_with("anon_inode:") {
            // One file per open description: they share an inode.
            let open_file = match open_files.find(pid, fd)? {
                Some(i) => i,
                None => {
                    let kind = match link.strip_prefix("anon_inode:") {
                        Some(object) => kernel_object(proc, fd, object, &info)?,
                        None => FileKind::PtyMaster(super::tty::capture_master(pid, fd, tree)?),
                    };
                    let file = table.add_object(made_file(&link, kind, &meta, 0));
                    open_files.add(pid, fd, file, flags, info.pos)
                }
            };
            fds.push(Fd {
                fd,
                open_file,
                cloexec,
            });
            continue;
        }
        let deleted = link.ends_with(" (deleted)");
        let inner_pty = match super::tty::slave_index(meta.rdev()) {
            Some(n) if ftype == libc::S_IFCHR && tree.pty_masters()?.contains(&n) => Some(n),
            _ => None,
        };
        let path = link.trim_end_matches(" (deleted)").to_string();
        let kind = match ftype {
            libc::S_IFREG if link.starts_with("/memfd:") => FileKind::Memfd {
                seals: memfd_seals(&proc.path(&name))?,
            },
            libc::S_IFREG if !link.starts_with('/') => {
                return Err(refuse(describe_fd(&link), "close it before capturing"))
            }
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFCHR if inner_pty.is_some() => FileKind::PtySlave {
                index: inner_pty.expect("matched"),
            },
            libc::S_IFCHR if is_terminal(meta.rdev()) => {
                if !shell_job {
                    return Err(Error::refused(
                        format!("process {pid} has a terminal open (fd {fd}: {link})"),
                        "pass --shell-job to capture it with its terminal (a restore then gives it the terminal dolly runs on), or start it without a terminal (setsid, redirected stdin/stdout/stderr)",
                    ));
                }
                FileKind::Terminal
            }
            libc::S_IFCHR => {
                let rdev = meta.rdev();
                if stateless_device(rdev).is_none() {
                    return Err(refuse("a character device", "close it before capturing"));
                }
                FileKind::CharDevice { rdev }
            }
            libc::S_IFIFO => {
                check_pipe_private(pid, fd, &link, &tree.pids)?;
                if link.starts_with("pipe:") {
                    FileKind::Pipe { capacity: 0 }
                } else {
                    FileKind::Fifo { capacity: 0 }
                }
            }
            libc::S_IFSOCK => {
                let file = match table.find(meta.dev(), meta.ino()) {
                    Some(file) => file,
                    None => {
                        let (kind, data) = super::sockets::capture(
                            pid,
                            fd,
                            meta.ino(),
                            tree,
                            policy.tcp_established,
                        )?;
                        table.add_with_data(
                            made_file(&link, kind, &meta, data.len() as u64),
                            &data,
                        )?
                    }
                };
                let open_file = open_files.find_or_add(pid, fd, file, flags, 0)?;
                fds.push(Fd {
                    fd,
                    open_file,
                    cloexec,
                });
                continue;
            }
            _ => return Err(refuse(describe_fd(&link), "close it before capturing")),
        };
        // (Shown deleted but linked again at its path: opened by it again.)
        let deleted = deleted && !still_at(&path, &meta);
        if !deleted && matches!(kind, FileKind::Regular | FileKind::Directory) {
            check_reachable(pid, &path, &meta)?;
        }
        let memfd = matches!(kind, FileKind::Memfd { .. });
        if deleted && kind == FileKind::Regular && flags & libc::O_ACCMODE as u32 != 0 {
            check_gone(pid, &format!("fd {fd} open for writing on"), &path, &meta)?;
        }
        let file = File {
            path,
            kind,
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            deleted: deleted && ftype == libc::S_IFREG && !memfd,
            content: None,
        };
        let fd_path = proc.path(&name);
        let file = table.add(file, || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fd_path)
                .with_context(|| format!("opening what fd {fd} of process {pid} points at"))
        })?;
        let open_file = open_files.find_or_add(pid, fd, file, flags, info.pos)?;
        fds.push(Fd {
            fd,
            open_file,
            cloexec,
        });
    }
    Ok(fds)
}

/// The open file descriptions found so far in a tree, each with an fd that holds it, so
/// that fds of any process of the tree that share one (dup'ed, inherited) are told apart
/// from fds that merely open the same file (`kcmp`).
#[derive(Debug, Default)]
pub struct OpenFiles {
    list: Vec<OpenFile>,
    owners: Vec<(Pid, i32)>,
}

impl OpenFiles {
    /// The index of the description fd `fd` of `pid` holds, adding it if it is new.
    fn find_or_add(&mut self, pid: Pid, fd: i32, file: u32, flags: u32, pos: u64) -> Result<u32> {
        for (i, of) in self.list.iter().enumerate() {
            let (owner, owner_fd) = self.owners[i];
            if of.file == file
                && same_file_description(owner, owner_fd, pid, fd)
                    .with_context(|| format!("comparing fds of processes {owner} and {pid}"))?
            {
                return Ok(i as u32);
            }
        }
        self.list.push(OpenFile { file, flags, pos });
        self.owners.push((pid, fd));
        Ok((self.list.len() - 1) as u32)
    }

    /// The description fd `fd` of `pid` holds, if it was found already (whatever its file).
    fn find(&self, pid: Pid, fd: i32) -> Result<Option<u32>> {
        for (i, &(owner, owner_fd)) in self.owners.iter().enumerate() {
            if same_file_description(owner, owner_fd, pid, fd)
                .with_context(|| format!("comparing fds of processes {owner} and {pid}"))?
            {
                return Ok(Some(i as u32));
            }
        }
        Ok(None)
    }

    fn add(&mut self, pid: Pid, fd: i32, file: u32, flags: u32, pos: u64) -> u32 {
        self.list.push(OpenFile { file, flags, pos });
        self.owners.push((pid, fd));
        (self.list.len() - 1) as u32
    }

    /// The descriptions, in index order.
    pub fn into_list(self) -> Vec<OpenFile> {
        self.list
    }
}

/// What a restore has opened in dolly, to hand to the processes being rebuilt.
#[derive(Debug, Default)]
pub struct PreparedFiles {
    /// One fd per open file description (indexed like [`Manifest::open_files`]).
    pub descriptions: Vec<OwnedFd>,
    /// Fds for memory mappings, per `(file index, writable)`.
    pub mappings: Vec<((u32, bool), OwnedFd)>,
    /// A slave of each pseudo-terminal made, by pts index: for its session leader to take
    /// as its controlling terminal.
    pub tty_slaves: HashMap<u32, OwnedFd>,
}

impl PreparedFiles {
    /// The fd table of one process: `(fd in dolly, number in the process, close-on-exec)`.
    pub fn fd_table(&self, proc: &Process) -> Vec<(i32, i32, bool)> {
        proc.fds
            .iter()
            .map(|fd| {
                (
                    self.descriptions[fd.open_file as usize].as_raw_fd(),
                    fd.fd,
                    fd.cloexec,
                )
            })
            .collect()
    }

    /// The fd to map file `index` with (writable for writable shared mappings).
    pub fn mapping(&self, index: u32, writable: bool) -> Option<&OwnedFd> {
        self.mappings
            .iter()
            .find(|(k, _)| *k == (index, writable))
            .map(|(_, fd)| fd)
    }
}

/// Flags that only mean something at creation or for the fd, not the open file.
const CREATION_FLAGS: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Opens a captured path again: no symlink may have appeared in it, never a controlling
/// terminal, close-on-exec in dolly.
pub fn open_path(path: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let flags =
        OFlag::from_bits_truncate((flags & !CREATION_FLAGS) | libc::O_CLOEXEC | libc::O_NOCTTY);
    // Captured paths are resolved paths (they come from /proc links): a symlink in one now
    // means the path was changed under the snapshot. /proc/self/fd is a magic link on purpose.
    let resolve = if path.starts_with("/proc/self/fd") {
        ResolveFlag::empty()
    } else {
        ResolveFlag::RESOLVE_NO_SYMLINKS
    };
    let how = OpenHow::new().flags(flags).resolve(resolve);
    openat2(nix::fcntl::AT_FDCWD, path, how).map_err(std::io::Error::from)
}

/// Refuses an fd whose file is not of the captured kind (a path replaced by something else).
fn check_kind(fd: &OwnedFd, file: &File, path: &Path) -> Result<()> {
    let st = nix::sys::stat::fstat(fd).with_context(|| format!("inspecting {}", path.display()))?;
    let ftype = st.st_mode & libc::S_IFMT;
    let ok = match file.kind {
        FileKind::Regular | FileKind::Memfd { .. } => ftype == libc::S_IFREG,
        FileKind::Directory => ftype == libc::S_IFDIR,
        FileKind::CharDevice { rdev } => ftype == libc::S_IFCHR && st.st_rdev == rdev,
        FileKind::Terminal => ftype == libc::S_IFCHR,
        FileKind::Pipe { .. } | FileKind::Fifo { .. } => ftype == libc::S_IFIFO,
        // Made by dolly, not found by path.
        FileKind::PtySlave { .. } => ftype == libc::S_IFCHR,
        FileKind::UnixSocket(_)
        | FileKind::InetSocket(_)
        | FileKind::PtyMaster(_)
        | FileKind::Inotify { .. }
        | FileKind::EventFd { .. }
        | FileKind::TimerFd { .. }
        | FileKind::SignalFd { .. }
        | FileKind::Epoll { .. } => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::refused(
            format!(
                "{} is no longer what the process had open ({:?})",
                path.display(),
                file.kind
            ),
            "put the original file back, or capture again",
        ))
    }
}

fn own_terminal() -> Result<PathBuf> {
    use std::io::IsTerminal;
    let ttys = [
        (0, std::io::stdin().is_terminal()),
        (1, std::io::stdout().is_terminal()),
        (2, std::io::stderr().is_terminal()),
    ];
    for (fd, tty) in ttys {
        if tty {
            if let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                return Ok(path);
            }
        }
    }
    Err(Error::refused(
        "the snapshot holds a terminal, and dolly runs without one",
        "run the restore from a terminal (with --shell-job)",
    ))
}

/// Recreates a deleted file from its saved content, at its old path when that is free (so
/// its fds read the same name), else beside it; returns the path, to unlink after opening.
fn recreate_deleted(file: &File, pool_dir: &Path, index: u32) -> Result<PathBuf> {
    let content = file.content.as_deref().ok_or_else(|| {
        Error::corrupt(
            format!("deleted file {} has no saved content", file.path),
            "the snapshot is damaged; capture again",
        )
    })?;
    let original = PathBuf::from(&file.path);
    let dir = original
        .parent()
        .filter(|d| d.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let candidates = [
        original.clone(),
        dir.join(format!(".dolly-deleted-{}-{index}", std::process::id())),
    ];
    let src = pool_dir.join(content);
    for path in candidates {
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        let Ok(mut dst) = created else {
            continue;
        };
        let mut input = StdFile::open(&src).map_err(|e| {
            Error::corrupt(
                format!(
                    "saved content {} of deleted file {} is missing ({e})",
                    src.display(),
                    file.path
                ),
                "the memory tier lost this snapshot's data; capture it again",
            )
        })?;
        let copied = std::io::copy(&mut input, &mut dst)
            .and_then(|_| std::os::unix::fs::fchown(&dst, Some(file.uid), Some(file.gid)))
            // Never setuid/setgid: dolly (root) writes this file, not its owner.
            .and_then(|_| dst.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o777)));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&path);
            return Err(Error::io(
                format!("recreating deleted file {}", file.path),
                e,
            ));
        }
        return Ok(path);
    }
    Err(Error::refused(
        format!(
            "cannot recreate deleted file {} (directory not writable?)",
            file.path
        ),
        "make its directory writable, or free the path",
    ))
}

/// Opens, in dolly, everything the restored processes will have open or mapped: every open
/// file description (with its flags and offset; a restore gives every fd that shared one the
/// same one), and the files their areas map. Refuses files that changed since the capture
/// where that would corrupt memory.
pub fn prepare(manifest: &Manifest, pool_dir: &Path) -> Result<PreparedFiles> {
    let mut out = PreparedFiles::default();
    let mut recreated: Vec<PathBuf> = Vec::new();
    // Memfds made anew, opened through /proc/self/fd like pipes.
    let mut memfds: Vec<OwnedFd> = Vec::new();
    let result = (|| -> Result<()> {
        let mut paths: HashMap<u32, PathBuf> = HashMap::new();
        let mut path_of = |index: u32| -> Result<PathBuf> {
            if let Some(p) = paths.get(&index) {
                return Ok(p.clone());
            }
            let file = &manifest.files[index as usize];
            let path = match file.kind {
                FileKind::Terminal => own_terminal()?,
                FileKind::Memfd { seals } => {
                    let fd = make_memfd(file, seals, pool_dir)?;
                    let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                    memfds.push(fd);
                    p
                }
                _ if file.deleted => {
                    let p = recreate_deleted(file, pool_dir, index)?;
                    recreated.push(p.clone());
                    p
                }
                FileKind::CharDevice { rdev } => {
                    PathBuf::from(stateless_device(rdev).unwrap_or(&file.path))
                }
                _ => PathBuf::from(&file.path),
            };
            paths.insert(index, path.clone());
            Ok(path)
        };
        // Memory mappings: private file pages come from the file, so it must not have changed.
        for area in manifest.processes.iter().flat_map(|p| &p.areas) {
            let AreaKind::File { file: index, .. } = area.kind else {
                continue;
            };
            let writable = super::memory::needs_writable_fd(area);
            if out.mappings.iter().any(|(k, _)| *k == (index, writable)) {
                continue;
            }
            let file = &manifest.files[index as usize];
            let path = path_of(index)?;
            let flags = if writable {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = open_path(&path, flags).map_err(|e| {
                Error::refused(
                    format!("cannot open {} that the process maps ({e})", file.path),
                    "put the file back where it was, or capture again",
                )
            })?;
            check_kind(&fd, file, &path)?;
            if !area.shared && !file.deleted {
                let st = nix::sys::stat::fstat(&fd)
                    .with_context(|| format!("inspecting {}", file.path))?;
                let mtime = st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128;
                if st.st_size as u64 != file.size || mtime != file.mtime_ns {
                    return Err(Error::refused(
                        format!("file {} changed since the snapshot (size or modification time differ)", file.path),
                        "restore the original file (e.g. reinstall the same package version), or capture again",
                    ));
                }
            }
            out.mappings.push(((index, writable), fd));
        }
        // Open file descriptions, each opened once and shared by its fds. Pipes and FIFOs
        // are made anew and refilled first; their descriptions are opened through
        // /proc/self/fd, which gives a new description of the same pipe.
        let mut pipes: HashMap<u32, Vec<OwnedFd>> = HashMap::new();
        let same_boot = manifest.host.boot_id == crate::capture::boot_id()?;
        let mut sockets = super::sockets::make(&manifest.files, pool_dir)?;
        let ptys = super::tty::make(&manifest.files)?;
        let mut masters = ptys.masters;
        out.tty_slaves = ptys.slaves;
        for of in &manifest.open_files {
            let file = &manifest.files[of.file as usize];
            let made = match &file.kind {
                FileKind::InetSocket(s) => {
                    let data = match &file.content {
                        Some(name) => std::fs::read(pool_dir.join(name)).map_err(|e| {
                            Error::corrupt(
                                format!(
                                    "the saved queues {name} of a TCP connection are missing ({e})"
                                ),
                                "the snapshot is damaged: capture again",
                            )
                        })?,
                        None => Vec::new(),
                    };
                    Some(super::inet::make(s, &data)?)
                }
                FileKind::PtyMaster(_) => masters.remove(&of.file),
                _ => sockets.remove(&of.file),
            };
            if let Some(fd) = made {
                let flags = nix::fcntl::OFlag::from_bits_truncate(
                    (of.flags & libc::O_NONBLOCK as u32) as i32,
                );
                nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
                    .context("setting the flags of a socket or pty")?;
                out.descriptions.push(fd);
                continue;
            }
            if let Some(fd) = make_object(&file.kind, of.flags, same_boot)? {
                out.descriptions.push(fd);
                continue;
            }
            let path = match file.kind {
                FileKind::Pipe { .. } | FileKind::Fifo { .. } => {
                    if let std::collections::hash_map::Entry::Vacant(e) = pipes.entry(of.file) {
                        e.insert(make_pipe(file, pool_dir)?);
                    }
                    PathBuf::from(format!("/proc/self/fd/{}", pipes[&of.file][0].as_raw_fd()))
                }
                _ => path_of(of.file)?,
            };
            let fd = open_path(&path, of.flags as i32).map_err(|e| {
                Error::refused(
                    format!("cannot open {} again ({e})", file.path),
                    "put the file back where it was, or capture again",
                )
            })?;
            check_kind(&fd, file, &path)?;
            if matches!(
                file.kind,
                FileKind::Regular | FileKind::Directory | FileKind::Memfd { .. }
            ) && of.pos > 0
            {
                nix::unistd::lseek(&fd, of.pos as i64, nix::unistd::Whence::SeekSet)
                    .with_context(|| format!("seeking {} to {}", path.display(), of.pos))?;
            }
            out.descriptions.push(fd);
        }
        take_description_locks(manifest, &out.descriptions)
    })();
    // Deleted files go away again once open, as they were.
    for path in recreated {
        let _ = std::fs::remove_file(path);
    }
    result.map(|_| out)
}

/// Makes a memfd anew with its name, data, owner, mode and seals.
fn make_memfd(file: &File, seals: u32, pool_dir: &Path) -> Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let name = file.path.strip_prefix("/memfd:").unwrap_or(&file.path);
    let sealable = seals != libc::F_SEAL_SEAL as u32;
    let mut flags = MFdFlags::MFD_CLOEXEC;
    if sealable {
        flags |= MFdFlags::MFD_ALLOW_SEALING;
    }
    let fd = memfd_create(name, flags).with_context(|| format!("making memfd {}", file.path))?;
    let content = file.content.as_deref().ok_or_else(|| {
        Error::corrupt(
            format!("memfd {} has no saved content", file.path),
            "the snapshot is damaged: capture again",
        )
    })?;
    let src = StdFile::open(pool_dir.join(content)).map_err(|e| {
        Error::corrupt(
            format!(
                "saved content {content} of memfd {} is missing ({e})",
                file.path
            ),
            "the snapshot is damaged: capture again",
        )
    })?;
    let dst = StdFile::from(fd);
    copy_data(&src, &dst, file.size).with_context(|| format!("filling memfd {}", file.path))?;
    nix::unistd::fchown(&dst, Some(file.uid.into()), Some(file.gid.into()))
        .with_context(|| format!("giving memfd {} its owner", file.path))?;
    dst.set_permissions(std::fs::Permissions::from_mode(file.mode))
        .with_context(|| format!("giving memfd {} its mode", file.path))?;
    if sealable && seals != 0 {
        fcntl(
            &dst,
            FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals as i32)),
        )
        .with_context(|| format!("sealing memfd {}", file.path))?;
    }
    Ok(dst.into())
}

/// Takes, inside a process being restored, the POSIX locks it held (they belong to the
/// process, so only it can take them). `scratch`: a writable page of the process.
pub fn take_process_locks(
    remote: &mut crate::tracee::Remote,
    scratch: u64,
    proc: &Process,
) -> Result<()> {
    for lock in proc.locks.iter().filter(|l| l.kind == LockKind::Posix) {
        let l = crate::sys::process::flock_struct(lock.write, lock.start, lock.end);
        let mut raw = [0u8; std::mem::size_of::<libc::flock>()];
        raw[0..2].copy_from_slice(&l.l_type.to_ne_bytes());
        raw[2..4].copy_from_slice(&l.l_whence.to_ne_bytes());
        raw[8..16].copy_from_slice(&l.l_start.to_ne_bytes());
        raw[16..24].copy_from_slice(&l.l_len.to_ne_bytes());
        remote.write_mem(scratch, &raw)?;
        remote
            .call(
                &format!("locking fd {} again", lock.fd),
                libc::SYS_fcntl,
                &[lock.fd as u64, libc::F_SETLK as u64, scratch],
            )
            .map_err(|e| {
                Error::refused(
                    format!("process {} cannot lock fd {} again: {e}", proc.pid, lock.fd),
                    "stop the process that holds a lock on that file now (the original?) first",
                )
            })?;
    }
    Ok(())
}

/// Registers, inside a process being restored, what its epoll instances watched: `epolls`
/// pairs an epoll fd of the process with registrations by the process's own fd numbers.
/// `scratch`: a writable page of the process.
pub fn register_epolls(
    remote: &mut crate::tracee::Remote,
    scratch: u64,
    epolls: &[(i32, &[EpollItem])],
) -> Result<()> {
    for &(epfd, items) in epolls {
        for item in items {
            // struct epoll_event is packed on x86_64: u32 events, then u64 data.
            let mut event = [0u8; 12];
            event[..4].copy_from_slice(&item.events.to_ne_bytes());
            event[4..].copy_from_slice(&item.data.to_ne_bytes());
            remote.write_mem(scratch, &event)?;
            remote.call(
                &format!("registering fd {} with epoll fd {epfd}", item.fd),
                libc::SYS_epoll_ctl,
                &[
                    epfd as u64,
                    libc::EPOLL_CTL_ADD as u64,
                    item.fd as u64,
                    scratch,
                ],
            )?;
        }
    }
    Ok(())
}

/// Makes a kernel object (eventfd, timerfd, signalfd, epoll) in dolly in its captured state,
/// with the description's `O_NONBLOCK`; `None` for files that are opened, not made. (Epoll
/// registrations are made later, inside the restored process, with its fd numbers.)
/// `same_boot`: the snapshot was taken since this boot, so its timers' deadlines on the
/// monotonic clocks hold.
fn make_object(kind: &FileKind, flags: u32, same_boot: bool) -> Result<Option<OwnedFd>> {
    use std::os::fd::FromRawFd;
    let nonblock = flags & libc::O_NONBLOCK as u32 != 0;
    let raw: i32 = match *kind {
        FileKind::EventFd { semaphore, .. } => {
            let mut f = libc::EFD_CLOEXEC;
            if semaphore {
                f |= libc::EFD_SEMAPHORE;
            }
            // SAFETY: eventfd takes integers.
            unsafe { libc::eventfd(0, f) }
        }
        // SAFETY: timerfd_create takes integers.
        FileKind::TimerFd { clock, .. } => unsafe {
            libc::timerfd_create(clock, libc::TFD_CLOEXEC)
        },
        FileKind::SignalFd { mask } => {
            // SAFETY: the kernel reads 8 bytes of mask.
            unsafe {
                libc::syscall(
                    libc::SYS_signalfd4,
                    -1,
                    &mask as *const u64,
                    8usize,
                    libc::SFD_CLOEXEC,
                ) as i32
            }
        }
        // SAFETY: epoll_create1 takes an integer.
        FileKind::Epoll { .. } => unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
        FileKind::Inotify { ref watches } => {
            let fd = super::inotify::make(watches)?;
            if !nonblock {
                nix::fcntl::fcntl(
                    &fd,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
                )
                .context("setting an inotify instance's flags")?;
            }
            return Ok(Some(fd));
        }
        _ => return Ok(None),
    };
    if raw < 0 {
        return Err(Error::io(
            format!("making a {kind:?}"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just gave us this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match *kind {
        FileKind::EventFd { count, .. } if count > 0 => {
            nix::unistd::write(&fd, &count.to_ne_bytes()).context("setting an eventfd's count")?;
        }
        FileKind::TimerFd {
            clock,
            ticks,
            interval_ns,
            value_ns,
            deadline_ns,
        } => {
            let ts = |ns: u64| libc::timespec {
                tv_sec: (ns / 1_000_000_000) as i64,
                tv_nsec: (ns % 1_000_000_000) as i64,
            };
            let wall = clock == libc::CLOCK_REALTIME || clock == libc::CLOCK_REALTIME_ALARM;
            let (how, value) = if deadline_ns != 0 && (same_boot || wall) {
                // The deadline it had: if it passed meanwhile, the kernel counts the
                // expirations missed, as it would have for a stopped process.
                (libc::TFD_TIMER_ABSTIME, ts(deadline_ns))
            } else {
                // A periodic timer that has fired reads 0 until read (the kernel re-arms it
                // then): arm it for its next period, as the kernel would have.
                (0, ts(if value_ns == 0 { interval_ns } else { value_ns }))
            };
            let spec = libc::itimerspec {
                it_interval: ts(interval_ns),
                it_value: value,
            };
            // SAFETY: the kernel reads one itimerspec.
            if unsafe { libc::timerfd_settime(fd.as_raw_fd(), how, &spec, std::ptr::null_mut()) }
                < 0
            {
                return Err(Error::io(
                    "arming a timerfd",
                    std::io::Error::last_os_error(),
                ));
            }
            if ticks > 0 {
                const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
                // SAFETY: the ioctl reads one u64.
                if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } < 0 {
                    return Err(Error::io(
                        "setting a timerfd's pending expirations",
                        std::io::Error::last_os_error(),
                    ));
                }
            }
        }
        _ => {}
    }
    if nonblock {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .context("making a kernel object non-blocking")?;
    }
    Ok(Some(fd))
}

/// Makes a pipe (or opens a FIFO) in dolly with its capacity and buffered bytes; returns
/// the fds that keep it open while its descriptions are opened (the first one is the
/// handle to open them through).
fn make_pipe(file: &File, pool_dir: &Path) -> Result<Vec<OwnedFd>> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let (handles, writer): (Vec<OwnedFd>, usize) = match file.kind {
        FileKind::Fifo { .. } => {
            let fd =
                open_path(Path::new(&file.path), libc::O_RDWR | libc::O_NONBLOCK).map_err(|e| {
                    Error::refused(
                        format!("cannot open FIFO {} again ({e})", file.path),
                        "recreate the FIFO at its path (mkfifo), or capture again",
                    )
                })?;
            (vec![fd], 0)
        }
        _ => {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
                .context("creating a pipe")?;
            (vec![r, w], 1)
        }
    };
    if let FileKind::Pipe { capacity } | FileKind::Fifo { capacity } = file.kind {
        if capacity > 0 {
            fcntl(&handles[writer], FcntlArg::F_SETPIPE_SZ(capacity as i32)).with_context(
                || format!("giving {} its capacity of {capacity} bytes", file.path),
            )?;
        }
    }
    if let Some(content) = &file.content {
        let data = std::fs::read(pool_dir.join(content)).map_err(|e| {
            Error::corrupt(
                format!("the saved data of {} is missing ({e})", file.path),
                "the memory tier lost this snapshot's data; capture it again",
            )
        })?;
        if !data.is_empty() {
            let n = nix::unistd::write(&handles[writer], &data)
                .with_context(|| format!("refilling {}", file.path))?;
            if n != data.len() {
                return Err(Error::new(
                    crate::ErrorKind::System,
                    format!(
                        "refilling {}: only {n} of {} bytes fit",
                        file.path,
                        data.len()
                    ),
                ));
            }
        }
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fd_kinds() {
        assert_eq!(describe_fd("pipe:[123]"), "a pipe");
        assert_eq!(describe_fd("anon_inode:[eventfd]"), "an eventfd");
        assert_eq!(describe_fd("anon_inode:[timerfd]"), "a timerfd");
        assert_eq!(describe_fd("socket:[9]"), "a socket");
    }

    #[test]
    fn terminals_by_major() {
        assert!(is_terminal(nix::sys::stat::makedev(136, 3)));
        assert!(is_terminal(nix::sys::stat::makedev(5, 0)));
        assert!(!is_terminal(nix::sys::stat::makedev(1, 3)));
    }
}
