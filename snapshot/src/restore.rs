//! Restore: bring a snapshot back as a running process with its original PID.
//!
//! dolly forks a *stub* at the original PID (`clone3` with `set_tid`). The stub sets what a
//! process can set on itself (session, cwd, umask, signal dispositions, its fd table) and
//! stops; dolly then rebuilds it from outside with remote system calls: it unmaps the stub's
//! memory, moves the vDSO to its old address, maps every area (pool pages copy-on-write),
//! sets the kernel's layout fields, timers, registrations and credentials, and finally the
//! registers, and lets it go. Until then the stub dies with dolly (`PTRACE_O_EXITKILL`), so
//! a failed or killed restore leaves no half-built process.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::checkpoint::Checkpoints;
use crate::error::{Context, Error, Result};
use crate::image::{AreaKind, Manifest, Process, ShmemObject};
use crate::pool;
use crate::proc::ProcDir;
use crate::resource::files::{self, PreparedFiles};
use crate::resource::memory::{self, MapSources};
use crate::resource::{creds, process, signals, thread};
use crate::store::Store;
use crate::sys::clone::{fork_at, Forked};
use crate::sys::process::{self as sysproc, AltStack, KernelSigaction};
use crate::sys::{page_ceil, PAGE_SIZE, TASK_SIZE};
use crate::tracee::{self, Remote, Tracee};

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Give terminal fds the terminal dolly runs on, and keep the process in dolly's session
    /// and process group (so it can be a foreground job dolly waits for).
    pub shell_job: bool,
    /// The caller is PID 1 of a new PID namespace (a clone): the snapshot's PIDs are free
    /// there whatever runs on the host, so the host-wide PID lock is not taken.
    pub in_new_pid_namespace: bool,
}

/// A restored process.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Its PID.
    pub pid: Pid,
}

/// Bytes of scratch memory mapped inside the process while it is rebuilt.
const SCRATCH_MIN: u64 = 4 * PAGE_SIZE;

/// How the stub places itself in sessions and process groups.
#[derive(Debug, Clone, Copy)]
enum Session {
    /// Stay in dolly's session and process group.
    Inherit,
    /// Lead a new process group in dolly's session.
    NewGroup,
    /// Lead a new session (and group), without a controlling terminal.
    Detached,
}

fn session_plan(proc: &Process, shell_job: bool) -> Session {
    let own_sid = nix::unistd::getsid(None).map(|s| s.as_raw()).unwrap_or(-1);
    if shell_job {
        Session::Inherit
    } else if proc.sid == proc.pid || own_sid != proc.sid {
        Session::Detached
    } else if proc.pgid == proc.pid {
        Session::NewGroup
    } else {
        Session::Inherit
    }
}

/// Everything the stub does to itself, prepared before the fork (it must not allocate).
struct StubPlan<'a> {
    parent: Pid,
    report_fd: i32,
    session: Session,
    cwd: &'a CStr,
    root: Option<&'a CStr>,
    umask: u32,
    personality: u32,
    comm: &'a CStr,
    timerslack: u64,
    thp_disable: bool,
    subreaper: bool,
    sched_policy: i32,
    sched_priority: i32,
    nice: i32,
    affinity: &'a [u64],
    io_priority: u32,
    actions: &'a [(i32, KernelSigaction)],
    altstack: AltStack,
    /// `(fd in dolly, fd in the restored process, close-on-exec)`.
    moves: &'a [(i32, i32, bool)],
    /// Fds the rebuild needs inside the stub; they end at `high + moves.len() + i`.
    helpers: &'a [i32],
    high: i32,
}

/// Writes "step: error" to the report pipe and leaves.
fn stub_fail(fd: i32, step: &str, err: Errno) -> ! {
    use std::io::Write;
    let mut buf = [0u8; 160];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cur, "{step}: {}", err.desc());
    let n = cur.position() as usize;
    sysproc::write_all_raw(fd, &buf[..n]);
    sysproc::exit_now(1)
}

