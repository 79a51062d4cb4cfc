//! Pre-copy with write tracking: while a process runs, its private memory is registered for
//! userfaultfd asynchronous write-protection, write-protected and copied into its pool file;
//! at the freeze only the pages written since (`PAGE_IS_WRITTEN`) are copied again. What is
//! stored is exactly the memory at the freeze: a page copied early and not written since is
//! unchanged; one written since is copied again; one dropped since is left out.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::unistd::Pid;

use super::incremental::ParentPages;
use super::memory::{add_page, copy_runs, merge_ranges, page_runs, read_memory, subtract_ranges};
use crate::error::{Context, Result};
use crate::image::{Pages, PoolFile};
use crate::pool::{self, PoolWriter};
use crate::proc::{MapsEntry, ProcDir};
use crate::sys::pagemap::{self, ScanFilter};
use crate::sys::{uffd, PAGE_SIZE};

/// Pages that hold data of their own: in memory or swap, not file pages, not the zero page.
pub const OWN_PAGES: ScanFilter = ScanFilter {
    inverted: pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO,
    required: pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO,
    any_of: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
};

/// Own pages written since they were write-protected (or never protected: new ones).
const WRITTEN_PAGES: ScanFilter = ScanFilter {
    inverted: pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO,
    required: pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO | pagemap::PAGE_IS_WRITTEN,
    any_of: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
};

/// Finds what the freeze needs to know once per run (the marker type: about 0.1 ms; whether
/// page frames show: about 10 µs), so that the freeze does not: call it before.
pub fn warm_up() {
    marker_type();
    pagemap::frames_visible();
}

/// The swap type of userfaultfd's write-protect markers on this kernel (it depends on its
/// configuration): found once by making one, in dolly's own memory. (A private mapping of a
/// memfd: dropping a written page of a file mapping leaves a marker; of anonymous memory,
/// nothing.)
fn marker_type() -> Option<u8> {
    static TYPE: std::sync::OnceLock<Option<u8>> = std::sync::OnceLock::new();
    *TYPE.get_or_init(|| {
        let page = PAGE_SIZE as usize;
        let memfd =
            nix::sys::memfd::memfd_create(c"dolly-marker", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .ok()?;
        nix::unistd::ftruncate(&memfd, page as i64).ok()?;
        // SAFETY: a private mapping of our own memfd, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&memfd),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return None;
        }
        let found = (|| {
            let start = addr as u64;
            let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd::USER_MODE_ONLY;
            // SAFETY: userfaultfd takes flags and returns a new fd we then own.
            let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if fd < 0 {
                return None;
            }
            // SAFETY: the kernel just gave us this fd.
            let uffd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
            uffd::enable_async_wp(&uffd, false).ok()?;
            uffd::register_wp(&uffd, start, start + PAGE_SIZE).ok()?;
            // SAFETY: writes within our page.
            unsafe { *(addr as *mut u8) = 1 };
            let pagemap = File::open("/proc/self/pagemap").ok()?;
            pagemap::scan_and_protect(&pagemap, start, start + PAGE_SIZE, OWN_PAGES).ok()?;
            // SAFETY: drops our own page: a write-protected page dropped leaves a marker.
            unsafe { libc::madvise(addr, page, libc::MADV_DONTNEED) };
            pagemap::swap_types(&pagemap, start, start + PAGE_SIZE).ok()?[0]
        })();
        // SAFETY: unmapping the page mapped above.
        unsafe { libc::munmap(addr, page) };
        found
    })
}

/// The pages of `regions` (runs with their categories) that are write-protect markers
/// (dropped pages, which read as zeros), not data.
fn markers(pagemap: &File, regions: &[(u64, u64, u64)]) -> Result<Vec<(u64, u64)>> {
    let Some(marker) = marker_type() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for &(s, e, c) in regions {
        if c & pagemap::PAGE_IS_SWAPPED == 0 || c & pagemap::PAGE_IS_PRESENT != 0 {
            continue;
        }
        let types = pagemap::swap_types(pagemap, s, e).context("reading pagemap")?;
        for (i, t) in types.into_iter().enumerate() {
            if t == Some(marker) {
                let at = s + i as u64 * PAGE_SIZE;
                out.push((at, at + PAGE_SIZE));
            }
        }
    }
    Ok(merge_ranges(out))
}

/// One tracked area: where its pages go, and which are in the pool already.
#[derive(Debug)]
struct TrackedArea {
    start: u64,
    end: u64,
    slot: u32,
    /// Address ranges whose pages are in the slot.
    copied: Vec<(u64, u64)>,
    /// Address ranges whose pages are the parent snapshot's (not in the slot); disjoint
    /// from `copied`.
    same: Vec<(u64, u64)>,
    /// The parts of it the freeze stored (see [`Tracked::free_unused`]).
    finished: Vec<(u64, u64)>,
    /// For an area mapping the parent's pool file (a process restored from the parent):
    /// the ranges still reading the parent's pages, unless written (see
    /// [`ParentPages::mapped_from_parent`]).
    from_parent: Vec<(u64, u64)>,
    /// Tracked since the last round (mapped after the tracking began): its next round
    /// copies all its pages, not only those written.
    fresh: bool,
}

impl TrackedArea {
    /// The address ranges whose pages are stored: in the slot, or the parent's.
    fn held(&self) -> Vec<(u64, u64)> {
        merge_ranges(self.copied.iter().chain(&self.same).copied().collect())
    }
}

