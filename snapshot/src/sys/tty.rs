//! Pseudo-terminal ioctls.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::check;

fn ioctl_get<T: Default>(fd: RawFd, request: libc::c_ulong) -> Result<T, Errno> {
    let mut value = T::default();
    // SAFETY: each request used with this helper writes one `T`.
    check(unsafe { libc::ioctl(fd, request, &mut value as *mut T) } as libc::c_long)?;
    Ok(value)
}

fn ioctl_set<T>(fd: RawFd, request: libc::c_ulong, value: &T) -> Result<(), Errno> {
    // SAFETY: each request used with this helper reads one `T`.
    check(unsafe { libc::ioctl(fd, request, value as *const T) } as libc::c_long).map(drop)
}

/// The number N of the pty whose master is `master` (`/dev/pts/N`).
pub fn pty_index(master: RawFd) -> Result<u32, Errno> {
    ioctl_get::<libc::c_uint>(master, libc::TIOCGPTN)
}

/// Opens the slave of `master` (`TIOCGPTPEER`), without making it a controlling terminal.
pub fn open_peer(master: RawFd) -> Result<OwnedFd, Errno> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as its argument and returns a new fd.
    let fd = check(unsafe { libc::ioctl(master, libc::TIOCGPTPEER, flags) } as libc::c_long)?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the slave is locked (`TIOCGPTLCK`).
pub fn locked(master: RawFd) -> Result<bool, Errno> {
    ioctl_get::<libc::c_int>(master, libc::TIOCGPTLCK).map(|v| v != 0)
}

/// Locks or unlocks the slave (`TIOCSPTLCK`).
pub fn set_locked(master: RawFd, on: bool) -> Result<(), Errno> {
    ioctl_set(master, libc::TIOCSPTLCK, &(on as libc::c_int))
}

/// Whether packet mode is on (`TIOCGPKT`).
pub fn packet_mode(master: RawFd) -> Result<bool, Errno> {
    ioctl_get::<libc::c_int>(master, libc::TIOCGPKT).map(|v| v != 0)
}

/// Turns packet mode on or off (`TIOCPKT`).
pub fn set_packet_mode(master: RawFd, on: bool) -> Result<(), Errno> {
    ioctl_set(master, libc::TIOCPKT, &(on as libc::c_int))
}

/// The window size (`TIOCGWINSZ`).
pub fn window_size(fd: RawFd) -> Result<libc::winsize, Errno> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize.
    check(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) } as libc::c_long)?;
    Ok(w)
}

/// Sets the window size (`TIOCSWINSZ`).
pub fn set_window_size(fd: RawFd, w: &libc::winsize) -> Result<(), Errno> {
    ioctl_set(fd, libc::TIOCSWINSZ, w)
}

/// Bytes waiting to be read (`FIONREAD`).
pub fn pending(fd: RawFd) -> Result<u32, Errno> {
    ioctl_get::<libc::c_int>(fd, libc::FIONREAD).map(|n| n as u32)
}

/// The terminal's foreground process group (`TIOCGPGRP`), 0 when it has none.
pub fn foreground(fd: RawFd) -> Result<i32, Errno> {
    match ioctl_get::<libc::pid_t>(fd, libc::TIOCGPGRP) {
        Err(Errno::ENOTTY) => Ok(0),
        r => r,
    }
}

/// The session the terminal controls (`TIOCGSID`), 0 when none.
pub fn session(fd: RawFd) -> Result<i32, Errno> {
    match ioctl_get::<libc::pid_t>(fd, libc::TIOCGSID) {
        Err(Errno::ENOTTY) => Ok(0),
        r => r,
    }
}

/// The terminal's settings (`tcgetattr`).
pub fn termios(fd: RawFd) -> Result<libc::termios, Errno> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios.
    check(unsafe { libc::tcgetattr(fd, &mut t) } as libc::c_long)?;
    Ok(t)
}

/// Sets the terminal's settings at once (`tcsetattr(TCSANOW)`).
pub fn set_termios(fd: RawFd, t: &libc::termios) -> Result<(), Errno> {
    // SAFETY: tcsetattr reads one termios.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } as libc::c_long).map(drop)
}
