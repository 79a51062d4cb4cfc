//! Capture: freeze a process, read its state, copy its pages into the pool, let it run on,
//! and record the snapshot. The resource modules do the reading; this only orchestrates.

use std::time::Instant;

use nix::unistd::Pid;

use crate::checkpoint::Checkpoints;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{AreaKind, Host, Manifest, PoolFile, Process, Signals, FORMAT, VERSION};
use crate::proc::{ProcDir, Status};
use crate::resource::{creds, files, memory, process, signals, thread};
use crate::store::{Record, Store};
use crate::tracee::{self, RawRegs, Tracee};

/// What to capture, and how.
#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// The process.
    pub pid: i32,
    /// A name for the snapshot.
    pub name: Option<String>,
    /// Allow a process with a terminal; a restore gives it the restorer's terminal.
    pub shell_job: bool,
}

/// What became of a capture.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// The snapshot's catalog record (id, status, bytes, frozen time).
    pub record: Record,
}

/// Bytes of scratch memory mapped inside the target while reading hidden state.
const SCRATCH_LEN: u64 = 2 * crate::sys::PAGE_SIZE;

fn refuse_busy_tracer(pid: Pid, tracer: i32) -> Error {
    let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    if comm == "dolly" {
        Error::busy(
            format!("process {pid} is already being captured or restored by dolly (pid {tracer})"),
            "wait for the other dolly to finish, then try again",
        )
    } else {
        Error::refused(
            format!("process {pid} is being traced by {comm} (pid {tracer})"),
            format!("detach the debugger or tracer first (quit {comm}, or `kill {tracer}`)"),
        )
    }
}

/// Refusals that need no freeze; also run again once frozen, since things change.
fn check_capturable(proc: &ProcDir, status: &Status) -> Result<()> {
    let pid = proc.pid();
    if status.threads > 1 {
        return Err(Error::refused(
            format!(
                "process {pid} has {} threads: multi-threaded processes are not supported yet",
                status.threads
            ),
            "capture a single-threaded process",
        ));
    }
    let children = proc.children()?;
    if let Some(child) = children.first() {
        return Err(Error::refused(
            format!(
                "process {pid} has a child process ({child}): process trees are not supported yet"
            ),
            "capture a process without children (or wait for them to exit and be reaped)",
        ));
    }
    if status.seccomp != 0 {
        let mode = if status.seccomp == 1 {
            "strict mode"
        } else {
            "a filter"
        };
        return Err(Error::refused(
            format!("process {pid} runs under seccomp ({mode}): not supported yet"),
            "capture a process without seccomp",
        ));
    }
    // A restore puts the process in dolly's namespaces: it must be in them already.
    for ns in ["pid", "mnt", "net", "ipc", "uts", "user", "cgroup", "time"] {
        let theirs = std::fs::read_link(proc.path(&format!("ns/{ns}"))).ok();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        if theirs.is_some() && theirs != ours {
            return Err(Error::refused(
                format!("process {pid} is in another {ns} namespace than dolly: not supported yet"),
                "run dolly in the process's namespaces (e.g. with nsenter), or capture a process in dolly's",
            ));
        }
    }
    let (policy, _) = crate::sys::process::get_scheduler(pid).unwrap_or((0, 0));
    if policy & !libc::SCHED_RESET_ON_FORK == 6 {
        return Err(Error::refused(
            format!("process {pid} runs under SCHED_DEADLINE: not supported yet"),
            "capture it under another scheduling policy",
        ));
    }
    let timers = proc.read("timers").unwrap_or_default();
    if !timers.trim().is_empty() {
        return Err(Error::refused(
            format!("process {pid} has POSIX timers (timer_create): not supported yet"),
            "capture a process without POSIX timers",
        ));
    }
    Ok(())
}

fn preflight(proc: &ProcDir) -> Result<(Status, char)> {
    let pid = proc.pid();
    let stat = proc.stat().map_err(|_| {
        Error::not_found(
            format!("no process {pid}"),
            "check the PID (it may have exited)",
        )
    })?;
    let status = proc.status()?;
    if status.tgid != pid.as_raw() {
        return Err(Error::refused(
            format!(
                "{pid} is a thread of process {}, not a process",
                status.tgid
            ),
            format!("capture process {} instead", status.tgid),
        ));
    }
    const PF_KTHREAD: u32 = 0x0020_0000;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(Error::refused(
            format!("{pid} is a kernel thread"),
            "capture a user-space process",
        ));
    }
    let uid = nix::unistd::geteuid();
    if !uid.is_root() && status.uid[0] != uid.as_raw() {
        return Err(Error::refused(
            format!(
                "process {pid} belongs to user {}, and dolly runs as user {uid}",
                status.uid[0]
            ),
            "run dolly as root, or as the user who owns the process",
        ));
    }
    if stat.state == 'Z' {
        return Err(Error::refused(
            format!("process {pid} is a zombie (it has exited)"),
            "there is nothing left to capture",
        ));
    }
    if proc.read_link("exe").is_err() {
        return Err(Error::refused(
            format!("process {pid} has no executable dolly can read"),
            "capture a user-space process (as root, or as its owner)",
        ));
    }
    let me = nix::unistd::getpid();
    if pid == me || pid == nix::unistd::getppid() {
        return Err(Error::refused(
            "dolly cannot capture itself or its caller",
            "capture another process",
        ));
    }
    if status.tracer_pid != 0 {
        return Err(refuse_busy_tracer(pid, status.tracer_pid));
    }
    check_capturable(proc, &status)?;
    Ok((status, stat.state))
}

