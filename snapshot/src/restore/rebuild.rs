//! Rebuilding one stopped stub into the captured process, from outside, with remote system
//! calls: its memory, layout, registrations, timers, credentials, and finally its registers.

use std::collections::HashMap;

use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::checkpoint::Checkpoints;
use crate::error::{Context, Error, Result};
use crate::image::{AreaKind, EpollItem, Process};
use crate::proc::ProcDir;
use crate::resource::memory::{self, MapSources};
use crate::resource::{creds, files, process, signals, thread};
use crate::sys::{page_ceil, PAGE_SIZE, TASK_SIZE};
use crate::tracee::{self, Remote, Tracee};

/// Bytes of scratch memory mapped inside the process while it is rebuilt.
const SCRATCH_MIN: u64 = 4 * PAGE_SIZE;

/// What a stub has, parked at fixed numbers, to rebuild its process from.
#[derive(Debug)]
pub struct Sources<'a> {
    /// Its pool file, areas' files and shared memory objects, as fds inside the stub.
    pub maps: MapSources,
    /// Its executable, as an fd inside the stub.
    pub exe: i32,
    /// Its pool files, open in dolly (pages to copy rather than map are read from them).
    pub pools: &'a memory::ProcessPools,
    /// First fd number above the process's own: dolly's parked fds, closed at the end.
    pub high: i32,
    /// Epoll instances this process registers the watched fds of: (its epoll fd, items).
    pub epolls: Vec<(i32, &'a [EpollItem])>,
    /// The pseudo-terminal it is the session leader of: (a slave fd inside the stub, the
    /// foreground process group).
    pub ctty: Option<(i32, i32)>,
}

