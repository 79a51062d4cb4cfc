//! The x86-64 signal frame `rt_sigreturn` restores a thread from (`struct rt_sigframe`),
//! built by dolly: with a thread's own registers, signal mask and extended state in it, a
//! thread that runs `rt_sigreturn` on it goes back to where it was, all by itself.
//!
//! Layout: `pretcode` (8 bytes), then the `ucontext` (flags, link, alternate stack, the
//! `sigcontext` of the registers, the signal mask: [`UCONTEXT_LEN`] bytes), then a
//! `siginfo` (128 bytes, which `rt_sigreturn` does not read: dolly keeps a signal action
//! there, see [`INFO_AT`]), then the XSAVE area, 64-byte aligned, in the standard format
//! with its software-reserved bytes filled in as the kernel's own frames have them.

/// Bytes of the kernel's `struct ucontext` on x86-64.
pub const UCONTEXT_LEN: u64 = 304;

/// Offset of the `siginfo` in the frame (after `pretcode` and the `ucontext`).
pub const INFO_AT: u64 = 8 + UCONTEXT_LEN;

/// Offset of `uc_mcontext.rsp` in a `ucontext`.
pub const UC_RSP_AT: u64 = 40 + 15 * 8;

/// `uc_flags`: the frame holds an XSAVE area, not only the legacy FXSAVE one.
const UC_FP_XSTATE: u64 = 1;
/// `uc_flags`: the `ss` of the `sigcontext` is to be restored.
const UC_SIGCONTEXT_SS: u64 = 2;
/// The software-reserved bytes of an XSAVE area in a signal frame start here.
const SW_BYTES_AT: usize = 464;
/// Marks those bytes as describing an XSAVE area.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// Ends the XSAVE area of a signal frame.
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// The legacy area and the XSAVE header: the least an XSAVE area holds.
const XSAVE_MIN: usize = 512 + 64;
/// AMX tile state: left out (a thread has it only with `ARCH_REQ_XCOMP_PERM`).
const AMX_FEATURES: u64 = (1 << 17) | (1 << 18);
/// Restartable-call errors a system call interrupted by a stop returns, for the kernel to
/// restart it on resume (`-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`).
const ERESTART: [i64; 3] = [-512, -513, -514];
/// A call to be restarted through `restart_syscall` (`-ERESTART_RESTARTBLOCK`).
const ERESTART_RESTARTBLOCK: i64 = -516;

/// A thread's state to go back to: its registers (as `PTRACE_GETREGS` reads them), signal
/// mask and XSAVE area (as `PTRACE_GETREGSET NT_X86_XSTATE` reads it).
#[derive(Debug, Clone, Copy)]
pub struct ThreadState<'a> {
    /// General-purpose registers.
    pub regs: &'a libc::user_regs_struct,
    /// Blocked signals.
    pub mask: u64,
    /// The XSAVE area.
    pub xstate: &'a [u8],
}

/// The bytes of a frame, to be written at `base` (page-aligned or at least 64-byte
/// aligned), that `rt_sigreturn` run with `rsp` at `base + 8` restores `state` from. A
/// system call the thread was stopped in is restarted as the kernel would on resume; one
/// restarted through `restart_syscall` returns `EINTR` instead (`rt_sigreturn` forgets how
/// to restart it). The alternate signal stack is left as it is (the frame's one is empty,
/// which `rt_sigreturn` cannot set). AMX tile state is not restored.
pub fn rt_sigframe(base: u64, state: ThreadState<'_>) -> Vec<u8> {
    let mut regs = *state.regs;
    if (regs.orig_rax as i64) >= 0 {
        let rax = regs.rax as i64;
        if ERESTART.contains(&rax) {
            regs.rax = regs.orig_rax;
            regs.rip -= 2;
        } else if rax == ERESTART_RESTARTBLOCK {
            regs.rax = -(libc::EINTR as i64) as u64;
        }
    }
    let fpstate = (base + INFO_AT + crate::sys::ptrace::SIGINFO_SIZE as u64 + 63) & !63;
    let xsave = xsave_area(state.xstate);
    let full = xsave.len() > XSAVE_MIN;
    let mut frame = vec![0u8; (fpstate - base) as usize];
    let mut put = |at: u64, value: u64| {
        let at = (8 + at) as usize;
        frame[at..at + 8].copy_from_slice(&value.to_ne_bytes());
    };
    put(0, UC_SIGCONTEXT_SS | if full { UC_FP_XSTATE } else { 0 });
    // (uc_link, and uc_stack left empty.)
    let sigcontext = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.eflags,
    ];
    for (i, value) in sigcontext.iter().enumerate() {
        put(40 + 8 * i as u64, *value);
    }
    // cs, gs, fs, ss: four 16-bit fields (gs and fs are not restored).
    let selectors = (regs.cs & 0xffff) | (regs.ss & 0xffff) << 48;
    put(40 + 18 * 8, selectors);
    // err, trapno, oldmask, cr2: 0. Then the XSAVE area's address.
    put(40 + 23 * 8, fpstate);
    put(UCONTEXT_LEN - 8, state.mask);
    frame.extend_from_slice(&xsave);
    frame
}

