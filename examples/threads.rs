//! A multi-threaded program for the tests: named worker threads each advancing a hash chain
//! kept both in thread-local storage and in shared memory, two threads handing a counter back
//! and forth through a mutex and condition variable, and a thread the main thread joins.
//!
//! ```text
//! threads --dir DIR [--workers N] [--ready]
//! ```
//!
//! Every 50 ms the main thread appends to DIR/log one line per worker,
//! `worker=I n=N hash=H ok=BOOL`, and `pingpong=N`; `ok` is false if the worker's
//! thread-local copy of its chain ever differed from the shared one, if its alternate signal
//! stack (each worker sets one of its own) ever changed, or if the hash is not what N steps
//! of the chain give. When DIR/stop appears, the joined thread ends; the main
//! thread logs `joined` and exits 0.

use std::cell::Cell;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

thread_local! {
    static CHAIN: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

fn step(h: u64, n: u64) -> u64 {
    let mut x = h ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn chain(seed: u64, n: u64) -> u64 {
    (1..=n).fold(seed, step)
}

#[derive(Clone, Copy, Default)]
struct Progress {
    n: u64,
    hash: u64,
    ok: bool,
}

/// Gives the calling thread an alternate signal stack of its own (leaked: threads here never
/// end) and returns it as [`current_altstack`] reads it.
fn own_altstack() -> (usize, usize, i32) {
    let stack = Box::leak(vec![0u8; 64 << 10].into_boxed_slice());
    let new = libc::stack_t {
        ss_sp: stack.as_mut_ptr().cast(),
        ss_flags: 0,
        ss_size: stack.len(),
    };
    // SAFETY: the stack is leaked, so it outlives the thread.
    unsafe { libc::sigaltstack(&new, std::ptr::null_mut()) };
    current_altstack()
}

/// The calling thread's alternate signal stack: base, size, flags.
fn current_altstack() -> (usize, usize, i32) {
    // SAFETY: an all-zero stack_t is valid; sigaltstack only writes it.
    let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads this thread's alternate stack into `old`, changes nothing.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut old) };
    (old.ss_sp as usize, old.ss_size, old.ss_flags)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dir = PathBuf::from(arg("--dir").expect("usage: threads --dir DIR [--workers N]"));
    let workers: usize = arg("--workers").map_or(4, |v| v.parse().expect("--workers N"));
    let progress = Arc::new(Mutex::new(vec![Progress::default(); workers]));
    for w in 0..workers {
        let progress = progress.clone();
        std::thread::Builder::new()
            .name(format!("worker-{w}"))
            .spawn(move || {
                let seed = w as u64 + 1;
                CHAIN.with(|c| c.set((0, seed)));
                let altstack = own_altstack();
                loop {
                    let (n, h) = CHAIN.with(|c| c.get());
                    let (n, h) = (n + 1, step(h, n + 1));
                    CHAIN.with(|c| c.set((n, h)));
                    {
                        let mut p = progress.lock().unwrap();
                        let ok = (p[w].n + 1 == n || p[w].n == 0) && current_altstack() == altstack;
                        p[w] = Progress {
                            n,
                            hash: h,
                            ok: ok && (p[w].ok || p[w].n == 0),
                        };
                    }
                    std::thread::sleep(Duration::from_millis(5 + w as u64));
                }
            })
            .unwrap();
    }
    // Ping-pong: each side waits on the condition variable for its turn.
    let turn = Arc::new((Mutex::new((0u64, false)), Condvar::new()));
    for side in [false, true] {
        let turn = turn.clone();
        std::thread::Builder::new()
            .name(format!("pong-{}", side as u8))
            .spawn(move || loop {
                let (lock, cv) = &*turn;
                let mut state = cv
                    .wait_while(lock.lock().unwrap(), |s| s.1 != side)
                    .unwrap();
                state.0 += 1;
                state.1 = !side;
                cv.notify_all();
                drop(state);
                std::thread::sleep(Duration::from_millis(2));
            })
            .unwrap();
    }
    let stop = dir.join("stop");
    let joined = std::thread::Builder::new()
        .name("joined".into())
        .spawn(move || {
            while !stop.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .unwrap();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    if args.iter().any(|a| a == "--ready") {
        // Every thread has started: say so (the benchmark waits for it).
        std::thread::sleep(Duration::from_millis(50));
        println!("ready");
        std::io::stdout().flush().unwrap();
    }
    let seeds: Vec<u64> = (1..=workers as u64).collect();
    while !joined.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let snapshot = progress.lock().unwrap().clone();
        let mut text = String::new();
        for (w, p) in snapshot.iter().enumerate() {
            let right = p.n == 0 || chain(seeds[w], p.n) == p.hash;
            text.push_str(&format!(
                "worker={w} n={} hash={:x} ok={}\n",
                p.n,
                p.hash,
                p.ok && right
            ));
        }
        text.push_str(&format!("pingpong={}\n", turn.0.lock().unwrap().0));
        log.write_all(text.as_bytes()).unwrap();
    }
    joined.join().unwrap();
    log.write_all(b"joined\n").unwrap();
}
