//! Making a created snapshot durable, after the capture returned: its pool files are
//! fsync'd where the pool is on persistent media, or copied into the durable tier where it
//! is in memory (tmpfs), as compact extent files (a pool file's sparse 128 TiB slots fit no
//! disk filesystem). A restore whose pool is gone (a reboot wiped the memory tier) puts the
//! pages back from there first.
//!
//! ```text
//! ROOT/snapshots/ID/pages/index.json   the pool files: name, size, extents, BLAKE3
//! ROOT/snapshots/ID/pages/NAME         a pool file's data extents, back to back
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoints;
use crate::error::{Context, Error, Result};
use crate::store::{PersistClaim, Record, Status, Store};

/// The durable copy of one pool file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DurableFile {
    /// Its name in the pool directory.
    pub name: String,
    /// Its size (holes included).
    pub size: u64,
    /// `[offset, length]` of each data extent, in file order; their bytes follow each other
    /// in the durable file.
    pub extents: Vec<[u64; 2]>,
    /// BLAKE3 of the durable file.
    pub blake3: String,
}

/// `pages/index.json`: the durable copy of a snapshot's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DurableIndex {
    /// Every pool file.
    pub files: Vec<DurableFile>,
}

/// Copies are made in chunks of this size (progress and cancellation in between).
const CHUNK: u64 = 16 << 20;

/// ramfs's `statfs` type.
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// Whether files in `dir` live in memory only (tmpfs, ramfs): a crash or reboot loses them.
pub fn is_volatile(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == nix::sys::statfs::TMPFS_MAGIC || t == nix::sys::statfs::FsType(RAMFS_MAGIC)
    })
}

/// A directory only its owner can read: it holds process memory.
fn private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// A new file only its owner can read.
fn private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// The data extents of a sparse file (`SEEK_DATA`/`SEEK_HOLE`).
fn data_extents(file: &File, size: u64) -> Result<Vec<[u64; 2]>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < size {
        let start = match lseek(file, at, Whence::SeekData) {
            Ok(o) => o,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(Error::sys("seeking data", e)),
        };
        let end =
            lseek(file, start, Whence::SeekHole).map_err(|e| Error::sys("seeking a hole", e))?;
        out.push([start as u64, (end - start) as u64]);
        at = end;
    }
    Ok(out)
}

