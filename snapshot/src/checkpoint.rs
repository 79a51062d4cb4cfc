//! Named points of a capture or restore where it may stop early: because whoever asked for
//! it has gone (the CLI was killed), or because `DOLLY_PAUSE_AT` names the point (a debugging
//! aid the tests use to kill dolly at an exact moment).

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Environment variable naming a checkpoint at which to pause until aborted.
pub const PAUSE_ENV: &str = "DOLLY_PAUSE_AT";

/// Checks for abort requests at named points.
pub struct Checkpoints<'a> {
    abort: Option<&'a dyn Fn() -> bool>,
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
    pub fn with_abort(abort: &'a dyn Fn() -> bool) -> Checkpoints<'a> {
        Checkpoints { abort: Some(abort) }
    }

    fn aborted(&self) -> bool {
        self.abort.is_some_and(|f| f())
    }

    /// Reached point `name`: pauses there if asked to, and fails if the work must stop.
    pub fn reach(&self, name: &str) -> Result<()> {
        if std::env::var(PAUSE_ENV).is_ok_and(|v| v == name) {
            eprintln!("dolly: paused at {name} (pid {})", std::process::id());
            while !self.aborted() {
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