/// The stub's own work, in the forked child. Never returns: it stops itself for dolly to
/// take over, or reports what failed and exits.
fn stub_main(plan: &StubPlan) -> ! {
    let fd = plan.report_fd;
    let step = |what: &str, r: std::result::Result<(), Errno>| {
        if let Err(e) = r {
            stub_fail(fd, what, e)
        }
    };
    // Die with dolly until the rebuild is done (dolly then also holds PTRACE_O_EXITKILL).
    step(
        "setting the parent-death signal",
        sysproc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as u64, 0, 0, 0).map(drop),
    );
    if sysproc::parent_pid() != plan.parent {
        sysproc::exit_now(1);
    }
    step("blocking signals", sysproc::block_all_signals());
    match plan.session {
        Session::Inherit => {}
        Session::NewGroup => step("setpgid", sysproc::new_process_group()),
        Session::Detached => step("setsid", sysproc::new_session()),
    }
    step("chdir", sysproc::chdir(plan.cwd));
    if let Some(root) = plan.root {
        step("chroot", sysproc::chroot(root));
    }
    sysproc::set_umask(plan.umask);
    step("personality", sysproc::set_personality(plan.personality));
    step(
        "setting the name",
        sysproc::prctl(libc::PR_SET_NAME, plan.comm.as_ptr() as u64, 0, 0, 0).map(drop),
    );
    step(
        "setting the timer slack",
        sysproc::prctl(libc::PR_SET_TIMERSLACK, plan.timerslack, 0, 0, 0).map(drop),
    );
    // Set both ways: the stub starts with dolly's settings, not the defaults.
    step(
        "setting THP disable",
        sysproc::prctl(libc::PR_SET_THP_DISABLE, plan.thp_disable as u64, 0, 0, 0).map(drop),
    );
    step(
        "setting the subreaper flag",
        sysproc::prctl(libc::PR_SET_CHILD_SUBREAPER, plan.subreaper as u64, 0, 0, 0).map(drop),
    );
    step(
        "setting the scheduling policy",
        sysproc::set_scheduler(plan.sched_policy, plan.sched_priority),
    );
    step("setting the nice value", sysproc::set_nice(plan.nice));
    step(
        "setting the CPU affinity",
        sysproc::set_affinity(plan.affinity),
    );
    step(
        "setting the I/O priority",
        sysproc::set_io_priority(plan.io_priority),
    );
    for (signo, action) in plan.actions {
        step(
            "setting a signal action",
            sysproc::set_sigaction(*signo, action),
        );
    }
    step("sigaltstack", sysproc::set_altstack(&plan.altstack));
    // The fd table: park everything needed above `high`, close the rest, then put each fd
    // at its number. The report pipe is the last helper.
    let sources = plan
        .moves
        .iter()
        .map(|m| m.0)
        .chain(plan.helpers.iter().copied());
    for (i, src) in sources.enumerate() {
        step("parking an fd", sysproc::dup2(src, plan.high + i as i32));
    }
    let parked = plan.moves.len() + plan.helpers.len();
    let fd = plan.high + parked as i32 - 1;
    let step = |what: &str, r: std::result::Result<(), Errno>| {
        if let Err(e) = r {
            stub_fail(fd, what, e)
        }
    };
    step("closing fds", sysproc::close_range(0, plan.high as u32 - 1));
    step(
        "closing fds",
        sysproc::close_range(plan.high as u32 + parked as u32, u32::MAX),
    );
    for (i, &(_, target, cloexec)) in plan.moves.iter().enumerate() {
        step(
            "placing an fd",
            sysproc::dup3(plan.high + i as i32, target, cloexec),
        );
    }
    if !plan.moves.is_empty() {
        step(
            "closing fds",
            sysproc::close_range(
                plan.high as u32,
                (plan.high as usize + plan.moves.len() - 1) as u32,
            ),
        );
    }
    step("PTRACE_TRACEME", crate::sys::ptrace::traceme());
    sysproc::stop_self();
    sysproc::exit_now(1)
}

/// Creates a shared anonymous memory object in dolly with the stored content and returns an
/// fd to it (its `/proc/self/map_files` entry), for the restored process to map.
fn make_shmem(object: &ShmemObject, pool_file: Option<&File>) -> Result<OwnedFd> {
    let len = page_ceil(object.size.max(1));
    let file = sysproc::new_shared_anonymous(len).context("creating shared memory")?;
    if let (Some(pages), Some(pool_file)) = (&object.pages, pool_file) {
        let mut buf = vec![0u8; 1 << 20];
        for run in &pages.runs {
            let mut done = 0;
            let total = run[1] * PAGE_SIZE;
            while done < total {
                let n = (total - done).min(buf.len() as u64) as usize;
                pool_file
                    .read_exact_at(&mut buf[..n], pool::page_offset(pages.slot, run[0]) + done)
                    .context("reading shared memory from the pool")?;
                file.write_all_at(&buf[..n], run[0] * PAGE_SIZE + done)
                    .context("filling shared memory")?;
                done += n as u64;
            }
        }
    }
    file.set_len(object.size).context("sizing shared memory")?;
    Ok(file.into())
}

