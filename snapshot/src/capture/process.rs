//! Capturing one frozen process of the tree: first everything but its pages (so that any
//! refusal comes before pages are copied for any process), then its pages.

use std::path::Path;

use crate::checkpoint::Checkpoints;
use crate::error::{Error, Result};
use crate::image::{AreaKind, PoolFile, Process, Signals, Thread};
use crate::proc::ProcDir;
use crate::resource::files::{FileTable, OpenFiles};
use crate::resource::memory::{MemoryPlan, ShmemTable};
use crate::resource::{creds, files, memory, process, signals, thread};
use crate::sys::sigframe::ThreadState;
use crate::tracee::{self, RawRegs, Tracee};
use nix::unistd::Pid;

use super::tree::Member;
use super::{checks, cow};

/// Bytes of scratch memory mapped inside the target while reading hidden state: the tables
/// of calls and their outputs, then [`NETS`] safety nets (see [`tracee::Net`]).
const SCRATCH_LEN: u64 = TABLES_LEN + NETS * tracee::Net::LEN;

/// The part of the scratch memory for tables of calls and their outputs.
const TABLES_LEN: u64 = 8 * crate::sys::PAGE_SIZE;

/// Safety nets in the scratch memory: as many threads of a process run their calls at the
/// same time (see [`capture_threads`]; their slots then fill the tables' first half).
const NETS: u64 = 32;

/// Where the count of threads under safety nets is in the scratch memory (see
/// [`tracee::Remote::count_nets`]): at the end of the first page of the leader's outputs
/// (a page written anyway; the other threads' slots stay below it).
const COUNT_AT: u64 = OUT + crate::sys::PAGE_SIZE - 8;

/// Where safety net `i` is in the scratch memory at `area`.
pub(super) fn net_at(area: u64, i: u64) -> u64 {
    area + TABLES_LEN + i * tracee::Net::LEN
}

/// The tables a tree's processes share: each file, open file description and shared memory
/// object once, however many processes hold it.
#[derive(Debug)]
pub struct Shared {
    /// Files (inodes).
    pub files: FileTable,
    /// Open file descriptions.
    pub open_files: OpenFiles,
    /// Shared anonymous memory objects.
    pub shmem: ShmemTable,
    /// The whole tree (a pipe held only inside it is the tree's own...).
    pub tree: crate::resource::tree::TreeView,
}

/// What only code running inside the process can tell.
struct Hidden {
    actions: Vec<crate::image::SignalAction>,
    thread: thread::HiddenState,
    itimers: crate::image::ITimers,
    brk: u64,
    flags: crate::image::ProcessFlags,
    securebits: u32,
}

/// A process inspected, its pages not yet copied.
pub struct Inspected {
    /// Its image, but its memory's pages.
    process: Process,
    memory: MemoryPlan,
}

impl Inspected {
    /// Fills in the flags of the areas the freeze did not read them for, from `maps` (see
    /// [`memory::MemoryPlan::fill_flags`]): the process's own, read while it is frozen, or
    /// its fork's (`of_fork`).
    pub fn fill_flags(&mut self, maps: &[crate::proc::MapsEntry], of_fork: bool) -> Result<()> {
        let pid = Pid::from_raw(self.process.pid);
        self.memory.fill_flags(pid, maps, of_fork)
    }

    /// After the thaw: fails unless the fork made of it at the freeze, with areas `maps`,
    /// has all its areas (see [`memory::MemoryPlan::check_fork`]).
    pub fn check_fork(&self, maps: &[crate::proc::MapsEntry]) -> Result<()> {
        self.memory
            .check_fork(Pid::from_raw(self.process.pid), maps)
    }

    /// Whether the flags of some of its areas are still to be read.
    pub fn flags_unknown(&self) -> bool {
        self.memory.flags_unknown()
    }

    /// The areas of its memory (their pages not yet assigned).
    pub fn areas(&self) -> &[crate::image::Area] {
        &self.memory.areas
    }
}

/// Finds a `syscall` instruction the stopped process can execute: in its vDSO (at `vdso`
/// where known, else where its areas say), or the one it is stopped right after if the
/// freeze caught it in a system call.
fn syscall_ip(tracee: &Tracee, vdso: Option<u64>, regs: &RawRegs) -> Result<u64> {
    let in_vdso = tracee.vdso_syscall_ip(vdso);
    if in_vdso.is_err() && (regs.orig_rax as i64) >= 0 && tracee.has_syscall_at(regs.rip - 2) {
        return Ok(regs.rip - 2);
    }
    in_vdso
}

/// Where the vDSO is in areas `known` (as read before the freeze).
fn known_vdso(known: &[crate::proc::MapsEntry]) -> Option<u64> {
    known.iter().find(|m| m.path == "[vdso]").map(|m| m.start)
}

/// Where the vDSO is in a memory plan.
fn plan_vdso(memory: &MemoryPlan) -> Option<u64> {
    memory
        .areas
        .iter()
        .find(|a| a.kind == AreaKind::Vdso)
        .map(|a| a.start)
}

/// Where the batched queries of [`query_hidden`] write, in the scratch area: the call table
/// first, the outputs from here.
const OUT: u64 = TABLES_LEN / 2;

/// Dolly's scratch area and code page inside a process, kept mapped after the leader's
/// queries for those of its other threads (they share its memory): see [`Scratch::unmap`].
struct Scratch {
    /// The scratch area (with the code page at its end, if `runner_page` is `None`).
    area: u64,
    /// Its length.
    len: u64,
    /// Where the code that runs a batch of calls is.
    runner: u64,
    /// The code page, when it could not be mapped with the scratch area.
    runner_page: Option<u64>,
    /// The process's own SIGTRAP action (`struct sigaction`), as the leader's batch saved
    /// it: for the safety nets of its other threads' batches.
    trap_action: [u8; tracee::SIGACTION_LEN as usize],
    /// A net's handler may still be the process's SIGTRAP action (the other threads' nets,
    /// or putting the process's own back failed): it is put back before the unmapping.
    net_out: std::cell::Cell<bool>,
}

