//! The syscall edge: thin, typed wrappers over the system calls that `nix` does not cover.
//!
//! Every `unsafe` block of the snapshot core lives below this module (and in the few
//! places that call into a forked child), each with a `// SAFETY:` line.

pub mod clone;
pub mod diag;
pub mod inotify;
pub mod pagemap;
pub mod process;
pub mod ptrace;
pub mod sigframe;
pub mod socket;
pub mod sysv;
pub mod tty;
pub mod uffd;

/// Turns a raw syscall return (-1 and errno on failure) into a `Result`.
pub(crate) fn check(rc: libc::c_long) -> Result<libc::c_long, nix::errno::Errno> {
    if rc == -1 {
        Err(nix::errno::Errno::last())
    } else {
        Ok(rc)
    }
}

/// The size of a page on x86_64 Linux; dolly supports no other.
pub const PAGE_SIZE: u64 = 4096;

/// Highest user address + 1 with 4-level page tables (TASK_SIZE on x86_64).
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Rounds `n` down to a page boundary.
pub fn page_floor(n: u64) -> u64 {
    n & !(PAGE_SIZE - 1)
}

/// Rounds `n` up to a page boundary.
pub fn page_ceil(n: u64) -> u64 {
    (n + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}