/// Refuses when `pid` is in use, naming what uses it.
fn check_pid_free(pid: i32) -> Result<()> {
    if !sysproc::pid_exists(pid) {
        return Ok(());
    }
    let stat = ProcDir::new(Pid::from_raw(pid)).stat().ok();
    let (comm, zombie) = stat
        .as_ref()
        .map(|s| (s.comm.clone(), s.state == 'Z'))
        .unwrap_or_else(|| ("?".into(), false));
    if zombie {
        return Err(Error::refused(
            format!("PID {pid} is held by a zombie ({comm}) that its parent has not reaped yet"),
            "wait for its parent to reap it (or end the parent), then restore",
        ));
    }
    Err(Error::refused(
        format!("PID {pid} is in use by {comm}: a restore in place needs the snapshot's PID free"),
        format!("stop the original first (e.g. `kill {pid}`), or start a clone instead"),
    ))
}

fn own_fds_max() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .max()
                .unwrap_or(2)
        })
        .unwrap_or(1024)
}

/// Raises dolly's own soft fd limit to its hard limit (room to park fds above the
/// process's own during a restore).
fn raise_nofile() {
    if let Ok(l) = sysproc::get_rlimit(Pid::from_raw(0), libc::RLIMIT_NOFILE) {
        let _ = sysproc::set_rlimit(
            Pid::from_raw(0),
            libc::RLIMIT_NOFILE,
            sysproc::Rlimit {
                soft: l.hard,
                hard: l.hard,
            },
        );
    }
}

/// Restores snapshot `id` in place: the process comes back with its PID and runs on,
/// detached from dolly. Refuses if the PID is taken.
pub fn restore(
    store: &Store,
    id: &str,
    opts: &RestoreOptions,
    checkpoints: &Checkpoints,
) -> Result<Restored> {
    let (manifest, _snapshot_lock) = store.load(id)?;
    check_compatible(&manifest, opts)?;
    let proc = manifest.root();
    creds::check_restorable(&proc.creds, &ProcDir::new(nix::unistd::getpid()).status()?)?;
    let _pid_lock = if opts.in_new_pid_namespace {
        None
    } else {
        Some(store.lock_pid(proc.pid)?)
    };
    check_pid_free(proc.pid)?;
    let pool_dir = store.pool_dir(&manifest.id);
    let pool_file = match &proc.pool {
        Some(pf) => {
            let f = memory::open_pool(&pool_dir, &pf.name)?;
            memory::check_pool(proc, &f, &pool_dir.join(&pf.name))?;
            Some(f)
        }
        None => None,
    };
    raise_nofile();
    let prepared = files::prepare(proc, &pool_dir)?;
    let shmem: Vec<OwnedFd> = proc
        .shmem
        .iter()
        .map(|o| make_shmem(o, pool_file.as_ref()))
        .collect::<Result<_>>()?;
    let exe = exe_fd(proc, &prepared)?;
    checkpoints.reach("restore:prepared")?;
    spawn(
        proc,
        opts,
        &prepared,
        &shmem,
        pool_file.as_ref(),
        &exe,
        checkpoints,
    )
}

fn check_compatible(manifest: &Manifest, opts: &RestoreOptions) -> Result<()> {
    let here = crate::capture::host_vdso_hash()?;
    if manifest.host.vdso_hash != here {
        return Err(Error::refused(
            format!(
                "snapshot {} was taken on another kernel ({}; this is {}): its vDSO differs",
                manifest.id,
                manifest.host.kernel,
                crate::capture::kernel_release()
            ),
            "restore it on a machine running the same kernel",
        ));
    }
    if manifest.shell_job && !opts.shell_job {
        return Err(Error::refused(
            format!(
                "snapshot {} holds a terminal (captured with --shell-job)",
                manifest.id
            ),
            "pass --shell-job to give it the terminal dolly runs on",
        ));
    }
    if manifest.processes.len() != 1 || manifest.root().threads.len() != 1 {
        return Err(Error::refused(
            "this snapshot has several processes or threads: not supported by this dolly yet",
            "use a dolly that restores process trees",
        ));
    }
    Ok(())
}