impl Scratch {
    /// Unmaps it, from inside a stopped thread of the process (the process's own SIGTRAP
    /// action put back first, if a net may still be out: else the action would be code
    /// unmapped).
    fn unmap(&self, remote: &mut tracee::Remote) -> Result<()> {
        if self.net_out.get() {
            remote.take_net_in(&tracee::Net::at(net_at(self.area, 0)))?;
            self.net_out.set(false);
        }
        let page = crate::sys::PAGE_SIZE;
        let runner = match self.runner_page {
            Some(at) => remote
                .call("unmapping dolly's code page", libc::SYS_munmap, &[at, page])
                .map(drop),
            None => Ok(()),
        };
        remote.call(
            "unmapping the scratch page",
            libc::SYS_munmap,
            &[self.area, self.len],
        )?;
        runner
    }
}

/// What dolly does beside the calls it runs inside a frozen process (see [`query_hidden`]),
/// rather than only wait for them.
trait Beside {
    /// While dolly's scratch memory is mapped inside the process.
    fn mapping(&mut self);
    /// Once that memory is mapped (at each `[start, end)` of `dollys`): whether the batch is
    /// to end with a fork. With `reread`, the areas are read again first (dolly's memory was
    /// mapped in more than one call, after the areas were read: merged into one of the
    /// process's areas, it would be missed).
    fn fork(&mut self, dollys: &[(u64, u64)], reread: bool) -> bool;
    /// Before the batch runs, dolly's memory mapped at `area` (`len` bytes, its code at
    /// `runner`): to note what a killed capture would leave in the process.
    fn calls_at(&mut self, area: u64, len: u64, runner: u64);
    /// While the batch of calls (and the fork) runs.
    fn running(&mut self);
}

