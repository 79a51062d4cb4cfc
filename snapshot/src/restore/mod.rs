//! Restore: bring a snapshot back as running processes with their original PIDs.
//!
//! dolly forks the root's *stub* at its original PID (`clone3` with `set_tid`); each stub
//! forks its children's stubs in turn (so sessions, groups and inheritance come out as they
//! were; zombies are stubs that exit at once), sets what a process can set on itself
//! (session, cwd, umask, signal dispositions, its fd table) and stops. dolly follows the
//! forks under ptrace (`PTRACE_O_TRACEFORK`), then rebuilds each stub from outside with
//! remote system calls (see [`rebuild`]) and lets them all go, children first. Until then
//! every stub dies with dolly (`PTRACE_O_EXITKILL`, parent-death signals), so a failed or
//! killed restore leaves no half-built process.

mod rebuild;
mod stub;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::checkpoint::Checkpoints;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::image::{EpollItem, FileKind, Manifest, Process, ShmemObject};
use crate::proc::ProcDir;
use crate::resource::files::{self, PreparedFiles};
use crate::resource::memory::{self, MapSources};
use crate::resource::{creds, process, signals};
use crate::store::Store;
use crate::sys::clone::{fork_at, Forked};
use crate::sys::process::{self as sysproc, AltStack, KernelSigaction};
use crate::sys::{page_ceil, PAGE_SIZE};
use crate::tracee::Tracee;

use stub::{Group, Node, Plan, Setup};

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Give terminal fds the terminal dolly runs on, and keep the root in dolly's session and
    /// process group (so it can be a foreground job dolly waits for).
    pub shell_job: bool,
    /// The caller is PID 1 of a new PID namespace (a clone): the snapshot's PIDs are free
    /// there whatever runs on the host, so the host-wide PID lock is not taken.
    pub in_new_pid_namespace: bool,
}

/// A restored tree.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Its root process.
    pub pid: Pid,
}

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

/// Restores snapshot `id` in place: the tree comes back with its PIDs and runs on, its root
/// detached from dolly. Refuses if a PID is taken.
pub fn restore(
    store: &Store,
    id: &str,
    opts: &RestoreOptions,
    checkpoints: &Checkpoints,
) -> Result<Restored> {
    let (manifest, _snapshot_lock) = store.load(id)?;
    check_compatible(&manifest, opts)?;
    let own = ProcDir::new(nix::unistd::getpid()).status()?;
    for p in &manifest.processes {
        creds::check_restorable(&p.creds, &own)?;
    }
    let _pid_lock = if opts.in_new_pid_namespace {
        None
    } else {
        Some(store.lock_pid(manifest.root_pid)?)
    };
    for pid in manifest
        .processes
        .iter()
        .map(|p| p.pid)
        .chain(manifest.zombies.iter().map(|z| z.pid))
    {
        check_pid_free(pid)?;
    }
    let pool_dir = store.pool_dir(&manifest.id);
    let (pools, shmem_pool) = match open_pools(&manifest, &pool_dir) {
        Err(e) if e.kind() == ErrorKind::Corrupt && store.can_repair_pool(id) => {
            // The memory tier lost pages of a persisted snapshot: put them back.
            store.repair_pool(id)?;
            open_pools(&manifest, &pool_dir)?
        }
        opened => opened?,
    };
    raise_nofile();
    let prepared = files::prepare(&manifest, &pool_dir)?;
    let shmem: Vec<OwnedFd> = manifest
        .shmem
        .iter()
        .map(|o| make_shmem(o, shmem_pool.as_ref()))
        .collect::<Result<_>>()?;
    let exes: Vec<OwnedFd> = manifest
        .processes
        .iter()
        .map(|p| exe_fd(&manifest, p, &prepared))
        .collect::<Result<_>>()?;
    checkpoints.reach("restore:prepared")?;
    build(
        &manifest,
        opts,
        &prepared,
        &shmem,
        &pools,
        &exes,
        checkpoints,
    )
}