/// The XSAVE area of a signal frame from one `ptrace` read: the features a signal frame
/// has (what XCR0 enables, but AMX), its software-reserved bytes filled in, and the end
/// marker after it. A legacy-only area (no XSAVE) is kept as it is, without marks.
fn xsave_area(xstate: &[u8]) -> Vec<u8> {
    if xstate.len() < XSAVE_MIN {
        let mut legacy = xstate.to_vec();
        legacy.resize(512, 0);
        return legacy;
    }
    // (`ptrace` puts XCR0 where a signal frame has its software bytes.)
    let xcr0 = u64::from_ne_bytes(xstate[SW_BYTES_AT..SW_BYTES_AT + 8].try_into().unwrap());
    let features = xcr0 & !AMX_FEATURES;
    let size = standard_size(features).clamp(XSAVE_MIN, xstate.len());
    let mut area = xstate[..size].to_vec();
    // Software bytes: magic1, extended_size, xfeatures, xstate_size, padding.
    area[SW_BYTES_AT..512].fill(0);
    area[SW_BYTES_AT..SW_BYTES_AT + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_ne_bytes());
    area[SW_BYTES_AT + 4..SW_BYTES_AT + 8].copy_from_slice(&(size as u32 + 4).to_ne_bytes());
    area[SW_BYTES_AT + 8..SW_BYTES_AT + 16].copy_from_slice(&features.to_ne_bytes());
    area[SW_BYTES_AT + 16..SW_BYTES_AT + 20].copy_from_slice(&(size as u32).to_ne_bytes());
    // The header's XSTATE_BV: no feature the area leaves out.
    let bv = u64::from_ne_bytes(area[512..520].try_into().unwrap()) & features;
    area[512..520].copy_from_slice(&bv.to_ne_bytes());
    area.extend_from_slice(&FP_XSTATE_MAGIC2.to_ne_bytes());
    area
}

/// Bytes of a standard-format XSAVE area holding `features`: the end of the last of them,
/// as CPUID leaf 0xD places them (read once: CPUID traps to the hypervisor in a VM, tens
/// of µs for all features; see [`warm_up`]).
fn standard_size(features: u64) -> usize {
    feature_ends()
        .iter()
        .enumerate()
        .filter(|&(bit, _)| features & (1 << bit) != 0)
        .map(|(_, &end)| end)
        .max()
        .unwrap_or(0)
        .max(XSAVE_MIN)
}

/// Where each XSAVE feature's state ends in the standard format (0 for x87 and SSE, in
/// the legacy area, and for features this CPU lacks).
fn feature_ends() -> &'static [usize; 64] {
    static ENDS: std::sync::OnceLock<[usize; 64]> = std::sync::OnceLock::new();
    ENDS.get_or_init(|| {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 0xD only reads.
        let supported = unsafe { core::arch::x86_64::__cpuid_count(0xD, 0) };
        let supported = supported.eax as u64 | (supported.edx as u64) << 32;
        let mut ends = [0; 64];
        for (bit, end) in ends.iter_mut().enumerate().skip(2) {
            if supported & (1 << bit) != 0 {
                #[allow(unused_unsafe)]
                // SAFETY: as above; sub-leaf `bit` describes that feature's state.
                let leaf = unsafe { core::arch::x86_64::__cpuid_count(0xD, bit as u32) };
                *end = (leaf.ebx + leaf.eax) as usize;
            }
        }
        ends
    })
}

