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
/// Events for `mremap` of registered memory.
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Events for `madvise(MADV_DONTNEED/MADV_FREE/MADV_REMOVE)` of registered memory.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Events for `munmap` (and mappings made over) registered memory.
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;
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

/// Enables asynchronous write-protection on a new userfaultfd and, if `events` and the
/// kernel can, events telling which registered ranges lose their pages (see
/// [`read_events`]). Returns whether the events are on. With them on, the process's
/// `madvise`, `munmap` and `mremap` of registered memory wait until the events are read:
/// never ask for them on a userfaultfd of the calling process. (No fork events: a fork's
/// memory is simply not tracked.)
pub fn enable_async_wp(uffd: &OwnedFd, events: bool) -> Result<bool, Errno> {
    let events = if events {
        UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP
    } else {
        0
    };
    let api = |features: u64| {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api.
        check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } as libc::c_long)
    };
    match api(UFFD_FEATURE_WP_ASYNC | events) {
        Ok(_) => Ok(events != 0),
        // (A refused handshake leaves the userfaultfd as it was: try without the events.)
        Err(Errno::EINVAL) if events != 0 => api(UFFD_FEATURE_WP_ASYNC).map(|_| false),
        Err(e) => Err(e),
    }
}

/// What the events of a userfaultfd told.
#[derive(Debug, Default)]
pub struct Events {
    /// Address ranges whose pages may have gone or changed (`madvise` drops, `munmap`, both
    /// ends of an `mremap`).
    pub lost: Vec<(u64, u64)>,
    /// Of those, the ranges unmapped (`munmap`, a mapping made over them, both ends of an
    /// `mremap`): where an area registered for tracking may have been replaced by one that
    /// is not.
    pub unmapped: Vec<(u64, u64)>,
}

/// Reads the pending events of a userfaultfd opened `O_NONBLOCK`. Reading an event lets the
/// process go on.
pub fn read_events(uffd: &impl AsRawFd) -> Result<Events, Errno> {
    let mut out = Events::default();
    let mut buf = [0u8; MSG_LEN * 16];
    loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return match Errno::last() {
                Errno::EAGAIN => Ok(out),
                Errno::EINTR => continue,
                e => Err(e),
            };
        }
        if n == 0 {
            return Ok(out);
        }
        for msg in buf[..n as usize].chunks_exact(MSG_LEN) {
            let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
            match msg[0] {
                UFFD_EVENT_REMOVE => out.lost.push((word(8), word(16))),
                UFFD_EVENT_UNMAP => {
                    out.lost.push((word(8), word(16)));
                    out.unmapped.push((word(8), word(16)));
                }
                // Both ends: the pages left the source, and replaced what the
                // destination held.
                UFFD_EVENT_REMAP => {
                    for range in [
                        (word(8), word(8) + word(24)),
                        (word(16), word(16) + word(24)),
                    ] {
                        out.lost.push(range);
                        out.unmapped.push(range);
                    }
                }
                _ => {}
            }
        }
    }
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
