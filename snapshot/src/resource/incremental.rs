//! Incremental capture (`--parent`): what a parent snapshot holds of a process, so that a
//! capture compares each page it copies with the parent's page at the same address, then
//! (if that differs) with any page of the parent's of the same content, found by hash (the
//! parent's pages not found at their address are indexed after the first pass), and stores
//! only those found nowhere. The others are shared: the new snapshot's pool
//! directory gets a hard link to the parent's pool file, so deleting the parent keeps them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use crate::image::{PoolFile, Process, SharedRuns};
use crate::resource::memory::{add_page, merge_ranges, subtract_ranges};
use crate::sys::PAGE_SIZE;

/// Bytes of the parent's pool files read at a time while they are hashed.
const HASH_CHUNK: usize = 1 << 20;

/// A pool file of the parent that a process's pages may be shared with.
#[derive(Debug)]
struct ParentFile {
    /// Its name in the new snapshot's pool directory.
    name: String,
    /// Where it is now (in the parent's pool directory).
    path: PathBuf,
    file: File,
    /// Its index in the new process's `base_pools`, once a page is shared with it.
    base: Option<u32>,
}

/// Addresses `[start, end)` whose parent pages are in file `file` from page `file_page`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u64,
    end: u64,
    file: usize,
    file_page: u64,
}

/// The pages a parent snapshot stored for one process, by address.
#[derive(Debug)]
pub struct ParentPages {
    files: Vec<ParentFile>,
    /// Sorted by address, disjoint.
    segments: Vec<Segment>,
    /// Shared pool files in the order of the new process's `base_pools`.
    bases: Vec<usize>,
    /// Where a page of each content is in the parent's files (hash of the page to file and
    /// page): made after the first pre-copy pass ([`ParentPages::index_content`]).
    by_content: Option<HashMap<u64, (usize, u64)>>,
    /// Pages of the process equal to a parent page at another address (a page that moved,
    /// or one of another process of the same program): address to file and page.
    moved: BTreeMap<u64, (usize, u64)>,
}

impl ParentPages {
    /// The pages process `proc` of snapshot `parent_id` (pool directory `parent_pool`)
    /// stored, or `None` if it stored none.
    pub fn of(proc: &Process, parent_id: &str, parent_pool: &Path) -> Result<Option<ParentPages>> {
        let mut files = Vec::new();
        let mut open = |name: String, stored: &str| -> Result<()> {
            let path = parent_pool.join(stored);
            let file = File::open(&path).with_context(|| {
                format!("opening {} of parent snapshot {parent_id}", path.display())
            })?;
            files.push(ParentFile {
                name,
                path,
                file,
                base: None,
            });
            Ok(())
        };
        // Its own file first (named after the parent in the new snapshot), then those it
        // shares with its own parents (the names stay).
        let own = proc.pool.as_ref().map(|pf| &pf.name);
        if let Some(name) = own {
            open(format!("{parent_id}-{name}"), name)?;
        }
        for pf in &proc.base_pools {
            open(pf.name.clone(), &pf.name)?;
        }
        let first_base = usize::from(own.is_some());
        let mut segments = Vec::new();
        for area in &proc.areas {
            let Some(pages) = &area.pages else { continue };
            let at = |page: u64| area.start + page * PAGE_SIZE;
            if own.is_some() {
                for r in &pages.runs {
                    segments.push(Segment {
                        start: at(r[0]),
                        end: at(r[0] + r[1]),
                        file: 0,
                        file_page: pages.byte_offset(r[0]) / PAGE_SIZE,
                    });
                }
            }
            for shared in &pages.shared {
                for r in &shared.runs {
                    segments.push(Segment {
                        start: at(r[0]),
                        end: at(r[0] + r[1]),
                        file: first_base + shared.pool as usize,
                        file_page: r[2],
                    });
                }
            }
        }
        if segments.is_empty() {
            return Ok(None);
        }
        segments.sort_by_key(|s| s.start);
        Ok(Some(ParentPages {
            files,
            segments,
            bases: Vec::new(),
            by_content: None,
            moved: BTreeMap::new(),
        }))
    }