/// Opens and checks each pool file of `manifest`: those of each process (its own, and
/// those it shares with earlier snapshots), and the one of the shared memory objects.
fn open_pools(
    manifest: &Manifest,
    pool_dir: &Path,
) -> Result<(Vec<memory::ProcessPools>, Option<File>)> {
    let pools = manifest
        .processes
        .iter()
        .map(|p| memory::open_process_pools(p, pool_dir))
        .collect::<Result<_>>()?;
    let shmem_pool = manifest
        .shmem_pool
        .as_ref()
        .map(|pf| {
            let f = memory::open_pool(pool_dir, &pf.name)?;
            let pages = manifest.shmem.iter().filter_map(|o| o.pages.as_ref());
            memory::check_pool(pages, pf, &f, &pool_dir.join(&pf.name))?;
            Ok::<_, Error>(f)
        })
        .transpose()?;
    Ok((pools, shmem_pool))
}

/// The order a parent creates its children in: group leaders first, so the others can join.
fn children_of(pid: i32, nodes: &[(i32, i32, i32)]) -> Vec<usize> {
    let mut kids: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].1 == pid && i != 0)
        .collect();
    kids.sort_by_key(|&i| nodes[i].2 != nodes[i].0);
    kids
}

/// Which process groups exist when node `me` joins one: those of its ancestors and of the
/// siblings (of it and of each ancestor) created before it.
fn groups_before(
    me: usize,
    parent: &[Option<usize>],
    children: &[Vec<usize>],
    pids: &[i32],
) -> HashSet<i32> {
    let mut out = HashSet::new();
    let mut n = me;
    while let Some(p) = parent[n] {
        out.insert(pids[p]);
        for &s in children[p].iter().take_while(|&&s| s != n) {
            out.insert(pids[s]);
        }
        n = p;
    }
    out
}