/// Captures process `opts.pid` into a new snapshot of `store`. The process is frozen only
/// while its state and pages are read, then runs on; on any failure it runs on exactly as
/// before and no usable snapshot is left.
pub fn capture(
    store: &Store,
    opts: &CaptureOptions,
    checkpoints: &Checkpoints,
) -> Result<CaptureReport> {
    let started = Instant::now();
    let pid = Pid::from_raw(opts.pid);
    let proc = ProcDir::new(pid);
    let (status, state) = preflight(&proc)?;
    let _pid_lock = store.lock_pid(opts.pid)?;
    let draft = store.begin(opts.name.as_deref(), opts.pid, &status.name)?;
    let frozen: Result<(Process, f64)> = (|| {
        checkpoints.reach("capture:locked")?;
        let mut tracee = Tracee::seize(pid)?;
        let frozen_at = Instant::now();
        let result = capture_frozen(&proc, &mut tracee, opts, &draft, state == 'T', checkpoints);
        let thawed = tracee.detach();
        let frozen_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
        let process = result?;
        thawed?;
        Ok((process, frozen_ms))
    })();
    let (process, frozen_ms) = match frozen {
        Ok(v) => v,
        Err(e) => {
            match e.kind() {
                ErrorKind::Refused | ErrorKind::Busy | ErrorKind::NotFound => draft.discard(),
                _ => draft.fail(&e.message()),
            }
            return Err(e);
        }
    };
    let (vdso_hash, kernel) = (host_vdso_hash()?, kernel_release());
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: draft.id().to_string(),
        name: opts.name.clone(),
        created_at: draft.created_at().to_string(),
        host: Host {
            kernel,
            page_size: crate::sys::PAGE_SIZE,
            vdso_hash,
        },
        shell_job: opts.shell_job,
        root_pid: opts.pid,
        processes: vec![process],
    };
    checkpoints.reach("capture:commit")?;
    let record = draft.commit(&manifest, frozen_ms, started.elapsed().as_secs_f64() * 1e3)?;
    Ok(CaptureReport { record })
}

