//! A program that writes its memory as fast as it can, for the tests and benchmarks of
//! near-instant capture: what it holds at any instant is known from its own bookkeeping,
//! so a restored copy can check that every page is the one of a single instant.
//!
//! ```text
//! scribbler --dir DIR --mib N [--hot-mib H] [--quiet-after-ms MS] [--gaps-ms G] [--huge]
//! ```
//!
//! It maps N MiB and loops: each turn writes one page with a pattern of the turn number
//! (and records it), now and then drops a run of pages (`MADV_DONTNEED`, recorded as zero)
//! or maps a fresh 1 MiB over part of the buffer (`MAP_FIXED`, recorded as zero). It reads
//! the clock every turn and keeps the longest gap between two turns: how long it was stopped.
//!
//! With `--huge`, the buffer is aligned to 2 MiB and advised `MADV_HUGEPAGE`: transparent
//! huge pages where the kernel has them (`AnonHugePages` in its smaps).
//!
//! With `--hot-mib`, only the first H MiB are rewritten (a hot set; the rest keeps what it
//! was first written with). Once DIR/drop exists it drops its last MiB (`MADV_DONTNEED`,
//! recorded as zero; outside the hot set, nothing writes it again) and logs `dropped`.
//!
//! After `--quiet-after-ms` it stops writing and only watches the clock (for benchmarks that
//! want a settled process). Once DIR/steady exists it no longer drops or maps over pages.
//! (A restored process's memory is a private mapping of the snapshot: `MADV_DONTNEED` on it
//! reads the snapshot's data again, not zeros. A drop whose pages do not read as zeros then
//! zeroes them itself, so that the records hold: a process restored from an instant just
//! before a drop, which it then makes, is no exception.)
//!
//! DIR/log gets `ready` once the buffer is written, then `turn=N` lines; on SIGUSR1 it checks
//! every page against its records and appends `verify ok turns=N` or `verify BAD page=P ...`;
//! on SIGUSR2 it appends `stall max_us=U` and starts a new measurement; on SIGWINCH it
//! times its own fork() and appends `fork us=U in_a_row_us=R`: one fork as it runs, then the
//! median of 3 made in a row, each with every page just written again. With `--gaps-ms`,
//! every gap longer than G ms is logged as `gap us=U ended_at_ns=T` (CLOCK_MONOTONIC, as
//! the start of a `DOLLY_TRACE` trace).

#[path = "common/fork_time.rs"]
mod fork_time;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static VERIFY: AtomicBool = AtomicBool::new(false);
static STALL: AtomicBool = AtomicBool::new(false);
static FORK_TIME: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    VERIFY.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    STALL.store(true, Ordering::SeqCst);
}

extern "C" fn on_winch(_: libc::c_int) {
    FORK_TIME.store(true, Ordering::SeqCst);
}

/// The time of one fork() of this process as it runs, in µs (the parent's side), then the
/// median of 3 more made in a row, each with every page of `buf` just written again
/// (rewritten with what it holds): a fork right after another finds the kernel's
/// bookkeeping of every page still in this CPU's cache and takes a third to a half as long
/// at 64 MiB (see `fork_time::first_then_in_a_row`).
fn fork_us(buf: &mut [u64]) -> (u128, u128) {
    fork_time::first_then_in_a_row(|| {
        for page in buf.chunks_mut(PAGE / 8) {
            // SAFETY: a word of our own buffer, written back as it was.
            unsafe { std::ptr::write_volatile(&mut page[0], std::ptr::read_volatile(&page[0])) };
        }
    })
}

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