/// Builds the tree of stubs, rebuilds each, and lets them go.
#[allow(clippy::too_many_arguments)]
fn build(
    manifest: &Manifest,
    opts: &RestoreOptions,
    prepared: &PreparedFiles,
    shmem: &[OwnedFd],
    pools: &[memory::ProcessPools],
    exes: &[OwnedFd],
    checkpoints: &Checkpoints,
) -> Result<Restored> {
    let procs = &manifest.processes;
    // Nodes: live processes (root first), then zombies, as (pid, ppid, pgid).
    let ids: Vec<(i32, i32, i32)> = procs
        .iter()
        .map(|p| (p.pid, p.ppid, p.pgid))
        .chain(manifest.zombies.iter().map(|z| (z.pid, z.ppid, z.pgid)))
        .collect();
    let sids: Vec<i32> = procs
        .iter()
        .map(|p| p.sid)
        .chain(manifest.zombies.iter().map(|z| z.sid))
        .collect();
    let pids: Vec<i32> = ids.iter().map(|n| n.0).collect();
    let children: Vec<Vec<usize>> = ids.iter().map(|n| children_of(n.0, &ids)).collect();
    let mut parent = vec![None; ids.len()];
    for (p, kids) in children.iter().enumerate() {
        for &k in kids {
            parent[k] = Some(p);
        }
    }

    // Fds every stub parks for the rebuilds: descriptions, mapping files, shared memory,
    // pool files, executables, and the report pipe last.
    let mut helpers: Vec<i32> = prepared
        .descriptions
        .iter()
        .map(|fd| fd.as_raw_fd())
        .collect();
    let mut mapping_at: HashMap<(u32, bool), usize> = HashMap::new();
    for (key, fd) in &prepared.mappings {
        mapping_at.insert(*key, helpers.len());
        helpers.push(fd.as_raw_fd());
    }
    let shmem_base = helpers.len();
    helpers.extend(shmem.iter().map(|fd| fd.as_raw_fd()));
    let mut tty_at: HashMap<u32, usize> = HashMap::new();
    for (&index, fd) in &prepared.tty_slaves {
        tty_at.insert(index, helpers.len());
        helpers.push(fd.as_raw_fd());
    }
    let mut pool_at = Vec::new();
    let mut bases_at = Vec::new();
    for pool in pools {
        pool_at.push(pool.own.as_ref().map(|f| {
            helpers.push(f.as_raw_fd());
            helpers.len() - 1
        }));
        bases_at.push(
            pool.bases
                .iter()
                .map(|f| {
                    helpers.push(f.as_raw_fd());
                    helpers.len() - 1
                })
                .collect::<Vec<_>>(),
        );
    }
    let exe_base = helpers.len();
    helpers.extend(exes.iter().map(|fd| fd.as_raw_fd()));
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    helpers.push(report_write.as_raw_fd());
    let max_target = procs
        .iter()
        .flat_map(|p| &p.fds)
        .map(|f| f.fd)
        .max()
        .unwrap_or(2);
    let high = own_fds_max().max(max_target) + 1;
    let parked = |i: usize| Plan::parked(high, i);

    // Each epoll instance's registrations are made by the first process holding it: the
    // one whose fd numbers they were captured with.
    let mut epolls: Vec<Vec<(i32, &[EpollItem])>> = vec![Vec::new(); procs.len()];
    let mut registered = HashSet::new();
    for (i, p) in procs.iter().enumerate() {
        for fd in &p.fds {
            let open = &manifest.open_files[fd.open_file as usize];
            if let FileKind::Epoll { items } = &manifest.files[open.file as usize].kind {
                if registered.insert(fd.open_file) {
                    epolls[i].push((fd.fd, items.as_slice()));
                }
            }
        }
    }

    // What each stub does to itself (all allocated here, before any fork).
    let tables: Vec<Vec<(i32, i32, bool)>> = procs.iter().map(|p| prepared.fd_table(p)).collect();
    let cwds: Vec<CString> = procs
        .iter()
        .map(|p| cstring(&p.cwd, "a working directory"))
        .collect::<Result<_>>()?;
    let roots: Vec<Option<CString>> = procs
        .iter()
        .map(|p| {
            (p.root != "/")
                .then(|| cstring(&p.root, "a root directory"))
                .transpose()
        })
        .collect::<Result<_>>()?;
    let comms: Vec<CString> = procs
        .iter()
        .map(|p| cstring(&p.comm, "a process name"))
        .collect::<Result<_>>()?;
    let actions: Vec<Vec<(i32, KernelSigaction)>> = procs
        .iter()
        .map(|p| signals::full_table(&p.signals.actions))
        .collect();
    let affinities: Vec<Vec<u64>> = procs
        .iter()
        .map(|p| process::usable_affinity(&p.sched.affinity))
        .collect();
    let all_pids: HashSet<i32> = pids.iter().copied().collect();
    let mut nodes = Vec::with_capacity(ids.len());
    for (i, &(pid, _, pgid)) in ids.iter().enumerate() {
        let (mut setsid, mut group) = (sids[i] == pid, Group::Inherit);
        if pgid == pid {
            group = Group::Lead;
        } else if all_pids.contains(&pgid) {
            if !groups_before(i, &parent, &children, &pids).contains(&pgid) {
                return Err(Error::refused(
                    format!("process {pid} is in process group {pgid}, which is created after it in the tree: not supported yet"),
                    "capture a tree whose process groups are led by an ancestor or an elder sibling",
                ));
            }
            group = Group::Join(pgid);
        }
        if i == 0 {
            (setsid, group) = match session_plan(&procs[0], opts.shell_job) {
                Session::Inherit => (false, Group::Inherit),
                Session::NewGroup => (false, Group::Lead),
                Session::Detached => (true, Group::Inherit),
            };
        }
        if setsid {
            group = Group::Inherit; // a session leader leads its group already
        }
        let setup = procs.get(i).map(|p| Setup {
            cwd: &cwds[i],
            root: roots[i].as_deref(),
            umask: p.umask,
            personality: p.personality,
            comm: &comms[i],
            timerslack: p.flags.timerslack_ns,
            thp_disable: p.flags.thp_disable,
            subreaper: p.flags.child_subreaper,
            sched_policy: p.sched.policy,
            sched_priority: p.sched.priority,
            nice: p.sched.nice,
            affinity: &affinities[i],
            io_priority: p.sched.io_priority,
            actions: &actions[i],
            // Always set: "none" too, or the stub keeps dolly's own (Rust's runtime has one).
            altstack: AltStack {
                sp: p.threads[0].altstack.sp,
                flags: p.threads[0].altstack.flags,
                pad: 0,
                size: p.threads[0].altstack.size,
            },
            moves: &tables[i],
        });
        nodes.push(Node {
            pid,
            setsid,
            group,
            children: &children[i],
            exit: (i >= procs.len()).then(|| manifest.zombies[i - procs.len()].wait_status),
            setup,
        });
    }
    let plan = Plan {
        dolly: nix::unistd::getpid(),
        report_fd: report_write.as_raw_fd(),
        helpers: &helpers,
        high,
        nodes: &nodes,
    };

    let root = match fork_at(&[manifest.root_pid], 0) {
        Ok(Forked::Child) => stub::run_root(&plan),
        Ok(Forked::Parent(pid)) => pid,
        Err(Errno::EEXIST) => {
            return Err(check_pid_free(manifest.root_pid).err().unwrap_or_else(|| {
                Error::refused(
                    format!("PID {} is in use", manifest.root_pid),
                    "stop the original first",
                )
            }))
        }
        Err(Errno::EPERM) => {
            return Err(Error::refused(
                format!(
                    "creating a process at PID {} needs privileges dolly lacks",
                    manifest.root_pid
                ),
                "run dolly as root (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)",
            ))
        }
        Err(e) => {
            return Err(Error::sys(
                format!("creating a process at PID {}", manifest.root_pid),
                e,
            ))
        }
    };
    drop(report_write);
    let live: Vec<i32> = procs.iter().map(|p| p.pid).collect();
    let zombies: Vec<i32> = manifest.zombies.iter().map(|z| z.pid).collect();
    let built = (|| -> Result<()> {
        let mut tracees = follow(root, &live, &zombies, report_read)?;
        let mut threads: HashMap<i32, Vec<Tracee>> = HashMap::new();
        for (i, p) in procs.iter().enumerate() {
            let mut maps = MapSources {
                pool: pool_at[i].map(parked),
                bases: bases_at[i].iter().map(|&at| parked(at)).collect(),
                ..Default::default()
            };
            for (key, &at) in &mapping_at {
                maps.files.insert(*key, parked(at));
            }
            for (o, object) in manifest.shmem.iter().enumerate() {
                if let Some(seg) = &object.sysv {
                    maps.sysv.insert(o as u32, seg.shmid);
                }
            }
            for o in 0..shmem.len() {
                maps.shmem.insert(o as u32, parked(shmem_base + o));
            }
            // The pty this process leads the session of, with its foreground group.
            let ctty = manifest.files.iter().find_map(|f| match &f.kind {
                FileKind::PtyMaster(pty) if pty.session == p.pid => {
                    Some((parked(tty_at[&pty.index]), pty.foreground))
                }
                _ => None,
            });
            let sources = rebuild::Sources {
                maps,
                exe: parked(exe_base + i),
                pools: &pools[i],
                high,
                epolls: epolls[i].clone(),
                ctty,
            };
            let tracee = tracees.get_mut(&p.pid).expect("a tracee per live process");
            threads.insert(
                p.pid,
                rebuild::rebuild(tracee, p, &sources, i == 0, checkpoints)?,
            );
        }
        crate::resource::sysv::remove_again(
            &manifest
                .shmem
                .iter()
                .filter_map(|o| o.sysv.as_ref())
                .collect::<Vec<_>>(),
        );
        checkpoints.reach("restore:detach")?;
        for p in procs.iter().rev() {
            let leader = tracees.remove(&p.pid).expect("a tracee per live process");
            rebuild::finish(leader, threads.remove(&p.pid).unwrap_or_default(), p)?;
        }
        Ok(())
    })();
    match built {
        Ok(()) => Ok(Restored { pid: root }),
        Err(e) => {
            // Unless it was already reaped (then its PID may belong to someone else now), the
            // root stub is still our child: end it (its descendants die with it).
            if waitpid(root, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) != Err(Errno::ECHILD)
            {
                let _ = nix::sys::signal::kill(root, Signal::SIGKILL);
                let _ = waitpid(root, Some(WaitPidFlag::__WALL));
            }
            Err(e)
        }
    }
}

