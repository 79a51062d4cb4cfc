//! What a capture needs to know about the whole frozen tree while it looks at one fd: which
//! processes are in it, and the sockets and pseudo-terminals they hold between them (read
//! once, when first asked).

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;

use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::sys::diag::{self, UnixDiag};

/// The captured tree, seen from one of its fds.
#[derive(Debug)]
pub struct TreeView {
    /// PIDs of every process of the tree.
    pub pids: HashSet<i32>,
    unix: OnceCell<HashMap<u64, UnixDiag>>,
    ptys: OnceCell<HashSet<u32>>,
    sockets: OnceCell<HashSet<u64>>,
}

impl TreeView {
    /// The tree of processes `pids`.
    pub fn new(pids: HashSet<i32>) -> TreeView {
        TreeView {
            pids,
            unix: OnceCell::new(),
            ptys: OnceCell::new(),
            sockets: OnceCell::new(),
        }
    }

    /// Calls `f(pid, fd, link)` for every fd of the tree.
    fn each_fd(&self, mut f: impl FnMut(i32, i32, &str) -> Result<()>) -> Result<()> {
        for &pid in &self.pids {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for entry in fds.filter_map(|e| e.ok()) {
                let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Ok(link) = std::fs::read_link(entry.path()) {
                    f(pid, fd, &link.to_string_lossy())?;
                }
            }
        }
        Ok(())
    }

    /// Whether a process of the tree holds socket `inode`.
    pub fn holds_socket(&self, inode: u64) -> Result<bool> {
        if self.sockets.get().is_none() {
            let mut out = HashSet::new();
            self.each_fd(|_, _, link| {
                if let Some(ino) = socket_inode(link) {
                    out.insert(ino);
                }
                Ok(())
            })?;
            let _ = self.sockets.set(out);
        }
        Ok(self.sockets.get().expect("just set").contains(&inode))
    }

    /// sock_diag's view of every unix socket the tree holds, by inode.
    pub fn unix_sockets(&self) -> Result<&HashMap<u64, UnixDiag>> {
        if self.unix.get().is_none() {
            let mut out = HashMap::new();
            self.each_fd(|_, _, link| {
                let Some(ino) = socket_inode(link) else {
                    return Ok(());
                };
                if let std::collections::hash_map::Entry::Vacant(e) = out.entry(ino) {
                    if let Some(d) = diag::unix_socket(ino as u32)? {
                        e.insert(d);
                    }
                }
                Ok(())
            })?;
            let _ = self.unix.set(out);
        }
        Ok(self.unix.get().expect("just set"))
    }

    /// The indexes of the pseudo-terminals whose master the tree holds.
    pub fn pty_masters(&self) -> Result<&HashSet<u32>> {
        if self.ptys.get().is_none() {
            let mut out = HashSet::new();
            self.each_fd(|pid, fd, link| {
                if link != "/dev/ptmx" && link != "/dev/pts/ptmx" {
                    return Ok(());
                }
                let master = crate::sys::socket::borrow_fd(Pid::from_raw(pid), fd)
                    .map_err(|e| Error::sys(format!("borrowing fd {fd} of process {pid}"), e))?;
                let index = crate::sys::tty::pty_index(master.as_raw_fd()).map_err(|e| {
                    Error::sys(
                        format!("reading the pty number of fd {fd} of process {pid}"),
                        e,
                    )
                })?;
                out.insert(index);
                Ok(())
            })?;
            let _ = self.ptys.set(out);
        }
        Ok(self.ptys.get().expect("just set"))
    }
}

/// The inode of a `socket:[N]` fd link.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}
