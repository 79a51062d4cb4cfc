//! Named points of a capture or restore where it may stop early: because whoever asked for
//! it has gone (the CLI was killed), or because `DOLLY_PAUSE_AT` names the point (a debugging
//! aid the tests use to kill dolly at an exact moment).

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Environment variable naming a checkpoint at which to pause until aborted.
pub const PAUSE_ENV: &str = "DOLLY_PAUSE_AT";

/// Environment variable naming a file whose appearance ends a pause at `DOLLY_PAUSE_AT`
/// (which otherwise lasts until dolly is aborted): for tests that act while dolly waits.
pub const PAUSE_UNTIL_ENV: &str = "DOLLY_PAUSE_UNTIL";

/// Environment variable that makes every checkpoint (and [`mark`]) print the time since
/// dolly started, to stderr: where a capture or restore spends its time.
pub const TRACE_ENV: &str = "DOLLY_TRACE";

/// With `DOLLY_TRACE` set, notes `what` with the milliseconds since the first mark, to be
/// printed by [`flush_marks`] (printing right away would slow what is measured).
pub fn mark(what: &str) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some()) {
        let start = START.get_or_init(|| {
            let at = std::time::Instant::now();
            let line = format!("dolly: marks from CLOCK_MONOTONIC {} ns", monotonic_ns());
            MARKS.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            at
        });
        let line = format!(
            "dolly: {:9.3} ms  {what}",
            start.elapsed().as_secs_f64() * 1e3
        );
        MARKS.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

static MARKS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Prints the marks noted so far on stderr (see [`mark`]).
pub fn flush_marks() {
    for line in MARKS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        eprintln!("{line}");
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
fn monotonic_ns() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
        .unwrap_or(0)
}

/// Checks for abort requests at named points.
pub struct Checkpoints<'a> {
    abort: Option<&'a (dyn Fn() -> bool + Sync)>,
}

impl std::fmt::Debug for Checkpoints<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints").finish_non_exhaustive()
    }
}

impl<'a> Checkpoints<'a> {
    /// Checkpoints that never abort (but still honour `DOLLY_PAUSE_AT`).
    pub fn none() -> Checkpoints<'static> {
        Checkpoints { abort: None }
    }

    /// Checkpoints that abort once `abort()` returns true.
    pub fn with_abort(abort: &'a (dyn Fn() -> bool + Sync)) -> Checkpoints<'a> {
        Checkpoints { abort: Some(abort) }
    }

    fn aborted(&self) -> bool {
        self.abort.is_some_and(|f| f())
    }

    /// Reached point `name`: pauses there if asked to, and fails if the work must stop.
    pub fn reach(&self, name: &str) -> Result<()> {
        mark(name);
        if std::env::var(PAUSE_ENV).is_ok_and(|v| v == name) {
            eprintln!("dolly: paused at {name} (pid {})", std::process::id());
            let until = std::env::var_os(PAUSE_UNTIL_ENV).map(std::path::PathBuf::from);
            while !self.aborted() && !until.as_ref().is_some_and(|p| p.exists()) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if self.aborted() {
            return Err(Error::new(
                ErrorKind::System,
                format!("aborted at {name}: the dolly that asked for this was killed"),
            ));
        }
        Ok(())
    }
}