/// A running process whose memory is being pre-copied.
#[derive(Debug)]
pub struct Tracked {
    /// Where pages are read from: the process, or its copy (see [`Tracked::use_copy`]).
    pid: Pid,
    /// The process tracked.
    process: Pid,
    /// Keeps the write tracking alive; closing it ends it (the kernel unprotects).
    _uffd: OwnedFd,
    pagemap: File,
    mem: File,
    /// The process's pool file, written before and during the freeze.
    pub writer: PoolWriter,
    /// Its areas with their flags, read after the last pre-copy round (see
    /// [`Tracked::read_flags`]).
    pub known_maps: Option<Vec<MapsEntry>>,
    areas: Vec<TrackedArea>,
    /// For an incremental capture: the parent's pages of this process.
    parent: Option<ParentPages>,
    /// The walk of the page tables made at the freeze ([`Tracked::scan_frozen`]), by area
    /// start: the area's end then, and what it found.
    scanned: HashMap<u64, (u64, Scanned)>,
    /// The userfaultfd reports the ranges whose pages go (see [`uffd::read_lost`]).
    events: bool,
    /// Ranges whose pages may have gone since the tracking began (from those events).
    lost: Vec<(u64, u64)>,
    /// Copies the freeze decided on, made together by [`Tracked::finish_copies`].
    deferred: Vec<Deferred>,
    /// Bytes the last pre-copy round copied.
    last_round: u64,
    /// Reading a copy-on-write fork of the process, not the process (see
    /// [`Tracked::use_copy`]).
    copy: bool,
    /// The process's own pagemap while the copy's is read (for
    /// [`Tracked::compare_with_copy`]).
    process_pagemap: Option<File>,
    /// Pages the process kept untouched that its copy lacks (see
    /// [`Tracked::confirm_copy`]).
    missing: Vec<(u64, u64)>,
    /// Whether the area at each of these addresses was still registered for tracking at
    /// the freeze (a fork's areas are not: see [`Tracked::survey`]).
    registered_at: HashMap<u64, bool>,
    /// Each area (by its bounds) as it was when its flags were read after pre-copy
    /// ([`Tracked::read_flags`]).
    before_freeze: HashMap<(u64, u64), AreaState>,
    /// The ranges unmapped since then (as the userfaultfd's events report them).
    unmapped_since_flags: Vec<(u64, u64)>,
    /// Bytes [`Tracked::finish_copies`] copied.
    freeze_copied: u64,
    /// Some area is registered with a userfaultfd of the program's own (a fork inside the
    /// process could then wait on that userfaultfd's reader).
    pub foreign_uffd: bool,
}

/// An area of a tracked process as it was just before the freeze.
#[derive(Debug, PartialEq, Eq)]
enum AreaState {
    /// Registered for tracking.
    Registered,
    /// Not registered (mapped since the tracking began, over tracked memory...): the bytes
    /// of its own pages, if it is writable (and they could be counted).
    Untracked { own: Option<u64> },
}

/// The entries of `maps`, a listing of a running process's areas in address order, without
/// those a later entry overlaps: the kernel lists an area that changed during the read twice
/// (as it was, then as it is), and two tracked areas over the same pages would each answer
/// for them, from their own copies.
fn latest_listed(maps: &[MapsEntry]) -> Vec<&MapsEntry> {
    let mut out: Vec<&MapsEntry> = Vec::with_capacity(maps.len());
    for m in maps {
        while out
            .last()
            .is_some_and(|last| last.end > m.start && m.end > last.start)
        {
            out.pop();
        }
        out.push(m);
    }
    out
}

/// The bytes of the own pages (not a file's) of `[start, end)` of the process whose
/// `pagemap` this is.
fn own_bytes(pagemap: &File, start: u64, end: u64) -> Option<u64> {
    let ranges = pagemap::scan(pagemap, start, end, OWN_PAGES).ok()?;
    Some(ranges.iter().map(|(s, e)| e - s).sum())
}

/// A copy the freeze decided on: slot, the address its page 0 stands for, runs of pages.
type Deferred = (u32, u64, Vec<[u64; 2]>);

/// At least this many bytes to copy at the freeze are copied by two threads (the tree is
/// stopped: both cores are dolly's).
const PARALLEL_COPY_BYTES: u64 = 4 << 20;

/// What the walk at the freeze found in one area.
#[derive(Debug)]
enum Scanned {
    /// Every own page with its categories (the full walk).
    All(Vec<Region>),
    /// Only the ranges not write-protected any more: written, or holes (the quick walk).
    Touched(Vec<(u64, u64)>),
}

/// Pages not write-protected: the filter `PAGEMAP_SCAN` walks quickly (it only looks at the
/// protection bit of each entry, not at the page).
const TOUCHED: ScanFilter = ScanFilter {
    inverted: 0,
    required: pagemap::PAGE_IS_WRITTEN,
    any_of: 0,
};

/// Ranges to look at page by page at the freeze that are closer than this are walked as
/// one.
const SCOPE_JOIN_GAP: u64 = 64 * PAGE_SIZE;

/// A run of pages with their categories: `(start, end, categories)`.
type Region = (u64, u64, u64);

/// The walk [`Tracked::finish_area`] needs: own pages, with whether each is present,
/// swapped, written.
fn scan_own(pagemap: &File, start: u64, end: u64) -> Result<Vec<Region>, nix::errno::Errno> {
    pagemap::scan_regions(
        pagemap,
        start,
        end,
        OWN_PAGES,
        pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED | pagemap::PAGE_IS_WRITTEN,
    )
}

/// Whether pre-copy applies to an area: private memory whose pages dolly stores (not the
/// vDSO, not a mapping of a dolly pool file, which the freeze copies with its file data).
pub fn trackable(m: &MapsEntry) -> bool {
    !m.shared
        && !matches!(
            m.path.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
        )
        && !m.path.ends_with(super::memory::POOL_FILE_SUFFIX)
}