fn pattern(turn: u64, word: usize) -> u64 {
    (turn.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ word as u64
}

/// After `MADV_DONTNEED` on `pages`: zeroes those that do not read as zeros (memory mapped
/// privately from a file, as a restored process's is, reads the file's data again). (Word 0
/// tells: a written page's is never zero, see [`pattern`].)
fn zero_after_drop(pages: &mut [u64]) {
    for page in pages.chunks_mut(PAGE / 8) {
        if page[0] != 0 {
            page.fill(0);
        }
    }
}

fn fill(page: &mut [u64], turn: u64) {
    for (w, v) in page.iter_mut().enumerate() {
        *v = pattern(turn, w);
    }
}

/// CLOCK_MONOTONIC in nanoseconds (to compare with `DOLLY_TRACE`'s marks).
fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn say(log: &mut std::fs::File, line: String) {
    log.write_all(format!("{line}\n").as_bytes())
        .expect("writing the log");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dir = PathBuf::from(arg("--dir").expect("usage: scribbler --dir DIR --mib N"));
    let mib: usize = arg("--mib").map_or(64, |v| v.parse().expect("--mib N"));
    let quiet_after =
        arg("--quiet-after-ms").map(|v| Duration::from_millis(v.parse().expect("MS")));
    let gaps_over = arg("--gaps-ms").map(|v| Duration::from_millis(v.parse().expect("MS")));
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .expect("opening the log");
    // SAFETY: installing async-signal-safe handlers that only set flags.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGWINCH, on_winch as *const () as libc::sighandler_t);
    }
    let len = mib << 20;
    let pages = len / PAGE;
    let hot = arg("--hot-mib").map_or(pages, |v| {
        (v.parse::<usize>().expect("--hot-mib H") << 20) / PAGE
    });
    let hot = hot.clamp(1, pages);
    let huge = args.iter().any(|a| a == "--huge");
    // (With room to align it to a huge page.)
    let slack = if huge { HUGE } else { 0 };
    // SAFETY: a fresh private anonymous mapping, used only through `buf` below.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + slack,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mapped, libc::MAP_FAILED);
    let base = (mapped as usize).next_multiple_of(slack.max(1)) as *mut libc::c_void;
    if huge {
        // SAFETY: advice on the mapping just made.
        if unsafe { libc::madvise(base, len, libc::MADV_HUGEPAGE) } != 0 {
            let err = std::io::Error::last_os_error();
            say(
                &mut log,
                format!("error: MADV_HUGEPAGE: {err} (no transparent huge pages)"),
            );
            std::process::exit(2);
        }
    }
    // SAFETY: the mapping is `len` bytes, aligned, and only this function uses it.
    let buf: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(base.cast(), len / 8) };
    let words = PAGE / 8;
    // What each page holds: the turn that wrote it, 0 for zeros.
    let mut written = vec![0u64; pages];
    for (p, w) in written.iter_mut().enumerate() {
        *w = p as u64 + 1;
        fill(&mut buf[p * words..(p + 1) * words], *w);
    }
    say(&mut log, "ready".into());
    let started = Instant::now();
    let mut turn = pages as u64 + 1;
    let mut last = Instant::now();
    let mut max_stall = Duration::ZERO;
    let steady_path = dir.join("steady");
    let mut steady = false;
    let drop_path = dir.join("drop");
    let mut dropped = false;
    loop {
        let now = Instant::now();
        max_stall = max_stall.max(now - last);
        if gaps_over.is_some_and(|g| now - last > g) {
            say(
                &mut log,
                format!(
                    "gap us={} ended_at_ns={}",
                    (now - last).as_micros(),
                    monotonic_ns()
                ),
            );
        }
        last = now;
        if STALL.swap(false, Ordering::SeqCst) {
            say(&mut log, format!("stall max_us={}", max_stall.as_micros()));
            max_stall = Duration::ZERO;
            last = Instant::now();
        }
        if FORK_TIME.swap(false, Ordering::SeqCst) {
            let (first, in_a_row) = fork_us(buf);
            say(&mut log, format!("fork us={first} in_a_row_us={in_a_row}"));
            last = Instant::now();
        }
        if VERIFY.swap(false, Ordering::SeqCst) {
            let bad = (0..pages).find(|&p| {
                let page = &buf[p * words..(p + 1) * words];
                match written[p] {
                    0 => page.iter().any(|&v| v != 0),
                    t => page.iter().enumerate().any(|(w, &v)| v != pattern(t, w)),
                }
            });
            match bad {
                None => say(&mut log, format!("verify ok turns={turn}")),
                Some(p) => {
                    // The turn whose pattern the page holds: word 0 is turn * K.
                    let found = buf[p * words].wrapping_mul(0xf1de_83e1_9937_733d);
                    say(
                        &mut log,
                        format!(
                            "verify BAD page={p} expected_turn={} found_turn={found} now={turn}",
                            written[p]
                        ),
                    )
                }
            }
            last = Instant::now();
        }
        if quiet_after.is_some_and(|q| started.elapsed() > q) {
            std::hint::spin_loop();
            continue;
        }
        turn += 1;
        if !steady && turn.is_multiple_of(512) {
            // Just before a drop: a restored copy must not drop a page (see above).
            steady = steady_path.exists();
        }
        if !dropped && turn.is_multiple_of(512) && drop_path.exists() && pages > hot + 256 {
            let first = pages - 256;
            // SAFETY: the last MiB of our own mapping.
            unsafe {
                libc::madvise(
                    base.cast::<u8>().add(first * PAGE).cast(),
                    256 * PAGE,
                    libc::MADV_DONTNEED,
                );
            }
            zero_after_drop(&mut buf[first * words..]);
            written[first..].fill(0);
            dropped = true;
            say(&mut log, "dropped".into());
        }
        let p = (turn.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 17) as usize % hot;
        match if steady { 1 } else { turn % 1024 } {
            0 => {
                // Drop a run of pages: they read as zeros from now on.
                let n = 16.min(pages - p);
                // SAFETY: the range is inside the mapping.
                unsafe {
                    libc::madvise(
                        base.cast::<u8>().add(p * PAGE).cast(),
                        n * PAGE,
                        libc::MADV_DONTNEED,
                    );
                }
                zero_after_drop(&mut buf[p * words..(p + n) * words]);
                written[p..p + n].fill(0);
            }
            512 if pages > 512 => {
                // Map fresh memory over 1 MiB of the buffer.
                let first = (p / 256) * 256;
                let n = 256.min(pages - first);
                // SAFETY: MAP_FIXED over a range inside our own mapping.
                let r = unsafe {
                    libc::mmap(
                        base.cast::<u8>().add(first * PAGE).cast(),
                        n * PAGE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                assert_ne!(r, libc::MAP_FAILED);
                written[first..first + n].fill(0);
            }
            _ => {
                fill(&mut buf[p * words..(p + 1) * words], turn);
                written[p] = turn;
            }
        }
        if turn.is_multiple_of(1 << 20) {
            say(&mut log, format!("turn={turn}"));
        }
    }
}
