//! The parent of an incremental capture (`--parent ID`): a restorable snapshot, held
//! against deletion while the capture reads its pages.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::Manifest;
use crate::resource::incremental::ParentPages;
use crate::store::{SnapshotLock, Store};

/// A parent snapshot, loaded and held.
#[derive(Debug)]
pub struct Parent {
    id: String,
    manifest: Manifest,
    pool_dir: PathBuf,
    _lock: SnapshotLock,
}

impl Parent {
    /// Loads snapshot `id` as a parent (its pages put back from the durable tier if the
    /// memory tier lost them). Refuses one that cannot be restored.
    pub fn load(store: &Store, id: &str) -> Result<Parent> {
        let (manifest, lock) = store.load(id).map_err(|e| {
            let remedy = "pick a created or persisted snapshot as --parent (`dolly snapshot list`), or capture without --parent";
            Error::new(e.kind(), format!("cannot capture against parent {id}: {}", e.message()))
                .with_remedy(remedy)
        })?;
        Ok(Parent {
            id: id.to_string(),
            pool_dir: store.pool_dir(id),
            manifest,
            _lock: lock,
        })
    }

    /// The pages the parent stored of process `pid`, the `index`th of the tree: the
    /// parent's process with the same PID, else the one at the same place in its tree (a
    /// clone's processes have other PIDs on the host).
    pub fn pages_of(&self, pid: i32, index: usize) -> Result<Option<ParentPages>> {
        let procs = &self.manifest.processes;
        let Some(proc) = procs
            .iter()
            .find(|p| p.pid == pid)
            .or_else(|| procs.get(index))
        else {
            return Ok(None);
        };
        ParentPages::of(proc, &self.id, &self.pool_dir)
    }
}

/// The snapshot process `pid` was restored or cloned from, if it still maps that
/// snapshot's pool and the snapshot is restorable: what a capture of it is made against by
/// default (its memory read from that pool is then shared, not read again).
pub fn restored_from(store: &Store, pid: i32) -> Option<String> {
    let proc = crate::proc::ProcDir::new(nix::unistd::Pid::from_raw(pid));
    let pool = store
        .pool()
        .canonicalize()
        .unwrap_or_else(|_| store.pool().to_path_buf());
    proc.maps_without_flags().ok().and_then(|maps| {
        maps.iter().find_map(|m| {
            let path = std::path::Path::new(&m.path);
            if !m.path.ends_with(crate::resource::memory::POOL_FILE_SUFFIX)
                || !path.starts_with(&pool)
            {
                return None;
            }
            let id = path.parent()?.file_name()?.to_str()?.to_string();
            store
                .record(&id)
                .is_ok_and(|r| r.status.is_restorable())
                .then_some(id)
        })
    })
}

/// The parent `--parent auto` picks for process `pid`: the snapshot it was restored from
/// ([`restored_from`]), else the newest snapshot of the same process (PID and command),
/// else of the same command; `None` for a full capture.
pub fn auto_parent(store: &Store, pid: i32) -> Result<Option<String>> {
    if let Some(id) = restored_from(store, pid) {
        return Ok(Some(id));
    }
    let proc = crate::proc::ProcDir::new(nix::unistd::Pid::from_raw(pid));
    let comm = proc.stat().map(|s| s.comm).unwrap_or_default();
    store.latest_of(pid, &comm)
}