/// Reads what only the process itself can tell, with one batch of system calls run inside
/// it (one stop, not one per call), doing `beside`'s work while dolly's scratch memory is
/// mapped and while the batch runs. With `keep`, the scratch area stays mapped for the
/// queries of the process's other threads ([`capture_threads`]) and is returned; the caller
/// unmaps it. If `beside` says so (and not `keep`), the batch ends with the `clone` of a
/// fork held by dolly ([`tracee::FORK_HELD_ARGS`]; the fork gets a copy of dolly's memory,
/// left out of the image, whose code ends the fork should it ever run): the `clone`'s
/// result goes into `made`, whatever else happened once the calls ran (for the caller to
/// take the fork over).
fn query_hidden(
    remote: &mut tracee::Remote,
    leader: ThreadState<'_>,
    checkpoints: &Checkpoints,
    keep: bool,
    beside: &mut dyn Beside,
    made: &mut Option<i64>,
) -> Result<(Hidden, Option<Scratch>)> {
    let page = crate::sys::PAGE_SIZE;
    let mut map = |remote: &mut tracee::Remote, len: u64, prot: i32| {
        remote.call_while(
            "mapping a scratch page",
            libc::SYS_mmap,
            &[
                0,
                len,
                prot as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
            || beside.mapping(),
        )
    };
    // The scratch area and the code page in one mapping (one stop less to map it and one
    // to unmap it), unless the process may not have writable and executable memory.
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    let (scratch, runner, together) = match map(remote, SCRATCH_LEN + page, rwx) {
        Ok(at) => {
            let runner = remote
                .write_call_runner(at + SCRATCH_LEN)
                .map(|_| at + SCRATCH_LEN);
            (at, runner, true)
        }
        Err(_) => {
            let scratch = map(remote, SCRATCH_LEN, libc::PROT_READ | libc::PROT_WRITE)?;
            (scratch, remote.map_call_runner(), false)
        }
    };
    let len = if together {
        SCRATCH_LEN + page
    } else {
        SCRATCH_LEN
    };
    let mut dollys = vec![(scratch, scratch + len)];
    if let (false, Ok(at)) = (together, &runner) {
        dollys.push((*at, *at + page));
    }
    let fork = beside.fork(&dollys, !together);
    // (The process's own SIGTRAP action, as the batch saved it; whether the batch's net
    // may still be out: its handler the process's SIGTRAP action.)
    let mut trap_action = [0u8; tracee::SIGACTION_LEN as usize];
    let net_out = std::cell::Cell::new(false);
    let result = match &runner {
        Err(e) => Err(Error::new(e.kind(), e.message())),
        Ok(runner) => Ok(*runner),
    }
    .and_then(|runner| {
        checkpoints.reach("capture:injected")?;
        let out = scratch + OUT;
        // (Under a safety net: should dolly end now, the process goes back to its state.)
        beside.calls_at(scratch, len, runner);
        // (The count, of this thread alone, is written with the outputs' zeros below.) The
        // batch saves the action it replaces, but an ignored one: dolly's calls so far
        // set it back to its default (see `Tracee::set_trap_ignored`).
        let count = scratch + COUNT_AT;
        let ignored = remote.tracee().trap_ignored();
        let saved = ignored.then_some(&tracee::IGNORED_ACTION);
        let spread = remote.spread_net(net_at(scratch, 0), runner, leader, saved, count)?;
        let mut calls = tracee::Calls::default();
        spread.add_install(&mut calls, !ignored);
        // Each signal's action: 32 bytes each.
        let signals: Vec<i32> = (1..=signals::MAX_SIGNAL)
            .filter(|&s| signals::settable(s))
            .collect();
        // (SIGTRAP's is the one the net's install saves: see below.)
        for (i, &signo) in signals
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s != libc::SIGTRAP)
        {
            calls.add(
                libc::SYS_rt_sigaction,
                &[signo as u64, 0, out + 32 * i as u64, 8],
            );
        }
        let after_actions = out + 32 * signals.len() as u64;
        let (altstack, timers) = (after_actions, after_actions + THREAD_STATE_LEN);
        add_thread_queries(&mut calls, altstack);
        for (i, which) in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF]
            .iter()
            .enumerate()
        {
            calls.add(
                libc::SYS_getitimer,
                &[*which as u64, timers + 32 * i as u64],
            );
        }
        let ints = timers + 96;
        let brk = calls.add(libc::SYS_brk, &[0]);
        calls.add(libc::SYS_prctl, &[libc::PR_GET_PDEATHSIG as u64, ints]);
        calls.add(
            libc::SYS_prctl,
            &[libc::PR_GET_CHILD_SUBREAPER as u64, ints + 8],
        );
        let dumpable = calls.add(libc::SYS_prctl, &[libc::PR_GET_DUMPABLE as u64]);
        let thp = calls.add(libc::SYS_prctl, &[libc::PR_GET_THP_DISABLE as u64]);
        let slack = calls.add(libc::SYS_prctl, &[libc::PR_GET_TIMERSLACK as u64]);
        let securebits = calls.add(libc::SYS_prctl, &[libc::PR_GET_SECUREBITS as u64]);
        let queries = calls.len();
        // (The fork gets a copy of dolly's memory, whose code ends it should it ever run:
        // see `tracee::RUN_CALLS`.)
        let clone = (fork && !keep).then(|| calls.add(libc::SYS_clone, &tracee::FORK_HELD_ARGS));
        let end = ints + 16;
        debug_assert!(end <= count, "the outputs end before the count");
        let mut zeros = vec![0u8; (count + 8 - out) as usize];
        zeros[(count - out) as usize..].copy_from_slice(&1u64.to_ne_bytes());
        remote.write_mem(out, &zeros)?;
        remote.start_run(&calls, runner, scratch, Some(&spread))?;
        // (Not to leave the calls running: an abort is acted on once they are over.)
        let paused = checkpoints.reach("capture:calls");
        beside.running();
        let mut done = Ok(());
        let batch = (calls.len(), runner, scratch);
        let (finished, clone_made, taken_in) =
            finish_netted(remote, &spread, batch, clone, &net_out, || {
                if paused.is_ok() {
                    done = checkpoints.reach("capture:calls done");
                }
            });
        let paused = paused.and(done);
        *made = clone_made;
        let results = finished?;
        taken_in?;
        paused?;
        crate::checkpoint::mark("inspect: state read");
        if let Some((i, rc)) = results[..queries]
            .iter()
            .enumerate()
            .find(|(_, &rc)| (-4095..0).contains(&rc))
        {
            return Err(Error::sys(
                format!("reading the process's state from inside it (call {i})"),
                nix::errno::Errno::from_raw(-*rc as i32),
            ));
        }
        let mut raw = vec![0u8; (end - out) as usize];
        remote.read_mem(out, &mut raw)?;
        let at = |addr: u64| (addr - out) as usize;
        remote.read_mem(spread.saved_action(), &mut trap_action)?;
        // (Kept for the handler of the other threads' nets: see `tracee::RUN_CALLS`.)
        if keep {
            remote.keep_trap_action(runner, &trap_action)?;
        }
        if let Some(i) = signals.iter().position(|&s| s == libc::SIGTRAP) {
            let a = at(out + 32 * i as u64);
            raw[a..a + trap_action.len()].copy_from_slice(&trap_action);
        }
        let word = |addr: u64| u64::from_ne_bytes(raw[at(addr)..at(addr) + 8].try_into().unwrap());
        // (An ignored SIGTRAP reads as at its default by now: see `Tracee::set_trap_ignored`.)
        let trap_ignored = remote.tracee().trap_ignored();
        let actions = signals
            .iter()
            .enumerate()
            .map(|(i, &signal)| {
                let a = out + 32 * i as u64;
                let ignored = signal == libc::SIGTRAP && trap_ignored;
                crate::image::SignalAction {
                    signal,
                    handler: if ignored { 1 } else { word(a) },
                    flags: word(a + 8),
                    restorer: word(a + 16),
                    mask: word(a + 24),
                }
            })
            .filter(|a| a.handler != 0 || a.flags != 0 || a.mask != 0)
            .collect();
        let timer = |i: u64| {
            process::read_timeval_pair(&raw[at(timers + 32 * i)..at(timers + 32 * i) + 32])
        };
        Ok(Hidden {
            actions,
            thread: thread_state(&raw[at(altstack)..at(altstack) + THREAD_STATE_LEN as usize]),
            itimers: crate::image::ITimers {
                real: timer(0),
                virtual_: timer(1),
                prof: timer(2),
            },
            brk: results[brk] as u64,
            flags: crate::image::ProcessFlags {
                dumpable: results[dumpable] as u32,
                timerslack_ns: results[slack] as u64,
                thp_disable: results[thp] != 0,
                child_subreaper: word(ints + 8) as i32 != 0,
                pdeathsig: word(ints) as i32,
                coredump_filter: 0,
            },
            securebits: results[securebits] as u32,
        })
    });
    // (`result` is an error whenever the code page could not be mapped.)
    let runner = runner.ok();
    let kept = Scratch {
        area: scratch,
        len,
        runner: runner.unwrap_or_default(),
        runner_page: runner.filter(|_| !together),
        trap_action,
        net_out,
    };
    match result {
        Ok(hidden) if keep => Ok((hidden, Some(kept))),
        result => {
            let unmapped = kept.unmap(remote);
            let hidden = result?;
            unmapped?;
            Ok((hidden, None))
        }
    }
}