/// Makes snapshot `id` durable and marks it `persisted`, noting its progress in its record
/// (`persist_done`, as `list` shows it) every [`NOTE_EVERY`] bytes; with `claim` if it is
/// taken already (see [`Store::claim_persisting`]), else claiming it. `checkpoints` may stop
/// it (then the snapshot stays `created`, still restorable from the pool). Stops early if
/// the snapshot is deleted meanwhile; leaves one another persister made durable as it is.
pub fn persist(
    store: &Store,
    id: &str,
    claim: Option<PersistClaim>,
    checkpoints: &Checkpoints,
) -> Result<Record> {
    let claim = match claim {
        Some(claim) => claim,
        None => store.claim_persisting(id)?,
    };
    let started = Instant::now();
    let _guard = store.persisting(id, claim)?;
    // (Under the guard: another persister may have made it durable meanwhile.)
    let record = store.record(id)?;
    match record.status {
        Status::Persisted => return Ok(record),
        Status::Created => {}
        other => {
            return Err(Error::refused(
                format!("snapshot {id} is {}: nothing to persist", other.as_str()),
                "capture again",
            ))
        }
    }
    let pool = store.pool_dir(id);
    let mut names: Vec<String> = std::fs::read_dir(&pool)
        .with_context(|| format!("reading {}", pool.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    checkpoints.reach("persist:copying")?;
    if !is_volatile(&pool) {
        // The pool is on persistent media: syncing it makes it durable.
        for name in &names {
            File::open(pool.join(name))
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", pool.join(name).display()))?;
        }
        File::open(&pool)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", pool.display()))?;
    } else {
        let mut last = 0;
        copy_to_durable(store, id, &names, checkpoints, &mut |done, _total| {
            if done - last >= NOTE_EVERY {
                last = done;
                let _ = store.set_persist_progress(id, done);
            }
        })?;
    }
    store.set_persisted(id, started.elapsed().as_secs_f64() * 1e3)
}

/// How often [`persist`] notes its progress, in bytes.
pub const NOTE_EVERY: u64 = 64 << 20;

fn copy_to_durable(
    store: &Store,
    id: &str,
    names: &[String],
    checkpoints: &Checkpoints,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    let pool = store.pool_dir(id);
    let dest = store.snapshot_dir(id).join("pages");
    // A copy left half done by an earlier, interrupted attempt is started over.
    let _ = std::fs::remove_dir_all(&dest);
    private_dir(&dest)?;
    let mut files = Vec::new();
    let mut sources = Vec::new();
    let mut total = 0;
    let parent = store.record(id).ok().and_then(|r| r.parent);
    let mut linked = Vec::new();
    for name in names {
        // A pool file shared with an earlier snapshot shares its durable copy too.
        if let Some((path, entry)) = durable_twin(store, parent.as_deref(), name) {
            if std::fs::hard_link(&path, dest.join(name)).is_ok() {
                linked.push(entry);
                continue;
            }
        }
        let file = File::open(pool.join(name))
            .with_context(|| format!("opening {}", pool.join(name).display()))?;
        let size = file.metadata().context("reading a pool file's size")?.len();
        let extents = data_extents(&file, size)?;
        total += extents.iter().map(|e| e[1]).sum::<u64>();
        sources.push(file);
        files.push(DurableFile {
            name: name.clone(),
            size,
            extents,
            blake3: String::new(),
        });
    }
    let mut done = 0;
    let mut buf = vec![0u8; CHUNK as usize];
    for (entry, src) in files.iter_mut().zip(&sources) {
        let path = dest.join(&entry.name);
        let out = private_file(&path)?;
        let mut hash = blake3::Hasher::new();
        let mut at = 0u64;
        for &[offset, len] in &entry.extents {
            let mut copied = 0;
            while copied < len {
                if store.is_doomed(id) {
                    return Err(Error::new(
                        crate::ErrorKind::System,
                        format!("snapshot {id} was deleted while it was being persisted"),
                    ));
                }
                checkpoints.reach("persist:chunk")?;
                let n = (len - copied).min(CHUNK) as usize;
                src.read_exact_at(&mut buf[..n], offset + copied)
                    .context("reading the pool")?;
                out.write_all_at(&buf[..n], at)
                    .with_context(|| format!("writing {}", path.display()))?;
                hash.update(&buf[..n]);
                copied += n as u64;
                at += n as u64;
                done += n as u64;
                progress(done, total);
            }
        }
        out.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        entry.blake3 = hash.finalize().to_hex().to_string();
    }
    files.extend(linked);
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let index = serde_json::to_vec_pretty(&DurableIndex { files }).expect("index serializes");
    crate::store::write_atomic(&dest.join("index.json"), &index)
}

/// The durable copy an earlier snapshot made of pool file `name` of an incremental snapshot
/// whose parent is `parent`: the file is named `ORIGIN-FILE` after the snapshot that wrote
/// it, and is `FILE` in ORIGIN's durable copy, or `name` in the parent's (which shares it).
fn durable_twin(
    store: &Store,
    parent: Option<&str>,
    name: &str,
) -> Option<(std::path::PathBuf, DurableFile)> {
    // (Own pool files, `PID.dolly-pages`, have no twin: they are this snapshot's.)
    let (origin, file) = crate::resource::incremental::shared_file_origin(name)?;
    let candidates = [Some((origin, file)), parent.map(|p| (p, name))];
    candidates
        .into_iter()
        .flatten()
        .find_map(|(snapshot, file)| {
            let dir = store.snapshot_dir(snapshot).join("pages");
            let index: DurableIndex =
                serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
            let mut entry = index.files.into_iter().find(|f| f.name == file)?;
            let path = dir.join(file);
            path.is_file().then(|| {
                entry.name = name.to_string();
                (path, entry)
            })
        })
}

/// Puts a persisted snapshot's pages back into the pool from the durable tier (after the
/// memory tier was wiped), checking each file against its checksum.
pub fn rehydrate(store: &Store, id: &str) -> Result<()> {
    let src = store.snapshot_dir(id).join("pages");
    let text = std::fs::read(src.join("index.json")).map_err(|e| {
        Error::corrupt(
            format!("snapshot {id} has no durable copy of its pages ({e})"),
            "capture again",
        )
    })?;
    let index: DurableIndex = serde_json::from_slice(&text).map_err(|e| {
        Error::corrupt(
            format!("the durable page index of snapshot {id} is damaged ({e})"),
            "capture again",
        )
    })?;
    let pool = store.pool_dir(id);
    let tmp = store
        .pool()
        .join(format!(".rehydrating-{id}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    private_dir(&tmp)?;
    let result = (|| -> Result<()> {
        let mut buf = vec![0u8; CHUNK as usize];
        for entry in &index.files {
            let input = File::open(src.join(&entry.name)).map_err(|e| {
                Error::corrupt(
                    format!(
                        "durable pages {} of snapshot {id} are missing ({e})",
                        entry.name
                    ),
                    "capture again",
                )
            })?;
            let out = private_file(&tmp.join(&entry.name))?;
            out.set_len(entry.size).context("sizing a pool file")?;
            let mut hash = blake3::Hasher::new();
            let mut at = 0u64;
            for &[offset, len] in &entry.extents {
                let mut copied = 0;
                while copied < len {
                    let n = (len - copied).min(CHUNK) as usize;
                    input.read_exact_at(&mut buf[..n], at).map_err(|e| {
                        Error::corrupt(
                            format!(
                                "durable pages {} of snapshot {id} are truncated ({e})",
                                entry.name
                            ),
                            "capture again",
                        )
                    })?;
                    out.write_all_at(&buf[..n], offset + copied)
                        .context("filling the pool")?;
                    hash.update(&buf[..n]);
                    copied += n as u64;
                    at += n as u64;
                }
            }
            if hash.finalize().to_hex().as_str() != entry.blake3 {
                return Err(Error::corrupt(
                    format!(
                        "durable pages {} of snapshot {id} do not match their checksum",
                        entry.name
                    ),
                    "capture again",
                ));
            }
        }
        std::fs::rename(&tmp, &pool).with_context(|| format!("putting {} in place", pool.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Whether snapshot `id` has a complete durable copy of its pages.
pub fn has_durable_copy(store: &Store, id: &str) -> bool {
    store
        .snapshot_dir(id)
        .join("pages")
        .join("index.json")
        .is_file()
}

/// Status a persisted snapshot keeps when its pool is gone but its pages are in the durable
/// tier: still persisted (a restore puts them back).
pub fn status_without_pool(store: &Store, id: &str, status: Status) -> Status {
    match status {
        Status::Persisted if has_durable_copy(store, id) => Status::Persisted,
        Status::Created | Status::Persisted => Status::Incomplete,
        s => s,
    }
}
