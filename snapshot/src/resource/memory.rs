//! Memory areas: which areas a process has, which of their pages are stored in the pool,
//! and how a restore maps them back.
//!
//! Private anonymous memory and the dirty (copied-on-write) pages of private file mappings
//! are stored; clean file pages are mapped again from their file; shared anonymous memory is
//! stored once per object; the vDSO is moved, not stored. A restore maps stored runs from
//! the pool `MAP_PRIVATE` (copy-on-write) and leaves never-touched pages anonymous.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use nix::unistd::Pid;

use crate::error::{Context, Error, ErrorKind, Result};
use crate::image::{Area, AreaFlags, AreaKind, Pages, PoolFile, Process, ShmemObject};
use crate::pool::{self, PoolWriter};
use crate::proc::{MapsEntry, ProcDir};
use crate::resource::files::FileTable;
use crate::sys::pagemap::{self, ScanFilter};
use crate::sys::{PAGE_SIZE, TASK_SIZE};
use crate::tracee::Remote;

/// Suffix of pool file names; an area mapped from such a file belongs to a process that
/// dolly restored, and its pages are captured like anonymous memory.
pub const POOL_FILE_SUFFIX: &str = ".dolly-pages";

/// Gaps shorter than this between stored runs of an anonymous area are mapped from the pool
/// too (they read as zeros there), to keep the number of mappings down.
const COALESCE_GAP_PAGES: u64 = 16;

/// Where an area's pages come from, as found at capture.
#[derive(Debug)]
enum Source {
    /// Anonymous pages in the process's page tables (private memory, or the copied-on-write
    /// pages of a private file mapping).
    Private,
    /// A mapping of a dolly pool file: every page is the process's own, whether it is in the
    /// page tables or still only in the pool file.
    Pool { file: File, offset: u64 },
    /// Nothing to store.
    None,
}

/// The memory of a process as found at capture, before its pages are copied.
#[derive(Debug)]
pub struct MemoryPlan {
    /// The areas (pages not yet assigned).
    pub areas: Vec<Area>,
    sources: Vec<Source>,
    /// Areas (private ones, mapped since the flags were last read) whose kernel flags are
    /// still to be read (see [`MemoryPlan::fill_flags`]).
    unknown_flags: Vec<Range>,
    /// Some area is hugetlb memory.
    pub hugetlb: bool,
    /// The areas mapping files not yet looked at (see [`MemoryPlan::look_at_files`]).
    files_unseen: Vec<MapsEntry>,
}

/// An address range, `[start, end)`.
type Range = (u64, u64);

impl MemoryPlan {
    /// Whether the flags of some areas are still to be read.
    pub fn flags_unknown(&self) -> bool {
        !self.unknown_flags.is_empty()
    }

    /// Fills in the flags of the areas whose flags were not read at the freeze, from
    /// `maps` (smaps of the process, read while it is still frozen; or of a fork of it made
    /// at the freeze, read after the thaw: `of_fork`). A fork lacks the areas the process
    /// marked not to be copied (`MADV_DONTFORK`) and holds zeros in those to be wiped
    /// (`MADV_WIPEONFORK`): its pages there are not the process's, and the capture fails.
    /// (A fork's areas are never locked: flags are left unknown only in a process without
    /// locked memory, see [`maps_with_known_flags`].)
    pub fn fill_flags(&mut self, pid: Pid, maps: &[MapsEntry], of_fork: bool) -> Result<()> {
        for (start, end) in std::mem::take(&mut self.unknown_flags) {
            let found = maps.iter().find(|m| m.start == start && m.end == end);
            let flags = match found {
                Some(m) if of_fork && m.flags.wipe_on_fork => {
                    return Err(left_out_of_fork(pid, start, end))
                }
                // (The process's copy-on-write takes a huge page from the fork when the pool
                // of huge pages is empty.)
                Some(m) if of_fork && m.flags.hugetlb => {
                    return Err(Error::refused(
                        format!(
                            "process {pid} mapped hugetlb memory at {start:#x}-{end:#x} during \
                             the capture: the fork dolly made at the freeze may not keep its \
                             pages"
                        ),
                        "capture again, or with --fork never",
                    ))
                }
                Some(m) if m.flags.device => return Err(device_memory(pid, m)),
                Some(m) => area_flags(m),
                None if of_fork => return Err(left_out_of_fork(pid, start, end)),
                None => {
                    return Err(Error::new(
                        ErrorKind::System,
                        format!("process {pid} has no area at {start:#x}-{end:#x} any more"),
                    ))
                }
            };
            if let Some(area) = self.areas.iter_mut().find(|a| a.start == start) {
                area.flags = flags;
            }
        }
        Ok(())
    }

    /// Leaves out area `[start, end)` (memory dolly mapped inside the process while its
    /// areas were read). False if an area only overlaps it (the kernel merged dolly's
    /// mapping with one of the process's): the plan is then not the process's own.
    pub fn exclude(&mut self, (start, end): Range) -> bool {
        let overlapping = |a: &Area| a.start < end && start < a.end;
        match self.areas.iter().position(overlapping) {
            None => true,
            Some(i) if (self.areas[i].start, self.areas[i].end) == (start, end) => {
                self.areas.remove(i);
                self.sources.remove(i);
                self.unknown_flags.retain(|&r| r != (start, end));
                true
            }
            Some(_) => false,
        }
    }

