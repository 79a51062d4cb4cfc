//! A process with a given amount of touched memory, for the benchmark: it fills N MiB of
//! private anonymous memory with non-zero data, says "ready", then idles.
//!
//! ```text
//! memhog --mib N
//! ```

use std::io::Write;
use std::time::Duration;

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
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut i = 0usize;
    loop {
        // Touch a little now and then, like a live service.
        let n = memory.len();
        memory[i % n] += 1;
        i += 4096;
        std::thread::sleep(Duration::from_millis(10));
        std::hint::black_box(&memory);
    }
}