impl Tracked {
    /// Starts tracking process `pid` through `uffd` (a userfaultfd made inside it): every
    /// trackable area of `maps` that can be registered is. `maps` may have been read while
    /// the process ran and changed its mappings, as a listing that is no snapshot: an area
    /// changed during the read may be listed twice, overlapping (as it was, then as it is):
    /// only the later is tracked (see [`latest_listed`]). What the listing missed or got
    /// wrong is tracked by [`Tracked::track_new_areas`] or copied whole at the freeze.
    /// With `parent`, pages equal to the parent's at the same address are shared, not
    /// copied.
    pub fn start(
        pid: Pid,
        uffd: OwnedFd,
        maps: &[MapsEntry],
        pool_path: &Path,
        parent: Option<ParentPages>,
    ) -> Result<Tracked> {
        let events = uffd::enable_async_wp(&uffd, true).map_err(|e| {
            crate::Error::sys(
                "enabling write tracking (userfaultfd async write-protect)",
                e,
            )
        })?;
        let proc = ProcDir::new(pid);
        let pagemap = File::open(proc.path("pagemap")).context("opening pagemap")?;
        let mem = File::open(proc.path("mem")).context("opening process memory")?;
        let mut writer = PoolWriter::create(pool_path)?;
        let mut areas = Vec::new();
        let mut foreign_uffd = false;
        for m in latest_listed(maps) {
            // Memory a restored process still maps from its snapshot's pool is tracked when
            // that snapshot is the parent: what it did not write is the parent's.
            let from_parent = match &parent {
                Some(p) if m.path.ends_with(super::memory::POOL_FILE_SUFFIX) && !m.shared => {
                    p.mapped_from_parent(m)
                }
                _ => Vec::new(),
            };
            if !trackable(m) && from_parent.is_empty() {
                continue;
            }
            // An area the program registered with a userfaultfd of its own is busy: the
            // freeze copies it whole.
            if let Err(e) = uffd::register_wp(&uffd, m.start, m.end) {
                foreign_uffd |= e == nix::errno::Errno::EBUSY;
                continue;
            }
            areas.push(TrackedArea {
                start: m.start,
                end: m.end,
                slot: writer.new_slot()?,
                copied: Vec::new(),
                same: Vec::new(),
                finished: Vec::new(),
                from_parent,
                fresh: false,
            });
        }
        Ok(Tracked {
            pid,
            process: pid,
            _uffd: uffd,
            pagemap,
            mem,
            writer,
            known_maps: None,
            areas,
            parent,
            scanned: HashMap::new(),
            events,
            lost: Vec::new(),
            deferred: Vec::new(),
            last_round: 0,
            copy: false,
            process_pagemap: None,
            missing: Vec::new(),
            registered_at: HashMap::new(),
            before_freeze: HashMap::new(),
            unmapped_since_flags: Vec::new(),
            freeze_copied: 0,
            foreign_uffd,
        })
    }

