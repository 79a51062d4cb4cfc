//! `PAGEMAP_SCAN` (Linux 6.7): find the runs of pages of an address range that are in
//! memory, written, file-backed, zero... in one ioctl instead of 8 bytes per page.

use std::os::fd::AsRawFd;

use nix::errno::Errno;

/// The page is write-protected by userfaultfd in async mode and may be tracked.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// The page was written since userfaultfd write-protection was armed.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// The page is in the page cache of a file (or shared anonymous memory).
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// The page is in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// The page is in swap.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// The page is the shared zero page (read but never written).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// The page is part of a huge page.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

/// Which pages a scan selects, in the kernel's terms: a page matches when
/// `(categories ^ inverted) & required == required` and, if `any_of` is not zero,
/// `(categories ^ inverted) & any_of != 0`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanFilter {
    /// Categories whose meaning is inverted before testing.
    pub inverted: u64,
    /// Categories that must all be set (after inversion).
    pub required: u64,
    /// Categories of which at least one must be set (after inversion).
    pub any_of: u64,
}

/// Write-protect the pages a scan matches (userfaultfd async write-protection must be
/// registered on the range).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail unless the range is registered for userfaultfd async write-protection.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Returns the runs `[start, end)` of pages in `[start, end)` that match `filter`, read from
/// an open `/proc/PID/pagemap`.
pub fn scan(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    filter: ScanFilter,
) -> Result<Vec<(u64, u64)>, Errno> {
    scan_with(pagemap, start, end, filter, 0)
}

/// [`scan`] that also write-protects the matching pages, so that writes to them from now on
/// show as `PAGE_IS_WRITTEN`.
pub fn scan_and_protect(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    filter: ScanFilter,
) -> Result<Vec<(u64, u64)>, Errno> {
    scan_with(
        pagemap,
        start,
        end,
        filter,
        // (Without PM_SCAN_CHECK_WPASYNC: a mapping made over part of a registered range
        // is skipped, not an error that would leave the rest unprotected.)
        PM_SCAN_WP_MATCHING,
    )
}

/// Whether the area holding `addr` is registered for userfaultfd asynchronous
/// write-protection (a mapping made over a registered one is not).
pub fn wp_async_at(pagemap: &impl AsRawFd, addr: u64) -> bool {
    let any = ScanFilter {
        inverted: 0,
        required: 0,
        any_of: 0,
    };
    walk(
        pagemap,
        addr,
        addr + super::PAGE_SIZE,
        any,
        PAGE_IS_WPALLOWED,
        0,
    )
    .is_ok_and(|r| r.first().is_some_and(|r| r.2 & PAGE_IS_WPALLOWED != 0))
}

/// Like [`scan`], but returns each run with the categories of its pages (`return_mask` of
/// them): `(start, end, categories)`.
pub fn scan_regions(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    filter: ScanFilter,
    return_mask: u64,
) -> Result<Vec<(u64, u64, u64)>, Errno> {
    walk(pagemap, start, end, filter, return_mask, 0)
}

fn scan_with(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    filter: ScanFilter,
    flags: u64,
) -> Result<Vec<(u64, u64)>, Errno> {
    let regions = walk(
        pagemap,
        start,
        end,
        filter,
        filter.required | filter.any_of,
        flags,
    )?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (s, e, _) in regions {
        match runs.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => runs.push((s, e)),
        }
    }
    Ok(runs)
}

/// One `PAGEMAP_SCAN` walk of `[start, end)`, in as many calls as it takes.
fn walk(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    filter: ScanFilter,
    return_mask: u64,
    flags: u64,
) -> Result<Vec<(u64, u64, u64)>, Errno> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_inverted: filter.inverted,
            category_mask: filter.required,
            category_anyof_mask: filter.any_of,
            return_mask,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `vec_len` regions that
        // outlive the call; the kernel writes at most that many.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            return Err(Errno::last());
        }
        for r in &regions[..n as usize] {
            match out.last_mut() {
                Some(last) if last.1 == r.start && last.2 == r.categories => last.1 = r.end,
                _ => out.push((r.start, r.end, r.categories)),
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(out)
}

/// A `/proc/PID/pagemap` entry: the page is present (bits 0-54 then hold its frame number,
/// shown only to a reader with `CAP_SYS_ADMIN`).
pub const PM_PRESENT: u64 = 1 << 63;
/// A `/proc/PID/pagemap` entry: the page is swapped (or a marker: see [`swap_types`]).
pub const PM_SWAPPED: u64 = 1 << 62;
/// A `/proc/PID/pagemap` entry: the page is a file page (or shared anonymous memory).
pub const PM_FILE: u64 = 1 << 61;
/// A `/proc/PID/pagemap` entry: the page is write-protected by a userfaultfd.
pub const PM_UFFD_WP: u64 = 1 << 57;
/// The frame number bits of a present page's `/proc/PID/pagemap` entry.
pub const PM_PFN: u64 = (1 << 55) - 1;

/// The raw `/proc/PID/pagemap` entries of the pages of `[start, end)`.
pub fn entries(pagemap: &std::fs::File, start: u64, end: u64) -> Result<Vec<u64>, Errno> {
    use std::os::unix::fs::FileExt;
    let pages = ((end - start) / super::PAGE_SIZE) as usize;
    let mut raw = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut raw, start / super::PAGE_SIZE * 8)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect())
}

/// Whether `/proc/PID/pagemap` shows dolly the frame numbers of pages (it needs
/// `CAP_SYS_ADMIN`): found once, on a page of dolly's own stack.
pub fn frames_visible() -> bool {
    static VISIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VISIBLE.get_or_init(|| {
        let probe = std::hint::black_box([1u8; 8]);
        let at = probe.as_ptr() as u64 & !(super::PAGE_SIZE - 1);
        std::fs::File::open("/proc/self/pagemap")
            .ok()
            .and_then(|f| entries(&f, at, at + super::PAGE_SIZE).ok())
            .is_some_and(|e| e[0] & PM_PRESENT != 0 && e[0] & PM_PFN != 0)
    })
}

/// The swap type of each page of `[start, end)` that is a swap entry (`None` for the others),
/// read from `/proc/PID/pagemap` (bits 0-4 of a swapped entry). Userfaultfd's markers for
/// dropped, write-protected pages are swap entries of a type of their own: `PAGEMAP_SCAN`
/// reports them as swapped.
pub fn swap_types(pagemap: &std::fs::File, start: u64, end: u64) -> Result<Vec<Option<u8>>, Errno> {
    Ok(entries(pagemap, start, end)?
        .into_iter()
        .map(|e| (e & PM_SWAPPED != 0 && e & PM_PRESENT == 0).then_some((e & 0x1f) as u8))
        .collect())
}