    /// After [`inspect_areas`]: looks at the files the areas map (what they are, that dolly
    /// reaches them by their path) and notes them in `files`. (Apart, so that a freeze can
    /// do it while the process runs dolly's calls, which may end with a fork: a few µs per
    /// file, and no lock the fork holds for a file dolly reaches by its path.)
    pub fn look_at_files(&mut self, proc: &ProcDir, files: &mut FileTable) -> Result<()> {
        for m in std::mem::take(&mut self.files_unseen) {
            let id = files.intern_mapping(proc, &m)?;
            // (The areas are in address order.)
            let at = self.areas.binary_search_by_key(&m.start, |a| a.start);
            if let Ok(i) = at {
                if let AreaKind::File { file, .. } = &mut self.areas[i].kind {
                    *file = id;
                }
            }
        }
        Ok(())
    }

    /// After the thaw, with `maps` the areas of a fork of the process made at its freeze:
    /// fails unless the fork has every area the process had (it lacks those the process
    /// advised `MADV_DONTFORK` since their flags were read).
    pub fn check_fork(&self, pid: Pid, maps: &[MapsEntry]) -> Result<()> {
        for a in &self.areas {
            let there = maps
                .binary_search_by_key(&a.start, |m| m.start)
                .is_ok_and(|i| maps[i].end == a.end);
            if !there {
                return Err(left_out_of_fork(pid, a.start, a.end));
            }
        }
        Ok(())
    }
}

/// The refusal of a capture whose fork lacks memory of the process at `[start, end)`.
pub(crate) fn left_out_of_fork(pid: Pid, start: u64, end: u64) -> Error {
    Error::refused(
        format!(
            "process {pid} advised its memory at {start:#x}-{end:#x} to be left out of forks \
             (MADV_DONTFORK or MADV_WIPEONFORK) during the capture: the fork dolly made at the \
             freeze lacks its pages"
        ),
        "capture again, or with --fork never",
    )
}

/// The shared anonymous memory objects of a whole tree, each once (by inode), with a file
/// to read each through.
#[derive(Debug, Default)]
pub struct ShmemTable {
    objects: Vec<ShmemObject>,
    files: Vec<File>,
    /// By (System V, inode): a System V segment's "inode" in maps is its id.
    by_inode: HashMap<(bool, u64), u32>,
    /// Areas of the tree (process, start) that attach each System V segment: each counted
    /// once, however many times its process's areas are read.
    sysv_uses: HashMap<u32, std::collections::HashSet<(i32, u64)>>,
}

impl ShmemTable {
    fn intern(&mut self, proc: &ProcDir, m: &MapsEntry, sysv: bool) -> Result<u32> {
        let o = self.intern_object(proc, m, sysv)?;
        if sysv {
            self.sysv_uses
                .entry(o)
                .or_default()
                .insert((proc.pid().as_raw(), m.start));
        }
        Ok(o)
    }

    /// Refuses System V segments that processes outside the tree have attached too.
    pub fn check_sysv_private(&self) -> Result<()> {
        for (o, object) in self.objects.iter().enumerate() {
            let Some(seg) = &object.sysv else { continue };
            let ours = self
                .sysv_uses
                .get(&(o as u32))
                .map_or(0, |u| u.len() as u32);
            if seg.attaches > ours {
                return Err(Error::refused(
                    format!(
                        "System V shared memory segment {} (key {:#x}) is attached {} times, {} of them outside the captured tree: not supported yet",
                        seg.shmid, seg.key, seg.attaches, seg.attaches - ours
                    ),
                    "capture the tree that holds every attach (their common ancestor)",
                ));
            }
        }
        Ok(())
    }

    fn intern_object(&mut self, proc: &ProcDir, m: &MapsEntry, sysv: bool) -> Result<u32> {
        if let Some(&o) = self.by_inode.get(&(sysv, m.inode)) {
            return Ok(o);
        }
        let file = File::open(proc.map_file(m)).with_context(|| {
            format!(
                "opening shared memory of process {} at {:#x}",
                proc.pid(),
                m.start
            )
        })?;
        let size = file.metadata().context("reading shared memory size")?.len();
        let o = self.objects.len() as u32;
        let sysv = if sysv {
            Some(super::sysv::capture(m.inode as i32)?)
        } else {
            None
        };
        self.objects.push(ShmemObject {
            inode: m.inode,
            size,
            pages: None,
            sysv,
        });
        self.files.push(file);
        self.by_inode
            .insert((self.objects[o as usize].sysv.is_some(), m.inode), o);
        Ok(o)
    }

    /// Copies every object's pages into a new pool file; returns the objects (with their
    /// pages) and the file's size (0 when nothing was stored).
    pub fn dump(mut self, pool_path: &std::path::Path) -> Result<(Vec<ShmemObject>, u64)> {
        if self.objects.is_empty() {
            return Ok((self.objects, 0));
        }
        let mut writer = PoolWriter::create(pool_path)?;
        for (object, file) in self.objects.iter_mut().zip(&self.files) {
            let ranges = file_data_ranges(file, 0, object.size);
            if ranges.is_empty() {
                continue;
            }
            let slot = writer.new_slot()?;
            let runs = page_runs(&ranges, 0);
            for run in &runs {
                let mut dst = writer.map(pool::page_offset(slot, run[0]), run[1] * PAGE_SIZE)?;
                file.read_exact_at(&mut dst, run[0] * PAGE_SIZE)
                    .context("reading shared memory")?;
            }
            object.pages = Some(Pages {
                offset: 0,
                slot,
                runs,
                shared: Vec::new(),
            });
        }
        Ok((self.objects, writer.size()))
    }
}

fn area_flags(m: &MapsEntry) -> AreaFlags {
    AreaFlags {
        grows_down: m.flags.grows_down,
        may_write: m.flags.may_write,
        dont_fork: m.flags.dont_fork,
        dont_dump: m.flags.dont_dump,
        wipe_on_fork: m.flags.wipe_on_fork,
        huge_page: m.flags.huge_page,
        no_huge_page: m.flags.no_huge_page,
        mergeable: m.flags.mergeable,
        locked: m.flags.locked,
    }
}