    /// The userfaultfd, for reading its events, if it reports them.
    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.events.then(|| self._uffd.as_raw_fd())
    }

    /// Records ranges whose pages may have gone (events of its userfaultfd): the freeze
    /// looks at them page by page.
    pub fn note_lost(&mut self, events: uffd::Events) {
        self.lost = merge_ranges(self.lost.drain(..).chain(events.lost).collect());
        self.unmapped_since_flags.extend(events.unmapped);
    }

    /// Reads the process's areas with their flags (smaps) while it runs, for the freeze to
    /// reuse for the areas that stay the same, and which of them are registered for
    /// tracking, with the own pages of the writable ones that are not (see
    /// [`Tracked::survey`]).
    pub fn read_flags(&mut self) {
        self.unmapped_since_flags.clear();
        self.known_maps = ProcDir::new(self.pid).maps().ok();
        self.before_freeze = self
            .known_maps
            .iter()
            .flatten()
            .filter(|m| trackable(m))
            .map(|m| {
                let state = if pagemap::wp_async_at(&self.pagemap, m.start) {
                    AreaState::Registered
                } else {
                    AreaState::Untracked {
                        own: m
                            .write
                            .then(|| own_bytes(&self.pagemap, m.start, m.end))
                            .flatten(),
                    }
                };
                ((m.start, m.end), state)
            })
            .collect();
    }

    /// Between pre-copy rounds: tracks the areas mapped since the tracking began at places
    /// no tracked area covers (fresh mappings), which the freeze would otherwise copy whole.
    /// The next round copies them all.
    ///
    /// (Not a mapping made over part of a tracked area: registered, it may merge with the
    /// older area's pieces around it into one area whose pages the older area's records
    /// would then answer for, stale where the new mapping lies. The freeze copies those.)
    pub fn track_new_areas(&mut self) -> Result<()> {
        let Ok(maps) = ProcDir::new(self.pid).maps_without_flags() else {
            return Ok(());
        };
        for m in maps.iter().filter(|m| trackable(m)) {
            if self
                .areas
                .iter()
                .any(|a| a.start < m.end && m.start < a.end)
            {
                continue;
            }
            if let Err(e) = uffd::register_wp(&self._uffd, m.start, m.end) {
                self.foreign_uffd |= e == nix::errno::Errno::EBUSY;
                continue;
            }
            self.areas.push(TrackedArea {
                start: m.start,
                end: m.end,
                slot: self.writer.new_slot()?,
                copied: Vec::new(),
                same: Vec::new(),
                finished: Vec::new(),
                from_parent: Vec::new(),
                fresh: true,
            });
        }
        Ok(())
    }

    /// One pre-copy round while the process runs: write-protects and copies every page of
    /// the tracked areas (the first round), or those written since the last round. Returns
    /// the bytes copied.
    pub fn copy_round(&mut self, first: bool) -> Result<u64> {
        let mut bytes = 0;
        let mut scratch = (Vec::new(), Vec::new());
        let mut maps: Option<Vec<MapsEntry>> = None;
        for area in &mut self.areas {
            let filter = if first || area.fresh {
                OWN_PAGES
            } else {
                WRITTEN_PAGES
            };
            area.fresh = false;
            let mut pieces = vec![(area.start, area.end)];
            let mut whole = true;
            while let Some((start, end)) = pieces.pop() {
                // Write-protect, then read: a write that comes after shows as written.
                let copied = pagemap::scan_and_protect(&self.pagemap, start, end, filter)
                    .ok()
                    .and_then(|ranges| {
                        // A page may go away under the copy (the program unmaps it).
                        let runs = page_runs(&ranges, area.start);
                        let same = match &mut self.parent {
                            None => copy_runs(
                                self.pid,
                                &self.mem,
                                &self.writer,
                                area.slot,
                                area.start,
                                &runs,
                            )
                            .map(|_| Vec::new()),
                            Some(parent) => copy_changed_runs(
                                self.pid,
                                &self.mem,
                                &self.writer,
                                (area.slot, area.start),
                                &runs,
                                parent,
                                &mut scratch,
                            ),
                        }
                        .ok()?;
                        Some((ranges, same))
                    });
                let Some((ranges, same)) = copied else {
                    // The failed walk may have protected pages it did not copy, hiding that
                    // they were written: none of the range counts as copied any more, and
                    // the freeze looks at it page by page.
                    // (Its pages in the slot are freed too: a restore may map the slot
                    // across short gaps, which must read as zeros.)
                    area.copied = subtract_ranges(&area.copied, &[(start, end)]);
                    area.same = subtract_ranges(&area.same, &[(start, end)]);
                    punch(
                        &self.writer,
                        area.slot,
                        (start - area.start) / PAGE_SIZE,
                        end - start,
                    );
                    self.lost =
                        merge_ranges(self.lost.iter().copied().chain([(start, end)]).collect());
                    if whole {
                        // The area changed under the tracking (split by a mapping made over
                        // part of it, partly unmapped): each piece of it still mapped is
                        // copied on its own (a piece not tracked any more fails again).
                        whole = false;
                        let maps = maps.get_or_insert_with(|| {
                            ProcDir::new(self.pid)
                                .maps_without_flags()
                                .unwrap_or_default()
                        });
                        pieces.extend(
                            maps.iter()
                                .filter(|m| m.start < end && m.end > start)
                                .map(|m| (m.start.max(start), m.end.min(end))),
                        );
                    }
                    continue;
                };
                bytes += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
                let changed = subtract_ranges(&ranges, &same);
                // Pages now equal to the parent's that the slot held: freed.
                for (s, e) in intersect(&area.copied, &same) {
                    punch(&self.writer, area.slot, (s - area.start) / PAGE_SIZE, e - s);
                }
                area.copied = merge_ranges(
                    subtract_ranges(&area.copied, &same)
                        .into_iter()
                        .chain(changed.iter().copied())
                        .collect(),
                );
                area.same = merge_ranges(
                    subtract_ranges(&area.same, &changed)
                        .into_iter()
                        .chain(same)
                        .collect(),
                );
            }
        }
        if first {
            self.find_moved_pages()?;
        }
        self.last_round = bytes;
        Ok(bytes)
    }

    /// After the first round of an incremental capture: indexes the parent's pages that
    /// were not found where they were, and looks up by content the pages copied because
    /// they differed from the parent's at their address. Those found (pages that moved, or
    /// of another instance of the program) are shared, and freed from the slot. (Pages
    /// written later are looked up as they are copied.)
    fn find_moved_pages(&mut self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(parent) = &mut self.parent else {
            return Ok(());
        };
        let matched = merge_ranges(
            self.areas
                .iter()
                .flat_map(|a| a.same.iter().copied())
                .collect(),
        );
        parent.index_content(&matched)?;
        let (mut data, mut scratch) = (Vec::new(), Vec::new());
        for area in &mut self.areas {
            let mut found = Vec::new();
            for &(start, end) in &area.copied {
                let mut at = start;
                while at < end {
                    let len = (end - at).min(CHUNK);
                    data.resize(len as usize, 0);
                    let offset = pool::page_offset(area.slot, (at - area.start) / PAGE_SIZE);
                    self.writer
                        .file()
                        .read_exact_at(&mut data, offset)
                        .context("reading back the pool")?;
                    found.extend(parent.find_by_content(
                        &[(at, at + len)],
                        at,
                        &data,
                        &mut scratch,
                    )?);
                    at += len;
                }
            }
            for &(s, e) in &found {
                punch(&self.writer, area.slot, (s - area.start) / PAGE_SIZE, e - s);
            }
            area.copied = subtract_ranges(&area.copied, &found);
            area.same = merge_ranges(area.same.iter().copied().chain(found).collect());
        }
        Ok(())
    }

    /// At the freeze: takes a new slot of the pool file for an area not tracked, whose
    /// `runs` (pages from `base`) [`Tracked::finish_copies`] copies with the others.
    pub fn defer_new_slot(&mut self, base: u64, runs: Vec<[u64; 2]>) -> Result<u32> {
        let slot = self.writer.new_slot()?;
        self.deferred.push((slot, base, runs));
        Ok(slot)
    }

    /// Bytes the freeze copied (what was written since the last pre-copy round, and areas
    /// not tracked).
    pub fn freeze_bytes(&self) -> u64 {
        self.freeze_copied
    }

    /// At the freeze, with the process's `areas` as the freeze found them: reads from the
    /// process what reading a fork of it instead needs and could not read from the fork
    /// (which areas are still tracked: see [`Tracked::use_copy`]), and estimates what the
    /// freeze would copy, in bytes, until `enough` says it is enough to decide. That is
    /// what the process writes in the time of a round (what the last round copied), then
    /// the own pages of writable private areas not tracked (mapped since, or over tracked
    /// memory). For the areas that are as they were when [`Tracked::read_flags`] read them,
    /// both are taken from what it found (a look at each area took about 5 µs of the
    /// freeze). Where the frames of pages cannot be compared (see
    /// [`Tracked::compare_with_copy`]), the quick walk of which pages were written is made
    /// now, and what it found touched (holes count too) caps the estimate. `None` without
    /// the quick walk, which the userfaultfd's events make possible.
    pub fn survey(
        &mut self,
        areas: &[crate::image::Area],
        enough: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        use crate::image::AreaKind;
        if !self.events {
            return None;
        }
        let mut bytes = self.last_round;
        if !pagemap::frames_visible() {
            self.scan_frozen();
            let touched: u64 = self
                .scanned
                .values()
                .filter_map(|(_, found)| match found {
                    Scanned::Touched(ranges) => Some(ranges.iter().map(|r| r.1 - r.0).sum::<u64>()),
                    Scanned::All(_) => None,
                })
                .sum();
            bytes = bytes.min(touched);
        }
        // Known from just before the freeze where the area is the same and was not
        // unmapped since (an area stops being registered only when it is unmapped, which
        // the events report: never in between); else asked now. (Unless the one area asked
        // again says otherwise: the process ran another program since, whose memory the
        // events do not cover.)
        let same_memory = areas
            .iter()
            .find(|a| self.before_freeze.get(&(a.start, a.end)) == Some(&AreaState::Registered))
            .is_none_or(|a| pagemap::wp_async_at(&self.pagemap, a.start));
        let before = |a: &crate::image::Area| {
            let unmapped = |&(s, e): &(u64, u64)| s < a.end && a.start < e;
            self.before_freeze
                .get(&(a.start, a.end))
                .filter(|_| same_memory && !self.unmapped_since_flags.iter().any(unmapped))
        };
        for a in areas {
            let registered = match before(a) {
                Some(known) => *known == AreaState::Registered,
                None => pagemap::wp_async_at(&self.pagemap, a.start),
            };
            self.registered_at.insert(a.start, registered);
        }
        let copied_whole = |a: &&crate::image::Area| {
            !a.shared
                && a.write
                && matches!(
                    a.kind,
                    AreaKind::Anonymous { .. }
                        | AreaKind::Heap
                        | AreaKind::Stack
                        | AreaKind::File { .. }
                )
        };
        for a in areas.iter().filter(copied_whole) {
            if enough(bytes) {
                break;
            }
            if !self.registered_at[&a.start] {
                // Its own pages (an area may be mostly untouched, as a fresh malloc arena),
                // as counted just before the freeze if it is the same area (an estimate).
                bytes += match before(a) {
                    Some(AreaState::Untracked { own: Some(own) }) => *own,
                    _ => own_bytes(&self.pagemap, a.start, a.end).unwrap_or(a.len()),
                };
            }
        }
        Some(bytes)
    }

    /// Whether the area at `addr` is registered for tracking (as [`Tracked::survey`] found
    /// at the freeze, if it looked; a fork's areas never are).
    fn registered(&self, addr: u64) -> bool {
        match self.registered_at.get(&addr) {
            Some(&registered) => registered,
            None => !self.copy && pagemap::wp_async_at(&self.pagemap, addr),
        }
    }

    /// Whether the userfaultfd reports events (ranges whose pages go).
    pub fn has_events(&self) -> bool {
        self.events
    }

    /// After [`Tracked::survey`] at the freeze, once the process runs again: reads the page
    /// tables and memory of `copy` from now on, a copy-on-write fork of the process made at
    /// the freeze, so that the walk and the copies of the freeze are made after the thaw.
    /// (The fork's page tables tell which pages it holds, not which were written since they
    /// were protected: that comes from the survey's walk, or from
    /// [`Tracked::compare_with_copy`].)
    pub fn use_copy(&mut self, copy: Pid) -> Result<()> {
        let proc = ProcDir::new(copy);
        let pagemap = File::open(proc.path("pagemap")).context("opening pagemap")?;
        let mem = File::open(proc.path("mem")).context("opening process memory")?;
        self.process_pagemap = Some(std::mem::replace(&mut self.pagemap, pagemap));
        (self.mem, self.pid, self.copy) = (mem, copy, true);
        Ok(())
    }

    /// After the thaw, reading a copy made at the freeze that the survey did not walk:
    /// finds, for each tracked area, the pages that may differ from what pre-copy stored,
    /// by comparing the running process's page tables with the copy's. A page is as
    /// pre-copy stored it if the process maps at its address, still write-protected (not
    /// written since the last round), the very page frame the copy holds there: the
    /// process wrote it neither before the fork (that would have lifted the protection)
    /// nor after (that would have given it a frame of its own), and no other page was moved
    /// there (its frame would differ from the copy's, or the move came before the fork and
    /// its event says so). Every other page of the area counts as written. Only where
    /// either holds pages of its own is looked at page by page (the quick walk skips empty
    /// page tables: a large reservation costs nothing). Call it before the events are
    /// taken again ([`Tracked::note_lost`]): a page dropped while this looks had its event
    /// read before it went.
    ///
    /// Fails if the copy holds no page at all in one of the process's `areas` (as the freeze
    /// found them) where pre-copy stored pages that no event says went: the process advised
    /// it `MADV_WIPEONFORK` after its flags were read, and the copy is not the process's
    /// memory there. Pages the process kept untouched that the copy lacks are checked once
    /// the events after the thaw are in (see [`Tracked::confirm_copy`]).
    pub fn compare_with_copy(&mut self, areas: &[(u64, u64)]) -> Result<()> {
        /// Pages compared per read of the two pagemaps.
        const CHUNK_PAGES: u64 = 1 << 15;
        let Some(process_pagemap) = &self.process_pagemap else {
            return Ok(());
        };
        let held = merge_ranges(self.areas.iter().flat_map(TrackedArea::held).collect());
        for &(start, end) in areas {
            let expected = subtract_ranges(&intersect(&held, &[(start, end)]), &self.lost);
            if !expected.is_empty()
                && pagemap::scan(&self.pagemap, start, end, OWN_PAGES)
                    .with_context(|| format!("scanning pages of {} at {start:#x}", self.pid))?
                    .is_empty()
            {
                return Err(super::memory::left_out_of_fork(self.process, start, end));
            }
        }
        if !self.scanned.is_empty() {
            return Ok(()); // walked at the freeze
        }
        let frame = |e: u64| (e & pagemap::PM_PRESENT != 0).then_some(e & pagemap::PM_PFN);
        // A page of its own the process has not written since it was protected.
        let untouched = |e: u64| {
            e & pagemap::PM_UFFD_WP != 0
                && e & pagemap::PM_FILE == 0
                && frame(e).is_some_and(|f| f != 0)
        };
        for area in &self.areas {
            let (start, end) = (area.start, area.end);
            let own = |pagemap: &File| pagemap::scan(pagemap, start, end, OWN_PAGES);
            let copy_own = own(&self.pagemap)
                .with_context(|| format!("scanning pages of {} at {start:#x}", self.pid))?;
            let process_own = own(process_pagemap).unwrap_or_default();
            let mut kept: Vec<(u64, u64)> = Vec::new();
            for (from, to) in merge_ranges(copy_own.into_iter().chain(process_own).collect()) {
                let mut at = from;
                while at < to {
                    let until = to.min(at + CHUNK_PAGES * PAGE_SIZE);
                    // (The process ended, or runs another program, since: every page
                    // counts as written.)
                    let now = pagemap::entries(process_pagemap, at, until).unwrap_or_default();
                    // Written all over (a busy writer): no need to read the fork's entries.
                    if now.iter().any(|&e| untouched(e)) {
                        let then =
                            pagemap::entries(&self.pagemap, at, until).with_context(|| {
                                format!("reading the pagemap of {} at {at:#x}", self.pid)
                            })?;
                        for (i, (now, then)) in now.into_iter().zip(then).enumerate() {
                            if !untouched(now) {
                                continue;
                            }
                            let page = at + i as u64 * PAGE_SIZE;
                            if then & (pagemap::PM_PRESENT | pagemap::PM_SWAPPED) == 0 {
                                add_page(&mut self.missing, page);
                            }
                            if frame(then) == frame(now) {
                                add_page(&mut kept, page);
                            }
                        }
                    }
                    at = until;
                }
            }
            let changed = subtract_ranges(&[(start, end)], &kept);
            self.scanned.insert(start, (end, Scanned::Touched(changed)));
        }
        Ok(())
    }

    /// After [`Tracked::compare_with_copy`] and the events taken since: fails if the copy
    /// lacks pages the process kept untouched since the last round, unless an event says
    /// they went or came (an `mremap` after the thaw moves pages with their protection):
    /// the process advised their area `MADV_DONTFORK` or `MADV_WIPEONFORK` after its flags
    /// were read, and the copy is not the process's memory there.
    pub fn confirm_copy(&self) -> Result<()> {
        match subtract_ranges(&self.missing, &self.lost).first() {
            Some(&(start, end)) => Err(super::memory::left_out_of_fork(self.process, start, end)),
            None => Ok(()),
        }
    }

    /// Bytes of private memory the process holds, as far as the tracking knows: pages
    /// copied by pre-copy, or found equal to the parent's.
    pub fn held_bytes(&self) -> u64 {
        self.areas
            .iter()
            .flat_map(|a| a.copied.iter().chain(&a.same))
            .map(|r| r.1 - r.0)
            .sum()
    }

    /// Makes the copies the freeze decided on, with two threads when there is much to copy
    /// (a process that writes faster than pre-copy copies), then frees the slot pages no
    /// area uses. They are read from the stopped process itself, or from its copy (see
    /// [`Tracked::use_copy`]): then the process runs, and the second thread is only used if
    /// that leaves it a CPU (on two, the writer of the benchmark waited 3–5 ms for its CPU
    /// while the two threads copied, however low their priority: a time slice lasts until
    /// the next tick).
    pub fn finish_copies(&mut self) -> Result<()> {
        let jobs = std::mem::take(&mut self.deferred);
        let total: u64 = jobs
            .iter()
            .flat_map(|job| &job.2)
            .map(|r| r[1] * PAGE_SIZE)
            .sum();
        self.freeze_copied += total;
        let (pid, mem, writer) = (self.pid, &self.mem, &self.writer);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if total < PARALLEL_COPY_BYTES || (self.copy && cpus <= 2) {
            copy_jobs(pid, mem, writer, &jobs)?;
            self.free_unused();
            return Ok(());
        }
        // Two halves of about the same size (runs split where needed).
        let mut halves: [Vec<Deferred>; 2] = [Vec::new(), Vec::new()];
        let mut first_left = total / 2;
        for (slot, base, runs) in jobs {
            for run in runs {
                let len = run[1] * PAGE_SIZE;
                if first_left >= len {
                    first_left -= len;
                    halves[0].push((slot, base, vec![run]));
                } else if first_left > 0 {
                    let head = first_left / PAGE_SIZE;
                    first_left = 0;
                    if head > 0 {
                        halves[0].push((slot, base, vec![[run[0], head]]));
                    }
                    halves[1].push((slot, base, vec![[run[0] + head, run[1] - head]]));
                } else {
                    halves[1].push((slot, base, vec![run]));
                }
            }
        }
        let [first, second] = &halves;
        std::thread::scope(|scope| {
            let other = scope.spawn(|| copy_jobs(pid, mem, writer, second));
            let mine = copy_jobs(pid, mem, writer, first);
            let theirs = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            mine.and(theirs)
        })?;
        self.free_unused();
        Ok(())
    }

    /// Frees the pages of the slots that no area of the snapshot uses (an area unmapped, or
    /// split and partly unmapped or mapped over, since it was copied).
    fn free_unused(&mut self) {
        for area in &mut self.areas {
            let used = merge_ranges(std::mem::take(&mut area.finished));
            for (s, e) in subtract_ranges(&area.copied, &used) {
                punch(&self.writer, area.slot, (s - area.start) / PAGE_SIZE, e - s);
            }
        }
    }

    /// At the freeze, before [`Tracked::finish_area`]: walks the page tables of every tracked
    /// area with one system call (rather than one per area), from the first to the last.
    /// With the userfaultfd's events on, the quick walk: only which pages are no longer
    /// write-protected (every page that went is in the events' ranges).
    pub fn scan_frozen(&mut self) {
        if !self.scanned.is_empty() {
            return; // made already (by the survey)
        }
        let mut bounds: Vec<(u64, u64)> = self.areas.iter().map(|a| (a.start, a.end)).collect();
        bounds.sort_unstable();
        let (Some(first), Some(last)) = (bounds.first(), bounds.iter().map(|b| b.1).max()) else {
            return;
        };
        crate::checkpoint::mark(&format!(
            "freeze walk of {}: {}, {} ranges lost",
            self.pid,
            if self.events { "quick" } else { "full" },
            self.lost.len()
        ));
        let walked = if self.events {
            pagemap::scan_regions(
                &self.pagemap,
                first.0,
                last,
                TOUCHED,
                pagemap::PAGE_IS_WRITTEN,
            )
        } else {
            scan_own(&self.pagemap, first.0, last)
        };
        // On failure each area is walked on its own.
        let Ok(regions) = walked else {
            return;
        };
        for (start, end) in bounds {
            let from = regions.partition_point(|r| r.1 <= start);
            let mine = regions[from..]
                .iter()
                .take_while(|r| r.0 < end)
                .map(|&(s, e, c)| (s.max(start), e.min(end), c));
            let found = if self.events {
                Scanned::Touched(mine.map(|r| (r.0, r.1)).collect())
            } else {
                Scanned::All(mine.collect())
            };
            self.scanned.insert(start, (end, found));
        }
    }

    /// At the freeze: stores the pages of area `[start, end)` of the stopped process,
    /// reusing what was pre-copied if an area was tracked at `start`. Returns where they
    /// are, or `None` if no area was tracked there.
    ///
    /// Matching by start alone is sound: a page present now that dolly did not
    /// write-protect shows as written, and a page `mremap` moved (which keeps its
    /// protection, the remap events being on) lies in a range its event reports, where
    /// every page counts as written: only pages that stayed where they were copied are
    /// reused.
    ///
    /// `pool_mapping`: the area is, at the freeze, a private mapping of a pool file. Only then
    /// do its pages not written count as the parent's (the tracked area was read as one, but
    /// the process may have mapped something else there before its tracking began, which no
    /// event reports).
    pub fn finish_area(
        &mut self,
        start: u64,
        end: u64,
        pool_mapping: bool,
    ) -> Result<Option<Pages>> {
        // The tracked area holding `start`: the same, or one the area was split off (by
        // mprotect, or a mapping made over part of it): page protections outlive the split.
        let Some(i) = self
            .areas
            .iter()
            .position(|a| a.start <= start && start < a.end)
        else {
            return Ok(None);
        };
        let piece = [(start, end)];
        let held = intersect(&self.areas[i].held(), &piece);
        // A mapping made over (part of) a tracked one is not tracked: its pages are copied
        // whole (the slot's pages there are freed by `free_unused`). (Where nothing was
        // copied, nothing could be taken for what it is not: no need to look.)
        let parents = if pool_mapping {
            intersect(&self.areas[i].from_parent, &piece)
        } else {
            Vec::new()
        };
        if (!held.is_empty() || !parents.is_empty()) && !self.registered(start) {
            return Ok(None);
        }
        let area = &mut self.areas[i];
        let base = area.start;
        // Where to look page by page (`scope`), and the walk there: the pages of its own,
        // with whether each was written. The whole area, unless the quick walk was made:
        // then only what it found touched, the ranges the events say lost pages, and what
        // the area grew by since it was protected. Elsewhere every page is as it was
        // copied (or found equal to the parent's).
        let whole = piece.to_vec();
        let (scope, regions, changed) = match self.scanned.get(&base) {
            Some((e, Scanned::All(regions))) if base == start && *e == end => {
                (whole, regions.clone(), None)
            }
            Some((protected, Scanned::Touched(touched))) => {
                let mut scope = intersect(touched, &whole);
                scope.extend(intersect(&self.lost, &whole));
                if end > *protected {
                    scope.push(((*protected).max(start), end));
                }
                let changed = merge_ranges(scope);
                // Ranges close together are walked as one (one system call; looking page by
                // page at a few more pages is exact too).
                let mut scope = changed.clone();
                scope.dedup_by(|next, prev| {
                    let close = next.0 - prev.1 <= SCOPE_JOIN_GAP;
                    if close {
                        prev.1 = next.1;
                    }
                    close
                });
                let mut regions = Vec::new();
                for &(s, e) in &scope {
                    regions
                        .extend(scan_own(&self.pagemap, s, e).with_context(|| {
                            format!("scanning pages of {} at {s:#x}", self.pid)
                        })?);
                }
                (scope, regions, Some(changed))
            }
            _ => (
                whole,
                scan_own(&self.pagemap, start, end)
                    .with_context(|| format!("scanning pages of {} at {start:#x}", self.pid))?,
                None,
            ),
        };
        let all: Vec<(u64, u64)> = merge_ranges(regions.iter().map(|r| (r.0, r.1)).collect());
        let present_in_scope = subtract_ranges(&all, &markers(&self.pagemap, &regions)?);
        let present = merge_ranges(
            subtract_ranges(&held, &scope)
                .into_iter()
                .chain(present_in_scope.iter().copied())
                .collect(),
        );
        // In a fork, which keeps no write protection, what was written is what the walk at
        // the freeze (or the comparison with the process) found changed. In the process,
        // pages `mremap` moved keep theirs (the remap events being on): where events say
        // pages went or came, every page present counts as written too.
        let written: Vec<(u64, u64)> = match (&changed, self.copy) {
            (Some(changed), true) => changed.clone(),
            _ => regions
                .iter()
                .filter(|r| r.2 & pagemap::PAGE_IS_WRITTEN != 0)
                .map(|r| (r.0, r.1))
                .chain(intersect(&self.lost, &piece))
                .collect(),
        };
        // Copy what was written since, and what is here but was neither copied nor found
        // equal to the parent's.
        let missing = subtract_ranges(&present_in_scope, &held);
        let to_copy = intersect(
            &present,
            &merge_ranges(written.into_iter().chain(missing).collect()),
        );
        let (deferred, slot) = (&mut self.deferred, area.slot);
        let mut copy = |ranges: &[(u64, u64)]| {
            if !ranges.is_empty() {
                deferred.push((slot, base, page_runs(ranges, base)));
            }
        };
        copy(&to_copy);
        let copied = merge_ranges(
            intersect(&area.copied, &piece)
                .into_iter()
                .chain(to_copy.iter().copied())
                .collect(),
        );
        let same = subtract_ranges(&intersect(&area.same, &piece), &to_copy);
        // Pages copied early but gone since are not part of the snapshot: free them.
        for (s, e) in subtract_ranges(&copied, &present) {
            punch(&self.writer, area.slot, (s - base) / PAGE_SIZE, e - s);
        }
        let own = intersect(&present, &copied);
        let mut same = intersect(&present, &same);
        if !parents.is_empty() {
            // Pages read from the parent's pool file and not written are the parent's, unless
            // an event says the range changed: those are read now.
            let mapped = subtract_ranges(&parents, &own);
            let doubtful = intersect(&mapped, &self.lost);
            copy(&doubtful);
            let own_now = merge_ranges(
                own.iter()
                    .copied()
                    .chain(doubtful.iter().copied())
                    .collect(),
            );
            same = merge_ranges(
                same.into_iter()
                    .chain(subtract_ranges(&mapped, &doubtful))
                    .collect(),
            );
            return self.finish_piece(i, start, end, own_now, same);
        }
        self.finish_piece(i, start, end, own, same)
    }

    /// Records what the freeze stored of piece `[start, end)` of tracked area `i`: `own`
    /// pages in the slot, `same` ones shared with the parent.
    fn finish_piece(
        &mut self,
        i: usize,
        start: u64,
        end: u64,
        own: Vec<(u64, u64)>,
        same: Vec<(u64, u64)>,
    ) -> Result<Option<Pages>> {
        let piece = [(start, end)];
        let shared = match &mut self.parent {
            Some(parent) => parent.shared_runs(start, &same),
            None => Vec::new(),
        };
        let area = &mut self.areas[i];
        let base = area.start;
        let runs = page_runs(&own, start);
        area.copied = merge_ranges(
            subtract_ranges(&area.copied, &piece)
                .into_iter()
                .chain(own)
                .collect(),
        );
        area.same = merge_ranges(
            subtract_ranges(&area.same, &piece)
                .into_iter()
                .chain(same)
                .collect(),
        );
        area.end = area.end.max(end);
        area.finished.push((start, end));
        Ok(Some(Pages {
            offset: (start - base) / PAGE_SIZE,
            slot: area.slot,
            runs,
            shared,
        }))
    }

    /// Links the parent's pool files this process shares pages with into `pool_dir`; returns
    /// them as its `base_pools`.
    pub fn link_bases(&self, pool_dir: &Path) -> Result<Vec<PoolFile>> {
        match &self.parent {
            Some(parent) => parent.link_into(pool_dir),
            None => Ok(Vec::new()),
        }
    }
}