/// An fd of the executable for `PR_SET_MM_MAP`: the mapping fd when the process maps it
/// (which also covers a deleted executable), else the path opened again.
fn exe_fd(proc: &Process, prepared: &PreparedFiles) -> Result<OwnedFd> {
    for ((index, writable), fd) in &prepared.mappings {
        if !writable && proc.files[*index as usize].path == proc.exe {
            return fd.try_clone().context("duplicating the executable fd");
        }
    }
    files::open_path(std::path::Path::new(&proc.exe), libc::O_RDONLY).map_err(|e| {
        Error::refused(
            format!("cannot open the process's executable {} ({e})", proc.exe),
            "put the executable back where it was, or capture again",
        )
    })
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| {
        Error::corrupt(
            format!("{what} holds a NUL byte"),
            "the snapshot is damaged",
        )
    })
}

fn spawn(
    proc: &Process,
    opts: &RestoreOptions,
    prepared: &PreparedFiles,
    shmem: &[OwnedFd],
    pool_file: Option<&File>,
    exe: &OwnedFd,
    checkpoints: &Checkpoints,
) -> Result<Restored> {
    let moves = files::raw_fds(prepared);
    // Helpers, in order: pool, mapping fds, shared memory, executable, report pipe.
    let mut helpers: Vec<i32> = Vec::new();
    let mut sources = MapSources::default();
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let max_target = moves.iter().map(|m| m.1).max().unwrap_or(2);
    let high = own_fds_max().max(max_target) + 1;
    let parked = |i: usize| high + (moves.len() + i) as i32;
    if let Some(pf) = pool_file {
        sources.pool = Some(parked(helpers.len()));
        helpers.push(pf.as_raw_fd());
    }
    for (key, fd) in &prepared.mappings {
        sources.files.insert(*key, parked(helpers.len()));
        helpers.push(fd.as_raw_fd());
    }
    for (i, fd) in shmem.iter().enumerate() {
        sources.shmem.insert(i as u32, parked(helpers.len()));
        helpers.push(fd.as_raw_fd());
    }
    helpers.push(exe.as_raw_fd());
    let exe_num = parked(helpers.len() - 1);
    helpers.push(report_write.as_raw_fd());

    let cwd = cstring(&proc.cwd, "the working directory")?;
    let root = (proc.root != "/")
        .then(|| cstring(&proc.root, "the root directory"))
        .transpose()?;
    let comm = cstring(&proc.comm, "the process name")?;
    let actions = signals::full_table(&proc.signals.actions);
    let affinity = process::usable_affinity(&proc.sched.affinity);
    let thread = &proc.threads[0];
    let alt = thread.altstack;
    let plan = StubPlan {
        parent: nix::unistd::getpid(),
        report_fd: report_write.as_raw_fd(),
        session: session_plan(proc, opts.shell_job),
        cwd: &cwd,
        root: root.as_deref(),
        umask: proc.umask,
        personality: proc.personality,
        comm: &comm,
        timerslack: proc.flags.timerslack_ns,
        thp_disable: proc.flags.thp_disable,
        subreaper: proc.flags.child_subreaper,
        sched_policy: proc.sched.policy,
        sched_priority: proc.sched.priority,
        nice: proc.sched.nice,
        affinity: &affinity,
        io_priority: proc.sched.io_priority,
        actions: &actions,
        // Always set: "none" too, or the stub keeps dolly's own (Rust's runtime has one).
        altstack: AltStack {
            sp: alt.sp,
            flags: alt.flags,
            pad: 0,
            size: alt.size,
        },
        moves: &moves,
        helpers: &helpers,
        high,
    };
    // The PID in dolly's own namespace (a clone's init is PID 1 of a new one, where the
    // snapshot's PID is free).
    let set_tid = [proc.pid];
    let child = match fork_at(&set_tid, 0) {
        Ok(Forked::Child) => stub_main(&plan),
        Ok(Forked::Parent(pid)) => pid,
        Err(Errno::EEXIST) => {
            return Err(check_pid_free(proc.pid).err().unwrap_or_else(|| {
                Error::refused(
                    format!("PID {} is in use", proc.pid),
                    "stop the original first",
                )
            }))
        }
        Err(Errno::EPERM) => {
            return Err(Error::refused(
                format!(
                    "creating a process at PID {} needs privileges dolly lacks",
                    proc.pid
                ),
                "run dolly as root (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)",
            ))
        }
        Err(e) => {
            return Err(Error::sys(
                format!("creating a process at PID {}", proc.pid),
                e,
            ))
        }
    };
    drop(report_write);
    let rebuilt = rebuild(
        child,
        proc,
        &sources,
        pool_file,
        exe_num,
        high,
        report_read,
        checkpoints,
    );
    match rebuilt {
        Ok(()) => Ok(Restored { pid: child }),
        Err(e) => {
            // Unless it was already reaped (then its PID may belong to someone else now),
            // the stub is still our child: end it.
            use nix::sys::wait::WaitPidFlag;
            if waitpid(child, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL))
                != Err(Errno::ECHILD)
            {
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, Some(WaitPidFlag::__WALL));
            }
            Err(e)
        }
    }
}

