//! A workload that holds every kind of process state dolly captures, evolves it
//! deterministically, and checks it itself. The tests (and the demo) capture it, kill it,
//! restore it and ask it for a report.
//!
//! ```text
//! workload --dir DIR [--mem-mib N] [--tick-ms N]
//! ```
//!
//! Every tick it changes its memory in a way that depends only on its memory, and appends
//! `tick=N digest=D pid=P ns=pid:[INODE]` to DIR/log (an `O_APPEND` fd it holds): the digest hashes all
//! of its private state, so a restored copy that writes the same digests for the same ticks
//! as the original provably continued from the captured state. On SIGUSR1 it writes
//! DIR/report.json: one named check per piece of state (memory patterns, fds and offsets,
//! signal dispositions, masks and queues, alternate stack, timers, TLS, FPU/vector
//! registers, rseq, credentials, limits...), true when it still holds.

mod checks;
mod state;
mod vector;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Set by the SIGUSR1 handler: write a report.
pub static REPORT: AtomicBool = AtomicBool::new(false);
/// SIGALRM deliveries (the interval timer).
pub static ALARMS: AtomicU64 = AtomicU64::new(0);
/// SIGUSR2 deliveries.
pub static USR2: AtomicU64 = AtomicU64::new(0);

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(
        arg(&args, "--dir").expect("usage: workload --dir DIR [--mem-mib N] [--tick-ms N]"),
    );
    let mem_mib: usize = arg(&args, "--mem-mib").map_or(8, |v| v.parse().expect("--mem-mib N"));
    let tick_ms: u64 = arg(&args, "--tick-ms").map_or(50, |v| v.parse().expect("--tick-ms N"));

    let mut stack_block = [0u64; 2048];
    let mut st = state::State::setup(&dir, mem_mib, &mut stack_block);
    let spin_iters = vector::calibrate(Duration::from_millis(tick_ms / 2));
    st.log_line("ready");
    let mut tick: u64 = 0;
    loop {
        if REPORT.swap(false, Ordering::SeqCst) {
            let report = checks::report(&st, &stack_block, tick);
            st.write_report(&report);
        }
        if !vector::spin_and_check(spin_iters) {
            st.vector_failures += 1;
        }
        tick += 1;
        st.mutate(tick, &mut stack_block);
        let digest = st.digest(tick, &stack_block);
        // The PID namespace tells an original's lines from a clone's (same PID, same memory).
        let ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        st.log_line(&format!(
            "tick={tick} digest={digest} pid={} ns={ns}",
            std::process::id()
        ));
        std::thread::sleep(Duration::from_millis(tick_ms / 2));
    }
}
