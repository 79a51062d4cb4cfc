//! What a capture killed midway can leave inside the processes it froze, noted beside its
//! snapshot as the capture goes ([`Note`]), and how a later dolly clears it ([`clear`]):
//! - the forks made at the freeze (see `cow`), which die with dolly as zombies of their
//!   processes;
//! - dolly's memory, mapped inside a process while dolly's calls run there: a process that
//!   a safety net sent back to its own state (see [`crate::tracee::Net`]) keeps it, and
//!   the fork the calls may have made, whose PID only that memory tells.

use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::cow;
use crate::error::{Context, Result};
use crate::proc::ProcDir;
use crate::tracee::Net;

/// The note beside a snapshot being captured (the name is from when it held forks only).
pub const NOTE_FILE: &str = "forks.json";

/// Room for one entry in the note's mapping (an entry takes about 120 bytes); two per
/// process (its calls, its fork).
const ENTRY_BYTES: usize = 256;

/// Bytes of dolly's table of calls read back from a process's leftover memory: the first
/// half of the tables (the leader's table; its outputs come after).
const TABLE_BYTES: usize = 16 * 1024;

/// A fork as recorded beside its snapshot while it lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForkNote {
    /// The process forked.
    pub parent: i32,
    /// The fork's PID.
    pub pid: i32,
    /// The fork's PID as the process sees it.
    pub ns_pid: i32,
    /// When the fork had started by (clock ticks after boot: when dolly saw it made, known
    /// without reading its `stat` in the freeze): tells it from a later process with its
    /// PID. (Not from an earlier one: none can hold its PID while it is not reaped.) An
    /// older note's exact `start_time` reads as that.
    #[serde(alias = "start_time")]
    pub started_by: u64,
    /// When the process forked started: tells it from another process with its PID (a later
    /// one, or one of another PID namespace, as a clone's restored process). 0: unknown.
    #[serde(default)]
    pub parent_start_time: u64,
}

/// Dolly's memory mapped inside a process for the calls dolly runs there, noted before they
/// run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallsNote {
    /// The process.
    pub parent: i32,
    /// When it started (tells it from another process with its PID).
    pub parent_start_time: u64,
    /// Where dolly's memory starts: its table of calls first.
    pub area: u64,
    /// Its length.
    pub len: u64,
    /// Where dolly's code is (inside the area, or a page of its own).
    pub runner: u64,
}

/// One entry of the note.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Leftover {
    /// A fork made at the freeze.
    Fork(ForkNote),
    /// Dolly's memory inside a process.
    Calls(CallsNote),
}

/// [`NOTE_FILE`] beside a snapshot, made before the freeze (creating a file takes tenths
/// of a millisecond) and mapped, its pages written once: noting in the freeze is then a
/// copy into memory, not a write to the file system (tens of µs). The JSON list is
/// followed by zero bytes up to the end of the file.
pub struct Note {
    file: std::fs::File,
    map: Option<memmap2::MmapMut>,
    entries: Vec<Leftover>,
}

impl Note {
    /// Makes the note, empty, with room for the entries of `processes` processes.
    pub fn create(path: &Path, processes: usize) -> Option<Note> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .ok()?;
        let page = crate::sys::PAGE_SIZE as usize;
        let len = (processes.max(1) * 2 * ENTRY_BYTES).next_multiple_of(page);
        // (Zeros written, not faulted in through the mapping: a full file system fails the
        // write, where a store into the mapping would get SIGBUS.)
        let map = file.write_all_at(&vec![0; len], 0).ok().and_then(|()| {
            // SAFETY: the file was just made by dolly, in its own snapshot's directory;
            // nothing else maps or shortens it while the capture runs.
            unsafe { memmap2::MmapMut::map_mut(&file) }.ok()
        });
        // (Its pages written through the mapping once, now: the first store into a page of
        // a shared file mapping faults, about 10 µs, which would be in the freeze.)
        let map = map.map(|mut map| {
            map.fill(0);
            map
        });
        Some(Note {
            file,
            map,
            entries: Vec::new(),
        })
    }

    /// Notes `entry` too.
    pub fn add(&mut self, entry: Leftover) -> Result<()> {
        self.entries.push(entry);
        let text = serde_json::to_vec(&self.entries).expect("notes serialize");
        match &mut self.map {
            Some(map) if text.len() < map.len() => {
                map[..text.len()].copy_from_slice(&text);
                Ok(())
            }
            _ => self
                .file
                .write_all_at(&text, 0)
                .context("noting what the capture leaves in its processes"),
        }
    }
}

/// For a capture found interrupted (its worker killed) in snapshot directory `dir`: clears
/// what its note lists (see [`settle`]); the note is removed once all is settled.
pub fn clear(dir: &Path) {
    let path = dir.join(NOTE_FILE);
    let Ok(text) = std::fs::read(&path) else {
        return;
    };
    // (The list, then zeros: see `Note`.)
    let end = text.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let settled = match serde_json::from_slice::<Vec<Leftover>>(&text[..end]) {
        Ok(entries) => settle(&entries),
        Err(_) => true, // empty: made before the freeze, nothing noted yet
    };
    if settled {
        let _ = std::fs::remove_file(path);
    }
}

