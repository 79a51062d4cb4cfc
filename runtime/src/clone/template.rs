//! The library API for forking prepared environments: capture a process once it is warm
//! (modules imported, data loaded), then start a clone of it per test, per request, per
//! experiment — each from exactly that state, each isolated from the others.
//!
//! ```no_run
//! use runtime::clone::{CloneOptions, Template};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = snapshot::Store::open("/var/lib/dolly", "/dev/shm/dolly")?;
//! let template = Template::capture(&store, 4242)?;       // the warmed-up process
//! let opts = CloneOptions { overlays: vec!["/srv/work".into()], ..Default::default() };
//! let clone = template.spawn(&opts)?;                     // runs beside the original
//! std::fs::write(clone.path("/srv/work/case"), "7")?;     // its private view of /srv/work
//! let exit = clone.wait(std::time::Duration::from_secs(10))?;
//! let result = std::fs::read_to_string(clone.written("/srv/work/result").unwrap())?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapshot::error::{Error, ErrorKind, Result};
use snapshot::{CaptureOptions, Checkpoints, Store};

use super::{record, CloneOptions, CloneRecord, Exit};

/// A snapshot to start clones from.
#[derive(Debug, Clone)]
pub struct Template {
    store: Store,
    snapshot: String,
}

impl Template {
    /// Captures process `pid` (which runs on) as the template.
    pub fn capture(store: &Store, pid: i32) -> Result<Template> {
        let opts = CaptureOptions {
            pid,
            ..Default::default()
        };
        let report = snapshot::capture(store, &opts, &Checkpoints::none())?;
        Ok(Template {
            store: store.clone(),
            snapshot: report.record.id,
        })
    }

    /// Uses an existing snapshot (id, id prefix or name) as the template.
    pub fn from_snapshot(store: &Store, key: &str) -> Result<Template> {
        Ok(Template {
            store: store.clone(),
            snapshot: store.resolve(key)?,
        })
    }

    /// The snapshot's id.
    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// Starts a clone; it runs until it ends by itself, [`Clone::kill`], or drop.
    pub fn spawn(&self, opts: &CloneOptions) -> Result<Clone> {
        Ok(Clone {
            store: self.store.clone(),
            record: super::start(&self.store, &self.snapshot, opts)?,
        })
    }
}

/// A running clone; ended (and its overlay layers removed) when dropped.
#[derive(Debug)]
pub struct Clone {
    store: Store,
    record: CloneRecord,
}

impl Clone {
    /// What the registry knows of it (ids and PIDs).
    pub fn record(&self) -> &CloneRecord {
        &self.record
    }

    /// Its restored process as the host sees it.
    pub fn host_pid(&self) -> i32 {
        self.record.host_pid
    }

    /// A path as the clone sees it, reachable from the host while it runs (through
    /// `/proc/PID/root`): writes there land in its private overlay, not on the host.
    pub fn path(&self, path: impl AsRef<Path>) -> PathBuf {
        let p = path.as_ref();
        PathBuf::from(format!("/proc/{}/root", self.record.host_pid))
            .join(p.strip_prefix("/").unwrap_or(p))
    }

    /// Where a file the clone wrote under one of its overlaid directories is kept (its
    /// overlay's upper layer); readable after the clone ended, until it is dropped.
    pub fn written(&self, path: impl AsRef<Path>) -> Option<PathBuf> {
        let path = path.as_ref();
        self.record.overlays.iter().find_map(|o| {
            let rel = path.strip_prefix(&o.dir).ok()?;
            let f = o.upper.join(rel);
            f.exists().then_some(f)
        })
    }

    /// Waits until the clone ends, up to `timeout`; returns how its process ended.
    pub fn wait(&self, timeout: Duration) -> Result<Exit> {
        let deadline = Instant::now() + timeout;
        while self.record.is_running() {
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::System,
                    format!("clone {} still runs after {timeout:?}", self.record.id),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.record.exit(&self.store).ok_or_else(|| {
            Error::new(
                ErrorKind::System,
                format!("clone {} ended without an exit status", self.record.id),
            )
        })
    }

    /// Ends the clone now and removes what it left.
    pub fn kill(mut self) -> Result<()> {
        self.end()
    }

    fn end(&mut self) -> Result<()> {
        if self.record.id.is_empty() {
            return Ok(());
        }
        let result = record::kill(&self.store, &self.record);
        self.record.id.clear();
        result
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        let _ = self.end();
    }
}