/// Reads what building a frame needs from the CPU, ahead of a freeze.
pub fn warm_up() {
    feature_ends();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> libc::user_regs_struct {
        // SAFETY: user_regs_struct is plain integers: all zeroes is a valid value.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.rip = 0x1002;
        r.rsp = 0x7000;
        r.rax = 7;
        r.orig_rax = u64::MAX;
        r.cs = 0x33;
        r.ss = 0x2b;
        r
    }

    fn word(frame: &[u8], at: u64) -> u64 {
        let at = (8 + at) as usize;
        u64::from_ne_bytes(frame[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn places_registers_where_rt_sigreturn_reads_them() {
        let r = regs();
        let xstate = vec![0u8; 512];
        let frame = rt_sigframe(
            0x10000,
            ThreadState {
                regs: &r,
                mask: 0x55,
                xstate: &xstate,
            },
        );
        assert_eq!(word(&frame, UC_RSP_AT), 0x7000);
        assert_eq!(word(&frame, UC_RSP_AT + 8), 0x1002);
        assert_eq!(word(&frame, 40 + 13 * 8), 7, "rax");
        assert_eq!(word(&frame, UCONTEXT_LEN - 8), 0x55, "mask");
        assert_eq!(word(&frame, 40 + 18 * 8), 0x33 | 0x2b << 48);
        let fpstate = word(&frame, 40 + 23 * 8);
        assert_eq!(fpstate % 64, 0);
        assert_eq!(frame.len() as u64, fpstate - 0x10000 + 512);
        assert_eq!(word(&frame, 0), UC_SIGCONTEXT_SS, "legacy area only");
    }

    #[test]
    fn restarts_a_call_the_thread_was_stopped_in() {
        let mut r = regs();
        r.orig_rax = 230;
        r.rax = (-512i64) as u64;
        let frame_of = |regs: &libc::user_regs_struct| {
            let (mask, xstate) = (0, &[][..]);
            rt_sigframe(0, ThreadState { regs, mask, xstate })
        };
        let frame = frame_of(&r);
        assert_eq!(word(&frame, 40 + 13 * 8), 230);
        assert_eq!(word(&frame, UC_RSP_AT + 8), 0x1000);
        r.rax = (-516i64) as u64;
        let frame = frame_of(&r);
        assert_eq!(word(&frame, 40 + 13 * 8) as i64, -(libc::EINTR as i64));
        assert_eq!(word(&frame, UC_RSP_AT + 8), 0x1002);
    }

    #[test]
    fn marks_an_xsave_area_as_the_kernel_does() {
        let xcr0 = 0b111u64 | AMX_FEATURES;
        let mut xstate = vec![0u8; 16 * 1024];
        xstate[SW_BYTES_AT..SW_BYTES_AT + 8].copy_from_slice(&xcr0.to_ne_bytes());
        xstate[512..520].copy_from_slice(&xcr0.to_ne_bytes());
        let area = xsave_area(&xstate);
        let size = standard_size(0b111);
        assert_eq!(area.len(), size + 4);
        let u32_at = |at: usize| u32::from_ne_bytes(area[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(SW_BYTES_AT), FP_XSTATE_MAGIC1);
        assert_eq!(u32_at(SW_BYTES_AT + 4) as usize, size + 4);
        assert_eq!(u32_at(SW_BYTES_AT + 16) as usize, size);
        assert_eq!(u32_at(size), FP_XSTATE_MAGIC2);
        let bv = u64::from_ne_bytes(area[512..520].try_into().unwrap());
        assert_eq!(bv, 0b111, "no AMX");
    }
}
