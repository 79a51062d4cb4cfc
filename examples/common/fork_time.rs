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

/// The median of 3 of `timed`.
pub fn median3(mut timed: impl FnMut() -> u128) -> u128 {
    let mut times = [timed(), timed(), timed()];
    times.sort_unstable();
    times[1]
}
