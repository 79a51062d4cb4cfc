//! inotify instances, and finding a watched inode again from its file handle.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::check;

/// `inotify_init1(2)` with `flags` (`IN_NONBLOCK`, `IN_CLOEXEC`).
pub fn init(flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: inotify_init1 takes flags and returns a new fd we then own.
    let fd = check(unsafe { libc::inotify_init1(flags) } as libc::c_long)?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `inotify_add_watch(2)`: the watch descriptor.
pub fn add_watch(fd: RawFd, path: &str, mask: u32) -> Result<i32, Errno> {
    let path = CString::new(path).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the kernel reads a NUL-terminated path.
    check(unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) } as libc::c_long)
        .map(|wd| wd as i32)
}

/// `inotify_rm_watch(2)`.
pub fn rm_watch(fd: RawFd, wd: i32) -> Result<(), Errno> {
    // SAFETY: inotify_rm_watch takes integers.
    check(unsafe { libc::inotify_rm_watch(fd, wd) } as libc::c_long).map(drop)
}

/// Opens (`O_PATH`) the inode a file handle names, on the filesystem `mount` is on
/// (`open_by_handle_at(2)`).
pub fn open_by_handle(mount: &OwnedFd, handle_type: i32, handle: &[u8]) -> Result<OwnedFd, Errno> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&handle_type.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: the kernel reads one file_handle of the length it states.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            buf.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
