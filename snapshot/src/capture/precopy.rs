//! Pre-copy: most of a tree's memory is copied while it runs, so the freeze that captures
//! it only copies what changed since. A first, brief stop of each process, one after the
//! other, makes a userfaultfd inside it (write tracking must be set up from its own address
//! space), then everything else happens with the tree running: registering its private
//! areas for asynchronous write-protection, and rounds of protect-and-copy.

use std::collections::HashMap;
use std::path::Path;

use nix::unistd::Pid;

use super::parent::Parent;
use super::tree::{self, Member};
use crate::error::{Error, Result};
use crate::resource::lost_pages::LostPages;
use crate::resource::memory::POOL_FILE_SUFFIX;
use crate::resource::tracking::Tracked;
use crate::sys::socket::borrow_fd;
use crate::sys::uffd;
use crate::tracee;

/// Later rounds stop once a round copies less than this (what the freeze then copies).
const ROUND_DONE_BYTES: u64 = 8 << 20;
/// At most this many rounds: a process that writes faster than they copy is then copied
/// at the freeze for what it wrote during the last one.
const MAX_ROUNDS: usize = 12;

/// A round is worth another after it only if it copied at most this share of what the one
/// before copied (in tenths): the amount written between rounds still shrinks.
const SHRINKING_TENTHS: u64 = 8;

/// A tree being pre-copied.
#[derive(Debug, Default)]
pub struct Precopy {
    /// Reads the userfaultfds' events; declared first, so it stops before they close.
    lost_pages: Option<LostPages>,
    tracked: HashMap<i32, Tracked>,
    used: Vec<i32>,
    /// How long the tracking's setup stopped a process of the tree (each is stopped on its
    /// own: the longest of those stops).
    pub frozen_ms: f64,
    /// Bytes copied before the freeze.
    pub bytes: u64,
}

impl Precopy {
    /// The tracking of process `pid`, if it was pre-copied; marks its pool file as used.
    pub fn tracked(&mut self, pid: Pid) -> Option<&mut Tracked> {
        self.used.push(pid.as_raw());
        self.tracked.get_mut(&pid.as_raw())
    }

    /// The tracking of process `pid` (after [`Precopy::tracked`] took it for the freeze).
    pub fn tracking_of(&mut self, pid: Pid) -> Option<&mut Tracked> {
        self.tracked.get_mut(&pid.as_raw())
    }

    /// The areas of process `pid` with their flags as read after pre-copy, if it was.
    pub fn known_maps(&self, pid: Pid) -> Option<Vec<crate::proc::MapsEntry>> {
        self.tracked.get(&pid.as_raw())?.known_maps.clone()
    }

    /// At the freeze (and again once forks are compared with their processes: see
    /// [`Tracked::compare_with_copy`]): gives each tracked process the ranges whose pages
    /// may have gone since its tracking began.
    pub fn note_lost(&mut self) {
        let Some(reader) = &self.lost_pages else {
            return;
        };
        for (pid, events) in reader.take() {
            if let Some(t) = self.tracked.get_mut(&pid) {
                t.note_lost(events);
            }
        }
    }

    /// The processes pre-copied.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.tracked.keys().map(|&p| Pid::from_raw(p))
    }

    /// Ends the tracking (closing the userfaultfds: the kernel then unprotects the pages,
    /// which is why this waits for the thaw) and removes the pool files of processes that
    /// were pre-copied but were gone by the freeze.
    pub fn finish(self, pool_dir: &Path) {
        for pid in self.tracked.keys().filter(|p| !self.used.contains(p)) {
            let _ = std::fs::remove_file(pool_dir.join(format!("{pid}{POOL_FILE_SUFFIX}")));
        }
    }
}

/// Makes a userfaultfd inside stopped process `member` and returns dolly's copy of it (the
/// process's own fd is closed again). `vdso`: where its vDSO was a moment before the
/// freeze, if known (checked, else its areas are read). `detached_next`: the tree is thawed
/// right after (one stop less: no need to move the process out of the trap the calls left
/// it in, which only matters should dolly die before the thaw; a job-stopped process is
/// moved anyway, so that the thaw leaves it stopped).
fn make_uffd(
    member: &mut Member,
    vdso: Option<u64>,
    detached_next: bool,
) -> Result<std::os::fd::OwnedFd> {
    let park = !detached_next || member.stopped;
    let pid = member.proc.pid();
    let leader = &mut member.threads[0];
    let ip = leader.vdso_syscall_ip(vdso)?;
    leader.run_inside_as_is(ip, park, |remote| {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd::USER_MODE_ONLY;
        let fd = remote.call("making a userfaultfd", libc::SYS_userfaultfd, &[flags])? as i32;
        let ours = borrow_fd(pid, fd).map_err(|e| Error::sys("taking the userfaultfd", e));
        remote.call("closing the userfaultfd", libc::SYS_close, &[fd as u64])?;
        ours
    })
}

