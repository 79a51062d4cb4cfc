//! inotify instances: their watches are read from fdinfo (each watched inode by its file
//! handle, turned back into a path), and made again at restore with the same watch
//! descriptors.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::unistd::Pid;

use crate::error::{Context, Error, Result};
use crate::image::{FileKind, InotifyWatch};
use crate::proc::FdInfo;
use crate::sys::inotify as sys;
use crate::sys::socket::borrow_fd;

/// A mount of the filesystem with kernel device number `sdev` (`major << 20 | minor`),
/// opened: the whole filesystem's if it is mounted, else any.
fn mount_of(sdev: u64) -> Result<OwnedFd> {
    let want = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut candidates: Vec<(bool, String)> = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&want.as_str())).then(|| (f[3] != "/", unescape(f[4])))
        })
        .collect();
    candidates.sort();
    let (_, path) = candidates.into_iter().next().ok_or_else(|| {
        Error::refused(
            format!("an inotify watch is on filesystem {want}, which dolly cannot see"),
            "capture from the process's mount namespace",
        )
    })?;
    nix::fcntl::open(
        path.as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::sys(format!("opening mount {path}"), e))
}

/// Undoes mountinfo's octal escapes (`\040` for a space...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Captures inotify instance `fd` of process `pid`: its watches, each with the path of the
/// inode it watches. Refuses an instance with events not read yet, or a watch on a deleted
/// file.
pub fn capture(pid: Pid, fd: i32, info: &FdInfo) -> Result<FileKind> {
    let refuse = |what: String, remedy: &str| {
        Error::refused(
            format!("process {pid} has fd {fd}, an inotify instance {what}: not supported yet"),
            remedy,
        )
    };
    let instance = borrow_fd(pid, fd)
        .map_err(|e| Error::sys(format!("borrowing fd {fd} of process {pid}"), e))?;
    let queued = crate::sys::tty::pending(instance.as_raw_fd())
        .map_err(|e| Error::sys("reading an inotify queue's length", e))?;
    if queued > 0 {
        return Err(refuse(
            format!("with {queued} bytes of events not read yet"),
            "capture once the program has read them",
        ));
    }
    let bad = |line: &str| {
        Error::new(
            crate::ErrorKind::System,
            format!("unexpected fdinfo line of fd {fd} of process {pid}: {line}"),
        )
    };
    let mut watches = Vec::new();
    for line in info.lines.iter().filter(|l| l.starts_with("inotify ")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix(':'))
                .ok_or_else(|| bad(line))
        };
        let hex = |name: &str| u64::from_str_radix(field(name)?, 16).map_err(|_| bad(line));
        let wd: i32 = field("wd")?.parse().map_err(|_| bad(line))?;
        let mask = hex("mask")? as u32;
        let handle_type: i32 = field("fhandle-type")?.parse().map_err(|_| bad(line))?;
        let handle = field("f_handle")?;
        let handle: Vec<u8> = (0..handle.len() / 2)
            .map(|i| u8::from_str_radix(&handle[2 * i..2 * i + 2], 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(line))?;
        let mount = mount_of(hex("sdev")?)?;
        let inode = sys::open_by_handle(&mount, handle_type, &handle)
            .map_err(|e| Error::sys(format!("finding the inode inotify watch {wd} is on"), e))?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", inode.as_raw_fd()))
            .context("reading a watched inode's path")?
            .to_string_lossy()
            .into_owned();
        if path.ends_with(" (deleted)") || !path.starts_with('/') {
            return Err(refuse(
                format!("watching {path}, which has no path any more"),
                "capture once the watch is removed",
            ));
        }
        watches.push(InotifyWatch { wd, path, mask });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(FileKind::Inotify { watches })
}

/// Makes an inotify instance with its watches at their watch descriptors (the kernel hands
/// them out in increasing order: gaps are filled with watches on scratch files, removed
/// again, and the events that removal queues are drained).
pub fn make(watches: &[InotifyWatch]) -> Result<OwnedFd> {
    let fd = sys::init(libc::IN_CLOEXEC | libc::IN_NONBLOCK)
        .map_err(|e| Error::sys("making an inotify instance", e))?;
    let i = fd.as_raw_fd();
    let scratch = std::env::temp_dir().join(format!(".dolly-inotify-{}", std::process::id()));
    let mut fillers = Vec::new();
    let result = (|| -> Result<()> {
        let mut next = 1;
        for w in watches {
            while next < w.wd {
                std::fs::create_dir_all(&scratch)
                    .with_context(|| format!("creating {}", scratch.display()))?;
                let filler = scratch.join(next.to_string());
                std::fs::write(&filler, b"")
                    .with_context(|| format!("creating {}", filler.display()))?;
                let wd = sys::add_watch(i, &filler.to_string_lossy(), libc::IN_DELETE_SELF)
                    .map_err(|e| Error::sys("adding a filler inotify watch", e))?;
                fillers.push(wd);
                next = wd + 1;
            }
            let wd = sys::add_watch(i, &w.path, w.mask).map_err(|e| {
                Error::refused(
                    format!("cannot watch {} again ({e})", w.path),
                    "put the watched file back, or capture again",
                )
            })?;
            if wd != w.wd {
                return Err(Error::new(
                    crate::ErrorKind::System,
                    format!(
                        "inotify gave watch descriptor {wd} for {}, not {}",
                        w.path, w.wd
                    ),
                ));
            }
            next = wd + 1;
        }
        for wd in &fillers {
            sys::rm_watch(i, *wd).map_err(|e| Error::sys("removing a filler inotify watch", e))?;
        }
        // Removing the fillers queued IN_IGNORED events: not the process's.
        let mut buf = [0u8; 4096];
        while nix::unistd::read(&fd, &mut buf).is_ok_and(|n| n > 0) {}
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|_| fd)
}