    /// For an area mapping a pool file of the parent (a process restored from it): the
    /// address ranges whose pages the mapping reads from the very file page the parent
    /// stored there. Those pages are the parent's as long as the process did not write them.
    pub fn mapped_from_parent(&self, m: &crate::proc::MapsEntry) -> Vec<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let Some(file) = self
            .files
            .iter()
            .position(|f| f.file.metadata().is_ok_and(|meta| meta.ino() == m.inode))
        else {
            return Vec::new();
        };
        let first_page = m.offset / PAGE_SIZE;
        self.overlapping(m.start, m.end)
            .filter(|s| {
                s.file == file && s.file_page == first_page + (s.start - m.start) / PAGE_SIZE
            })
            .map(|s| (s.start, s.end))
            .collect()
    }

    /// The segments overlapping `[start, end)`, each cut to it.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = Segment> + '_ {
        let first = self.segments.partition_point(|s| s.end <= start);
        self.segments[first..]
            .iter()
            .take_while(move |s| s.start < end)
            .map(move |s| {
                let cut = start.max(s.start);
                Segment {
                    start: cut,
                    end: end.min(s.end),
                    file: s.file,
                    file_page: s.file_page + (cut - s.start) / PAGE_SIZE,
                }
            })
    }

    /// The page ranges of `data` (the process's memory at `addr`, whole pages) that equal
    /// a page of the parent's: the one at the same address, or, once the parent is indexed
    /// ([`ParentPages::index_content`]), any of the same content (remembered for
    /// [`ParentPages::shared_runs`]). `scratch` is a buffer to reuse.
    pub fn same_ranges(
        &mut self,
        addr: u64,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<(u64, u64)>> {
        let page = PAGE_SIZE as usize;
        let end = addr + data.len() as u64;
        let mut same: Vec<(u64, u64)> = Vec::new();
        for seg in self.overlapping(addr, end) {
            let len = (seg.end - seg.start) as usize;
            scratch.resize(len, 0);
            self.read_pages(seg.file, seg.file_page, scratch)?;
            let from = (seg.start - addr) as usize;
            for (i, (ours, theirs)) in data[from..from + len]
                .chunks_exact(page)
                .zip(scratch.chunks_exact(page))
                .enumerate()
            {
                if ours != theirs {
                    continue;
                }
                add_page(&mut same, seg.start + (i * page) as u64);
            }
        }
        // What these pages were found equal to before no longer holds: look again.
        let before: Vec<u64> = self.moved.range(addr..end).map(|(a, _)| *a).collect();
        for a in before {
            self.moved.remove(&a);
        }
        if self.by_content.is_none() {
            return Ok(same);
        }
        let elsewhere = subtract_ranges(&[(addr, end)], &same);
        same.extend(self.find_by_content(&elsewhere, addr, data, scratch)?);
        Ok(merge_ranges(same))
    }

    /// The page ranges of `within` (inside `data`, the process's memory at `addr`) whose
    /// content is a page of the parent's (remembered for [`ParentPages::shared_runs`]).
    /// Finds nothing before [`ParentPages::index_content`].
    pub fn find_by_content(
        &mut self,
        within: &[(u64, u64)],
        addr: u64,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<(u64, u64)>> {
        let page = PAGE_SIZE as usize;
        let mut found: Vec<(u64, u64)> = Vec::new();
        let Some(by_content) = &self.by_content else {
            return Ok(found);
        };
        let mut hits = Vec::new();
        for &(s, e) in within {
            for p in (s..e).step_by(page) {
                let ours = &data[(p - addr) as usize..][..page];
                if let Some(&at) = by_content.get(&xxhash_rust::xxh3::xxh3_64(ours)) {
                    hits.push((p, at));
                }
            }
        }
        for (p, (file, file_page)) in hits {
            scratch.resize(page, 0);
            self.read_pages(file, file_page, scratch)?;
            if scratch.as_slice() == &data[(p - addr) as usize..][..page] {
                self.moved.insert(p, (file, file_page));
                add_page(&mut found, p);
            }
        }
        Ok(found)
    }

    /// Reads pages of parent file `file` from page `file_page` into `buf`.
    fn read_pages(&self, file: usize, file_page: u64, buf: &mut [u8]) -> Result<()> {
        self.files[file]
            .file
            .read_exact_at(buf, file_page * PAGE_SIZE)
            .with_context(|| {
                format!(
                    "reading parent pages from {}",
                    self.files[file].path.display()
                )
            })
    }

    /// Hashes the pages the parent stored of the process, but those at addresses in
    /// `matched` (found equal where they are: a page that moved is elsewhere), once. Until
    /// then pages are compared by address only.
    pub fn index_content(&mut self, matched: &[(u64, u64)]) -> Result<()> {
        if self.by_content.is_some() {
            return Ok(());
        }
        let page = PAGE_SIZE as usize;
        let mut index = HashMap::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        for seg in &self.segments {
            for (s, e) in subtract_ranges(&[(seg.start, seg.end)], matched) {
                let mut at = seg.file_page + (s - seg.start) / PAGE_SIZE;
                let last = at + (e - s) / PAGE_SIZE;
                while at < last {
                    let n = ((last - at) as usize * page).min(HASH_CHUNK);
                    self.read_pages(seg.file, at, &mut buf[..n])?;
                    for (i, content) in buf[..n].chunks_exact(page).enumerate() {
                        index
                            .entry(xxhash_rust::xxh3::xxh3_64(content))
                            .or_insert((seg.file, at + i as u64));
                    }
                    at += (n / page) as u64;
                }
            }
        }
        self.by_content = Some(index);
        Ok(())
    }

    /// Where the parent holds the pages of `ranges` (addresses, sorted, all pages the parent
    /// has) of the area starting at `area_start`, as shared runs of the new process.
    pub fn shared_runs(&mut self, area_start: u64, ranges: &[(u64, u64)]) -> Vec<SharedRuns> {
        let mut out: Vec<SharedRuns> = Vec::new();
        for &(start, end) in ranges {
            for seg in self.pieces(start, end) {
                let base = self.base_index(seg.file);
                let run = [
                    (seg.start - area_start) / PAGE_SIZE,
                    (seg.end - seg.start) / PAGE_SIZE,
                    seg.file_page,
                ];
                match out.iter_mut().find(|s| s.pool == base) {
                    Some(shared) => match shared.runs.last_mut() {
                        Some(last)
                            if last[0] + last[1] == run[0] && last[2] + last[1] == run[2] =>
                        {
                            last[1] += run[1]
                        }
                        _ => shared.runs.push(run),
                    },
                    None => out.push(SharedRuns {
                        pool: base,
                        runs: vec![run],
                    }),
                }
            }
        }
        out
    }

    /// Where the parent holds the pages of `[start, end)`, in address order: pages found
    /// by content where they were, the parent's pages at the same address elsewhere.
    fn pieces(&self, start: u64, end: u64) -> Vec<Segment> {
        let moved: Vec<(u64, u64)> = merge_ranges(
            self.moved
                .range(start..end)
                .map(|(&a, _)| (a, a + PAGE_SIZE))
                .collect(),
        );
        let mut out: Vec<Segment> = Vec::new();
        for (s, e) in subtract_ranges(&[(start, end)], &moved) {
            out.extend(self.overlapping(s, e));
        }
        for (&a, &(file, file_page)) in self.moved.range(start..end) {
            out.push(Segment {
                start: a,
                end: a + PAGE_SIZE,
                file,
                file_page,
            });
        }
        out.sort_by_key(|s| s.start);
        out
    }

    fn base_index(&mut self, file: usize) -> u32 {
        if let Some(b) = self.files[file].base {
            return b;
        }
        let b = self.bases.len() as u32;
        self.bases.push(file);
        self.files[file].base = Some(b);
        b
    }

    /// Links the parent files pages are shared with into `pool_dir`, and returns them in the
    /// order of the process's `base_pools`.
    pub fn link_into(&self, pool_dir: &Path) -> Result<Vec<PoolFile>> {
        self.bases
            .iter()
            .map(|&i| {
                let f = &self.files[i];
                let to = pool_dir.join(&f.name);
                std::fs::hard_link(&f.path, &to)
                    .with_context(|| format!("linking {} to {}", f.path.display(), to.display()))?;
                let size = f
                    .file
                    .metadata()
                    .with_context(|| format!("reading {}", f.path.display()))?
                    .len();
                Ok(PoolFile {
                    name: f.name.clone(),
                    size,
                })
            })
            .collect()
    }
}

/// For the name of a pool file shared with an earlier snapshot (`SNAPSHOT-FILE`): the
/// snapshot that wrote it and the file's name there. `None` for a snapshot's own files.
pub fn shared_file_origin(name: &str) -> Option<(&str, &str)> {
    let (origin, file) = name.split_once('-')?;
    (origin.len() == 16 && origin.bytes().all(|b| b.is_ascii_hexdigit())).then_some((origin, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parent whose file holds 8 pages, page `k` filled with byte `k + 1`.
    fn parent(segments: Vec<Segment>) -> ParentPages {
        let file = tempfile::tempfile().unwrap();
        for k in 0..8u8 {
            file.write_all_at(&[k + 1; 4096], k as u64 * 4096).unwrap();
        }
        ParentPages {
            files: vec![ParentFile {
                name: "p-1.dolly-pages".into(),
                path: "/nonexistent".into(),
                file,
                base: None,
            }],
            segments,
            bases: Vec::new(),
            by_content: None,
            moved: BTreeMap::new(),
        }
    }

    /// A parent holding pages at 0x10000..0x14000: file pages 2..6, bytes 3, 4, 5, 6.
    fn four_pages_at_0x10000() -> ParentPages {
        parent(vec![Segment {
            start: 0x10000,
            end: 0x10000 + 4 * PAGE_SIZE,
            file: 0,
            file_page: 2,
        }])
    }

    /// Pages filled with the given bytes.
    fn pages(fill: &[u8]) -> Vec<u8> {
        fill.iter().flat_map(|&b| [b; 4096]).collect()
    }

    #[test]
    fn tells_shared_files_from_own_ones() {
        assert_eq!(
            shared_file_origin("0123456789abcdef-42.dolly-pages"),
            Some(("0123456789abcdef", "42.dolly-pages"))
        );
        assert_eq!(shared_file_origin("42.dolly-pages"), None);
        assert_eq!(shared_file_origin("shmem.dolly-pages"), None);
    }

    #[test]
    fn finds_equal_pages_and_turns_them_into_shared_runs() {
        let mut p = four_pages_at_0x10000();
        // Ours: 6 pages from 0xf000; the second parent page differs, and the pages around
        // are found nowhere in the parent.
        let data = pages(&[0xee, 3, 0xee, 5, 6, 0xee]);
        let same = p.same_ranges(0xf000, &data, &mut Vec::new()).unwrap();
        assert_eq!(
            same,
            vec![(0x10000, 0x11000), (0x12000, 0x14000)],
            "the pages found nowhere, and the changed one, are not the same"
        );
        let shared = p.shared_runs(0xf000, &same);
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].pool, 0);
        assert_eq!(shared[0].runs, vec![[1, 1, 2], [3, 2, 4]]);
    }

    #[test]
    fn finds_pages_that_moved_by_their_content() {
        let mut p = four_pages_at_0x10000();
        // At another address: the parent's pages 5 and 6 (file pages 4, 5), then a page
        // whose content is in the file but not among the process's pages (file page 0),
        // then the parent's first page again.
        let data = pages(&[5, 6, 1, 3]);
        let same = p.same_ranges(0x40000, &data, &mut Vec::new()).unwrap();
        assert!(
            same.is_empty(),
            "by address only until the parent is indexed"
        );
        p.index_content(&[]).unwrap();
        let same = p.same_ranges(0x40000, &data, &mut Vec::new()).unwrap();
        assert_eq!(same, vec![(0x40000, 0x42000), (0x43000, 0x44000)]);
        let shared = p.shared_runs(0x40000, &same);
        assert_eq!(shared[0].runs, vec![[0, 2, 4], [3, 1, 2]]);

        // Later the first of them is the parent's page at the same address... of nothing:
        // it changed, and is found nowhere.
        let data = pages(&[0xee]);
        let same = p.same_ranges(0x40000, &data, &mut Vec::new()).unwrap();
        assert!(same.is_empty());
        let shared = p.shared_runs(0x41000, &[(0x41000, 0x42000)]);
        assert_eq!(shared[0].runs, vec![[0, 1, 5]], "the others stay found");
    }
}
