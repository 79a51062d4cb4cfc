//! Sockets: borrowing a traced process's socket, and the socket options `nix` does not name.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::unistd::Pid;

use super::check;

/// A copy, in dolly, of fd `fd` of process `pid` (`pidfd_getfd`): the same open file
/// description, so the same socket.
pub fn borrow_fd(pid: Pid, fd: i32) -> Result<OwnedFd, Errno> {
    let pidfd = super::process::pidfd_open(pid)?;
    // SAFETY: pidfd_getfd takes integers and returns a new fd we then own.
    let got = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

fn get_int(fd: BorrowedFd, level: i32, name: i32) -> Result<i32, Errno> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    check(rc as libc::c_long)?;
    Ok(value)
}

fn set_int(fd: BorrowedFd, level: i32, name: i32, value: i32) -> Result<(), Errno> {
    // SAFETY: the kernel reads one int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc as libc::c_long).map(drop)
}

/// The socket's address family (`SO_DOMAIN`).
pub fn domain(fd: impl AsFd) -> Result<i32, Errno> {
    get_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN)
}

/// `SO_PEEK_OFF`: where the next `MSG_PEEK` reads from (-1: peeking does not advance).
pub fn peek_offset(fd: impl AsFd) -> Result<i32, Errno> {
    get_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF)
}

/// Sets `SO_PEEK_OFF`.
pub fn set_peek_offset(fd: impl AsFd, offset: i32) -> Result<(), Errno> {
    set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, offset)
}

/// `SO_PASSSEC`: whether received messages carry the sender's security context.
pub fn pass_sec(fd: impl AsFd) -> Result<bool, Errno> {
    get_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_PASSSEC).map(|v| v != 0)
}

/// Sets `SO_PASSSEC`.
pub fn set_pass_sec(fd: impl AsFd, on: bool) -> Result<(), Errno> {
    set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_PASSSEC, on as i32)
}

/// Sets `TCP_REPAIR`: in repair mode a TCP socket binds and connects without the usual
/// checks and handshakes.
pub fn set_tcp_repair(fd: impl AsFd, on: bool) -> Result<(), Errno> {
    set_int(fd.as_fd(), libc::SOL_TCP, libc::TCP_REPAIR, on as i32)
}

/// Reads a socket option of any size into `buf`; returns the length the kernel wrote.
pub fn get_raw(fd: impl AsFd, level: i32, name: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    check(rc as libc::c_long)?;
    Ok(len as usize)
}

/// Sets a socket option from raw bytes.
pub fn set_raw(fd: impl AsFd, level: i32, name: i32, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: the kernel reads `value.len()` bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    check(rc as libc::c_long).map(drop)
}

/// Reads an int TCP option.
pub fn tcp_get(fd: impl AsFd, name: i32) -> Result<i32, Errno> {
    get_int(fd.as_fd(), libc::SOL_TCP, name)
}

/// Sets an int TCP option.
pub fn tcp_set(fd: impl AsFd, name: i32, value: i32) -> Result<(), Errno> {
    set_int(fd.as_fd(), libc::SOL_TCP, name, value)
}

/// An int-valued socket ioctl (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
pub fn ioctl_int(fd: impl AsFd, request: libc::c_ulong) -> Result<i32, Errno> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int.
    check(unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), request, &mut value) } as libc::c_long)?;
    Ok(value)
}
