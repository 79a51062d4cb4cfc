//! Timing a program's own fork(), for the example programs the benchmark captures.

use std::time::Instant;

/// The time one fork() of this process takes, in µs (the parent's side: until the call
/// returns, the child's address space set up copy-on-write); the child ends at once and is
/// waited for.
pub fn fork_us() -> u128 {
    let at = Instant::now();
    // SAFETY: the child only calls _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    let took = at.elapsed().as_micros();
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
    took
}

/// One fork() as the process runs (what a process that forks now and then pays), then the
/// median of 3 made in a row, each after `prepare`; in µs. The forks in a row take a third
/// to a half as long on this VM at 64 MiB: a fork updates the kernel's record of every page
/// (its reference and map counts), and right after another fork those records are still in
/// this CPU's cache; as a process runs, they are wherever the last one to touch them left
/// them.
pub fn first_then_in_a_row(mut prepare: impl FnMut()) -> (u128, u128) {
    prepare();
    let first = fork_us();
    let mut times = [0; 3];
    for t in &mut times {
        prepare();
        *t = fork_us();
    }
    times.sort_unstable();
    (first, times[1])
}