/// What [`inspect`] reads from the `/proc` directory of a frozen process, but its areas
/// (while the process runs dolly's batch of calls).
struct ProcRead {
    fds: Vec<crate::image::Fd>,
    locks: Vec<crate::image::FileLock>,
    cwd: String,
    exe: String,
    root: String,
    personality: u32,
    rlimits: Vec<crate::image::Rlimit>,
    sched: crate::image::Scheduling,
    oom_score_adj: i32,
    coredump_filter: u32,
    auxv: Vec<u64>,
}

/// Reads a frozen process's files, then the rest of what [`ProcRead`] holds, from its
/// `/proc` directory; refuses what cannot be restored.
fn read_proc(
    proc: &ProcDir,
    stat: &crate::proc::Stat,
    shared: &mut Shared,
    policy: files::FdPolicy,
) -> Result<ProcRead> {
    let pid = proc.pid();
    let fds = files::capture_fds(
        proc,
        &mut shared.files,
        &mut shared.open_files,
        policy,
        &shared.tree,
    )?;
    let locks = if policy.file_locks {
        files::capture_locks(proc, &fds)?
    } else {
        Vec::new()
    };
    crate::checkpoint::mark("inspect: fds");
    let cwd = proc.read_link("cwd")?;
    if cwd.ends_with(" (deleted)") {
        return Err(Error::refused(
            format!("the working directory of process {pid} ({cwd}) was deleted"),
            "capture a process whose working directory exists",
        ));
    }
    let (sched, oom_score_adj) = process::capture_sched(proc, stat)?;
    Ok(ProcRead {
        fds,
        locks,
        cwd,
        exe: proc
            .read_link("exe")?
            .trim_end_matches(" (deleted)")
            .to_string(),
        root: proc.read_link("root")?,
        personality: u32::from_str_radix(proc.read("personality")?.trim(), 16).unwrap_or(0),
        rlimits: process::capture_rlimits(proc)?,
        sched,
        oom_score_adj,
        coredump_filter: process::capture_coredump_filter(proc)?,
        auxv: proc.auxv()?,
    })
}

/// What [`inspect`] reads through ptrace and from inside the process.
struct ReadInside {
    hidden: Hidden,
    threads: Vec<Thread>,
    pending: Vec<crate::image::QueuedSignal>,
}

/// What [`inspect`] reads from a frozen process's `/proc` directory beside the calls it runs
/// inside it ([`Beside`]): while dolly's scratch memory is mapped, its areas and whether to
/// fork it (`fork_if`); while the calls run, its `stat`, the rest of its checks, the rest of
/// what [`ProcRead`] holds and the files its areas map (none of which needs a lock the
/// calls hold, but the lookup of a mapped file dolly does not reach by its path: see
/// [`MemoryPlan::look_at_files`]).
struct ProcReads<'a, F> {
    proc: &'a ProcDir,
    shared: &'a mut Shared,
    policy: files::FdPolicy,
    known_maps: Option<&'a [crate::proc::MapsEntry]>,
    fork_if: Option<F>,
    /// Notes dolly's memory in the process (area, length, code) before calls run there.
    note_calls: &'a mut dyn FnMut(u64, u64, u64),
    plan: Option<Result<MemoryPlan>>,
    /// What `fork_if` said.
    worth: bool,
    /// The areas were read with dolly's scratch memory merged into one of the process's:
    /// to be read again once it is gone.
    reread: bool,
    rest: Option<RestRead>,
}

/// What [`ProcReads`] reads while the calls run: the process's `stat`, and the rest.
type RestRead = Result<(crate::proc::Stat, ProcRead)>;

impl<F: FnOnce(&MemoryPlan) -> bool> ProcReads<'_, F> {
    /// The areas, but for the files they map (see [`ProcReads::look_at_files`]).
    fn read_plan(&mut self) -> Result<MemoryPlan> {
        let plan = memory::inspect_areas(self.proc, &mut self.shared.shmem, self.known_maps);
        crate::checkpoint::mark("inspect: memory areas");
        plan
    }

    /// The files the plan's areas map, looked at once the fork is decided (a refusal then
    /// undoes the decision, for the forks made after the batch).
    fn look_at_files(&mut self) {
        if let Some(Ok(plan)) = &mut self.plan {
            if let Err(e) = plan.look_at_files(self.proc, &mut self.shared.files) {
                self.plan = Some(Err(e));
                self.worth = false;
            }
        }
    }

    fn read_rest(&mut self) -> RestRead {
        let stat = self.proc.stat()?;
        checks::check_rest(self.proc)?;
        let read = read_proc(self.proc, &stat, self.shared, self.policy)?;
        Ok((stat, read))
    }

    /// What was read, once the calls are over: the memory plan (read again if dolly's
    /// memory was merged into it: it is gone by now), then the rest; reads what was not yet
    /// (the calls could not run).
    fn take(&mut self) -> (Result<MemoryPlan>, RestRead) {
        self.running();
        let plan = match self.plan.take().expect("read by mapping()") {
            Ok(_) if self.reread => self.read_plan().and_then(|mut plan| {
                plan.look_at_files(self.proc, &mut self.shared.files)?;
                Ok(plan)
            }),
            plan => plan,
        };
        (plan, self.rest.take().expect("read by running()"))
    }

    /// Where the process's vDSO is, once its areas are read.
    fn vdso(&self) -> Option<u64> {
        match &self.plan {
            Some(Ok(plan)) => plan_vdso(plan),
            _ => None,
        }
    }
}

