//! A process with a given amount of touched memory, for the benchmark: it fills N MiB of
//! private anonymous memory with non-zero data, says "ready", then idles. On SIGWINCH it
//! times its own fork(): one as it runs, then the median of 3 made in a row, and says
//! `fork us=U in_a_row_us=R`.
//!
//! ```text
//! memhog --mib N
//! ```

#[path = "common/fork_time.rs"]
mod fork_time;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static FORK_TIME: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    FORK_TIME.store(true, Ordering::SeqCst);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .expect("usage: memhog --mib N");
    let mut memory = vec![0u64; mib << 17];
    for (i, w) in memory.iter_mut().enumerate() {
        *w = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGWINCH, on_winch as *const () as libc::sighandler_t) };
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut i = 0usize;
    loop {
        if FORK_TIME.swap(false, Ordering::SeqCst) {
            let (first, in_a_row) = fork_time::first_then_in_a_row(|| ());
            println!("fork us={first} in_a_row_us={in_a_row}");
            std::io::stdout().flush().unwrap();
        }
        // Touch a little now and then, like a live service.
        let n = memory.len();
        memory[i % n] += 1;
        i += 4096;
        std::thread::sleep(Duration::from_millis(10));
        std::hint::black_box(&memory);
    }
}
