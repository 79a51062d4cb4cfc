//! ptrace requests beyond what `nix` offers: extended register state, signal masks,
//! queued signals and rseq configuration.

use nix::errno::Errno;
use nix::unistd::Pid;

/// `PTRACE_GETREGSET` note type of the XSAVE area (x87, SSE, AVX, AVX-512 ...).
const NT_X86_XSTATE: libc::c_int = 0x202;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Largest XSAVE area dolly accepts (AMX tiles make it ~11 KiB).
const XSTATE_MAX: usize = 16 * 1024;
/// Size of a `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;

use super::check;

/// Reads the XSAVE area (FPU, SSE, AVX... state) of a stopped tracee.
pub fn get_xstate(pid: Pid) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov points at a buffer of iov_len bytes that lives across the call; the
    // kernel shrinks iov_len to what it wrote.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid.as_raw(),
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    })?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Writes an XSAVE area previously read with [`get_xstate`] into a stopped tracee.
pub fn set_xstate(pid: Pid, xstate: &[u8]) -> Result<(), Errno> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    // SAFETY: iov points at a buffer of iov_len bytes that lives across the call.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            pid.as_raw(),
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    })?;
    Ok(())
}

/// Reads the blocked-signal mask of a stopped tracee (bit n-1 = signal n).
pub fn get_sigmask(pid: Pid) -> Result<u64, Errno> {
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes exactly 8 bytes (the size passed) into `mask`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            pid.as_raw(),
            std::mem::size_of::<u64>(),
            &mut mask as *mut u64,
        )
    })?;
    Ok(mask)
}

/// Sets the blocked-signal mask of a stopped tracee (SIGKILL and SIGSTOP stay unblocked).
pub fn set_sigmask(pid: Pid, mask: u64) -> Result<(), Errno> {
    // SAFETY: the kernel reads exactly 8 bytes from `mask`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            pid.as_raw(),
            std::mem::size_of::<u64>(),
            &mask as *const u64,
        )
    })?;
    Ok(())
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Reads, without dequeuing them, the signals queued for a stopped tracee: the thread's own
/// queue, or with `shared` the whole process's queue. Each entry is a raw `siginfo_t`.
pub fn peek_siginfo(pid: Pid, shared: bool) -> Result<Vec<[u8; SIGINFO_SIZE]>, Errno> {
    let mut out = Vec::new();
    loop {
        let mut batch = [[0u8; SIGINFO_SIZE]; 32];
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared {
                libc::PTRACE_PEEKSIGINFO_SHARED
            } else {
                0
            },
            nr: batch.len() as i32,
        };
        // SAFETY: `batch` holds `nr` siginfo slots; the kernel writes at most that many.
        let n = check(unsafe {
            libc::ptrace(
                libc::PTRACE_PEEKSIGINFO,
                pid.as_raw(),
                &args as *const PeekSiginfoArgs,
                batch.as_mut_ptr(),
            )
        })? as usize;
        out.extend_from_slice(&batch[..n]);
        if n < batch.len() {
            return Ok(out);
        }
    }
}

/// A thread's restartable-sequences registration, as `rseq(2)` took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the thread's `struct rseq`.
    pub pointer: u64,
    /// Size registered.
    pub size: u32,
    /// Signature the abort handlers carry.
    pub signature: u32,
    /// Registration flags.
    pub flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct PtraceRseqConfiguration {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// Reads the rseq registration of a stopped tracee; `None` when it has none.
pub fn rseq_config(pid: Pid) -> Result<Option<RseqConfig>, Errno> {
    let mut conf = PtraceRseqConfiguration::default();
    // SAFETY: the kernel writes at most `size` bytes into `conf`.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION as _,
            pid.as_raw(),
            std::mem::size_of::<PtraceRseqConfiguration>(),
            &mut conf as *mut PtraceRseqConfiguration,
        )
    })?;
    Ok((conf.rseq_abi_pointer != 0).then_some(RseqConfig {
        pointer: conf.rseq_abi_pointer,
        size: conf.rseq_abi_size,
        signature: conf.signature,
        flags: conf.flags,
    }))
}

/// Makes the calling process a tracee of its parent (used by a restore stub).
pub fn traceme() -> Result<(), Errno> {
    nix::sys::ptrace::traceme()
}