/// Sets up write tracking on the tree under `root` (a brief freeze) and copies its private
/// memory into `pool_dir` while it runs, in rounds, until what changes between two rounds
/// is small. A process whose tracking cannot be set up is simply copied at the freeze.
/// With a `parent`, pages equal to its pages are shared rather than copied.
pub fn run(root: Pid, pool_dir: &Path, parent: Option<&Parent>) -> Result<Precopy> {
    // Found before the freeze (it is dolly's own vDSO: the same for every process), and
    // the reading of a process's areas warmed up: the freeze is short.
    tracee::vdso_syscall_offset()?;
    crate::sys::process::populate_own_code();
    crate::resource::tracking::warm_up();
    crate::sys::sigframe::warm_up();
    let root_vdso = crate::proc::ProcDir::new(root)
        .maps_without_flags()?
        .iter()
        .find(|m| m.path == "[vdso]")
        .map(|m| m.start);
    // Each process is stopped on its own, for its own userfaultfd only (what happens in the
    // others meanwhile does not matter: each is tracked on its own); a process that appears
    // later is copied at the freeze. (All its threads, though: they share the fd table the
    // userfaultfd goes through.)
    // (`index`: its place among the processes frozen, as the final freeze will order them;
    // see `Parent::pages_of`.)
    let mut fds = Vec::new();
    let mut pre = Precopy::default();
    let mut frozen = 0;
    for (pid, under) in tree::live_order(root) {
        // (Not one that left the tree meanwhile, nor a new process with its PID.)
        if !tree::still_under(pid, under) {
            continue;
        }
        let Some(mut one) = tree::freeze_process(pid, pid == root)? else {
            continue;
        };
        if !tree::still_under(pid, under) {
            let _ = one.thaw();
            continue;
        }
        let index = frozen;
        frozen += 1;
        crate::checkpoint::mark("precopy: frozen");
        let known = root_vdso.filter(|_| pid == root);
        let made = make_uffd(&mut one.members[0], known, true);
        let (frozen_for, thawed) = one.thaw();
        pre.frozen_ms = pre.frozen_ms.max(frozen_for.as_secs_f64() * 1e3);
        thawed?;
        if let Ok(fd) = made {
            fds.push((index, pid, fd));
        }
    }
    crate::checkpoint::mark("precopy: tracking set up");
    for (index, pid, fd) in fds {
        let base = match parent {
            Some(p) => p.pages_of(pid.as_raw(), index)?,
            None => None,
        };
        let maps = match crate::proc::ProcDir::new(pid).maps_without_flags() {
            Ok(m) => m,
            Err(_) => continue, // gone
        };
        let path = pool_dir.join(format!("{pid}{POOL_FILE_SUFFIX}"));
        match Tracked::start(pid, fd, &maps, &path, base) {
            Ok(t) => {
                pre.tracked.insert(pid.as_raw(), t);
            }
            // Without tracking (an older kernel, a full pool...) the freeze copies it all,
            // and says why if it cannot either.
            Err(_) => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let event_fds: Vec<(i32, std::os::fd::RawFd)> = pre
        .tracked
        .iter()
        .filter_map(|(&pid, t)| Some((pid, t.event_fd()?)))
        .collect();
    if !event_fds.is_empty() {
        pre.lost_pages = Some(LostPages::start(event_fds)?);
    }
    // The copy yields the CPU to the tree it copies (the freeze then runs at the usual
    // priority again, to be short).
    let _lowered = crate::sys::process::Lowered::by(super::YIELD_NICE);
    let mut last = u64::MAX;
    for round in 0..MAX_ROUNDS {
        let mut bytes = 0;
        for t in pre.tracked.values_mut() {
            if round > 0 {
                t.track_new_areas()?;
            }
            bytes += t.copy_round(round == 0)?;
        }
        pre.bytes += bytes;
        crate::checkpoint::mark(&format!("precopy: round {round}: {bytes} bytes"));
        let shrinking = bytes.saturating_mul(10) <= last.saturating_mul(SHRINKING_TENTHS);
        last = bytes;
        if round > 0 && (bytes < ROUND_DONE_BYTES || !shrinking) {
            break;
        }
    }
    for t in pre.tracked.values_mut() {
        t.read_flags();
    }
    Ok(pre)
}
