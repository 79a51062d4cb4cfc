//! Waiting for a snapshot to reach a status (`created`, `persisted`), for a caller that did
//! not wait for it when it captured: `dolly snapshot info ID --wait ...` and `snapshot
//! persist`.

use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, ErrorKind, Result};
use crate::store::{Record, Status, Store};

/// How long a `created` snapshot may go with nobody making it durable before it counts as
/// left so: the persister starts within milliseconds of the commit that makes a snapshot
/// `created`, and writes its progress to the record as it goes.
pub const UNPERSISTED_AFTER: Duration = Duration::from_secs(5);

/// How often the record is read again.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// Waits until snapshot `id` is `wanted` (`Created`: restorable, or already persisted;
/// `Persisted`: durable) and returns its record. Fails at once, naming why, once it can
/// never get there (failed, incomplete, or created with nobody making it durable: see
/// [`UNPERSISTED_AFTER`]), and after `timeout`.
pub fn wait_for(store: &Store, id: &str, wanted: Status, timeout: Duration) -> Result<Record> {
    let deadline = Instant::now() + timeout;
    loop {
        let record = store.record(id)?;
        let reason = || {
            record
                .reason
                .clone()
                .unwrap_or_else(|| "no reason kept".into())
        };
        match record.status {
            Status::Persisted => return Ok(record),
            Status::Created if wanted == Status::Created => return Ok(record),
            Status::Failed => {
                return Err(Error::refused(
                    format!("snapshot {id} failed: {}", reason()),
                    "capture again",
                ))
            }
            Status::Incomplete => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("snapshot {id} is incomplete: {}", reason()),
                )
                .with_remedy("capture again"))
            }
            Status::Created
                if !record.persisting && untouched_for(store, id) > UNPERSISTED_AFTER =>
            {
                return Err(Error::refused(
                    format!(
                        "snapshot {id} is created, but nothing is making it durable (its \
                         persister ended before it was done)"
                    ),
                    format!("run `dolly snapshot persist {id}`"),
                ))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::busy(
                format!(
                    "snapshot {id} is still {} after {timeout:?}",
                    record.status.as_str()
                ),
                "wait longer (--timeout)",
            ));
        }
        std::thread::sleep(LOOK_EVERY);
    }
}

/// How long snapshot `id`'s record has gone unwritten.
fn untouched_for(store: &Store, id: &str) -> Duration {
    let record = store.snapshot_dir(id).join("record.json");
    std::fs::metadata(record)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}
