//! `/proc/PID/smaps` (the `maps` lines plus each area's `VmFlags`).

use crate::error::{Error, ErrorKind, Result};

/// The kernel `VM_*` flags of an area that a restore must give back, as `VmFlags` names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmFlags {
    /// `gd`: the area grows down (a stack).
    pub grows_down: bool,
    /// `lo`: pages are locked in memory (`mlock`).
    pub locked: bool,
    /// `dc`: not copied on fork (`MADV_DONTFORK`).
    pub dont_fork: bool,
    /// `dd`: left out of core dumps (`MADV_DONTDUMP`).
    pub dont_dump: bool,
    /// `wf`: wiped on fork (`MADV_WIPEONFORK`).
    pub wipe_on_fork: bool,
    /// `hg`: transparent huge pages advised (`MADV_HUGEPAGE`).
    pub huge_page: bool,
    /// `nh`: transparent huge pages refused (`MADV_NOHUGEPAGE`).
    pub no_huge_page: bool,
    /// `mg`: may be merged by KSM (`MADV_MERGEABLE`).
    pub mergeable: bool,
    /// `mw`: may be made writable (for shared file mappings: the file is open for writing).
    pub may_write: bool,
    /// `io` or `pf`: a device or raw-PFN mapping dolly cannot rebuild.
    pub device: bool,
    /// `ht`: hugetlb memory (`MAP_HUGETLB`, a hugetlbfs file).
    pub hugetlb: bool,
}

impl VmFlags {
    fn parse(text: &str) -> VmFlags {
        let mut f = VmFlags::default();
        for flag in text.split_whitespace() {
            match flag {
                "gd" => f.grows_down = true,
                "lo" => f.locked = true,
                "dc" => f.dont_fork = true,
                "dd" => f.dont_dump = true,
                "wf" => f.wipe_on_fork = true,
                "hg" => f.huge_page = true,
                "nh" => f.no_huge_page = true,
                "mg" => f.mergeable = true,
                "mw" => f.may_write = true,
                "io" | "pf" => f.device = true,
                "ht" => f.hugetlb = true,
                _ => {}
            }
        }
        f
    }
}

/// One memory area (VMA) of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapsEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared (`s`) rather than private (`p`).
    pub shared: bool,
    /// Offset into the file, in bytes.
    pub offset: u64,
    /// Device of the file (`major:minor` packed as by `makedev`).
    pub dev: u64,
    /// Inode of the file (0 for anonymous memory).
    pub inode: u64,
    /// The path, a `[name]`, or empty; without the ` (deleted)` suffix.
    pub path: String,
    /// The file was deleted (`(deleted)` suffix).
    pub deleted: bool,
    /// The `VmFlags` line.
    pub flags: VmFlags,
}

impl MapsEntry {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the area is empty (never, for a real VMA).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The `start-end` name of the area under `/proc/PID/map_files`.
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

fn parse_header(line: &str) -> Option<MapsEntry> {
    let mut rest = line;
    let mut next = || {
        let s = rest.trim_start();
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let (tok, after) = s.split_at(end);
        rest = after;
        tok
    };
    let range = next();
    let perms = next();
    let offset = next();
    let dev = next();
    let inode = next();
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = perms.as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let major = u64::from_str_radix(major, 16).ok()?;
    let minor = u64::from_str_radix(minor, 16).ok()?;
    let mut path = rest.trim_start().to_string();
    let deleted = path.ends_with(" (deleted)");
    if deleted {
        path.truncate(path.len() - " (deleted)".len());
    }
    Some(MapsEntry {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: nix::sys::stat::makedev(major, minor),
        inode: inode.parse().ok()?,
        path,
        deleted,
        flags: VmFlags::default(),
    })
}

fn is_header(line: &str) -> bool {
    let first = line.split_whitespace().next().unwrap_or("");
    first.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit())
    })
}

/// Parses `/proc/PID/smaps` (or `/proc/PID/maps`, which leaves the flags empty).
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>> {
    let mut out: Vec<MapsEntry> = Vec::new();
    for line in text.lines() {
        if is_header(line) {
            let entry = parse_header(line).ok_or_else(|| {
                Error::new(
                    ErrorKind::System,
                    format!("unexpected /proc maps line {line:?}"),
                )
            })?;
            out.push(entry);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.flags = VmFlags::parse(flags);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 247030                     /usr/bin/cat
Size:                  8 kB
VmFlags: rd mr mw me dw sd
7f0000000000-7f0000001000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
Size:                  4 kB
VmFlags: rd wr sh mr mw me ms sd
7f0000002000-7f0000004000 rw-p 00000000 00:00 0                          /tmp/a file with spaces (deleted)
VmFlags: rd wr mr mw me ac sd dc dd hg
7ffd52185000-7ffd521a6000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7f0000005000-7f0000006000 ---p 00000000 00:00 0 
VmFlags: mr mw me
";

    #[test]
    fn parses_areas_paths_and_flags() {
        let m = parse_maps(SMAPS).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].path, "/usr/bin/cat");
        assert_eq!(m[0].dev, nix::sys::stat::makedev(0xfe, 0));
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert!(m[1].shared && m[1].deleted && m[1].path == "/dev/zero");
        assert_eq!(m[2].path, "/tmp/a file with spaces");
        assert!(m[2].flags.dont_fork && m[2].flags.dont_dump && m[2].flags.huge_page);
        assert!(m[3].flags.grows_down);
        assert_eq!(m[4].path, "");
        assert!(!m[4].read && !m[4].write && !m[4].exec);
        assert_eq!(m[4].len(), 4096);
    }
}