/// The refusal of device memory mapped by process `pid` at `m`.
fn device_memory(pid: Pid, m: &MapsEntry) -> Error {
    unsupported(
        pid,
        m,
        "device memory",
        "capture a process without device mappings",
    )
}

fn unsupported(pid: Pid, m: &MapsEntry, what: &str, remedy: &str) -> Error {
    Error::refused(
        format!(
            "process {pid} maps {what} at {:#x}-{:#x} ({}): not supported yet",
            m.start,
            m.end,
            if m.path.is_empty() {
                "anonymous"
            } else {
                &m.path
            }
        ),
        remedy.to_string(),
    )
}

/// The areas of a process with their flags, taking the flags of each area from `known`
/// (smaps read a moment earlier, while it ran) when the area is unchanged: reading smaps
/// walks every page table, too slow for a freeze. A private area mapped (or grown) since,
/// anonymous or of a file that is not a device, keeps its flags unknown, returned apart
/// (see [`MemoryPlan::fill_flags`]),
/// unless the process has locked memory (a fork's areas are never locked, so a fork could
/// not tell); any other new area has smaps read now.
fn maps_with_known_flags(
    proc: &ProcDir,
    known: &[MapsEntry],
) -> Result<(Vec<MapsEntry>, Vec<Range>)> {
    let mut maps = proc.maps_without_flags()?;
    let mut unknown = Vec::new();
    for m in &mut maps {
        // (Both in address order, as the kernel lists them: thousands of areas are usual.)
        let same = known
            .binary_search_by_key(&m.start, |k| k.start)
            .ok()
            .map(|i| &known[i])
            .filter(|k| {
                (k.end, k.read, k.write, k.exec, k.shared, k.offset, k.inode)
                    == (m.end, m.read, m.write, m.exec, m.shared, m.offset, m.inode)
                    && k.path == m.path
            });
        let anonymous = m.inode == 0
            && (m.path.is_empty()
                || m.path.starts_with("[anon:")
                || matches!(m.path.as_str(), "[heap]" | "[stack]"));
        match same {
            Some(k) => m.flags = k.flags,
            None if !m.shared && (anonymous || plain_file(proc, m)) => {
                unknown.push((m.start, m.end))
            }
            None => return Ok((proc.maps()?, Vec::new())),
        }
    }
    if !unknown.is_empty() && has_locked_memory(proc)? {
        return Ok((proc.maps()?, Vec::new()));
    }
    Ok((maps, unknown))
}

/// Whether area `m` maps a plain file (a library loaded, a file mapped), not a device or a
/// kernel interface whose flags (`io`, `pf`) decide a refusal.
fn plain_file(proc: &ProcDir, m: &MapsEntry) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let kernel = ["/dev/", "/proc/", "/sys/"]
        .iter()
        .any(|p| m.path.starts_with(p));
    m.path.starts_with('/')
        && !kernel
        && std::fs::metadata(proc.map_file(m))
            .is_ok_and(|f| !f.file_type().is_char_device() && !f.file_type().is_block_device())
}

/// Whether the process has locked areas (`VmLck`: `mlock`, `mlockall`).
fn has_locked_memory(proc: &ProcDir) -> Result<bool> {
    let status = proc.read("status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .is_some_and(|v| v.trim().trim_end_matches("kB").trim() != "0"))
}

/// Reads the areas of a stopped process and decides what to store of each: `known`, the
/// areas with their flags as read shortly before, spares reading them again. The files the
/// areas map are left to [`MemoryPlan::look_at_files`] (its file areas name no file until
/// then).
pub fn inspect_areas(
    proc: &ProcDir,
    shmem: &mut ShmemTable,
    known: Option<&[MapsEntry]>,
) -> Result<MemoryPlan> {
    let pid = proc.pid();
    let (maps, unknown_flags) = match known {
        Some(known) => maps_with_known_flags(proc, known)?,
        None => (proc.maps()?, Vec::new()),
    };
    let mut plan = MemoryPlan {
        areas: Vec::new(),
        sources: Vec::new(),
        unknown_flags,
        hugetlb: false,
        files_unseen: Vec::new(),
    };
    for m in &maps {
        if m.path == "[vsyscall]" {
            continue;
        }
        plan.hugetlb |= m.flags.hugetlb || m.path == "/anon_hugepage";
        let vdso_part = matches!(m.path.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]");
        if m.flags.device && !vdso_part {
            return Err(device_memory(pid, m));
        }
        let private_anon = !m.shared;
        let (kind, source) = match m.path.as_str() {
            "[vdso]" => (AreaKind::Vdso, Source::None),
            "[vvar]" => (AreaKind::Vvar, Source::None),
            "[vvar_vclock]" => (AreaKind::VvarVclock, Source::None),
            "[heap]" => (AreaKind::Heap, Source::Private),
            "[stack]" => (AreaKind::Stack, Source::Private),
            "" if private_anon => (AreaKind::Anonymous { name: None }, Source::Private),
            p if p.starts_with("[anon:") && private_anon => (
                AreaKind::Anonymous {
                    name: Some(p["[anon:".len()..p.len() - 1].to_string()),
                },
                Source::Private,
            ),
            p if m.shared && (p == "/dev/zero" && m.deleted || p.starts_with("[anon_shmem:")) => {
                let object = shmem.intern(proc, m, false)?;
                (
                    AreaKind::SharedAnonymous {
                        object,
                        offset: m.offset,
                    },
                    Source::None,
                )
            }
            p if p.starts_with("/SYSV") => {
                let object = shmem.intern(proc, m, true)?;
                let size = shmem.objects[object as usize].size;
                if m.offset != 0 || m.end - m.start != crate::sys::page_ceil(size) {
                    return Err(unsupported(
                        pid,
                        m,
                        "part of a System V shared memory segment (the rest unmapped)",
                        "keep the segment attached whole",
                    ));
                }
                (AreaKind::SysvShm { object }, Source::None)
            }
            p if p.starts_with('/') => {
                if p.ends_with(POOL_FILE_SUFFIX) && !m.shared {
                    let file = File::open(proc.map_file(m)).with_context(|| {
                        format!("opening pool mapping of process {pid} at {:#x}", m.start)
                    })?;
                    (
                        AreaKind::Anonymous { name: None },
                        Source::Pool {
                            file,
                            offset: m.offset,
                        },
                    )
                } else {
                    plan.files_unseen.push(m.clone());
                    (
                        AreaKind::File {
                            file: u32::MAX,
                            offset: m.offset,
                        },
                        if m.shared {
                            Source::None
                        } else {
                            Source::Private
                        },
                    )
                }
            }
            _ => {
                return Err(unsupported(
                    pid,
                    m,
                    "a special area",
                    "capture a process without it",
                ))
            }
        };
        plan.areas.push(Area {
            start: m.start,
            end: m.end,
            read: m.read,
            write: m.write,
            exec: m.exec,
            shared: m.shared,
            kind,
            flags: area_flags(m),
            pages: None,
        });
        plan.sources.push(source);
    }
    Ok(plan)
}

/// Adds the page at `p` to `ranges`, sorted ranges that end at or before it.
pub(crate) fn add_page(ranges: &mut Vec<(u64, u64)>, p: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 == p => last.1 = p + crate::sys::PAGE_SIZE,
        _ => ranges.push((p, p + crate::sys::PAGE_SIZE)),
    }
}