/// Follows the stubs as they build the tree (dolly traces the root, and through
/// `PTRACE_O_TRACEFORK` every stub it and they fork), until every live process's stub has
/// stopped for its rebuild and every zombie has exited. Returns the stopped stubs.
fn follow(
    root: Pid,
    live: &[i32],
    zombies: &[i32],
    report: OwnedFd,
) -> Result<HashMap<i32, Tracee>> {
    let failed = |what: String| -> Error {
        let mut msg = String::new();
        let _ = std::io::Read::read_to_string(
            &mut File::from(report.try_clone().expect("dup")),
            &mut msg,
        );
        Error::new(
            ErrorKind::System,
            format!("building the process tree: {what}: {}", msg.trim()),
        )
    };
    let mut tracees: HashMap<i32, Tracee> = HashMap::new();
    let root_tracee = match Tracee::adopt_stopped_child(root)? {
        Ok(t) => t,
        Err(status) => return Err(failed(format!("the root stub ended ({status:?})"))),
    };
    root_tracee.set_options(
        ptrace::Options::PTRACE_O_EXITKILL
            | ptrace::Options::PTRACE_O_TRACEFORK
            | ptrace::Options::PTRACE_O_TRACEVFORK
            | ptrace::Options::PTRACE_O_TRACECLONE,
    )?;
    ptrace::cont(root, None).context("resuming the root stub")?;
    tracees.insert(root.as_raw(), root_tracee);
    #[derive(Clone, Copy, PartialEq)]
    enum Phase {
        Running,
        Ready,
        Exited,
    }
    let mut phase: HashMap<i32, Phase> = HashMap::from([(root.as_raw(), Phase::Running)]);
    let done = |phase: &HashMap<i32, Phase>| {
        live.iter().all(|p| phase.get(p) == Some(&Phase::Ready))
            && zombies.iter().all(|p| phase.get(p) == Some(&Phase::Exited))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&phase) {
        if Instant::now() > deadline {
            return Err(failed("the stubs did not all get ready within 30 s".into()));
        }
        let mut progressed = false;
        for &pid in live.iter().chain(zombies) {
            if matches!(phase.get(&pid), Some(Phase::Ready | Phase::Exited)) {
                continue;
            }
            let p = Pid::from_raw(pid);
            let status = match waitpid(p, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => continue,
                Ok(s) => s,
                Err(e) => return Err(Error::sys(format!("waiting for the stub of {pid}"), e)),
            };
            progressed = true;
            match status {
                WaitStatus::PtraceEvent(..) => ptrace::cont(p, None).context("resuming a stub")?,
                WaitStatus::Stopped(_, Signal::SIGSTOP) => match phase.get(&pid) {
                    None => {
                        // A new stub's first stop: it starts traced. Let it build.
                        if !tracees.contains_key(&pid) && live.contains(&pid) {
                            tracees.insert(pid, Tracee::adopt_traced(p)?);
                        }
                        phase.insert(pid, Phase::Running);
                        ptrace::cont(p, None).context("resuming a stub")?;
                    }
                    _ => {
                        phase.insert(pid, Phase::Ready);
                    }
                },
                WaitStatus::Stopped(_, sig) => ptrace::cont(p, sig).context("resuming a stub")?,
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) if zombies.contains(&pid) => {
                    phase.insert(pid, Phase::Exited);
                }
                other => return Err(failed(format!("the stub of {pid} ended ({other:?})"))),
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    Ok(tracees)
}

/// Creates a shared anonymous memory object in dolly with the stored content and returns an
/// fd to it (its `/proc/self/map_files` entry), for the restored process to map.
fn make_shmem(object: &ShmemObject, pool_file: Option<&File>) -> Result<OwnedFd> {
    let len = page_ceil(object.size.max(1));
    let file = match &object.sysv {
        Some(seg) => crate::resource::sysv::make(seg)?,
        None => sysproc::new_shared_anonymous(len).context("creating shared memory")?,
    };
    if let (Some(pages), Some(pool_file)) = (&object.pages, pool_file) {
        let mut buf = vec![0u8; 1 << 20];
        for run in &pages.runs {
            let mut done = 0;
            let total = run[1] * PAGE_SIZE;
            while done < total {
                let n = (total - done).min(buf.len() as u64) as usize;
                pool_file
                    .read_exact_at(&mut buf[..n], pages.byte_offset(run[0]) + done)
                    .context("reading shared memory from the pool")?;
                file.write_all_at(&buf[..n], run[0] * PAGE_SIZE + done)
                    .context("filling shared memory")?;
                done += n as u64;
            }
        }
    }
    if object.sysv.is_none() {
        file.set_len(object.size).context("sizing shared memory")?;
    }
    Ok(file.into())
}

/// How long a restore waits for a zombie that holds a PID it needs to be reaped (an orphan
/// is reaped by PID 1 or a subreaper, which may take a moment: a process ended just before,
/// or the fork a capture made of it).
const ZOMBIE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuses when `pid` is in use, naming what uses it; waits a little for a zombie that holds
/// it (see [`ZOMBIE_WAIT`]).
fn check_pid_free(pid: i32) -> Result<()> {
    let deadline = std::time::Instant::now() + ZOMBIE_WAIT;
    loop {
        match pid_user(pid) {
            None => return Ok(()),
            Some((_, _, true)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Some((user, comm, zombie)) => return Err(pid_taken(pid, user, &comm, zombie)),
        }
    }
}

/// What keeps `pid` from being free: the process with that PID, or one whose process group
/// or session it names; with its command and whether it is a zombie.
fn pid_user(pid: i32) -> Option<(i32, String, bool)> {
    if sysproc::pid_exists(pid) {
        let stat = ProcDir::new(Pid::from_raw(pid)).stat().ok();
        return Some(
            stat.map(|s| (pid, s.comm, s.state == 'Z'))
                .unwrap_or_else(|| (pid, "?".into(), false)),
        );
    }
    // A PID also stays taken while it names a process group or session.
    std::fs::read_dir("/proc").ok().and_then(|d| {
        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find_map(|p| {
                let st = ProcDir::new(Pid::from_raw(p)).stat().ok()?;
                (st.pgid == pid || st.sid == pid).then_some((p, st.comm, st.state == 'Z'))
            })
    })
}

/// The refusal for `pid`, taken by process `user`.
fn pid_taken(pid: i32, user: i32, comm: &str, zombie: bool) -> Error {
    if user != pid {
        return Error::refused(
            format!("PID {pid} is still the process group or session of process {user} ({comm}), which outlived the original"),
            format!("end process {user} too (e.g. `kill -- -{pid}`), then restore"),
        );
    }
    if zombie {
        return Error::refused(
            format!("PID {pid} is held by a zombie ({comm}) that its parent has not reaped yet"),
            "wait for its parent to reap it (or end the parent), then restore",
        );
    }
    Error::refused(
        format!("PID {pid} is in use by {comm}: a restore in place needs the snapshot's PID free"),
        format!("stop the original first (e.g. `kill {pid}`), or start a clone instead"),
    )
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
    Ok(())
}

/// An fd of the executable for `PR_SET_MM_MAP`: the mapping fd when the process maps it
/// (which also covers a deleted executable), else the path opened again.
fn exe_fd(manifest: &Manifest, proc: &Process, prepared: &PreparedFiles) -> Result<OwnedFd> {
    for ((index, writable), fd) in &prepared.mappings {
        if !writable && manifest.files[*index as usize].path == proc.exe {
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