/// Has each process noted in `entries` reap its fork, if it is still a zombie there, and
/// unmaps dolly's memory left in it (with its fork reaped, if its calls made one). Returns
/// whether every entry is settled: its process seen (as itself, from this PID namespace)
/// and nothing left. (Seen from another PID namespace, as inside a clone, the entries are
/// left for a dolly that sees the processes.)
fn settle(entries: &[Leftover]) -> bool {
    let mut settled = true;
    for entry in entries {
        settled &= match entry {
            Leftover::Fork(note) => reap_fork(note),
            Leftover::Calls(note) => sweep(note),
        };
    }
    settled
}

/// Whether process `pid` is the one that started at `start_time` (0: unknown, any).
fn seen(pid: i32, start_time: u64) -> bool {
    ProcDir::new(Pid::from_raw(pid))
        .stat()
        .is_ok_and(|s| start_time == 0 || s.start_time == start_time)
}

/// Whether `child` is a zombie child of `parent` made by dolly (exit signal 0), started by
/// `started_by` (clock ticks after boot) if given.
fn dollys_zombie(child: i32, parent: i32, started_by: Option<u64>) -> bool {
    ProcDir::new(Pid::from_raw(child)).stat().is_ok_and(|s| {
        s.state == 'Z'
            && s.ppid == parent
            && s.exit_signal == 0
            && started_by.is_none_or(|by| s.start_time <= by)
    })
}

/// [`settle`] for a fork.
fn reap_fork(note: &ForkNote) -> bool {
    if !seen(note.parent, note.parent_start_time) {
        return false;
    }
    !dollys_zombie(note.pid, note.parent, Some(note.started_by))
        || cow::reap(Pid::from_raw(note.parent), note.ns_pid, None).is_ok()
}

/// [`settle`] for dolly's memory in a process: what of it is still there (mapped where
/// noted, perhaps merged with a neighbouring mapping; the area known by the nets' handler
/// action in its first net, the code by its bytes), from inside the process (one brief
/// stop): reaps the fork the area's table of calls says the calls made, if it is a zombie,
/// puts the process's own SIGTRAP action back if it is still the one of dolly's nets (their
/// threads not all sent back by them; from the copy in the area, else beside the code), and
/// unmaps it.
fn sweep(note: &CallsNote) -> bool {
    if !seen(note.parent, note.parent_start_time) {
        return false;
    }
    let pid = Pid::from_raw(note.parent);
    let proc = ProcDir::new(pid);
    let (Ok(maps), Ok(mem)) = (
        proc.maps_without_flags(),
        std::fs::File::open(proc.path("mem")),
    ) else {
        return false;
    };
    let mapped = |start: u64, len: u64| {
        maps.iter()
            .any(|m| m.start <= start && start + len <= m.end)
    };
    let bytes = |at: u64, len: usize| {
        let mut buf = vec![0u8; len];
        mem.read_exact_at(&mut buf, at).ok().map(|()| buf)
    };
    let code_len = crate::tracee::call_runner_len();
    let code = mapped(note.runner, code_len as u64)
        && bytes(note.runner, code_len).is_some_and(|c| crate::tracee::is_call_runner(&c));
    let handler = Net::handler(note.runner);
    let first_net = Net::at(super::process::net_at(note.area, 0));
    let end = note.area + note.len;
    let code_inside = (note.area..end).contains(&note.runner);
    let area = mapped(note.area, note.len)
        && ((code && code_inside)
            || bytes(first_net.action(), 8).is_some_and(|w| w == handler.to_ne_bytes()));
    if !code && !area {
        return true;
    }
    // (The process sees its fork's PID as dolly does: a capture refuses other PID
    // namespaces.)
    let fork = area
        .then(|| bytes(note.area, TABLE_BYTES.min(note.len as usize)))
        .flatten()
        .and_then(|table| crate::tracee::fork_in_table(&table))
        .filter(|&child| dollys_zombie(child, note.parent, None));
    // (Only the nets' handler needs putting back, and only while the area holds its
    // copy of the process's own action: its code page alone is left once it was put back.)
    let kept = area.then(|| first_net.saved_action());
    let page = crate::sys::PAGE_SIZE;
    let code_page = (code && !code_inside).then(|| crate::sys::page_floor(note.runner));
    cow::run_in(pid, None, |remote| {
        if let Some(child) = fork {
            cow::wait_for(remote, child)?;
        }
        if let Some(kept) = kept {
            // (The action read into the end of the page of the kept copy, past that.)
            let read_at = crate::sys::page_floor(kept) + page - crate::tracee::SIGACTION_LEN;
            let (trap, sigaction) = (libc::SIGTRAP as u64, libc::SYS_rt_sigaction);
            remote.call(
                "reading the SIGTRAP action",
                sigaction,
                &[trap, 0, read_at, 8],
            )?;
            let mut now = [0u8; 8];
            remote.read_mem(read_at, &mut now)?;
            if u64::from_ne_bytes(now) == handler {
                remote.call(
                    "putting the SIGTRAP action back",
                    sigaction,
                    &[trap, kept, 0, 8],
                )?;
            }
        }
        let munmap = libc::SYS_munmap;
        if area {
            remote.call("unmapping dolly's memory", munmap, &[note.area, note.len])?;
        }
        if let Some(at) = code_page {
            remote.call("unmapping dolly's code page", munmap, &[at, page])?;
        }
        Ok(())
    })
    .is_ok()
}
