//! Parsers for `/proc/PID/...`: what the kernel shows of a process without stopping it.

mod cgroup;
mod maps;
mod stat;
mod status;

pub use cgroup::memory_headroom;
pub use maps::{parse_maps, MapsEntry, VmFlags};
pub use stat::{boot_ticks_now, parse_stat, Stat};
pub use status::{parse_status, Status};

use std::path::PathBuf;

use nix::unistd::Pid;

use crate::error::{Context, Error, Result};

/// One process's `/proc/PID` directory (or a thread's `/proc/PID/task/TID`).
#[derive(Debug, Clone)]
pub struct ProcDir {
    pid: Pid,
    dir: PathBuf,
}

impl ProcDir {
    /// The `/proc` directory of process `pid`.
    pub fn new(pid: Pid) -> Self {
        ProcDir {
            pid,
            dir: PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// The process this directory describes.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The path of a file in this directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The `map_files` link to the file area `m` maps.
    pub fn map_file(&self, m: &MapsEntry) -> PathBuf {
        self.path(&format!("map_files/{}", m.map_files_name()))
    }

    /// Reads a file of this directory as text.
    pub fn read(&self, name: &str) -> Result<String> {
        let bytes = self.read_bytes(name)?;
        String::from_utf8(bytes).map_err(|_| {
            Error::corrupt(
                format!("{} is not text", self.path(name).display()),
                "report this: the kernel's file format was not expected",
            )
        })
    }

    /// Reads a file of this directory as bytes. (procfs files report no size: reading them
    /// in large chunks saves the many small reads `std::fs::read` would make, which count
    /// while a process is frozen.)
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        use std::io::Read;
        let path = self.path(name);
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut out = Vec::with_capacity(16 << 10);
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity());
            }
            let len = out.len();
            let spare = out.capacity() - len;
            out.resize(len + spare, 0);
            match file.read(&mut out[len..]) {
                Ok(0) => {
                    out.truncate(len);
                    return Ok(out);
                }
                Ok(n) => out.truncate(len + n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => out.truncate(len),
                Err(e) => {
                    return Err(Error::io(format!("reading {}", path.display()), e));
                }
            }
        }
    }

    /// Reads a symlink of this directory (`exe`, `cwd`, `fd/3` ...).
    pub fn read_link(&self, name: &str) -> Result<String> {
        let path = self.path(name);
        let target =
            std::fs::read_link(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(target.to_string_lossy().into_owned())
    }

    /// `/proc/PID/stat`.
    pub fn stat(&self) -> Result<Stat> {
        parse_stat(&self.read("stat")?)
    }

    /// `/proc/PID/status`.
    pub fn status(&self) -> Result<Status> {
        parse_status(&self.read("status")?)
    }

    /// `/proc/PID/smaps`: the memory areas with their flags.
    pub fn maps(&self) -> Result<Vec<MapsEntry>> {
        parse_maps(&self.read("smaps")?)
    }

    /// `/proc/PID/maps`: the memory areas without their flags (cheaper: smaps walks the
    /// page tables to count pages).
    pub fn maps_without_flags(&self) -> Result<Vec<MapsEntry>> {
        parse_maps(&self.read("maps")?)
    }

    /// The thread ids of the process.
    pub fn tasks(&self) -> Result<Vec<Pid>> {
        self.list_numbers("task")
    }

    /// The open fd numbers of the process, in order.
    pub fn fds(&self) -> Result<Vec<i32>> {
        Ok(self
            .list_numbers("fd")?
            .into_iter()
            .map(|p| p.as_raw())
            .collect())
    }

    /// The children of the process (all its threads' children).
    pub fn children(&self) -> Result<Vec<Pid>> {
        self.children_of(&self.tasks()?)
    }

    /// The children of threads `tids` of the process (all of them, when it can start no
    /// other: see [`ProcDir::children`]).
    pub fn children_of(&self, tids: &[Pid]) -> Result<Vec<Pid>> {
        let mut out = Vec::new();
        for &tid in tids {
            let text = self.read(&format!("task/{tid}/children"))?;
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse().ok())
                    .map(Pid::from_raw),
            );
        }
        Ok(out)
    }

    /// `/proc/PID/fdinfo/FD`: offset, flags, mount id.
    pub fn fdinfo(&self, fd: i32) -> Result<FdInfo> {
        parse_fdinfo(&self.read(&format!("fdinfo/{fd}"))?)
    }

    /// `/proc/PID/auxv` as (key, value) words.
    pub fn auxv(&self) -> Result<Vec<u64>> {
        let bytes = self.read_bytes("auxv")?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")))
            .collect())
    }

    fn list_numbers(&self, sub: &str) -> Result<Vec<Pid>> {
        let path = self.path(sub);
        let mut out: Vec<Pid> = std::fs::read_dir(&path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .map(Pid::from_raw)
            .collect();
        out.sort();
        Ok(out)
    }
}

/// What `/proc/PID/fdinfo/FD` says of an open file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// File offset.
    pub pos: u64,
    /// Open flags (`O_*`, including `O_CLOEXEC` for the fd).
    pub flags: u32,
    /// Mount the file was opened on.
    pub mnt_id: u64,
    /// A file lock (flock, POSIX or OFD) is held through this fd's file.
    pub locked: bool,
    /// Every line, for the kind-specific ones (eventfd count, timerfd settings, epoll items).
    pub lines: Vec<String>,
}

impl FdInfo {
    /// The value of a `key: value` line, trimmed.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
    }
}

/// Parses `/proc/PID/fdinfo/FD`.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo> {
    let mut info = FdInfo {
        lines: text.lines().map(str::to_string).collect(),
        ..Default::default()
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || {
            Error::new(
                crate::ErrorKind::System,
                format!("bad fdinfo line {line:?}"),
            )
        };
        match key {
            "pos" => info.pos = value.parse().map_err(|_| bad())?,
            "flags" => info.flags = u32::from_str_radix(value, 8).map_err(|_| bad())?,
            "mnt_id" => info.mnt_id = value.parse().map_err(|_| bad())?,
            "lock" => info.locked = true,
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_reads_octal_flags() {
        let info = parse_fdinfo("pos:\t42\nflags:\t02102001\nmnt_id:\t25\nino:\t7\n").unwrap();
        assert!(!info.locked);
        let locked = parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t7\nlock:\t1: FLOCK  ADVISORY  WRITE 77 fe:00:7 0 EOF\n").unwrap();
        assert!(locked.locked);
        assert_eq!(info.pos, 42);
        assert_eq!(info.flags, 0o2102001);
        assert_eq!(info.mnt_id, 25);
    }

    #[test]
    fn reads_own_process() {
        let me = ProcDir::new(nix::unistd::getpid());
        let stat = me.stat().unwrap();
        assert_eq!(stat.pid, nix::unistd::getpid().as_raw());
        let status = me.status().unwrap();
        assert_eq!(status.tgid, stat.pid);
        assert!(me.maps().unwrap().iter().any(|m| m.path == "[stack]"));
        assert!(!me.tasks().unwrap().is_empty());
    }
}