impl<F: FnOnce(&MemoryPlan) -> bool> Beside for ProcReads<'_, F> {
    fn mapping(&mut self) {
        if self.plan.is_none() {
            let plan = self.read_plan();
            // (The plan may hold dolly's scratch memory, if mapped already: no page of it
            // is written yet.)
            if let Ok(plan) = &plan {
                self.worth = self.fork_if.take().is_some_and(|f| f(plan));
            }
            self.plan = Some(plan);
        }
    }

    fn fork(&mut self, dollys: &[(u64, u64)], reread: bool) -> bool {
        self.mapping();
        if reread && self.worth {
            self.plan = Some(self.read_plan());
        }
        if let Some(Ok(plan)) = &mut self.plan {
            // (Each left out; all must be, for the fork.)
            let kept_in = dollys.iter().filter(|&&range| !plan.exclude(range)).count();
            if kept_in > 0 {
                self.reread = true;
                self.worth = false;
            }
        }
        self.worth
    }

    fn calls_at(&mut self, area: u64, len: u64, runner: u64) {
        (self.note_calls)(area, len, runner);
    }

    fn running(&mut self) {
        self.mapping();
        if self.rest.is_none() {
            self.rest = Some(self.read_rest());
            self.look_at_files();
        }
    }
}

/// Just before the freeze, while process `pid` runs: reads what [`inspect`] reads of it (its
/// status and stat, its areas and the files they map, its fds) and throws it away. The
/// freeze then finds dolly's code, the kernel's entries for these files (`map_files`, `fd`,
/// `fdinfo`) and the caches warm: after pre-copy's copying, the areas alone took a quarter
/// longer to read in the freeze of a 64 MiB writer (0.11 ms against 0.09 ms once
/// rehearsed; that freeze 0.055 ms shorter in all).
pub fn rehearse(pid: Pid) {
    let proc = ProcDir::new(pid);
    let _ = proc.status();
    let _ = proc.stat();
    for fd in proc.fds().unwrap_or_default() {
        let name = format!("fd/{fd}");
        let _ = proc.read_link(&name);
        let _ = std::fs::metadata(proc.path(&name));
        let _ = proc.fdinfo(fd);
    }
    let Ok(maps) = proc.maps_without_flags() else {
        return;
    };
    let mut seen = std::collections::HashSet::new();
    for m in maps.iter().filter(|m| m.path.starts_with('/')) {
        if seen.insert((m.dev, m.inode)) {
            let _ = std::fs::metadata(proc.map_file(m));
            let _ = std::fs::metadata(&m.path);
        }
    }
}

/// Reads everything of a frozen process but its pages; refuses what cannot be restored.
/// Forks it from inside (see [`cow`]) if `fork_if` says so of its memory, at the end of the
/// calls that read its state; returns the fork too.
pub fn inspect(
    member: &mut Member,
    shared: &mut Shared,
    policy: files::FdPolicy,
    known_maps: Option<&[crate::proc::MapsEntry]>,
    checkpoints: &Checkpoints,
    fork_if: impl FnOnce(&MemoryPlan) -> bool,
    note_calls: &mut dyn FnMut(u64, u64, u64),
) -> Result<(Inspected, Option<cow::Held>)> {
    let pid = member.proc.pid();
    let status = member.proc.status()?;
    checks::check_before_calls(pid, &status)?;
    for thread in &mut member.threads {
        thread.set_trap_ignored(tracee::ignores_trap(status.sig_ignored));
    }
    let tracee = &mut member.threads[0];
    let mut regs = tracee.regs()?;
    thread::abort_rseq_section(tracee, &mut regs)?;
    let registers = (regs, tracee.xstate()?, tracee.sigmask()?);
    crate::checkpoint::mark("inspect: registers");
    // The rest of /proc is read while the process runs dolly's calls (dolly would only
    // wait), else after them (the calls could not be started).
    let mut reads = ProcReads {
        proc: &member.proc,
        shared,
        policy,
        known_maps,
        fork_if: Some(fork_if),
        note_calls,
        plan: None,
        worth: false,
        reread: false,
        rest: None,
    };
    let mut held = None;
    let inside = read_inside(
        &mut member.threads,
        (registers, status.ns_pid.clone()),
        &mut reads,
        checkpoints,
        &mut held,
    );
    let (plan, rest) = reads.take();
    // (A refusal first: it tells the user what to do.)
    let refused = |e: &Error| e.kind() == crate::error::ErrorKind::Refused;
    let all = match (plan, rest) {
        (Err(e), _) | (_, Err(e)) if refused(&e) => Err(e),
        (plan, rest) => {
            plan.and_then(|plan| inside.and_then(|inside| rest.map(|rest| (plan, inside, rest))))
        }
    };
    let (memory, inside, (stat, read)) = match all {
        Ok(all) => all,
        Err(e) => {
            if let Some(held) = held {
                let _ = held.end_frozen(member);
            }
            return Err(e);
        }
    };
    if let Some(held) = &mut held {
        held.set_parent_start_time(stat.start_time);
    }
    let ReadInside {
        hidden,
        mut threads,
        pending,
    } = inside;
    threads[0].comm = stat.comm.clone();
    let mut flags = hidden.flags;
    flags.coredump_filter = read.coredump_filter;
    let mut mm = process::mm_layout(&stat, hidden.brk, read.auxv);
    mm.brk = hidden.brk;
    let process = Process {
        pid: pid.as_raw(),
        ns_pids: status.ns_pid.clone(),
        ppid: stat.ppid,
        pgid: stat.pgid,
        sid: stat.sid,
        comm: stat.comm.clone(),
        stopped: member.stopped,
        exe: read.exe,
        personality: read.personality,
        umask: status.umask,
        cwd: read.cwd,
        root: read.root,
        rlimits: read.rlimits,
        creds: creds::capture(&status, hidden.securebits),
        flags,
        sched: read.sched,
        oom_score_adj: read.oom_score_adj,
        mm,
        areas: Vec::new(),
        pool: None,
        base_pools: Vec::new(),
        fds: read.fds,
        locks: read.locks,
        signals: Signals {
            actions: hidden.actions,
            pending,
        },
        itimers: hidden.itimers,
        threads,
    };
    Ok((Inspected { process, memory }, held))
}