/// Merges sorted `[start, end)` byte ranges that touch or overlap.
pub(crate) fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Data ranges (relative to `offset`) of `len` bytes of `file` starting at `offset`.
fn file_data_ranges(file: &File, offset: u64, len: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsFd;
    let mut out = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let Ok(data) = lseek(file.as_fd(), at as i64, Whence::SeekData) else {
            break;
        };
        let data = data as u64;
        if data >= end {
            break;
        }
        let hole = lseek(file.as_fd(), data as i64, Whence::SeekHole).map_or(end, |h| h as u64);
        let hole = hole.min(end);
        out.push((data - offset, hole - offset));
        at = hole;
    }
    out
}

/// Address ranges as `[first page, page count]` runs counted from `base`.
pub(crate) fn page_runs(ranges: &[(u64, u64)], base: u64) -> Vec<[u64; 2]> {
    ranges
        .iter()
        .map(|&(s, e)| {
            let first = (s - base) / PAGE_SIZE;
            [first, (e - s).div_ceil(PAGE_SIZE)]
        })
        .collect()
}

/// The parts of `a` not in `b` (both sorted and merged).
pub(crate) fn subtract_ranges(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// What `dump` stored.
#[derive(Debug, Default)]
pub struct DumpStats {
    /// Size of the pool file (end of its last slot); 0 when nothing was stored.
    pub pool_size: u64,
}

impl MemoryPlan {
    /// The areas, with their pages as `dump` stored them.
    pub fn into_areas(self) -> Vec<Area> {
        self.areas
    }
}

/// Copies the pages to store of every area into the process's pool file (a new one, or the
/// one pre-copy filled: then only what changed since is copied), filling in each area's
/// `pages`. The process must be stopped (or `pid` be a fork of it made at its freeze, see
/// `capture::cow`). With pre-copy, the copies are only decided on:
/// [`super::tracking::Tracked::finish_copies`] makes them.
pub fn dump(
    pid: Pid,
    plan: &mut MemoryPlan,
    pool_path: &std::path::Path,
    mut tracked: Option<&mut super::tracking::Tracked>,
) -> Result<DumpStats> {
    let proc = ProcDir::new(pid);
    // (Opened when first needed: a tracked process often needs neither, at the freeze.)
    let (pagemap, mem) = (std::cell::OnceCell::new(), std::cell::OnceCell::new());
    let pagemap = || opened(&pagemap, &proc, "pagemap");
    let mem = || opened(&mem, &proc, "mem");
    let mut own_writer = None;
    match tracked.as_deref_mut() {
        Some(t) => t.scan_frozen(),
        None => own_writer = Some(PoolWriter::create(pool_path)?),
    }
    let mut stats = DumpStats::default();
    let own_pages = super::tracking::OWN_PAGES;
    let any_page = ScanFilter {
        inverted: pagemap::PAGE_IS_PFNZERO,
        required: pagemap::PAGE_IS_PFNZERO,
        any_of: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
    };
    for (area, source) in plan.areas.iter_mut().zip(&plan.sources) {
        // (A tracked mapping of a pool file is one of the parent's: see `Tracked::start`.)
        if let (Some(t), Source::Private | Source::Pool { .. }) = (tracked.as_deref_mut(), source) {
            let pool_mapping = matches!(source, Source::Pool { .. });
            if let Some(pages) = t.finish_area(area.start, area.end, pool_mapping)? {
                area.pages = (!pages.runs.is_empty() || !pages.shared.is_empty()).then_some(pages);
                continue;
            }
        }
        let ranges = match source {
            Source::None => continue,
            Source::Private => pagemap::scan(pagemap()?, area.start, area.end, own_pages)
                .with_context(|| format!("scanning pages of {pid} at {:#x}", area.start))?,
            Source::Pool { file, offset } => {
                let mut r = pagemap::scan(pagemap()?, area.start, area.end, any_page)
                    .with_context(|| format!("scanning pages of {pid} at {:#x}", area.start))?;
                r.extend(
                    file_data_ranges(file, *offset, area.len())
                        .into_iter()
                        .map(|(s, e)| (area.start + s, area.start + e)),
                );
                merge_ranges(r)
            }
        };
        if ranges.is_empty() {
            continue;
        }
        let runs = page_runs(&ranges, area.start);
        let slot = match (&mut own_writer, tracked.as_deref_mut()) {
            (Some(w), _) => {
                let slot = w.new_slot()?;
                copy_runs(pid, mem()?, w, slot, area.start, &runs)?;
                slot
            }
            // With the other copies of the freeze (see `Tracked::finish_copies`).
            (None, Some(t)) => t.defer_new_slot(area.start, runs.clone())?,
            (None, None) => unreachable!("one writer or the other"),
        };
        area.pages = Some(Pages {
            offset: 0,
            slot,
            runs,
            shared: Vec::new(),
        });
    }
    stats.pool_size = match (&own_writer, tracked) {
        (Some(w), _) => w.size(),
        (None, Some(t)) => t.writer.size(),
        (None, None) => 0,
    };
    Ok(stats)
}

/// The file `name` of `proc`'s directory, opened once into `cell`.
fn opened<'a>(cell: &'a std::cell::OnceCell<File>, proc: &ProcDir, name: &str) -> Result<&'a File> {
    if cell.get().is_none() {
        let file = File::open(proc.path(name)).with_context(|| format!("opening {name}"))?;
        let _ = cell.set(file);
    }
    Ok(cell.get().expect("set above"))
}

