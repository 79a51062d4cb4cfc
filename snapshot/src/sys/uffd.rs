//! userfaultfd, for write tracking: registered for asynchronous write-protection on a
//! process's memory, the kernel resolves write faults by itself and `PAGEMAP_SCAN` tells
//! which pages were written since they were protected (what soft-dirty did, on kernels
//! without it).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;

use super::check;

/// `UFFD_USER_MODE_ONLY`: faults from user space only (allowed to unprivileged callers).
pub const USER_MODE_ONLY: u64 = 1;
const UFFD_API: u64 = 0xAA;
/// The kernel resolves write-protect faults itself, unblocking the writer at once.
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// Enables asynchronous write-protection on a new userfaultfd.
pub fn enable_async_wp(uffd: &OwnedFd) -> Result<(), Errno> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } as libc::c_long).map(drop)
}

/// Registers `[start, end)` of the userfaultfd's process for write-protect tracking.
pub fn register_wp(uffd: &OwnedFd, start: u64, end: u64) -> Result<(), Errno> {
    let mut reg = UffdioRegister {
        start,
        len: end - start,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } as libc::c_long)
        .map(drop)
}