/// BLAKE3 of this kernel's vDSO image.
pub fn host_vdso_hash() -> Result<String> {
    let (_, bytes) = tracee::own_vdso()?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Finds a `syscall` instruction the stopped process can execute: in its vDSO, or the one
/// it is stopped right after if the freeze caught it in a system call.
fn syscall_ip(tracee: &Tracee, proc: &Process, regs: &RawRegs) -> Result<u64> {
    let mut candidates = Vec::new();
    if let Some(vdso) = proc.areas.iter().find(|a| a.kind == AreaKind::Vdso) {
        let (_, own) = tracee::own_vdso()?;
        if let Some(off) = tracee::find_syscall_in_vdso(&own) {
            candidates.push(vdso.start + off);
        }
    }
    if (regs.orig_rax as i64) >= 0 {
        candidates.push(regs.rip - 2);
    }
    for ip in candidates {
        let mut insn = [0u8; 2];
        if tracee.read_mem(ip, &mut insn).is_ok() && insn == [0x0f, 0x05] {
            return Ok(ip);
        }
    }
    Err(Error::refused(
        format!(
            "process {} has no vDSO to run system calls through",
            tracee.pid()
        ),
        "capture a process that keeps its vDSO mapped",
    ))
}

/// What a capture reads from inside the process.
struct Hidden {
    actions: Vec<crate::image::SignalAction>,
    thread: thread::HiddenState,
    itimers: crate::image::ITimers,
    brk: u64,
    flags: crate::image::ProcessFlags,
    securebits: u32,
}

fn query_hidden(remote: &mut tracee::Remote, checkpoints: &Checkpoints) -> Result<Hidden> {
    let scratch = remote.call(
        "mapping a scratch page",
        libc::SYS_mmap,
        &[
            0,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let result = (|| {
        checkpoints.reach("capture:injected")?;
        let actions = signals::query_actions(remote, scratch)?;
        let altstack = thread::query_altstack(remote, scratch)?;
        let clear_child_tid = thread::query_tid_address(remote, scratch)?;
        let itimers = process::query_itimers(remote, scratch)?;
        let brk = process::query_brk(remote)?;
        let (flags, securebits) = process::query_flags(remote, scratch)?;
        Ok(Hidden {
            actions,
            thread: thread::HiddenState {
                altstack,
                clear_child_tid,
            },
            itimers,
            brk,
            flags,
            securebits,
        })
    })();
    let unmapped = remote.call(
        "unmapping the scratch page",
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
    );
    let hidden = result?;
    unmapped?;
    Ok(hidden)
}

fn capture_frozen(
    proc: &ProcDir,
    tracee: &mut Tracee,
    opts: &CaptureOptions,
    draft: &crate::store::Draft,
    stopped: bool,
    checkpoints: &Checkpoints,
) -> Result<Process> {
    let pid = proc.pid();
    checkpoints.reach("capture:frozen")?;
    let stat = proc.stat()?;
    let status = proc.status()?;
    check_capturable(proc, &status)?;
    let mut regs = tracee.regs()?;
    thread::abort_rseq_section(tracee, &mut regs)?;
    let xstate = tracee.xstate()?;
    let sigmask = tracee.sigmask()?;

    // Refusals first: they need no help from inside the process.
    let mut table = files::FileTable::new(&draft.pool_dir());
    let (open_files, fds) = files::capture_fds(proc, &mut table, opts.shell_job)?;
    let mut memory = memory::inspect(proc, &mut table)?;
    let cwd = proc.read_link("cwd")?;
    if cwd.ends_with(" (deleted)") {
        return Err(Error::refused(
            format!("the working directory of process {pid} ({cwd}) was deleted"),
            "capture a process whose working directory exists",
        ));
    }
    let (sched, oom_score_adj) = process::capture_sched(proc, &stat)?;
    let mut shell = Process {
        pid: pid.as_raw(),
        ns_pids: status.ns_pid.clone(),
        ppid: stat.ppid,
        pgid: stat.pgid,
        sid: stat.sid,
        comm: stat.comm.clone(),
        stopped,
        exe: proc
            .read_link("exe")?
            .trim_end_matches(" (deleted)")
            .to_string(),
        personality: u32::from_str_radix(proc.read("personality")?.trim(), 16).unwrap_or(0),
        umask: status.umask,
        cwd,
        root: proc.read_link("root")?,
        rlimits: process::capture_rlimits(proc)?,
        creds: creds::capture(&status, 0),
        flags: Default::default(),
        sched,
        oom_score_adj,
        mm: process::mm_layout(&stat, 0, proc.auxv()?),
        areas: memory.areas.clone(),
        shmem: Vec::new(),
        pool: None,
        files: Vec::new(),
        open_files,
        fds,
        signals: Signals {
            actions: Vec::new(),
            pending: signals::pending(pid, true)?,
        },
        itimers: Default::default(),
        threads: Vec::new(),
    };

    // State only the process itself can tell: run system calls inside it, with every
    // signal blocked, then put its registers and mask back whatever happened.
    let ip = syscall_ip(tracee, &shell, &regs)?;
    tracee.set_sigmask(tracee::ALL_SIGNALS)?;
    let hidden = tracee
        .remote(ip)
        .and_then(|mut remote| query_hidden(&mut remote, checkpoints));
    let put_back = tracee
        .set_regs(&regs)
        .and_then(|_| tracee.set_sigmask(sigmask))
        .and_then(|_| tracee.park());
    let hidden = hidden?;
    put_back?;

    checkpoints.reach("capture:pages")?;
    let pool_name = format!("{pid}{}", memory::POOL_FILE_SUFFIX);
    let stats = memory::dump(pid, &mut memory, &draft.pool_dir().join(&pool_name))?;
    let (areas, shmem) = memory.into_image();

    shell.areas = areas;
    shell.shmem = shmem;
    shell.pool = (stats.pool_size > 0).then_some(PoolFile {
        name: pool_name,
        size: stats.pool_size,
    });
    shell.files = table.into_files();
    shell.creds = creds::capture(&status, hidden.securebits);
    shell.flags = hidden.flags;
    shell.flags.coredump_filter = process::capture_coredump_filter(proc)?;
    shell.mm.brk = hidden.brk;
    shell.signals.actions = hidden.actions;
    shell.itimers = hidden.itimers;
    shell.threads = vec![thread::capture(
        tracee,
        &regs,
        xstate,
        sigmask,
        hidden.thread,
        status.ns_pid.clone(),
        stat.comm.clone(),
    )?];
    Ok(shell)
}