/// Runs of up to this many bytes are read into a buffer and written into the pool file:
/// two system calls, rather than four to allocate, map, read into and unmap the pool.
const SMALL_RUN: u64 = 256 << 10;

/// Copies runs of a process's memory into the pool.
pub(crate) fn copy_runs(
    pid: Pid,
    mem: &File,
    writer: &PoolWriter,
    slot: u32,
    base: u64,
    runs: &[[u64; 2]],
) -> Result<()> {
    let mut buf = Vec::new();
    for run in runs {
        let len = run[1] * PAGE_SIZE;
        let (addr, offset) = (base + run[0] * PAGE_SIZE, pool::page_offset(slot, run[0]));
        if len <= SMALL_RUN {
            buf.resize(len as usize, 0);
            read_memory(pid, mem, addr, &mut buf)?;
            writer.write_at(offset, &buf)?;
        } else {
            let mut dst = writer.map(offset, len)?;
            read_memory(pid, mem, addr, &mut dst)?;
        }
    }
    Ok(())
}

/// Reads a process's memory at `addr` into `dst`: `process_vm_readv` where it is readable,
/// `/proc/PID/mem` (`mem`, which reads any protection) for the rest.
pub(crate) fn read_memory(pid: Pid, mem: &File, addr: u64, dst: &mut [u8]) -> Result<()> {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    use std::io::IoSliceMut;
    let mut done = 0usize;
    while done < dst.len() {
        let remote = [RemoteIoVec {
            base: addr as usize + done,
            len: dst.len() - done,
        }];
        let mut local = [IoSliceMut::new(&mut dst[done..])];
        match process_vm_readv(pid, &mut local, &remote) {
            Ok(n) if n > 0 => done += n,
            _ => break,
        }
    }
    if done < dst.len() {
        mem.read_exact_at(&mut dst[done..], addr + done as u64)
            .with_context(|| {
                format!(
                    "reading memory of process {pid} at {:#x}",
                    addr + done as u64
                )
            })?;
    }
    Ok(())
}

/// Which pool file a run of pages is in: the process's own, or one of its `base_pools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSource {
    /// The snapshot's own pool file of the process.
    Own,
    /// The process's `base_pools[n]` (pages shared with an earlier snapshot).
    Base(u32),
}

/// An area's stored pages by pool file: `(source, runs)` with runs as `[first page in the
/// area, page count, first page in the file]`.
fn layers(pages: &Pages) -> Vec<(PoolSource, Vec<[u64; 3]>)> {
    let first = pages.byte_offset(0) / PAGE_SIZE;
    std::iter::once((
        PoolSource::Own,
        pages
            .runs
            .iter()
            .map(|r| [r[0], r[1], first + r[0]])
            .collect(),
    ))
    .chain(
        pages
            .shared
            .iter()
            .map(|s| (PoolSource::Base(s.pool), s.runs.clone())),
    )
    .filter(|(_, runs)| !runs.is_empty())
    .collect()
}