/// Makes copies decided on (see [`Deferred`]) from process `pid`.
fn copy_jobs(pid: Pid, mem: &File, writer: &PoolWriter, jobs: &[Deferred]) -> Result<()> {
    for (slot, base, runs) in jobs {
        copy_runs(pid, mem, writer, *slot, *base, runs)?;
    }
    Ok(())
}

/// Frees `len` bytes of a slot's pages from page `page` on.
fn punch(writer: &PoolWriter, slot: u32, page: u64, len: u64) {
    let _ = nix::fcntl::fallocate(
        writer.file(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        pool::page_offset(slot, page) as i64,
        len as i64,
    );
}

/// Bytes read from a process at a time when comparing with a parent snapshot.
const CHUNK: u64 = 2 << 20;

/// Like `copy_runs`, for an incremental capture: reads the runs of the area at
/// `slot_and_base.1`, compares each page with the parent's (see
/// [`ParentPages::same_ranges`]), and writes into the slot only those found nowhere there.
/// Returns the address ranges that were equal.
fn copy_changed_runs(
    pid: Pid,
    mem: &File,
    writer: &PoolWriter,
    (slot, base): (u32, u64),
    runs: &[[u64; 2]],
    parent: &mut ParentPages,
    (data, theirs): &mut (Vec<u8>, Vec<u8>),
) -> Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let mut same_all = Vec::new();
    for run in runs {
        let (start, end) = (
            base + run[0] * PAGE_SIZE,
            base + (run[0] + run[1]) * PAGE_SIZE,
        );
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK);
            data.resize(len as usize, 0);
            read_memory(pid, mem, at, data)?;
            let same = parent.same_ranges(at, data, theirs)?;
            for (s, e) in subtract_ranges(&[(at, at + len)], &same) {
                let page = (s - base) / PAGE_SIZE;
                writer
                    .file()
                    .write_all_at(
                        &data[(s - at) as usize..(e - at) as usize],
                        pool::page_offset(slot, page),
                    )
                    .context("writing the pool")?;
            }
            same_all.extend(same);
            at += len;
        }
    }
    Ok(merge_ranges(same_all))
}

