//! Pseudo-terminals whose both ends are in the tree (a terminal multiplexer and the shells
//! in its panes). The master is captured with the terminal's state (settings, window size,
//! controlling session, foreground group); a restore opens `/dev/ptmx` until it gets the
//! same `/dev/pts/N`, sets that state again, and the session leader takes it back as its
//! controlling terminal.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::unistd::Pid;

use super::tree::TreeView;
use crate::error::{Error, Result};
use crate::image::{File, FileKind, Pty, Termios};
use crate::sys::socket::borrow_fd;
use crate::sys::tty;

/// The pts index of a slave device number (majors 136-143), if it is one.
pub fn slave_index(rdev: u64) -> Option<u32> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    (136..=143)
        .contains(&major)
        .then(|| ((major - 136) * 256 + minor) as u32)
}

/// Whether a device number is the pty multiplexer (`/dev/ptmx`).
pub fn is_ptmx(rdev: u64) -> bool {
    nix::sys::stat::major(rdev) == 5 && nix::sys::stat::minor(rdev) == 2
}

/// Captures the pty whose master is fd `fd` of process `pid`.
pub fn capture_master(pid: Pid, fd: i32, tree: &TreeView) -> Result<Pty> {
    let sys = |what: &str, e| {
        Error::sys(
            format!("{what} (fd {fd} of process {pid}, a pty master)"),
            e,
        )
    };
    let master = borrow_fd(pid, fd).map_err(|e| sys("borrowing it", e))?;
    let m = master.as_raw_fd();
    let index = tty::pty_index(m).map_err(|e| sys("reading its number", e))?;
    let refuse = |what: String, remedy: &str| {
        Error::refused(
            format!("process {pid} has fd {fd}, the master of /dev/pts/{index}, {what}: not supported yet"),
            remedy,
        )
    };
    if tty::locked(m).map_err(|e| sys("reading its lock", e))? {
        return Err(refuse(
            "whose slave is still locked".into(),
            "capture once the program has unlocked it (unlockpt)",
        ));
    }
    let slave = tty::open_peer(m).map_err(|e| sys("opening its slave", e))?;
    let s = slave.as_raw_fd();
    let output = tty::pending(m).map_err(|e| sys("reading its output queue", e))?;
    let input = tty::pending(s).map_err(|e| sys("reading its input queue", e))?;
    if output + input > 0 {
        return Err(refuse(
            format!(
                "with data in flight ({output} bytes of output, {input} of input not read yet)"
            ),
            "capture again once the terminal is idle",
        ));
    }
    let session = tty::session(m).map_err(|e| sys("reading its session", e))?;
    if session != 0 && !tree.pids.contains(&session) {
        return Err(refuse(
            format!(
                "the controlling terminal of session {session}, whose leader is outside the tree"
            ),
            "capture the session leader's tree",
        ));
    }
    let t = tty::termios(s).map_err(|e| sys("reading its settings", e))?;
    let w = tty::window_size(m).map_err(|e| sys("reading its window size", e))?;
    Ok(Pty {
        index,
        termios: Termios {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        },
        rows: w.ws_row,
        cols: w.ws_col,
        xpixel: w.ws_xpixel,
        ypixel: w.ws_ypixel,
        packet: tty::packet_mode(m).map_err(|e| sys("reading its packet mode", e))?,
        session,
        foreground: tty::foreground(m).map_err(|e| sys("reading its foreground group", e))?,
    })
}

/// The ptys a restore made: each master by file index, and a slave of each by pts index
/// (the session leader takes it as its controlling terminal).
#[derive(Debug, Default)]
pub struct MadePtys {
    /// Master fds, by index into the manifest's files.
    pub masters: HashMap<u32, OwnedFd>,
    /// A slave fd of each pty, by pts index.
    pub slaves: HashMap<u32, OwnedFd>,
}

/// Makes every pty of a snapshot at its `/dev/pts/N`, with its settings and window size.
pub fn make(files: &[File]) -> Result<MadePtys> {
    let mut ptys: Vec<(u32, &Pty)> = files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match &f.kind {
            FileKind::PtyMaster(p) => Some((i as u32, p)),
            _ => None,
        })
        .collect();
    ptys.sort_by_key(|(_, p)| p.index);
    let mut made = MadePtys::default();
    for (file, pty) in ptys {
        let master = open_at_index(pty.index)?;
        let m = master.as_raw_fd();
        let sys = |what: &str, e| Error::sys(format!("{what} of /dev/pts/{}", pty.index), e);
        tty::set_locked(m, false).map_err(|e| sys("unlocking", e))?;
        let slave = tty::open_peer(m).map_err(|e| sys("opening the slave", e))?;
        let mut t = tty::termios(slave.as_raw_fd()).map_err(|e| sys("reading the settings", e))?;
        t.c_iflag = pty.termios.iflag;
        t.c_oflag = pty.termios.oflag;
        t.c_cflag = pty.termios.cflag;
        t.c_lflag = pty.termios.lflag;
        t.c_line = pty.termios.line;
        for (dst, src) in t.c_cc.iter_mut().zip(&pty.termios.cc) {
            *dst = *src;
        }
        t.c_ispeed = pty.termios.ispeed;
        t.c_ospeed = pty.termios.ospeed;
        tty::set_termios(slave.as_raw_fd(), &t).map_err(|e| sys("setting the settings", e))?;
        let w = libc::winsize {
            ws_row: pty.rows,
            ws_col: pty.cols,
            ws_xpixel: pty.xpixel,
            ws_ypixel: pty.ypixel,
        };
        tty::set_window_size(m, &w).map_err(|e| sys("setting the window size", e))?;
        tty::set_packet_mode(m, pty.packet).map_err(|e| sys("setting packet mode", e))?;
        made.masters.insert(file, master);
        made.slaves.insert(pty.index, slave);
    }
    Ok(made)
}

/// Opens `/dev/ptmx` until the kernel hands out `/dev/pts/index` (it gives the lowest free
/// number: the lower ones are held meanwhile, then closed).
fn open_at_index(index: u32) -> Result<OwnedFd> {
    let mut held = Vec::new();
    loop {
        let fd = nix::fcntl::open(
            "/dev/ptmx",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::sys("opening /dev/ptmx", e))?;
        let got = tty::pty_index(fd.as_raw_fd())
            .map_err(|e| Error::sys("reading a new pty's number", e))?;
        if got == index {
            return Ok(fd);
        }
        if got > index || held.len() > index as usize {
            return Err(Error::refused(
                format!("/dev/pts/{index} is in use"),
                "stop the process that holds it (the original?) first; a clone gets pseudo-terminals of its own",
            ));
        }
        held.push(fd);
    }
}