/// The mappings that put an area's stored pages in place, in the order to make them: the
/// pool file with the most runs first, its runs joined across short gaps of anonymous areas
/// (read as zeros from the file's holes) and across gaps the other files fill; then the
/// others' runs, each mapped over it as it is. An area of a full snapshot is one file.
pub fn pool_mappings(area: &Area) -> Vec<(PoolSource, [u64; 3])> {
    let Some(pages) = &area.pages else {
        return Vec::new();
    };
    let mut layers = layers(pages);
    layers.sort_by_key(|(_, runs)| std::cmp::Reverse(runs.len()));
    let anonymous = !matches!(area.kind, AreaKind::File { .. });
    // Pages the other files fill, as sorted page ranges.
    let filled: Vec<(u64, u64)> = merge_ranges(
        layers
            .iter()
            .skip(1)
            .flat_map(|(_, runs)| runs.iter().map(|r| (r[0], r[0] + r[1])))
            .collect(),
    );
    let covered = |from: u64, to: u64| {
        let i = filled.partition_point(|r| r.1 <= from);
        filled.get(i).is_some_and(|r| r.0 <= from && r.1 >= to)
    };
    let mut out: Vec<(PoolSource, [u64; 3])> = Vec::new();
    let mut layers = layers.into_iter();
    if let Some((source, runs)) = layers.next() {
        for run in runs {
            match out.last_mut() {
                Some((_, last))
                    if run[2] - last[2] == run[0] - last[0] && {
                        let (gap_from, gap_to) = (last[0] + last[1], run[0]);
                        gap_to == gap_from
                            || (anonymous && gap_to - gap_from < COALESCE_GAP_PAGES)
                            || covered(gap_from, gap_to)
                    } =>
                {
                    last[1] = run[0] + run[1] - last[0];
                }
                _ => out.push((source, run)),
            }
        }
    }
    out.extend(layers.flat_map(|(source, runs)| runs.into_iter().map(move |r| (source, r))));
    out
}

/// The pool files of one process, open in dolly.
#[derive(Debug, Default)]
pub struct ProcessPools {
    /// Its own pool file.
    pub own: Option<File>,
    /// Its `base_pools`, in order.
    pub bases: Vec<File>,
}

impl ProcessPools {
    fn get(&self, source: PoolSource) -> &File {
        match source {
            PoolSource::Own => self.own.as_ref(),
            PoolSource::Base(n) => self.bases.get(n as usize),
        }
        .expect("a pool file for every stored page (the manifest was validated)")
    }
}

/// File descriptors, inside the process being rebuilt, of what its areas map.
#[derive(Debug, Default)]
pub struct MapSources {
    /// The process's pool file.
    pub pool: Option<i32>,
    /// Its `base_pools`, in order.
    pub bases: Vec<i32>,
    /// Per file index: fd opened read-only, and read-write (for writable shared mappings).
    pub files: HashMap<(u32, bool), i32>,
    /// Per shared-memory object index.
    pub shmem: HashMap<u32, i32>,
    /// Per System V segment's object index: its id.
    pub sysv: HashMap<u32, i32>,
}

fn prot(area: &Area) -> u64 {
    let mut p = 0;
    if area.read {
        p |= libc::PROT_READ;
    }
    if area.write {
        p |= libc::PROT_WRITE;
    }
    if area.exec {
        p |= libc::PROT_EXEC;
    }
    p as u64
}

/// Whether the mapping of a file area needs a writable fd.
pub fn needs_writable_fd(area: &Area) -> bool {
    area.shared && (area.write || area.flags.may_write)
}

/// Whether an area's stored pages must be copied into anonymous memory rather than mapped
/// from the pool: a grows-down area (the stack: a file mapping cannot grow down), and areas
/// whose kernel flags only anonymous memory may carry (`MADV_WIPEONFORK`, a name).
pub fn stays_anonymous(area: &Area) -> bool {
    matches!(
        area.kind,
        AreaKind::Stack | AreaKind::Anonymous { name: Some(_) }
    ) || area.flags.grows_down
        || area.flags.wipe_on_fork
}

/// Maps every area but the vDSO ones into the process being rebuilt (whose old areas are
/// gone), at their addresses, with their protections; stored pages are mapped from the
/// pool, or copied in where the area must stay anonymous.
pub fn map_areas(
    remote: &mut Remote,
    proc: &Process,
    sources: &MapSources,
    pools: &ProcessPools,
    batch: Option<Batch>,
) -> Result<()> {
    let mmap = libc::SYS_mmap;
    // The mappings of stored pages, made once every area is in place: in batches of
    // system calls run with one stop each where a batch runner is given.
    let mut pool_maps: Vec<[u64; 6]> = Vec::new();
    for area in &proc.areas {
        let what = || format!("mapping {:#x}-{:#x}", area.start, area.end);
        let prot = prot(area);
        let fixed = libc::MAP_FIXED as u64;
        match &area.kind {
            AreaKind::Vdso | AreaKind::Vvar | AreaKind::VvarVclock => continue,
            AreaKind::Anonymous { .. } | AreaKind::Heap | AreaKind::Stack => {
                let mut flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | fixed;
                if area.flags.grows_down || matches!(area.kind, AreaKind::Stack) {
                    flags |= libc::MAP_GROWSDOWN as u64;
                }
                remote.call(
                    &what(),
                    mmap,
                    &[area.start, area.len(), prot, flags, u64::MAX, 0],
                )?;
            }
            AreaKind::File { file, offset } => {
                let fd = sources
                    .files
                    .get(&(*file, needs_writable_fd(area)))
                    .copied()
                    .expect("an fd for every mapped file");
                let share = if area.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                remote.call(
                    &what(),
                    mmap,
                    &[
                        area.start,
                        area.len(),
                        prot,
                        share as u64 | fixed,
                        fd as u64,
                        *offset,
                    ],
                )?;
            }
            AreaKind::SysvShm { object } => {
                let mut flags = 0;
                if !area.write {
                    flags |= libc::SHM_RDONLY;
                }
                if area.exec {
                    flags |= libc::SHM_EXEC;
                }
                remote.call(
                    &what(),
                    libc::SYS_shmat,
                    &[sources.sysv[object] as u64, area.start, flags as u64],
                )?;
            }
            AreaKind::SharedAnonymous { object, offset } => {
                let fd = sources.shmem[object];
                remote.call(
                    &what(),
                    mmap,
                    &[
                        area.start,
                        area.len(),
                        prot,
                        libc::MAP_SHARED as u64 | fixed,
                        fd as u64,
                        *offset,
                    ],
                )?;
            }
        }
        let Some(pages) = &area.pages else {
            continue;
        };
        if stays_anonymous(area) {
            // Copied in, not mapped: this area must remain anonymous memory.
            for (source, runs) in layers(pages) {
                for run in runs {
                    let mut buf = vec![0u8; (run[1] * PAGE_SIZE) as usize];
                    pools
                        .get(source)
                        .read_exact_at(&mut buf, run[2] * PAGE_SIZE)
                        .context("reading pages from the pool")?;
                    remote.write_mem(area.start + run[0] * PAGE_SIZE, &buf)?;
                }
            }
            continue;
        }
        for (source, run) in pool_mappings(area) {
            let fd = match source {
                PoolSource::Own => sources.pool,
                PoolSource::Base(n) => sources.bases.get(n as usize).copied(),
            }
            .expect("a pool fd for every stored page");
            pool_maps.push([
                area.start + run[0] * PAGE_SIZE,
                run[1] * PAGE_SIZE,
                prot,
                libc::MAP_PRIVATE as u64 | fixed,
                fd as u64,
                run[2] * PAGE_SIZE,
            ]);
        }
    }
    let failed = |args: &[u64; 6], rc: i64| {
        Error::sys(
            format!("mapping pool pages at {:#x}", args[0]),
            nix::errno::Errno::from_raw(-rc as i32),
        )
    };
    match batch {
        Some(b) => {
            for chunk in pool_maps.chunks(b.calls_per_run()) {
                let mut calls = crate::tracee::Calls::default();
                for args in chunk {
                    calls.add(mmap, args);
                }
                let results = remote.run(&calls, b.runner, b.table)?;
                if let Some((args, &rc)) = chunk
                    .iter()
                    .zip(&results)
                    .find(|(_, &rc)| (-4095..0).contains(&rc))
                {
                    return Err(failed(args, rc));
                }
            }
        }
        None => {
            for args in &pool_maps {
                remote.call(&format!("mapping pool pages at {:#x}", args[0]), mmap, args)?;
            }
        }
    }
    Ok(())
}

