//! The catalog of snapshots over two tiers, as the memory machine has them: manifests and
//! statuses go to durable storage at once (`--root`, default `/var/lib/dolly`); pages go to
//! the pool on the memory tier (`--pool`, default `/dev/shm/dolly`).
//!
//! ```text
//! ROOT/snapshots/ID/manifest.json   the image (immutable once written)
//! ROOT/snapshots/ID/record.json     status, timings, manifest checksum (replaced atomically)
//! ROOT/snapshots/ID/lock            flock: exclusive while capturing or deleting, shared while restoring
//! ROOT/locks/pid-PID                flock: held while a capture or restore works on PID (then removed)
//! POOL/ID/...                       the snapshot's pool files and saved file contents
//! ```

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::image::Manifest;

/// Default durable tier.
pub const DEFAULT_ROOT: &str = "/var/lib/dolly";
/// Default memory tier.
pub const DEFAULT_POOL: &str = "/dev/shm/dolly";

/// Where a snapshot is in its life (specs/statuses.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The freeze and metadata capture are under way.
    Capturing,
    /// Restorable: all pages are in the pool, not yet durable (a crash loses it).
    Created,
    /// Pages are durable: survives a crash or reboot.
    Persisted,
    /// Metadata without all of its pages: never restorable.
    Incomplete,
    /// The capture failed; kept only to say why.
    Failed,
}

impl Status {
    /// Whether a snapshot in this status can be restored.
    pub fn is_restorable(self) -> bool {
        matches!(self, Status::Created | Status::Persisted)
    }