/// Takes over the stopped stub and turns it into the captured process.
#[allow(clippy::too_many_arguments)]
fn rebuild(
    child: Pid,
    proc: &Process,
    sources: &MapSources,
    pool_file: Option<&File>,
    exe_num: i32,
    high: i32,
    report: OwnedFd,
    checkpoints: &Checkpoints,
) -> Result<()> {
    let mut tracee = match Tracee::adopt_stopped_child(child)? {
        Ok(t) => t,
        Err(status) => {
            let mut msg = String::new();
            let _ = std::io::Read::read_to_string(&mut File::from(report), &mut msg);
            return Err(Error::new(
                crate::ErrorKind::System,
                format!("the restore stub failed ({status:?}): {msg}"),
            ));
        }
    };
    tracee.set_options(ptrace::Options::PTRACE_O_EXITKILL)?;
    let (own_vdso, own_vdso_bytes) = tracee::own_vdso()?;
    let vdso_syscall = tracee::find_syscall_in_vdso(&own_vdso_bytes).ok_or_else(|| {
        Error::refused(
            "no syscall instruction found in the vDSO",
            "this kernel's vDSO is not supported",
        )
    })?;
    let thread = &proc.threads[0];
    {
        let mut remote = tracee.remote(own_vdso + vdso_syscall)?;
        if let Some(r) =
            crate::sys::ptrace::rseq_config(child).context("reading the stub's rseq")?
        {
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
        replace_address_space(&mut remote, child, proc, vdso_syscall)?;
        checkpoints.reach("restore:rebuilding")?;
        let scratch_len =
            SCRATCH_MIN.max(page_ceil(creds::scratch_needed(&proc.creds) + PAGE_SIZE));
        let scratch_at = memory::free_range(&proc.areas, &[], scratch_len).ok_or_else(|| {
            Error::refused(
                "no room for a scratch page in the address space",
                "cannot restore this layout",
            )
        })?;
        let scratch = remote.call(
            "mapping a scratch page",
            libc::SYS_mmap,
            &[
                scratch_at,
                scratch_len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
                u64::MAX,
                0,
            ],
        )?;
        memory::map_areas(&mut remote, proc, sources, pool_file)?;
        memory::apply_flags(&mut remote, proc, scratch)?;
        process::set_mm_map(&mut remote, scratch, &proc.mm, Some(exe_num))?;
        remote.call(
            "closing dolly's fds",
            libc::SYS_close_range,
            &[high as u64, u32::MAX as u64, 0],
        )?;
        process::restore_rlimits(child, &proc.rlimits)?;
        process::restore_oom_score_adj(child, proc.oom_score_adj)?;
        process::restore_coredump_filter(child, proc.flags.coredump_filter)?;
        thread::restore_registrations(&mut remote, thread)?;
        let own_pid = remote.call("getpid", libc::SYS_getpid, &[])? as i32;
        signals::queue(&mut remote, scratch, own_pid, None, &proc.signals.pending)?;
        signals::queue(
            &mut remote,
            scratch,
            own_pid,
            Some(own_pid),
            &thread.pending,
        )?;
        process::restore_itimers(&mut remote, scratch, &proc.itimers)?;
        let own = ProcDir::new(child).status()?;
        creds::restore(&mut remote, scratch, &proc.creds, &own)?;
        process::restore_dumpable(&mut remote, &proc.flags)?;
        // The stub died with dolly; the restored process outlives it (its parent-death
        // signal belongs to a parent it no longer has).
        remote.call(
            "clearing the parent-death signal",
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, 0],
        )?;
        remote.call(
            "unmapping the scratch page",
            libc::SYS_munmap,
            &[scratch, scratch_len],
        )?;
    }
    tracee.set_xstate(&thread.xstate.0)?;
    tracee.set_regs(&thread::final_regs(thread))?;
    tracee.set_sigmask(thread.sigmask)?;
    checkpoints.reach("restore:detach")?;
    if proc.stopped {
        let _ = kill(child, Signal::SIGSTOP);
    }
    tracee.set_options(ptrace::Options::empty())?;
    tracee.detach()
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
