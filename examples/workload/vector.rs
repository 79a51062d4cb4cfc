//! FPU and vector registers: values held in ymm (and zmm, where the CPU has AVX-512)
//! registers across a long spin; if a capture or restore loses them, the comparison at the
//! end of the spin fails.

use std::arch::asm;
use std::time::{Duration, Instant};

/// The pattern the registers hold: 8 ymm registers (256 bytes) and 8 zmm (512 bytes).
#[repr(C, align(64))]
struct Pattern([u64; 96]);

static PATTERN: Pattern = {
    let mut p = [0u64; 96];
    let mut i = 0;
    while i < 96 {
        p[i] = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1) ^ 0xd1b5_4a32_d192_ed03;
        i += 1;
    }
    Pattern(p)
};

/// MXCSR with round-toward-zero and flush-to-zero, all exceptions masked.
pub const MXCSR: u32 = 0x1f80 | 0x6000 | 0x8000;
/// x87 control word with round-toward-zero, all exceptions masked.
pub const X87_CW: u16 = 0x0f7f;

/// Sets the FPU control registers to the non-default values the checks expect.
pub fn set_control_words() {
    let mxcsr = MXCSR;
    let cw = X87_CW;
    // SAFETY: loads control registers from valid stack locations.
    unsafe {
        asm!("ldmxcsr [{0}]", in(reg) &mxcsr);
        asm!("fldcw [{0}]", in(reg) &cw);
    }
}

/// The current MXCSR and x87 control word.
pub fn control_words() -> (u32, u16) {
    let mut mxcsr = 0u32;
    let mut cw = 0u16;
    // SAFETY: stores control registers into valid stack locations.
    unsafe {
        asm!("stmxcsr [{0}]", in(reg) &mut mxcsr);
        asm!("fnstcw [{0}]", in(reg) &mut cw);
    }
    (mxcsr, cw)
}

fn ymm_spin(iters: u64) -> bool {
    let mask: u32;
    // SAFETY: reads the static pattern; every register written is declared clobbered.
    unsafe {
        asm!(
            "vmovdqu ymm8, [{p}]",
            "vmovdqu ymm9, [{p} + 32]",
            "vmovdqu ymm10, [{p} + 64]",
            "vmovdqu ymm11, [{p} + 96]",
            "vmovdqu ymm12, [{p} + 128]",
            "vmovdqu ymm13, [{p} + 160]",
            "vmovdqu ymm14, [{p} + 192]",
            "vmovdqu ymm15, [{p} + 224]",
            "2:",
            "dec {n}",
            "jnz 2b",
            "vpcmpeqq ymm0, ymm8, [{p}]",
            "vpcmpeqq ymm1, ymm9, [{p} + 32]",
            "vpand ymm0, ymm0, ymm1",
            "vpcmpeqq ymm1, ymm10, [{p} + 64]",
            "vpand ymm0, ymm0, ymm1",
            "vpcmpeqq ymm1, ymm11, [{p} + 96]",
            "vpand ymm0, ymm0, ymm1",
            "vpcmpeqq ymm1, ymm12, [{p} + 128]",
            "vpand ymm0, ymm0, ymm1",
            "vpcmpeqq ymm1, ymm13, [{p} + 160]",
            "vpand ymm0, ymm0, ymm1",
            "vpcmpeqq ymm1, ymm14, [{p} + 192]",
            "vpand ymm0, ymm0, ymm1",
            "vpcmpeqq ymm1, ymm15, [{p} + 224]",
            "vpand ymm0, ymm0, ymm1",
            "vpmovmskb {m:e}, ymm0",
            "vzeroupper",
            p = in(reg) PATTERN.0.as_ptr(),
            n = inout(reg) iters.max(1) => _,
            m = out(reg) mask,
            out("ymm0") _, out("ymm1") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
        );
    }
    mask == u32::MAX
}

#[target_feature(enable = "avx512f")]
fn zmm_spin(iters: u64) -> bool {
    let mask: u32;
    // SAFETY: reads the static pattern; every register written is declared clobbered.
    unsafe {
        asm!(
            "vmovdqu64 zmm16, [{p} + 256]",
            "vmovdqu64 zmm17, [{p} + 320]",
            "vmovdqu64 zmm18, [{p} + 384]",
            "vmovdqu64 zmm19, [{p} + 448]",
            "vmovdqu64 zmm28, [{p} + 512]",
            "vmovdqu64 zmm29, [{p} + 576]",
            "vmovdqu64 zmm30, [{p} + 640]",
            "vmovdqu64 zmm31, [{p} + 704]",
            "2:",
            "dec {n}",
            "jnz 2b",
            "vpcmpeqq k1, zmm16, [{p} + 256]",
            "vpcmpeqq k2, zmm17, [{p} + 320]",
            "kandw k1, k1, k2",
            "vpcmpeqq k2, zmm18, [{p} + 384]",
            "kandw k1, k1, k2",
            "vpcmpeqq k2, zmm19, [{p} + 448]",
            "kandw k1, k1, k2",
            "vpcmpeqq k2, zmm28, [{p} + 512]",
            "kandw k1, k1, k2",
            "vpcmpeqq k2, zmm29, [{p} + 576]",
            "kandw k1, k1, k2",
            "vpcmpeqq k2, zmm30, [{p} + 640]",
            "kandw k1, k1, k2",
            "vpcmpeqq k2, zmm31, [{p} + 704]",
            "kandw k1, k1, k2",
            "kmovw {m:e}, k1",
            p = in(reg) PATTERN.0.as_ptr(),
            n = inout(reg) iters.max(1) => _,
            m = out(reg) mask,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            out("k1") _, out("k2") _,
        );
    }
    mask & 0xff == 0xff
}

/// Spins `iters` loop rounds with the vector registers loaded (half in ymm, half in zmm
/// where available); true when every register still held its value at the end.
pub fn spin_and_check(iters: u64) -> bool {
    let ymm = ymm_spin(iters / 2);
    let zmm = if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { zmm_spin(iters / 2) }
    } else {
        ymm_spin(iters / 2)
    };
    ymm && zmm
}

/// Loop rounds that take about `target`.
pub fn calibrate(target: Duration) -> u64 {
    let probe = 20_000_000u64;
    let t = Instant::now();
    ymm_spin(probe);
    let per_round = t.elapsed().as_secs_f64() / probe as f64;
    ((target.as_secs_f64() / per_round) as u64).max(1000)
}