/// The part of [`inspect`] that runs calls inside the process: the state only the process
/// can tell, and the fork if `reads` says so (into `held`); then its other threads and its
/// pending signals. `registers`: its leader's registers, extended state and signal mask;
/// `ns_pid`: its leader's PIDs. (The leader's name is left empty, for the caller.)
fn read_inside<F: FnOnce(&MemoryPlan) -> bool>(
    tracees: &mut [Tracee],
    ((regs, xstate, sigmask), ns_pid): ((RawRegs, Vec<u8>, u64), Vec<i32>),
    reads: &mut ProcReads<'_, F>,
    checkpoints: &Checkpoints,
    held: &mut Option<cow::Held>,
) -> Result<ReadInside> {
    // The other threads' queries use the leader's scratch area (one mapping, not one each).
    let others = tracees.len() > 1;
    let tracee = &mut tracees[0];
    let pid = tracee.pid();
    // State only the process itself can tell: run system calls inside it, with every
    // signal blocked but SIGTRAP and those of faults, then put its registers and mask back
    // whatever happened. The fork, if any, is the last call of the batch (or, for a
    // threaded process, of a batch of its own once the other threads' calls are over).
    let ip = syscall_ip(tracee, reads.known_maps.and_then(known_vdso), &regs)?;
    let vdso = |reads: &ProcReads<'_, F>| reads.vdso();
    // (For the safety net of the fork's batch, after the other threads' calls.)
    let kept_xstate = others.then(|| xstate.clone());
    // (What needs the leader stopped is read before it is put back: it then moves out of
    // the trap stop while dolly goes on.)
    let (hidden, scratch, leader, pending) =
        tracee.run_inside(ip, (&regs, sigmask), true, |remote| {
            let mut made = None;
            let state = ThreadState {
                regs: &regs,
                mask: sigmask,
                xstate: &xstate,
            };
            let queried = query_hidden(remote, state, checkpoints, others, &mut *reads, &mut made);
            if let Some(made) = made {
                *held = cow::hold_inside(remote, pid, vdso(reads), made).ok();
            }
            let (hidden, scratch) = queried?;
            // Its own registers and mask back at once, for what only reads it: should dolly
            // end now, it leaves the stop it is in (waited for, so without its SIGTRAP) as
            // itself.
            let read = (|| {
                remote.tracee().set_regs(&regs)?;
                remote.tracee().set_sigmask(sigmask)?;
                let leader = thread::capture(
                    remote.tracee(),
                    &regs,
                    xstate,
                    sigmask,
                    hidden.thread,
                    ns_pid,
                    String::new(),
                )?;
                Ok((leader, signals::pending(pid, true)?))
            })();
            match read {
                Ok((leader, pending)) => Ok((hidden, scratch, leader, pending)),
                // (Dolly's memory, kept for the other threads, goes with the failure.)
                Err(e) => {
                    if let Some(scratch) = &scratch {
                        let _ = scratch.unmap(remote);
                    }
                    Err(e)
                }
            }
        })?;
    let mut threads = vec![leader];
    if let Some(scratch) = &scratch {
        let captured = capture_threads(&mut tracees[1..], vdso(reads), scratch, checkpoints)
            .map(|t| threads.extend(t));
        // Whatever happened: the process is left as it was. The fork, if any, in a batch of
        // its own under a safety net, dolly's memory still mapped (the fork gets a copy of
        // it, left out of the image). (A fork that fails is no error: the freeze then copies
        // the pages.)
        let worth = reads.worth && captured.is_ok();
        let state = ThreadState {
            regs: &regs,
            mask: sigmask,
            xstate: kept_xstate.as_deref().unwrap_or_default(),
        };
        tracees[0].run_inside(ip, (&regs, sigmask), true, |remote| {
            let mut forked = Ok(());
            if worth {
                // (An abort is acted on once the batch is over.)
                let mut paused = Ok(());
                let (made, ran) = fork_in_batch(remote, scratch, state, || {
                    paused = checkpoints.reach("capture:fork calls");
                    reads.running();
                });
                if let Some(made) = made {
                    *held = cow::hold_inside(remote, pid, vdso(reads), made).ok();
                }
                forked = ran.and(paused);
            }
            scratch.unmap(remote)?;
            forked
        })?;
        captured?;
    }
    Ok(ReadInside {
        pending,
        hidden,
        threads,
    })
}

/// Forks the process from inside its stopped leader (in state `leader`), with a batch of one
/// `clone` ([`tracee::FORK_HELD_ARGS`]) under a safety net, through dolly's memory
/// `scratch` (kept by the leader's queries), doing `meanwhile`
/// while it runs. Returns what the `clone` returned, if it ran (a fork to take over, or to
/// end, whatever else happened), and how the batch went.
fn fork_in_batch(
    remote: &mut tracee::Remote,
    scratch: &Scratch,
    leader: ThreadState<'_>,
    meanwhile: impl FnOnce(),
) -> (Option<i64>, Result<()>) {
    let count = scratch.area + COUNT_AT;
    let saved = Some(&scratch.trap_action);
    let at = net_at(scratch.area, 0);
    let net = match remote
        .count_nets(count, 1)
        .and_then(|()| remote.spread_net(at, scratch.runner, leader, saved, count))
    {
        Ok(net) => net,
        Err(e) => return (None, Err(e)),
    };
    let mut calls = tracee::Calls::default();
    net.add_install(&mut calls, false);
    let clone = calls.add(libc::SYS_clone, &tracee::FORK_HELD_ARGS);
    if let Err(e) = remote.start_run(&calls, scratch.runner, scratch.area, Some(&net)) {
        return (None, Err(e));
    }
    meanwhile();
    let batch = (calls.len(), scratch.runner, scratch.area);
    let (finished, made, taken_in) =
        finish_netted(remote, &net, batch, Some(clone), &scratch.net_out, || {});
    (made, finished.and(taken_in).map(drop))
}

