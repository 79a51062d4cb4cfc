//! Waiting for a snapshot to reach a status (`created`, `persisted`), for a caller that did
//! not wait for it when it captured: `dolly snapshot info ID --wait ...` and `snapshot
//! persist`.

use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, ErrorKind, Result};
use crate::store::{Record, Status, Store};

/// How long a `created` snapshot may be seen with nobody making it durable, its record
/// unchanged, before it counts as left so: a capture's worker claims the making durable
/// before the snapshot is `created` and holds it until it is done (see
/// [`Store::claim_persisting`]), so this only spans a listing's brief look at the lock.
pub const UNPERSISTED_AFTER: Duration = Duration::from_secs(5);

/// How often the record is read again.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// Waits until snapshot `id` is `wanted` (`Created`: restorable, or already persisted;
/// `Persisted`: durable) and returns its record. Fails at once, naming why, once it can
/// never get there: failed, incomplete, or created with nobody making it durable (seen so,
/// its record unchanged, for [`UNPERSISTED_AFTER`]: measured on this clock, not against the
/// record's time, which another machine's clock may have set). After `timeout`, fails with
/// `remedy`.
pub fn wait_for(
    store: &Store,
    id: &str,
    wanted: Status,
    timeout: Duration,
    remedy: &str,
) -> Result<Record> {
    let deadline = Instant::now() + timeout;
    // Since when the snapshot has been seen created with nobody persisting it, and its
    // record's modification time then.
    let mut left_since: Option<(Instant, Option<SystemTime>)> = None;
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
            Status::Created if !record.persisting => {
                let written = written_at(store, id);
                match left_since {
                    Some((since, was)) if was == written => {
                        if since.elapsed() >= UNPERSISTED_AFTER {
                            return Err(Error::refused(
                                format!(
                                    "snapshot {id} is created, but nothing is making it durable \
                                     (its persister ended before it was done)"
                                ),
                                format!("run `dolly snapshot persist {id}`"),
                            ));
                        }
                    }
                    _ => left_since = Some((Instant::now(), written)),
                }
            }
            _ => left_since = None,
        }
        if Instant::now() >= deadline {
            return Err(Error::busy(
                format!(
                    "snapshot {id} is still {} after {timeout:?}",
                    record.status.as_str()
                ),
                remedy,
            ));
        }
        std::thread::sleep(LOOK_EVERY);
    }
}

/// When snapshot `id`'s record was last written, if that can be read.
fn written_at(store: &Store, id: &str) -> Option<SystemTime> {
    let record = store.snapshot_dir(id).join("record.json");
    std::fs::metadata(record).and_then(|m| m.modified()).ok()
}