    /// The status's name as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Capturing => "capturing",
            Status::Created => "created",
            Status::Persisted => "persisted",
            Status::Incomplete => "incomplete",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the catalog knows of a snapshot (`record.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Snapshot id.
    pub id: String,
    /// Name given at capture.
    pub name: Option<String>,
    /// PID of the captured root process.
    pub pid: i32,
    /// Its command name.
    pub comm: String,
    /// Status.
    pub status: Status,
    /// Why it failed or is incomplete.
    pub reason: Option<String>,
    /// When the capture began (RFC 3339).
    pub created_at: String,
    /// How long the process was frozen, in milliseconds.
    pub frozen_ms: Option<f64>,
    /// How long the whole capture took, in milliseconds.
    pub capture_ms: Option<f64>,
    /// Bytes of memory stored in the pool (for an incremental snapshot: those that changed
    /// since its parent).
    pub bytes: u64,
    /// Bytes of memory shared with earlier snapshots (an incremental snapshot).
    #[serde(default)]
    pub shared_bytes: u64,
    /// The snapshot it was captured against (`--parent`).
    #[serde(default)]
    pub parent: Option<String>,
    /// Number of processes.
    pub processes: u32,
    /// BLAKE3 of manifest.json.
    pub manifest_hash: Option<String>,
    /// How long making its pages durable took (from the end of the capture), once
    /// persisted.
    #[serde(default)]
    pub persisted_ms: Option<f64>,
    /// Bytes made durable so far, while it is being persisted.
    #[serde(default)]
    pub persist_done: Option<u64>,
    /// A background dolly is making it durable right now (found when listing).
    #[serde(default)]
    pub persisting: bool,
    /// That dolly's PID.
    #[serde(default)]
    pub persister: Option<i32>,
    /// Processes the freeze forked (copy-on-write, from inside) to read their last pages
    /// from after they ran on; 0: the freeze copied every page itself.
    #[serde(default)]
    pub forked: u32,
    /// Bytes read from those forks.
    #[serde(default)]
    pub forked_bytes: u64,
}

/// How a capture went, for its record.
#[derive(Debug, Clone, Copy)]
pub struct CaptureTimes {
    /// How long the processes were stopped, in milliseconds.
    pub frozen_ms: f64,
    /// How long the whole capture took, in milliseconds.
    pub capture_ms: f64,
    /// Processes forked at the freeze (see [`Record::forked`]).
    pub forked: u32,
    /// Bytes read from those forks after the thaw.
    pub forked_bytes: u64,
}

/// How long a restore waits for a snapshot still being captured.
const CAPTURE_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// How long a restore waits for a snapshot's lock otherwise (a capture committing it).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The catalog over a durable root and a memory-tier pool.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    pool: PathBuf,
}

fn make_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Writes `data` to `path` atomically: a temporary file, fsync, rename, fsync of the dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("a file path has a parent");
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// A new random id (16 lowercase hex digits), for snapshots and clones.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the kernel gives random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How old a snapshot directory without a record must be to be taken for the remains of a
/// capture killed as it began (see `Store::sweep_unbegun`).
const UNBEGUN_AGE: std::time::Duration = std::time::Duration::from_secs(60);

fn open_lock_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening lock {}", path.display()))
}

/// The current time, RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Takes a flock without waiting; `Ok(None)` if someone else holds it.
fn try_flock(file: File, arg: FlockArg) -> Result<Option<Flock<File>>> {
    match Flock::lock(file, arg) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(Error::sys("taking a lock", e)),
    }
}

/// Exclusive hold on a PID while a capture or restore works on it. Its lock file goes with
/// it (one per PID ever worked on would pile up otherwise).
#[derive(Debug)]
pub struct PidLock {
    path: PathBuf,
    lock: Option<Flock<File>>,
    /// The process that took it: a child forked meanwhile that drops its copy (a restore's
    /// stub unwinding) neither removes the file nor lets the lock go.
    owner: u32,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            std::mem::forget(self.lock.take());
            return;
        }
        // (Removed while still locked: whoever opened it meanwhile finds, once they lock it,
        // that it is not the file at its path any more, and tries again: see `lock_pid`.)
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A shared hold on a snapshot that keeps it from being deleted during a restore.
#[derive(Debug)]
pub struct SnapshotLock {
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating if needed) a store over `root` (durable) and `pool` (memory tier).
    pub fn open(root: impl Into<PathBuf>, pool: impl Into<PathBuf>) -> Result<Store> {
        let store = Store {
            root: root.into(),
            pool: pool.into(),
        };
        make_dir(&store.root.join("snapshots"))?;
        make_dir(&store.root.join("locks"))?;
        make_dir(&store.pool)?;
        Ok(store)
    }

    /// The durable root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pool directory of the memory tier.
    pub fn pool(&self) -> &Path {
        &self.pool
    }

    /// Directory holding a snapshot's manifest and record.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    /// Directory holding a snapshot's pages.
    pub fn pool_dir(&self, id: &str) -> PathBuf {
        self.pool.join(id)
    }

    /// Locks `pid` for a capture or restore; refuses if another dolly holds it.
    pub fn lock_pid(&self, pid: i32) -> Result<PidLock> {
        use std::os::unix::fs::MetadataExt;
        let path = self.root.join("locks").join(format!("pid-{pid}"));
        loop {
            let file = open_lock_file(&path)?;
            let Some(lock) = try_flock(file, FlockArg::LockExclusiveNonblock)? else {
                return Err(Error::busy(
                    format!("process {pid} is already being captured or restored by another dolly"),
                    "wait for the other capture or restore to finish, then try again",
                ));
            };
            // The lock counts only if its file is still the one at the path: its previous
            // holder may have removed it between the open and the lock.
            let locked = lock.metadata().map(|m| (m.dev(), m.ino()));
            let current = std::fs::metadata(&path).map(|m| (m.dev(), m.ino()));
            if let (Ok(locked), Ok(current)) = (locked, current) {
                if locked == current {
                    return Ok(PidLock {
                        path,
                        lock: Some(lock),
                        owner: std::process::id(),
                    });
                }
            }
        }
    }

    /// Starts a new snapshot in status `capturing`.
    pub fn begin(&self, name: Option<&str>, pid: i32, comm: &str) -> Result<Draft> {
        let id = new_id();
        let dir = self.snapshot_dir(&id);
        make_dir(&dir)?;
        // (Taken by another only if a listing took this directory, made over a minute ago,
        // for the remains of a capture killed as it began: see `sweep_unbegun`.)
        let lock = try_flock(
            open_lock_file(&dir.join("lock"))?,
            FlockArg::LockExclusiveNonblock,
        )?
        .ok_or_else(|| {
            Error::busy(
                format!("snapshot {id} was taken for abandoned as it began"),
                "capture again",
            )
        })?;
        make_dir(&self.pool_dir(&id))?;
        let record = Record {
            id: id.clone(),
            name: name.map(str::to_string),
            pid,
            comm: comm.to_string(),
            status: Status::Capturing,
            reason: None,
            created_at: now_rfc3339(),
            frozen_ms: None,
            capture_ms: None,
            bytes: 0,
            shared_bytes: 0,
            parent: None,
            processes: 0,
            manifest_hash: None,
            persisted_ms: None,
            persist_done: None,
            persisting: false,
            persister: None,
            forked: 0,
            forked_bytes: 0,
        };
        let draft = Draft {
            store: self.clone(),
            record,
            _lock: lock,
            done: false,
        };
        draft.write_record()?;
        Ok(draft)
    }

    /// Removes snapshot `id`'s directory and pool directory if it has no record, no capture
    /// holds its lock, and it is over a minute old (a capture that made it a moment ago
    /// may not have taken its lock yet): `begin` killed before it wrote the record.
    fn sweep_unbegun(&self, id: &str) {
        let dir = self.snapshot_dir(id);
        let old = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > UNBEGUN_AGE));
        if !old || dir.join("record.json").exists() {
            return;
        }
        let Ok(Some(_lock)) = open_lock_file(&dir.join("lock"))
            .and_then(|f| try_flock(f, FlockArg::LockExclusiveNonblock))
        else {
            return;
        };
        let _ = std::fs::remove_dir_all(self.pool_dir(id));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn ids(&self) -> Result<Vec<String>> {
        let dir = self.root.join("snapshots");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Whether snapshot `id` is being persisted, or still being captured (its worker about
    /// to commit it): work that ends by itself soon.
    fn finishing(&self, id: &str) -> Result<bool> {
        let record = self.record(id)?;
        // (A persister holds its lock a moment after it recorded `persisted`.)
        let persister = try_flock(
            open_lock_file(&self.snapshot_dir(id).join("persist.lock"))?,
            FlockArg::LockSharedNonblock,
        )?
        .is_none();
        Ok(persister || record.persisting || record.status == Status::Capturing)
    }

    /// The newest restorable snapshot of process `pid` running `comm`, else of any process
    /// running `comm` (another instance of the program): a parent for an incremental
    /// capture of it, if any.
    pub fn latest_of(&self, pid: i32, comm: &str) -> Result<Option<String>> {
        let list = self.list()?;
        let same_program = |r: &&Record| r.comm == comm && r.status.is_restorable();
        Ok(list
            .iter()
            .rfind(|r| r.pid == pid && same_program(r))
            .or_else(|| list.iter().rfind(same_program))
            .map(|r| r.id.clone()))
    }

    /// Every snapshot, with its current status, oldest first. (What a capture killed as it
    /// began left, a directory without its record, is removed.)
    pub fn list(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            match self.record(&id) {
                Ok(record) => out.push(record),
                Err(e) if e.kind() == crate::ErrorKind::NotFound => self.sweep_unbegun(&id),
                Err(_) => {}
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Finds a snapshot by id, id prefix or name.
    pub fn resolve(&self, key: &str) -> Result<String> {
        let ids = self.ids()?;
        if ids.iter().any(|id| id == key) {
            return Ok(key.to_string());
        }
        let mut matches: Vec<String> = ids
            .iter()
            .filter(|id| key.len() >= 4 && id.starts_with(key))
            .cloned()
            .collect();
        if matches.is_empty() {
            matches = self
                .list()?
                .into_iter()
                .filter(|r| r.name.as_deref() == Some(key))
                .map(|r| r.id)
                .collect();
        }
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(Error::not_found(
                format!("no snapshot {key:?} in {}", self.root.display()),
                "run `dolly snapshot list` to see the snapshots (and check --root)",
            )),
            _ => Err(Error::refused(
                format!("{key:?} matches several snapshots: {}", matches.join(", ")),
                "use the full snapshot id",
            )),
        }
    }

    /// A snapshot's record, with the status it has now: a capture whose dolly died shows as
    /// `failed`, a snapshot whose pool files are gone shows as `incomplete`.
    pub fn record(&self, id: &str) -> Result<Record> {
        let dir = self.snapshot_dir(id);
        let path = dir.join("record.json");
        let text = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(
                    format!("no snapshot {id:?} in {}", self.root.display()),
                    "run `dolly snapshot list` to see the snapshots",
                )
            } else {
                Error::io(format!("reading {}", path.display()), e)
            }
        })?;
        let mut record: Record = serde_json::from_slice(&text).map_err(|e| {
            Error::corrupt(
                format!("the record of snapshot {id} is damaged ({e})"),
                "delete the snapshot and capture again",
            )
        })?;
        match record.status {
            Status::Capturing => {
                let free = try_flock(
                    open_lock_file(&dir.join("lock"))?,
                    FlockArg::LockSharedNonblock,
                )?;
                if free.is_some() {
                    // Forks it held died with it: their processes reap them.
                    crate::capture::leftovers::clear(&dir);
                    record.status = Status::Failed;
                    record.reason = Some("the capture was interrupted (dolly was killed)".into());
                    // Nobody captures it any more: its pages are garbage.
                    let _ = std::fs::remove_dir_all(self.pool_dir(id));
                }
            }
            Status::Created | Status::Persisted if !self.pool_dir(id).is_dir() => {
                record.status = crate::persist::status_without_pool(self, id, record.status);
                if record.status == Status::Incomplete {
                    record.reason = Some(format!(
                        "the pool directory {} is gone (memory tier wiped?)",
                        self.pool_dir(id).display()
                    ));
                }
            }
            _ => {}
        }
        if record.status == Status::Created {
            let path = dir.join("persist.lock");
            record.persisting =
                try_flock(open_lock_file(&path)?, FlockArg::LockExclusiveNonblock)?.is_none();
            record.persister = record
                .persisting
                .then(|| std::fs::read_to_string(&path).ok()?.trim().parse().ok())
                .flatten();
        }
        Ok(record)
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let path = self.snapshot_dir(&record.id).join("record.json");
        let mut on_disk = record.clone();
        on_disk.persisting = false;
        on_disk.persister = None;
        let mut text = serde_json::to_vec_pretty(&on_disk).expect("record serializes");
        text.push(b'\n');
        write_atomic(&path, &text)
    }

    /// Claims the making durable of snapshot `id` (its `persist.lock`, with this process's
    /// PID in it), for [`Store::persisting`]; a capture's worker claims it as the freeze
    /// ends, so that the snapshot is never `created` without its persister.
    pub fn claim_persisting(&self, id: &str) -> Result<PersistClaim> {
        let path = self.snapshot_dir(id).join("persist.lock");
        // (A listing takes the lock for a moment to see whether a persister holds it: that
        // is not one, and is waited out.)
        let until = std::time::Instant::now() + PERSIST_LOCK_PATIENCE;
        let mine = loop {
            match try_flock(open_lock_file(&path)?, FlockArg::LockExclusiveNonblock)? {
                Some(mine) => break mine,
                None if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                None => {
                    return Err(Error::busy(
                        format!("snapshot {id} is being persisted already"),
                        format!("wait for it: `dolly snapshot info {id} --wait persisted`"),
                    ))
                }
            }
        };
        {
            use std::os::unix::fs::FileExt;
            let f: &File = &mine;
            let _ = f.set_len(0);
            let _ = f.write_all_at(std::process::id().to_string().as_bytes(), 0);
        }
        Ok(PersistClaim { _mine: mine })
    }

    /// Holds snapshot `id`, its making durable claimed (`claim`), while it is made durable:
    /// against deletion (which then waits for the persister to notice and stop), and
    /// visibly (`persisting` in listings).
    pub fn persisting(&self, id: &str, claim: PersistClaim) -> Result<PersistGuard> {
        let shared = try_flock(
            open_lock_file(&self.snapshot_dir(id).join("lock"))?,
            FlockArg::LockSharedNonblock,
        )?
        .ok_or_else(|| {
            Error::busy(
                format!("snapshot {id} is being deleted"),
                "nothing to persist",
            )
        })?;
        Ok(PersistGuard {
            _shared: shared,
            _claim: claim,
        })
    }

    /// Whether snapshot `id` is being deleted (a persister stops then).
    pub fn is_doomed(&self, id: &str) -> bool {
        self.snapshot_dir(id).join(".doomed").exists()
    }

    /// Records that snapshot `id`'s pages are durable.
    pub fn set_persisted(&self, id: &str, persisted_ms: f64) -> Result<Record> {
        let mut record = self.record(id)?;
        record.status = Status::Persisted;
        record.persisted_ms = Some(persisted_ms);
        record.persist_done = None;
        record.persisting = false;
        record.persister = None;
        self.write_record(&record)?;
        Ok(record)
    }

    /// Records how far making snapshot `id` durable has come.
    pub fn set_persist_progress(&self, id: &str, done: u64) -> Result<()> {
        let mut record = self.record(id)?;
        if record.status == Status::Created {
            record.persist_done = Some(done);
            self.write_record(&record)?;
        }
        Ok(())
    }

    /// Opens a snapshot for restore: checks its status and manifest checksum, parses the
    /// manifest, and holds it against deletion until the returned lock is dropped.
    pub fn load(&self, id: &str) -> Result<(Manifest, SnapshotLock)> {
        let dir = self.snapshot_dir(id);
        // A snapshot still being captured (its freeze is over, its pages are being stored) is
        // waited for; so is one whose capture is committing it (`created`, its lock not yet
        // let go).
        let started = std::time::Instant::now();
        let (record, lock) = loop {
            let record = self.record(id)?;
            let lock = try_flock(
                open_lock_file(&dir.join("lock"))?,
                FlockArg::LockSharedNonblock,
            )?;
            match lock {
                Some(lock) => break (self.record(id)?, lock),
                None if started.elapsed()
                    < if record.status == Status::Capturing {
                        CAPTURE_WAIT
                    } else {
                        LOCK_WAIT
                    } =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                None => {
                    return Err(Error::busy(
                        format!("snapshot {id} is being captured or deleted"),
                        "wait for that to finish",
                    ))
                }
            }
        };
        if !record.status.is_restorable() {
            let why = record
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            return Err(Error::refused(
                format!("snapshot {id} is {}{why}", record.status),
                "only created or persisted snapshots can be restored; capture again",
            ));
        }
        let path = dir.join("manifest.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let hash = blake3::hash(&text).to_hex().to_string();
        if record.manifest_hash.as_deref() != Some(hash.as_str()) {
            return Err(Error::corrupt(
                format!("the manifest of snapshot {id} does not match its checksum (damaged or truncated)"),
                "delete the snapshot and capture again",
            ));
        }
        let manifest = Manifest::from_json(&text)?;
        if !self.pool_dir(id).is_dir() && record.status == Status::Persisted {
            // The memory tier was wiped: put the pages back from the durable tier.
            crate::persist::rehydrate(self, id)?;
        }
        Ok((manifest, SnapshotLock { _lock: lock }))
    }

    /// Whether snapshot `id`'s pool can be put back from the durable tier (it is persisted
    /// and has a durable copy of its pages).
    pub fn can_repair_pool(&self, id: &str) -> bool {
        self.record(id).is_ok_and(|r| r.status == Status::Persisted)
            && crate::persist::has_durable_copy(self, id)
    }

    /// Replaces snapshot `id`'s damaged pool (truncated, punched, files missing) with the
    /// pages of its durable copy. Processes already mapping the old files keep them.
    pub fn repair_pool(&self, id: &str) -> Result<()> {
        let pool = self.pool_dir(id);
        let damaged = self
            .pool()
            .join(format!(".damaged-{id}-{}", std::process::id()));
        if pool.exists() {
            std::fs::rename(&pool, &damaged)
                .with_context(|| format!("moving the damaged {} aside", pool.display()))?;
        }
        let repaired = crate::persist::rehydrate(self, id);
        let _ = std::fs::remove_dir_all(&damaged);
        repaired
    }

    /// Deletes a snapshot (manifest, record and pages). Refuses while it is being captured
    /// or restored.
    pub fn delete(&self, id: &str) -> Result<()> {
        let dir = self.snapshot_dir(id);
        if !dir.join("record.json").exists() {
            return Err(Error::not_found(
                format!("no snapshot {id:?} in {}", self.root.display()),
                "run `dolly snapshot list` to see the snapshots",
            ));
        }
        // A persister stops at its next chunk when it sees the mark, and a capture that
        // has let the tree go ends soon: wait for them a little.
        let doomed_mark = dir.join(".doomed");
        let _ = std::fs::write(&doomed_mark, b"");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let _lock = loop {
            let lock = try_flock(
                open_lock_file(&dir.join("lock"))?,
                FlockArg::LockExclusiveNonblock,
            )?;
            match lock {
                Some(l) => break l,
                None if std::time::Instant::now() < deadline && self.finishing(id)? => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                None => {
                    let _ = std::fs::remove_file(&doomed_mark);
                    return Err(Error::busy(
                        format!("snapshot {id} is being captured or restored"),
                        "wait for that to finish, then delete it",
                    ));
                }
            }
        };
        let pool = self.pool_dir(id);
        if pool.exists() {
            std::fs::remove_dir_all(&pool)
                .with_context(|| format!("removing {}", pool.display()))?;
        }
        // Rename first so a half-removed snapshot never lists as anything.
        let doomed = self.root.join("snapshots").join(format!(".deleting-{id}"));
        std::fs::rename(&dir, &doomed).with_context(|| format!("removing {}", dir.display()))?;
        std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
    }
}

/// How long [`Store::claim_persisting`] tries for the persister's lock: longer than a listing
/// holds it to look (microseconds), far shorter than a persister holds it.
const PERSIST_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds a snapshot while it is made durable (see [`Store::persisting`]).
#[derive(Debug)]
pub struct PersistGuard {
    _shared: Flock<File>,
    _claim: PersistClaim,
}

/// The claim on making a snapshot durable (see [`Store::claim_persisting`]).
#[derive(Debug)]
pub struct PersistClaim {
    _mine: Flock<File>,
}

/// A snapshot being captured. Dropping it without [`Draft::commit`] marks it failed and
/// frees its pages.
#[derive(Debug)]
pub struct Draft {
    store: Store,
    record: Record,
    _lock: Flock<File>,
    done: bool,
}

impl Draft {
    /// The new snapshot's id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Directory for its pool files.
    pub fn pool_dir(&self) -> PathBuf {
        self.store.pool_dir(&self.record.id)
    }

    /// Its directory in the durable root (record, manifest).
    pub fn dir(&self) -> PathBuf {
        self.store.snapshot_dir(&self.record.id)
    }

    /// Records that the freeze is over (after `frozen_ms`): the snapshot stays `capturing`
    /// while its pages are stored. Returns the record as it now reads.
    pub fn note_frozen(&mut self, frozen_ms: f64) -> Result<Record> {
        self.record.frozen_ms = Some(frozen_ms);
        self.write_record()?;
        Ok(self.record.clone())
    }

    fn write_record(&self) -> Result<()> {
        let path = self.store.snapshot_dir(&self.record.id).join("record.json");
        let mut text = serde_json::to_vec_pretty(&self.record).expect("record serializes");
        text.push(b'\n');
        write_atomic(&path, &text)
    }

    /// Writes the manifest and makes the snapshot `created` (restorable).
    pub fn commit(mut self, manifest: &Manifest, times: CaptureTimes) -> Result<Record> {
        let text = manifest.to_json();
        let dir = self.store.snapshot_dir(&self.record.id);
        write_atomic(&dir.join("manifest.json"), &text)?;
        self.record.manifest_hash = Some(blake3::hash(&text).to_hex().to_string());
        self.record.status = Status::Created;
        self.record.frozen_ms = Some(times.frozen_ms);
        self.record.capture_ms = Some(times.capture_ms);
        self.record.forked = times.forked;
        self.record.forked_bytes = times.forked_bytes;
        self.record.bytes = manifest.stored_bytes();
        self.record.shared_bytes = manifest.shared_bytes();
        self.record.parent = manifest.parent.clone();
        self.record.processes = manifest.processes.len() as u32;
        self.write_record()?;
        self.done = true;
        Ok(self.record.clone())
    }

    /// When the capture began (RFC 3339).
    pub fn created_at(&self) -> &str {
        &self.record.created_at
    }

    /// Removes every trace of the snapshot: for refusals, which leave nothing behind.
    pub fn discard(mut self) {
        self.done = true;
        let _ = std::fs::remove_dir_all(self.pool_dir());
        let _ = std::fs::remove_dir_all(self.store.snapshot_dir(&self.record.id));
    }

    /// Marks the snapshot failed, saying why, and frees its pages.
    pub fn fail(mut self, reason: &str) {
        self.fail_in_place(reason);
    }

    fn fail_in_place(&mut self, reason: &str) {
        self.done = true;
        let _ = std::fs::remove_dir_all(self.pool_dir());
        self.record.status = Status::Failed;
        self.record.reason = Some(reason.to_string());
        let _ = self.write_record();
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.done {
            self.fail_in_place("the capture was abandoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("root"), dir.path().join("pool")).unwrap();
        (dir, store)
    }

    const TIMES: CaptureTimes = CaptureTimes {
        frozen_ms: 1.0,
        capture_ms: 2.0,
        forked: 0,
        forked_bytes: 0,
    };

    fn manifest(id: &str) -> Manifest {
        crate::image::tests::valid_manifest(id)
    }

    #[test]
    fn commit_makes_it_restorable_and_checks_the_hash() {
        let (_d, store) = store();
        let draft = store.begin(Some("warm"), 7, "sleep").unwrap();
        let id = draft.id().to_string();
        assert_eq!(store.record(&id).unwrap().status, Status::Capturing);
        draft.commit(&manifest(&id), TIMES).unwrap();
        assert_eq!(store.record(&id).unwrap().status, Status::Created);
        assert_eq!(store.resolve("warm").unwrap(), id);
        store.load(&id).unwrap();
        let path = store.snapshot_dir(&id).join("manifest.json");
        let mut text = std::fs::read(&path).unwrap();
        text.truncate(text.len() / 2);
        std::fs::write(&path, text).unwrap();
        let err = store.load(&id).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn abandoned_capture_is_failed_and_wiped_pool_is_incomplete() {
        let (_d, store) = store();
        let draft = store.begin(None, 7, "sleep").unwrap();
        let id = draft.id().to_string();
        drop(draft);
        let rec = store.record(&id).unwrap();
        assert_eq!(rec.status, Status::Failed);
        assert!(store.load(&id).is_err());

        let draft = store.begin(None, 8, "sleep").unwrap();
        let id = draft.id().to_string();
        draft.commit(&manifest(&id), TIMES).unwrap();
        std::fs::remove_dir_all(store.pool_dir(&id)).unwrap();
        assert_eq!(store.record(&id).unwrap().status, Status::Incomplete);
        assert_eq!(
            store.load(&id).unwrap_err().kind(),
            crate::ErrorKind::Refused
        );
    }

    #[test]
    fn what_a_capture_killed_as_it_began_left_is_swept_by_the_listing() {
        let (_d, store) = store();
        let begun = |id: &str, age_s: u64| {
            let dir = store.snapshot_dir(id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::create_dir_all(store.pool_dir(id)).unwrap();
            std::fs::write(dir.join("lock"), b"").unwrap();
            let then = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
            File::open(&dir).unwrap().set_modified(then).unwrap();
        };
        // Killed as it began, long ago: both directories go.
        begun("00000000000000aa", 120);
        // Just made (its capture may be about to take its lock): kept.
        begun("00000000000000bb", 0);
        // Old, but its capture holds the lock: kept.
        begun("00000000000000cc", 120);
        let held = open_lock_file(&store.snapshot_dir("00000000000000cc").join("lock")).unwrap();
        let _held = try_flock(held, FlockArg::LockExclusiveNonblock)
            .unwrap()
            .unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(!store.snapshot_dir("00000000000000aa").exists());
        assert!(!store.pool_dir("00000000000000aa").exists());
        for kept in ["00000000000000bb", "00000000000000cc"] {
            assert!(store.snapshot_dir(kept).exists(), "{kept}");
            assert!(store.pool_dir(kept).exists(), "{kept}");
        }
    }

    #[test]
    fn delete_waits_for_a_persister_that_just_recorded_persisted() {
        let (_d, store) = store();
        let draft = store.begin(None, 7, "sleep").unwrap();
        let id = draft.id().to_string();
        draft.commit(&manifest(&id), TIMES).unwrap();
        let guard = store
            .persisting(&id, store.claim_persisting(&id).unwrap())
            .unwrap();
        store.set_persisted(&id, 1.0).unwrap();
        let done = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(guard);
        });
        store.delete(&id).unwrap();
        done.join().unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn delete_refuses_while_restoring() {
        let (_d, store) = store();
        let draft = store.begin(None, 7, "sleep").unwrap();
        let id = draft.id().to_string();
        draft.commit(&manifest(&id), TIMES).unwrap();
        let (_m, lock) = store.load(&id).unwrap();
        assert_eq!(
            store.delete(&id).unwrap_err().kind(),
            crate::ErrorKind::Busy
        );
        drop(lock);
        store.delete(&id).unwrap();
        assert!(store.list().unwrap().is_empty());
        assert_eq!(
            store.delete(&id).unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
    }

    #[test]
    fn pid_lock_is_exclusive() {
        let (_d, store) = store();
        let held = store.lock_pid(99).unwrap();
        assert_eq!(
            store.lock_pid(99).unwrap_err().kind(),
            crate::ErrorKind::Busy
        );
        drop(held);
        let lock_file = store.root.join("locks").join("pid-99");
        assert!(!lock_file.exists(), "the lock file goes with the lock");
        let again = store.lock_pid(99).unwrap();
        assert!(lock_file.exists());
        drop(again);
    }
}