/// Rebuilds a stopped stub into the captured process, up to (not including) its registers;
/// returns its other threads, created and stopped. `root`: the root of the restored tree,
/// whose parent is not the one it had.
pub fn rebuild(
    tracee: &mut Tracee,
    proc: &Process,
    sources: &Sources,
    root: bool,
    checkpoints: &Checkpoints,
) -> Result<Vec<Tracee>> {
    let pid = tracee.pid();
    let (own_vdso, _) = tracee::own_vdso()?;
    let vdso_syscall = tracee::vdso_syscall_offset()?.ok_or_else(|| {
        Error::refused(
            "no syscall instruction found in the vDSO",
            "this kernel's vDSO is not supported",
        )
    })?;
    let thread = &proc.threads[0];
    let mut remote = tracee.remote(own_vdso + vdso_syscall)?;
    if let Some(r) = crate::sys::ptrace::rseq_config(pid).context("reading the stub's rseq")? {
        remote.call(
            "unregistering the stub's rseq",
            libc::SYS_rseq,
            &[
                r.pointer,
                r.size as u64,
                thread::RSEQ_FLAG_UNREGISTER,
                r.signature as u64,
            ],
        )?;
    }
    replace_address_space(&mut remote, pid, proc, vdso_syscall)?;
    checkpoints.reach("restore:rebuilding")?;
    let scratch_len = SCRATCH_MIN.max(page_ceil(creds::scratch_needed(&proc.creds) + PAGE_SIZE));
    let scratch_at =
        memory::free_range(&proc.areas, &[], scratch_len + PAGE_SIZE).ok_or_else(|| {
            Error::refused(
                "the snapshot's address space has no room left for dolly's scratch page",
                "this process cannot be restored by dolly",
            )
        })?;
    // The scratch area, and after it a page for the code that runs batches of system calls
    // (the stub, a fork of dolly, may have writable and executable memory).
    let scratch = remote.call(
        "mapping a scratch page",
        libc::SYS_mmap,
        &[
            scratch_at,
            scratch_len + PAGE_SIZE,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;
    remote.write_call_runner(scratch + scratch_len)?;
    let batch = memory::Batch {
        runner: scratch + scratch_len,
        table: scratch,
        table_len: scratch_len,
    };
    memory::map_areas(&mut remote, proc, &sources.maps, sources.pools, Some(batch))?;
    memory::apply_flags(&mut remote, proc, scratch)?;
    process::set_mm_map(&mut remote, scratch, &proc.mm, Some(sources.exe))?;
    // Before dolly's fds go: the pty slave is one of them.
    if let Some((slave, foreground)) = sources.ctty {
        take_controlling_terminal(&mut remote, scratch, slave, foreground)?;
    }
    remote.call(
        "closing dolly's fds",
        libc::SYS_close_range,
        &[sources.high as u64, u32::MAX as u64, 0],
    )?;
    files::register_epolls(&mut remote, scratch, &sources.epolls)?;
    files::take_process_locks(&mut remote, scratch, proc)?;

    process::restore_rlimits(pid, &proc.rlimits)?;
    process::restore_oom_score_adj(pid, proc.oom_score_adj)?;
    process::restore_coredump_filter(pid, proc.flags.coredump_filter)?;
    thread::restore_registrations(&mut remote, thread)?;
    let vdso_ip = proc
        .areas
        .iter()
        .find(|a| a.kind == AreaKind::Vdso)
        .map(|a| a.start + vdso_syscall)
        .ok_or_else(|| {
            Error::corrupt("the snapshot has no vDSO area", "the snapshot is damaged")
        })?;
    let mut others = create_threads(&mut remote, proc, scratch, vdso_ip)?;
    // Signals the stub got while it was built (its children stopping, zombies exiting) are
    // not the process's: drop them, then queue the captured ones.
    signals::flush_pending(&mut remote, scratch)?;
    let own_pid = remote.call("getpid", libc::SYS_getpid, &[])? as i32;
    signals::queue(&mut remote, scratch, own_pid, None, &proc.signals.pending)?;
    for t in &proc.threads {
        signals::queue(&mut remote, scratch, own_pid, Some(t.tid), &t.pending)?;
    }
    process::restore_itimers(&mut remote, scratch, &proc.itimers)?;
    // Credentials and the parent-death signal belong to each thread. The stub died with its
    // parent until now; a restored root has another parent than the original: its
    // parent-death signal no longer means anything, the others get theirs.
    let own = ProcDir::new(pid).status()?;
    let pdeathsig = if root { 0 } else { proc.flags.pdeathsig };
    let per_thread = |remote: &mut Remote| -> Result<()> {
        creds::restore(remote, scratch, &proc.creds, &own)?;
        remote.call(
            "setting the parent-death signal",
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, pdeathsig as u64],
        )?;
        Ok(())
    };
    for t in &mut others {
        per_thread(&mut t.remote(vdso_ip)?)?;
    }
    per_thread(&mut remote)?;
    process::restore_dumpable(&mut remote, &proc.flags)?;
    remote.call(
        "unmapping the scratch page",
        libc::SYS_munmap,
        &[scratch, scratch_len + PAGE_SIZE],
    )?;
    // (Set by the stub, an ignored SIGTRAP was set back to its default by the traps of the
    // calls since: see `Tracee::set_trap_ignored`.)
    let trap_ignored = proc
        .signals
        .actions
        .iter()
        .any(|a| a.signal == libc::SIGTRAP && a.handler == 1);
    if trap_ignored {
        remote.ignore_trap_again(thread::final_regs(thread).rsp)?;
    }
    Ok(others)
}

/// Creates the process's other threads inside its rebuilt leader (`clone3` with
/// `CLONE_THREAD` and `set_tid`). Each starts stopped (dolly follows clones) before running
/// anything, and gets its registrations, name and alternate stack. `scratch` is a page of
/// the process dolly may write; `vdso_ip` the `syscall` instruction of its vDSO.
fn create_threads(
    remote: &mut Remote,
    proc: &Process,
    scratch: u64,
    vdso_ip: u64,
) -> Result<Vec<Tracee>> {
    const CLONE_ARGS_SIZE: u64 = std::mem::size_of::<libc::clone_args>() as u64;
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    let mut out = Vec::new();
    for thread in &proc.threads[1..] {
        // struct clone_args (88 bytes): flags, pidfd, child_tid, parent_tid, exit_signal,
        // stack, stack_size, tls, set_tid, set_tid_size, cgroup; then the set_tid array.
        let set_tid_at = scratch + 128;
        let mut args = [0u64; 11];
        args[0] = flags;
        args[8] = set_tid_at;
        args[9] = 1;
        let bytes: Vec<u8> = args.iter().flat_map(|w| w.to_ne_bytes()).collect();
        remote.write_mem(scratch, &bytes)?;
        remote.write_mem(set_tid_at, &thread.tid.to_ne_bytes())?;
        let tid = remote.call(
            &format!("creating thread {}", thread.tid),
            libc::SYS_clone3,
            &[scratch, CLONE_ARGS_SIZE],
        )? as i32;
        let tid = Pid::from_raw(tid);
        let mut t = match Tracee::adopt_stopped_child(tid)? {
            Ok(t) => t,
            Err(status) => {
                return Err(Error::new(
                    crate::ErrorKind::System,
                    format!("thread {tid} ended as it was created ({status:?})"),
                ))
            }
        };
        {
            let mut r = t.remote(vdso_ip)?;
            thread::restore_registrations(&mut r, thread)?;
            let mut name = thread.comm.as_bytes().to_vec();
            name.truncate(15);
            name.push(0);
            r.write_mem(scratch + 256, &name)?;
            r.call(
                "naming a thread",
                libc::SYS_prctl,
                &[libc::PR_SET_NAME as u64, scratch + 256],
            )?;
            let alt = thread.altstack;
            let mut stack = Vec::with_capacity(24);
            stack.extend_from_slice(&alt.sp.to_ne_bytes());
            stack.extend_from_slice(&(alt.flags as u64).to_ne_bytes());
            stack.extend_from_slice(&alt.size.to_ne_bytes());
            r.write_mem(scratch + 512, &stack)?;
            r.call(
                "setting a thread's alternate stack",
                libc::SYS_sigaltstack,
                &[scratch + 512, 0],
            )?;
        }
        out.push(t);
    }
    Ok(out)
}

/// Gives a rebuilt process's threads their registers and signal masks and lets them run
/// (the leader last).
pub fn finish(leader: Tracee, others: Vec<Tracee>, proc: &Process) -> Result<()> {
    let set = |t: &Tracee, thread: &crate::image::Thread| -> Result<()> {
        t.set_xstate(&thread.xstate.0)?;
        t.set_regs(&thread::final_regs(thread))?;
        t.set_sigmask(thread.sigmask)
    };
    set(&leader, &proc.threads[0])?;
    for (t, thread) in others.iter().zip(&proc.threads[1..]) {
        set(t, thread)?;
    }
    if proc.stopped {
        let _ = kill(leader.pid(), Signal::SIGSTOP);
    }
    for t in others {
        t.set_options(ptrace::Options::empty())?;
        t.detach()?;
    }
    leader.set_options(ptrace::Options::empty())?;
    leader.detach()
}

/// Unmaps all of the stub's memory but its vDSO, then moves the vDSO (and its data pages) to
/// where the captured process had them, so its code finds them at the same addresses.
fn replace_address_space(
    remote: &mut Remote,
    child: Pid,
    proc: &Process,
    vdso_syscall: u64,
) -> Result<()> {
    let special =
        |kind: &AreaKind| matches!(kind, AreaKind::Vdso | AreaKind::Vvar | AreaKind::VvarVclock);
    let stub_maps = ProcDir::new(child).maps()?;
    let mut stub_special: HashMap<&'static str, (u64, u64)> = HashMap::new();
    for m in &stub_maps {
        let key = match m.path.as_str() {
            "[vdso]" => "vdso",
            "[vvar]" => "vvar",
            "[vvar_vclock]" => "vvar_vclock",
            _ => continue,
        };
        stub_special.insert(key, (m.start, m.end));
    }
    let mut target: Vec<(&'static str, u64, u64)> = Vec::new();
    for a in proc.areas.iter().filter(|a| special(&a.kind)) {
        let key = match a.kind {
            AreaKind::Vdso => "vdso",
            AreaKind::Vvar => "vvar",
            _ => "vvar_vclock",
        };
        target.push((key, a.start, a.end));
    }
    let mismatch = || {
        Error::refused(
            "the snapshot's vDSO layout differs from this kernel's",
            "restore it on a machine running the same kernel",
        )
    };
    if target.len() != stub_special.len() {
        return Err(mismatch());
    }
    for (key, start, end) in &target {
        let (s, e) = stub_special.get(key).ok_or_else(mismatch)?;
        if e - s != end - start {
            return Err(mismatch());
        }
    }
    // Unmap everything outside the stub's vDSO block.
    let mut keep: Vec<(u64, u64)> = stub_special.values().copied().collect();
    keep.sort_unstable();
    let mut at = 0u64;
    for &(s, e) in keep.iter().chain(std::iter::once(&(TASK_SIZE, TASK_SIZE))) {
        if s > at {
            remote.call(
                "unmapping the stub's memory",
                libc::SYS_munmap,
                &[at, s - at],
            )?;
        }
        at = e;
    }
    // Move the block; through a spot free in both layouts if the old and new overlap.
    let block = |v: &mut dyn Iterator<Item = (u64, u64)>| {
        v.fold((u64::MAX, 0u64), |(lo, hi), (s, e)| (lo.min(s), hi.max(e)))
    };
    let (s_lo, s_hi) = block(&mut keep.iter().copied());
    let (t_lo, t_hi) = block(&mut target.iter().map(|t| (t.1, t.2)));
    let mut current: HashMap<&'static str, u64> =
        stub_special.iter().map(|(k, v)| (*k, v.0)).collect();
    let mut move_block =
        |remote: &mut Remote, delta_to: &dyn Fn(&'static str, u64) -> u64| -> Result<()> {
            for (key, start, end) in &target {
                let from = current[key];
                let to = delta_to(key, *start);
                if from != to {
                    remote.call(
                        &format!("moving the [{key}] area"),
                        libc::SYS_mremap,
                        &[
                            from,
                            end - start,
                            end - start,
                            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                            to,
                        ],
                    )?;
                    current.insert(key, to);
                    if *key == "vdso" {
                        remote.set_syscall_ip(to + vdso_syscall);
                    }
                }
            }
            Ok(())
        };
    if s_lo < t_hi && t_lo < s_hi {
        let len = t_hi - t_lo;
        let temp = memory::free_range(&proc.areas, &[(s_lo, s_hi)], len).ok_or_else(|| {
            Error::refused("no room to move the vDSO", "cannot restore this layout")
        })?;
        move_block(remote, &|_, start| temp + (start - t_lo))?;
    }
    move_block(remote, &|_, start| start)
}

/// Makes pty slave `slave` (an fd of the process, a session leader) its controlling terminal
/// again, with `foreground` (if any) as its foreground process group.
fn take_controlling_terminal(
    remote: &mut Remote,
    scratch: u64,
    slave: i32,
    foreground: i32,
) -> Result<()> {
    remote.call(
        "taking the controlling terminal",
        libc::SYS_ioctl,
        &[slave as u64, libc::TIOCSCTTY, 0],
    )?;
    if foreground > 0 {
        remote.write_mem(scratch, &foreground.to_ne_bytes())?;
        remote.call(
            &format!("giving the terminal to process group {foreground}"),
            libc::SYS_ioctl,
            &[slave as u64, libc::TIOCSPGRP, scratch],
        )?;
    }
    Ok(())
}