/// The parts of `a` also in `b` (both sorted and merged).
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_swap_type_of_write_protect_markers() {
        // (Root and userfaultfd are needed, as for any capture.)
        assert!(marker_type().is_some(), "{:?}", marker_type());
    }

    /// The areas of a running process as listed while it remaps some: one area twice, as it
    /// was and as it is (the later listing is tracked).
    #[test]
    fn an_area_listed_twice_is_tracked_once() {
        let page = PAGE_SIZE as usize;
        // SAFETY: a fresh private mapping of our own, unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let start = at as u64;
        let line = |end: u64| format!("{start:x}-{end:x} rw-p 00000000 00:00 0\n");
        let listed = crate::proc::parse_maps(&format!(
            "{}{}",
            line(start + 6 * PAGE_SIZE),
            line(start + 8 * PAGE_SIZE)
        ))
        .unwrap();
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd::USER_MODE_ONLY;
        // SAFETY: userfaultfd takes flags and returns a new fd we then own.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel just gave us this fd.
        let uffd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        // (Pool files hold sparse 128 TiB slots: tmpfs.)
        let pool = tempfile::tempdir_in("/dev/shm").unwrap();
        let tracked = Tracked::start(
            nix::unistd::getpid(),
            uffd,
            &listed,
            &pool.path().join("pool"),
            None,
        )
        .unwrap();
        let bounds: Vec<(u64, u64)> = tracked.areas.iter().map(|a| (a.start, a.end)).collect();
        drop(tracked);
        // SAFETY: unmapping the area mapped above.
        unsafe { libc::munmap(at, 8 * page) };
        assert_eq!(bounds, vec![(start, start + 8 * PAGE_SIZE)]);
    }

    #[test]
    fn intersects_and_subtracts_ranges() {
        let a = [(0, 10), (20, 30)];
        let b = [(5, 25)];
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25)]);
        assert_eq!(subtract_ranges(&a, &b), vec![(0, 5), (25, 30)]);
        assert_eq!(subtract_ranges(&b, &a), vec![(10, 20)]);
        assert!(intersect(&a, &[]).is_empty());
    }
}
