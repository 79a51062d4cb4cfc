//! The page pool: one sparse file per process on the memory tier (tmpfs here, a DAX mount
//! where there is one).
//!
//! Each memory area with stored pages owns a *slot*: `2^47` bytes of the file, the size of
//! the whole x86_64 user address space. Page `n` of the area lives at byte
//! `(slot << 47) + n * 4096`. A restore maps runs of stored pages with one
//! `mmap(MAP_PRIVATE|MAP_FIXED)` each (copy-on-write; O(runs), not O(bytes)). The slot
//! spacing means that if the program later grows such a mapping with `mremap`, the new
//! pages come from the slot's unwritten (hole) part and read as zeros, as they would for
//! anonymous memory, instead of exposing another area's pages or raising SIGBUS.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Context, Error, Result};
use crate::sys::PAGE_SIZE;

/// log2 of the slot size.
pub const SLOT_SHIFT: u32 = 47;

/// Slots per pool file: the file must stay below 2^63 bytes.
pub const MAX_SLOTS: u32 = (1 << (63 - SLOT_SHIFT)) - 1;

/// Byte offset of a slot in its pool file.
pub fn slot_offset(slot: u32) -> u64 {
    (slot as u64) << SLOT_SHIFT
}

/// Byte offset in the pool file of page `page` of a slot.
pub fn page_offset(slot: u32, page: u64) -> u64 {
    slot_offset(slot) + page * PAGE_SIZE
}

/// Writes one process's pool file during a capture.
#[derive(Debug)]
pub struct PoolWriter {
    file: File,
    path: PathBuf,
    slots: u32,
}

/// What to do when the memory tier is full.
const POOL_FULL: &str =
    "the memory tier is full: free space in the pool (--pool) or delete snapshots";

impl PoolWriter {
    /// Creates a new, empty pool file (it must not exist).
    pub fn create(path: &Path) -> Result<PoolWriter> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating pool file {}", path.display()))?;
        Ok(PoolWriter {
            file,
            path: path.to_path_buf(),
            slots: 0,
        })
    }

    /// Reserves the next slot and grows the file to hold it.
    pub fn new_slot(&mut self) -> Result<u32> {
        if self.slots >= MAX_SLOTS {
            return Err(Error::refused(
                format!("the process has more than {MAX_SLOTS} memory areas with data"),
                "such processes are not supported",
            ));
        }
        let slot = self.slots;
        self.slots += 1;
        if let Err(e) = self.file.set_len(self.size()) {
            let remedy = if e.raw_os_error() == Some(libc::EFBIG) {
                "put the pool on tmpfs or a DAX mount (--pool): its files hold sparse 128 TiB slots"
            } else {
                "check the pool directory (--pool) is writable and not full"
            };
            return Err(
                Error::io(format!("growing pool file {}", self.path.display()), e)
                    .with_remedy(remedy),
            );
        }
        Ok(slot)
    }

    /// The file size: the end of the last slot.
    pub fn size(&self) -> u64 {
        slot_offset(self.slots)
    }

    /// Writes `data` into the file at byte `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset).map_err(|e| {
            let full = e.raw_os_error() == Some(libc::ENOSPC);
            let err = Error::io(format!("writing pool file {}", self.path.display()), e);
            if full {
                err.with_remedy(POOL_FULL)
            } else {
                err
            }
        })
    }

    /// Allocates `len` bytes of the file at byte `offset` and maps them for writing. (A
    /// full pool is an error here, not a SIGBUS while copying.)
    pub fn map(&self, offset: u64, len: u64) -> Result<MmapMut> {
        nix::fcntl::fallocate(
            &self.file,
            nix::fcntl::FallocateFlags::empty(),
            offset as i64,
            len as i64,
        )
        .map_err(|e| {
            Error::sys(
                format!(
                    "allocating {len} bytes in pool file {}",
                    self.path.display()
                ),
                e,
            )
            .with_remedy(POOL_FULL)
        })?;
        // SAFETY: the pool file is private to this capture until the manifest names it;
        // nothing else truncates or writes it while the map lives.
        unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len as usize)
                .map_mut(&self.file)
        }
        .with_context(|| format!("mapping pool file {}", self.path.display()))
    }

    /// The open pool file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Checks, in O(1), that a pool file still holds what the manifest says: it is not shorter
/// than `size`, and it has at least `pages` pages allocated (a wiped, truncated or
/// hole-punched pool has fewer). Reading a hole of a pool mapping allocates a zero page,
/// so a file may hold more than it was written with, never less.
pub fn check_file(file: &File, path: &Path, size: u64, pages: u64) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    let lost = |what: String| {
        Error::corrupt(
            format!("pool file {} {what}", path.display()),
            "the memory tier lost this snapshot's pages (wiped, truncated or punched pool); capture it again",
        )
    };
    if meta.len() < size {
        return Err(lost(format!(
            "is truncated ({} bytes, expected {size})",
            meta.len()
        )));
    }
    let held = meta.blocks() * 512 / PAGE_SIZE;
    if held < pages {
        return Err(lost(format!(
            "is missing pages: it holds {held}, the snapshot stored {pages}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_far_apart_and_lost_pages_are_detected() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("p.pages");
        let mut w = PoolWriter::create(&path).unwrap();
        let a = w.new_slot().unwrap();
        let b = w.new_slot().unwrap();
        assert_eq!(slot_offset(b) - slot_offset(a), 1 << 47);
        let mut m = w.map(page_offset(b, 3), 2 * PAGE_SIZE).unwrap();
        m.fill(0xab);
        m.flush().unwrap();
        check_file(w.file(), &path, w.size(), 2).unwrap();
        assert!(
            check_file(w.file(), &path, w.size(), 3).is_err(),
            "a page missing"
        );
        assert!(
            check_file(w.file(), &path, w.size() + 1, 2).is_err(),
            "truncated"
        );
    }

    #[test]
    fn refuses_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pages");
        std::fs::write(&path, b"x").unwrap();
        assert!(PoolWriter::create(&path).is_err());
    }
}