/// Where [`Remote::run`] batches go inside a process being rebuilt: its code page and a
/// writable table.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    /// The code page ([`Remote::write_call_runner`]).
    pub runner: u64,
    /// The call table.
    pub table: u64,
    /// The table's size in bytes.
    pub table_len: u64,
}

impl Batch {
    fn calls_per_run(&self) -> usize {
        (self.table_len / 64).saturating_sub(1).max(1) as usize
    }
}

/// Gives back each area's `madvise`/`mlock` state and anonymous names. `scratch` is a page
/// of the process that dolly may write.
pub fn apply_flags(remote: &mut Remote, proc: &Process, scratch: u64) -> Result<()> {
    for area in &proc.areas {
        let a = area.flags;
        let advise = [
            (a.dont_fork, libc::MADV_DONTFORK),
            (a.dont_dump, libc::MADV_DONTDUMP),
            (a.wipe_on_fork, libc::MADV_WIPEONFORK),
            (a.huge_page, libc::MADV_HUGEPAGE),
            (a.no_huge_page, libc::MADV_NOHUGEPAGE),
            (a.mergeable, libc::MADV_MERGEABLE),
        ];
        for (on, advice) in advise {
            if on {
                remote.call(
                    &format!("madvise({advice}) at {:#x}", area.start),
                    libc::SYS_madvise,
                    &[area.start, area.len(), advice as u64],
                )?;
            }
        }
        if a.locked {
            remote.call(
                &format!("mlock at {:#x}", area.start),
                libc::SYS_mlock,
                &[area.start, area.len()],
            )?;
        }
        if let AreaKind::Anonymous { name: Some(name) } = &area.kind {
            let mut bytes = name.as_bytes().to_vec();
            bytes.push(0);
            remote.write_mem(scratch, &bytes)?;
            remote.call(
                &format!("naming the area at {:#x}", area.start),
                libc::SYS_prctl,
                &[
                    libc::PR_SET_VMA as u64,
                    libc::PR_SET_VMA_ANON_NAME as u64,
                    area.start,
                    area.len(),
                    scratch,
                ],
            )?;
        }
    }
    Ok(())
}

/// Finds `len` free bytes in the address layout `areas` (sorted), avoiding `avoid` too.
pub fn free_range(areas: &[Area], avoid: &[(u64, u64)], len: u64) -> Option<u64> {
    let mut taken: Vec<(u64, u64)> = areas.iter().map(|a| (a.start, a.end)).collect();
    taken.extend_from_slice(avoid);
    let taken = merge_ranges(taken);
    // Leave a page of distance so the range never merges with a neighbour.
    let mut candidate = 0x1000_0000u64;
    for (s, e) in taken {
        if candidate + len + PAGE_SIZE <= s {
            return Some(candidate);
        }
        candidate = candidate.max(e + PAGE_SIZE);
    }
    (candidate + len <= TASK_SIZE).then_some(candidate)
}

/// Opens the pool file of a process for mapping (read-only).
pub fn open_pool(dir: &std::path::Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    File::open(&path).map_err(|e| {
        Error::corrupt(
            format!("pool file {} is missing ({e})", path.display()),
            "the memory tier lost this snapshot's pages (wiped pool?); capture it again",
        )
    })
}

/// Checks a pool file holds every page the manifest stored in it: `pages` are those of a
/// process's areas, or of the shared memory objects.
pub fn check_pool<'a>(
    pages: impl Iterator<Item = &'a Pages>,
    pool: &PoolFile,
    pool_file: &File,
    path: &std::path::Path,
) -> Result<()> {
    let count: u64 = pages.map(Pages::page_count).sum();
    pool::check_file(pool_file, path, pool.size, count)
}