/// Waits until the batch of `calls` calls started under `net` (through the code at
/// `runner`, its table at `table`) is over, does `at_end` (the thread still in the trap
/// that ends it), then takes the net in, whatever happened (the batch may have installed
/// the net's handler; whether it may still be out goes into `net_out`). Returns the calls'
/// results, what the `clone` at index `clone` returned if it ran (a fork to take over, or
/// to end), and how taking the net in went.
fn finish_netted(
    remote: &mut tracee::Remote,
    net: &tracee::Net,
    (calls, runner, table): (usize, u64, u64),
    clone: Option<usize>,
    net_out: &std::cell::Cell<bool>,
    at_end: impl FnOnce(),
) -> (Result<Vec<i64>>, Option<i64>, Result<()>) {
    let finished = remote.finish_run(calls, runner, table);
    at_end();
    let made = match (&finished, clone) {
        (Ok(results), Some(i)) => Some(results[i]),
        // (Stopped elsewhere: the clone's result word, zero if it was not reached.)
        (Err(_), Some(i)) => remote.run_result(table, i).filter(|&rc| rc > 0),
        _ => None,
    };
    let taken_in = remote.take_net_in(net);
    net_out.set(taken_in.is_err());
    (finished, made, taken_in)
}

/// Room for one thread's calls and their output in the scratch area (see
/// [`capture_threads`]): the table of three calls, then [`THREAD_STATE_LEN`] bytes of
/// output.
const THREAD_SLOT: u64 = 512;

/// Where in its slot a thread's calls write: after the table of three calls (its net's
/// install and two queries) and its end mark.
const THREAD_OUT: u64 = 4 * 64;

/// Bytes [`add_thread_queries`] writes: the alternate signal stack (24), then the tid
/// address at 32.
const THREAD_STATE_LEN: u64 = 40;

/// Adds the calls that read what only a thread itself can tell (its alternate signal stack
/// and tid address) into `out` ([`THREAD_STATE_LEN`] bytes; see [`thread_state`]).
fn add_thread_queries(calls: &mut tracee::Calls, out: u64) {
    calls.add(libc::SYS_sigaltstack, &[0, out]);
    calls.add(
        libc::SYS_prctl,
        &[libc::PR_GET_TID_ADDRESS as u64, out + 32],
    );
}

/// What [`add_thread_queries`] wrote, read back (`raw`: its [`THREAD_STATE_LEN`] bytes).
fn thread_state(raw: &[u8]) -> thread::HiddenState {
    let word = |at: usize| u64::from_ne_bytes(raw[at..at + 8].try_into().unwrap());
    thread::HiddenState {
        altstack: crate::image::AltStack {
            sp: word(0),
            flags: word(8) as i32,
            size: word(16),
        },
        clear_child_tid: word(32),
    }
}

/// The calls of one thread, in its slot of the scratch area at `slot`, under `net`.
fn thread_calls(slot: u64, net: &tracee::Net) -> tracee::Calls {
    let mut calls = tracee::Calls::default();
    net.add_install(&mut calls, false);
    add_thread_queries(&mut calls, slot + THREAD_OUT);
    calls
}

/// Reads what [`thread_calls`] at `slot` wrote, once they ran in `tracee` (`results`).
fn thread_hidden(tracee: &Tracee, slot: u64, results: &[i64]) -> Result<thread::HiddenState> {
    if let Some(rc) = results.iter().find(|&&rc| (-4095..0).contains(&rc)) {
        return Err(Error::sys(
            "reading a thread's state from inside it",
            nix::errno::Errno::from_raw(-*rc as i32),
        ));
    }
    let mut raw = [0u8; THREAD_STATE_LEN as usize];
    tracee.read_mem(slot + THREAD_OUT, &mut raw)?;
    Ok(thread_state(&raw))
}

/// A thread's state read through ptrace, before its calls run.
struct ThreadBefore {
    ns_pid: Vec<i32>,
    comm: String,
    regs: RawRegs,
    xstate: Vec<u8>,
    sigmask: u64,
    ip: u64,
}

/// Captures the threads of a process other than its leader, whole, through the process's
/// `scratch` area (kept by the leader's queries): each thread gets a slot of it, and the
/// calls of all the threads of a group (as many as there are slots) run at the same time
/// (one wait for all, not one per thread), as do the moves out of the trap they leave
/// them in.
fn capture_threads(
    tracees: &mut [Tracee],
    vdso: Option<u64>,
    scratch: &Scratch,
    checkpoints: &Checkpoints,
) -> Result<Vec<Thread>> {
    let slots = (TABLES_LEN / THREAD_SLOT).min(NETS) as usize;
    let mut threads = Vec::with_capacity(tracees.len());
    for group in tracees.chunks_mut(slots) {
        threads.extend(capture_group(group, vdso, scratch, checkpoints)?);
    }
    Ok(threads)
}

