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