/// Opens the pool files of process `proc` (its own and its `base_pools`) in `dir`, checking
/// each holds the pages the manifest takes from it.
pub fn open_process_pools(proc: &Process, dir: &std::path::Path) -> Result<ProcessPools> {
    let pages: Vec<&Pages> = proc.areas.iter().filter_map(|a| a.pages.as_ref()).collect();
    let own = proc
        .pool
        .as_ref()
        .map(|pf| {
            let f = open_pool(dir, &pf.name)?;
            check_pool(pages.iter().copied(), pf, &f, &dir.join(&pf.name))?;
            Ok::<_, Error>(f)
        })
        .transpose()?;
    let bases = proc
        .base_pools
        .iter()
        .enumerate()
        .map(|(n, pf)| {
            let runs = pages
                .iter()
                .flat_map(|p| &p.shared)
                .filter(|s| s.pool as usize == n)
                .flat_map(|s| &s.runs);
            let (count, end) = runs.fold((0, 0), |(c, e), r| (c + r[1], e.max(r[2] + r[1])));
            let f = open_pool(dir, &pf.name)?;
            pool::check_file(&f, &dir.join(&pf.name), end * PAGE_SIZE, count)?;
            Ok(f)
        })
        .collect::<Result<_>>()?;
    Ok(ProcessPools { own, bases })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A System V segment attached twice by this process, its areas read twice (as a freeze
    /// does when dolly's scratch memory merged into an area): each attach counts once, so
    /// the segment is the process's own with both areas read, and one not read is an
    /// attach outside.
    #[test]
    fn an_area_read_twice_counts_as_one_attach_of_its_segment() {
        // SAFETY: a private segment of this test, attached read-only twice, detached and
        // removed at the end; nothing else uses it.
        let (id, at) = unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o600);
            assert!(id >= 0);
            let at = [
                libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY),
                libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY),
            ];
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            (id, at)
        };
        assert!(id >= 0 && at.iter().all(|&a| a as isize != -1));
        let proc = ProcDir::new(nix::unistd::getpid());
        let maps = proc.maps().unwrap();
        let area = |a: *mut libc::c_void| maps.iter().find(|m| m.start == a as u64).unwrap();
        let mut table = ShmemTable::default();
        table.intern(&proc, area(at[0]), true).unwrap();
        table.intern(&proc, area(at[0]), true).unwrap();
        let one_read = table.check_sysv_private();
        table.intern(&proc, area(at[1]), true).unwrap();
        let both_read = table.check_sysv_private();
        // SAFETY: detaches the two attaches made above.
        unsafe {
            at.iter().for_each(|&a| {
                libc::shmdt(a);
            })
        };
        assert!(one_read.is_err(), "one attach left out");
        both_read.unwrap();
    }

    fn anon(pages: Option<Pages>) -> Area {
        Area {
            start: 0x10000,
            end: 0x10000 + 100 * PAGE_SIZE,
            read: true,
            write: true,
            exec: false,
            shared: false,
            kind: AreaKind::Anonymous { name: None },
            flags: AreaFlags::default(),
            pages,
        }
    }

    #[test]
    fn short_gaps_fold_into_one_mapping_for_anonymous_memory_only() {
        let pages = Pages {
            offset: 0,
            slot: 0,
            runs: vec![[0, 2], [5, 1], [60, 3]],
            shared: Vec::new(),
        };
        let runs = |a: &Area| -> Vec<[u64; 3]> {
            pool_mappings(a)
                .into_iter()
                .map(|(s, r)| {
                    assert_eq!(s, PoolSource::Own);
                    r
                })
                .collect()
        };
        let a = anon(Some(pages.clone()));
        assert_eq!(runs(&a), vec![[0, 6, 0], [60, 3, 60]]);
        let mut f = anon(Some(pages));
        f.kind = AreaKind::File { file: 0, offset: 0 };
        assert_eq!(runs(&f), vec![[0, 2, 0], [5, 1, 5], [60, 3, 60]]);
    }

    #[test]
    fn shared_pages_go_first_when_they_are_the_more_fragmented_and_own_pages_over_them() {
        // A file area whose pages 10 and 20 changed since the parent: the parent's runs
        // join across them, the two changed pages are mapped over.
        let mut f = anon(Some(Pages {
            offset: 0,
            slot: 1,
            runs: vec![[10, 1], [20, 1]],
            shared: vec![crate::image::SharedRuns {
                pool: 0,
                runs: vec![[0, 10, 100], [11, 9, 111], [21, 9, 121]],
            }],
        }));
        f.kind = AreaKind::File { file: 0, offset: 0 };
        let slot1 = pool::slot_offset(1) / PAGE_SIZE;
        assert_eq!(
            pool_mappings(&f),
            vec![
                (PoolSource::Base(0), [0, 30, 100]),
                (PoolSource::Own, [10, 1, slot1 + 10]),
                (PoolSource::Own, [20, 1, slot1 + 20]),
            ]
        );
    }

    #[test]
    fn free_range_avoids_areas() {
        let a = anon(None);
        let got = free_range(
            std::slice::from_ref(&a),
            &[(0x1000_0000, 0x1000_2000)],
            PAGE_SIZE,
        )
        .unwrap();
        assert!(got >= 0x1000_2000 + PAGE_SIZE);
        assert!(got + PAGE_SIZE <= a.start || got >= a.end);
    }

    #[test]
    fn merge_joins_overlaps() {
        assert_eq!(
            merge_ranges(vec![(5, 8), (0, 2), (2, 3), (7, 9)]),
            vec![(0, 3), (5, 9)]
        );
    }
}