/// [`capture_threads`] for one group of threads, at most one per slot.
fn capture_group(
    group: &mut [Tracee],
    vdso: Option<u64>,
    scratch: &Scratch,
    checkpoints: &Checkpoints,
) -> Result<Vec<Thread>> {
    let mut before = Vec::with_capacity(group.len());
    for tracee in group.iter_mut() {
        let task = ProcDir::new(tracee.pid());
        let ns_pid = task.status()?.ns_pid;
        let comm = task.read("comm")?.trim_end_matches('\n').to_string();
        let mut regs = tracee.regs()?;
        thread::abort_rseq_section(tracee, &mut regs)?;
        let (xstate, sigmask) = (tracee.xstate()?, tracee.sigmask()?);
        let ip = syscall_ip(tracee, vdso, &regs)?;
        before.push(ThreadBefore {
            ns_pid,
            comm,
            regs,
            xstate,
            sigmask,
            ip,
        });
    }
    let slot = |i: usize| scratch.area + i as u64 * THREAD_SLOT;
    // Every thread started (the signals of `tracee::CALLS_MASK` blocked, under a safety
    // net), then every started one waited for, and each put back as it was, whatever
    // happened to the others (the process's SIGTRAP action is put back later, once: see
    // `Scratch::net_out`).
    let mut started = 0;
    let mut first_error = None;
    // (The one that failed to start, if one did: it is not running.)
    let mut unstarted = None;
    let count = scratch.area + COUNT_AT;
    // (All counted, whatever starts: see `Remote::count_nets`.)
    let threads = group.len() as u64;
    if let Some(first) = group.first_mut() {
        first
            .remote_with(before[0].ip, before[0].regs)
            .count_nets(count, threads)?;
    }
    for (i, (tracee, b)) in group.iter_mut().zip(&before).enumerate() {
        let state = ThreadState {
            regs: &b.regs,
            mask: b.sigmask,
            xstate: &b.xstate,
        };
        // (The net first: the mask of dolly's calls is the thread's once set.)
        let at = net_at(scratch.area, i as u64);
        let saved = Some(&scratch.trap_action);
        let start = (|| {
            let remote = tracee.remote_with(b.ip, b.regs);
            let net = remote.spread_net(at, scratch.runner, state, saved, count)?;
            tracee.set_sigmask(tracee::CALLS_MASK)?;
            let mut remote = tracee.remote_with(b.ip, b.regs);
            remote.start_run(
                &thread_calls(slot(i), &net),
                scratch.runner,
                slot(i),
                Some(&net),
            )
        })();
        started += 1;
        if let Err(e) = start {
            first_error = Some(e);
            unstarted = Some(i);
            break;
        }
    }
    // (An abort is acted on once the calls are over.)
    if let Err(e) = checkpoints.reach("capture:thread calls") {
        first_error.get_or_insert(e);
    }
    let mut ran = Vec::with_capacity(started);
    for (i, (tracee, b)) in group.iter_mut().zip(&before).enumerate().take(started) {
        ran.push(match unstarted {
            Some(at) if at == i => Err(Error::new(crate::error::ErrorKind::System, "not started")),
            _ => tracee
                .remote_with(b.ip, b.regs)
                .finish_run(3, scratch.runner, slot(i))
                .and_then(|results| thread_hidden(tracee, slot(i), &results)),
        });
    }
    if let Err(e) = checkpoints.reach("capture:thread calls done") {
        first_error.get_or_insert(e);
    }
    // Each put back and moved out of its trap at once (with its own registers it must not
    // take the SIGTRAP of that trap, which a dolly that ends would leave it), then all
    // waited for.
    let mut hidden = Vec::with_capacity(started);
    for ((tracee, b), read) in group.iter_mut().zip(&before).zip(ran) {
        let put_back = tracee.put_back(&b.regs, b.sigmask, true);
        match read.and_then(|h| put_back.map(|()| h)) {
            Ok(h) => hidden.push(h),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut parked = Ok(());
    for tracee in group.iter_mut() {
        let settled = tracee.settle();
        if parked.is_ok() {
            parked = settled;
        }
    }
    // The process's own SIGTRAP action is put back once, by the leader, before dolly's
    // memory is unmapped (see `Scratch::unmap`; should dolly end before, a later dolly puts
    // it back).
    if started > 0 {
        scratch.net_out.set(true);
    }
    if let Err(e) = checkpoints.reach("capture:threads back") {
        first_error.get_or_insert(e);
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    parked?;
    group
        .iter()
        .zip(before)
        .zip(hidden)
        .map(|((tracee, b), hidden)| {
            thread::capture(
                tracee, &b.regs, b.xstate, b.sigmask, hidden, b.ns_pid, b.comm,
            )
        })
        .collect()
}

/// Copies the pages of an inspected process into its pool file and makes its image. The
/// pages are read from process `source`: the process itself, stopped, or a copy-on-write
/// fork of it made at its freeze (see `cow`).
pub fn dump(
    source: Pid,
    inspected: Inspected,
    pool_dir: &Path,
    tracked: Option<&mut crate::resource::tracking::Tracked>,
) -> Result<Process> {
    let Inspected {
        mut process,
        mut memory,
    } = inspected;
    let pool_name = format!("{}{}", process.pid, memory::POOL_FILE_SUFFIX);
    let mut tracked = tracked;
    let stats = memory::dump(
        source,
        &mut memory,
        &pool_dir.join(&pool_name),
        tracked.as_deref_mut(),
    )?;
    if let Some(t) = tracked {
        t.finish_copies()?;
        process.base_pools = t.link_bases(pool_dir)?;
    }
    process.areas = memory.into_areas();
    process.pool = (stats.pool_size > 0).then_some(PoolFile {
        name: pool_name,
        size: stats.pool_size,
    });
    Ok(process)
}
