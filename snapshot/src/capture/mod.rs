//! Capture: freeze a process tree, read each process's state, copy their pages into the
//! pool, let them run on, and record the snapshot. The resource modules do the reading;
//! this only orchestrates.

mod checks;
mod cow;
pub use cow::ForkPolicy;
pub mod leftovers;
mod parent;
pub use parent::{auto_parent, restored_from};
mod precopy;
mod process;
mod tree;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use nix::unistd::Pid;

use crate::checkpoint::Checkpoints;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::image::{Host, Manifest, PoolFile, FORMAT, VERSION};
use crate::proc::ProcDir;
use crate::resource::files::{FileTable, OpenFiles};
use crate::resource::memory::{self, ShmemTable};
use crate::store::{Record, Store};
use crate::tracee;

/// What to capture, and how.
#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// The root of the tree: it and all its descendants are captured.
    pub pid: i32,
    /// A name for the snapshot.
    pub name: Option<String>,
    /// Allow processes with a terminal; a restore gives them the restorer's terminal.
    pub shell_job: bool,
    /// Capture file locks (a restore takes them again); without it they are refused.
    pub file_locks: bool,
    /// Capture established TCP connections whose both ends are in the tree (TCP repair
    /// mode); without it they are refused.
    pub tcp_established: bool,
    /// Capture incrementally against this snapshot: only pages found nowhere in it are
    /// stored, the others are shared with it. Without one, the capture is made against
    /// the snapshot the process was restored or cloned from, if it still maps its pool
    /// ([`restored_from`]), unless `full`.
    pub parent: Option<String>,
    /// Without `parent`, store every page, even of a process restored from a snapshot.
    pub full: bool,
    /// When the freeze copies a process's last pages from a copy-on-write fork of it made
    /// inside it, after the thaw, rather than while it is stopped.
    pub fork: ForkPolicy,
}

/// What became of a capture.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// The snapshot's catalog record (id, status, bytes, frozen time).
    pub record: Record,
}

/// What the forks of the freeze (see [`cow`]) and the notes of what the capture leaves in
/// its processes (see [`leftovers`]) need, made ready before it.
struct ForkSetup {
    /// The memory each pre-copied process could still be given, for
    /// [`cow::worth_forking`] (`--fork auto`).
    rooms: HashMap<Pid, Option<u64>>,
    /// When each pre-copied process started (clock ticks after boot).
    starts: HashMap<Pid, u64>,
    /// [`leftovers::NOTE_FILE`], made and mapped before the freeze.
    note: Option<leftovers::Note>,
}

/// The image of a tree, but the header.
struct TreeImage {
    processes: Vec<crate::image::Process>,
    zombies: Vec<crate::image::Zombie>,
    files: Vec<crate::image::File>,
    open_files: Vec<crate::image::OpenFile>,
    shmem: Vec<crate::image::ShmemObject>,
    shmem_pool: Option<PoolFile>,
    /// Processes forked at the freeze, whose pages are read from their forks after the
    /// thaw (their images then join `processes`, in tree order).
    left: Vec<(cow::Held, process::Inspected)>,
    /// How many processes were forked.
    forked: u32,
    /// The bytes read from their forks.
    forked_bytes: u64,
}

/// Captures process `opts.pid` and its descendants into a new snapshot of `store`. The tree
/// is frozen only while its state and pages are read, then runs on; on any failure it runs on
/// exactly as before and no usable snapshot is left.
pub fn capture(
    store: &Store,
    opts: &CaptureOptions,
    checkpoints: &Checkpoints,
) -> Result<CaptureReport> {
    capture_observed(store, opts, checkpoints, &mut |_| {})
}

/// [`capture`], calling `on_frozen` with the snapshot's record (`capturing`, its frozen time
/// known) once the tree runs on again, before the pages still to store are (those of
/// processes forked at the freeze).
///
/// It runs on a thread of its own, the tracer of every thread it stops, which ends with it:
/// a thread that never reached its stop (in uninterruptible sleep past the freeze's
/// deadline) cannot be let go through ptrace, and the kernel lets it go as its tracer thread
/// ends, so that the caller does not keep it traced (to stop, with nobody to let it go, once
/// it wakes).
pub fn capture_observed(
    store: &Store,
    opts: &CaptureOptions,
    checkpoints: &Checkpoints,
    on_frozen: &mut (dyn FnMut(&Record) + Send),
) -> Result<CaptureReport> {
    let tid = AtomicI32::new(0);
    let joined = std::thread::scope(|scope| {
        // (Unnamed: a process it traces names its tracer `dolly`, see `checks`.)
        let tracer = std::thread::Builder::new()
            .stack_size(TRACER_STACK)
            .spawn_scoped(scope, || {
                tid.store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
                capture_traced(store, opts, checkpoints, on_frozen)
            })
            .map_err(|e| Error::io("starting dolly's capture thread", e))?;
        Ok::<_, Error>(tracer.join())
    })?;
    // (A panic too, once the thread is gone.)
    tracer_gone(Pid::from_raw(tid.load(Ordering::SeqCst)));
    joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Waits (a moment) until thread `tid` of this process is gone: a joined thread has not yet
/// ended (the kernel wakes its joiner before it lets its tracees go), and a caller that
/// captures again at once would find the process still traced.
fn tracer_gone(tid: Pid) {
    let task = format!("/proc/self/task/{tid}");
    let until = Instant::now() + std::time::Duration::from_secs(1);
    while std::path::Path::new(&task).exists() && Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// The stack of the thread a capture runs on (that of a process's main thread).
const TRACER_STACK: usize = 8 << 20;

/// [`capture_observed`], on its thread.
fn capture_traced(
    store: &Store,
    opts: &CaptureOptions,
    checkpoints: &Checkpoints,
    on_frozen: &mut (dyn FnMut(&Record) + Send),
) -> Result<CaptureReport> {
    let started = Instant::now();
    let root = Pid::from_raw(opts.pid);
    let status = checks::preflight(&ProcDir::new(root))?;
    let _pid_lock = store.lock_pid(opts.pid)?;
    let parent_id = match (&opts.parent, opts.full) {
        (Some(id), _) => Some(id.clone()),
        (None, true) => None,
        (None, false) => parent::restored_from(store, opts.pid),
    };
    // Held (against deletion) until the capture is over.
    let parent = parent_id
        .as_deref()
        .map(|id| parent::Parent::load(store, id))
        .transpose()?;
    let mut draft = store.begin(opts.name.as_deref(), opts.pid, &status.name)?;
    // Once the caller heard of the snapshot (`on_frozen`), a failure keeps it, as failed.
    let mut reported = false;
    let frozen: Result<(TreeImage, f64)> = (|| {
        checkpoints.reach("capture:locked")?;
        let mut precopy = precopy::run(root, &draft.pool_dir(), parent.as_ref())?;
        checkpoints.reach("capture:precopied")?;
        let mut setup = ForkSetup {
            rooms: match opts.fork {
                ForkPolicy::Auto => precopy.pids().map(|p| (p, cow::room(p))).collect(),
                _ => HashMap::new(),
            },
            starts: precopy
                .pids()
                .filter_map(|p| Some((p, ProcDir::new(p).stat().ok()?.start_time)))
                .collect(),
            note: leftovers::Note::create(
                &draft.dir().join(leftovers::NOTE_FILE),
                precopy.pids().count(),
            ),
        };
        for pid in precopy.pids() {
            process::rehearse(pid);
        }
        let mut tree = tree::freeze(root)?;
        crate::checkpoint::mark("capture: frozen");
        let order: Vec<i32> = tree.members.iter().map(|m| m.proc.pid().as_raw()).collect();
        let image = capture_frozen(
            &mut tree,
            opts,
            &draft,
            checkpoints,
            &mut precopy,
            &mut setup,
        );
        let (frozen_for, thawed) = tree.thaw();
        crate::checkpoint::mark("capture: thawed");
        // Both freezes: the one that set up write tracking, and this one.
        let final_ms = frozen_for.as_secs_f64() * 1e3;
        let frozen_ms = precopy.frozen_ms + final_ms;
        crate::checkpoint::mark(&format!(
            "capture: frozen {:.3} ms to set up tracking + {final_ms:.3} ms",
            precopy.frozen_ms
        ));
        let mut image = image?;
        // The forks taken over, and their own settings, kept out of the freeze, first thing
        // after it.
        for (held, _) in &mut image.left {
            held.hold()?;
            if let Some(tracked) = precopy.tracking_of(held.parent()) {
                held.take_over(tracked)?;
            }
        }
        thawed?;
        on_frozen(&draft.note_frozen(frozen_ms)?);
        reported = true;
        if !image.left.is_empty() {
            checkpoints.reach("capture:forked")?;
        }
        let (forked, bytes, reap_ms) = dump_forked(
            std::mem::take(&mut image.left),
            &draft.pool_dir(),
            &mut precopy,
        )?;
        image.forked = forked.len() as u32;
        image.processes.extend(forked);
        image
            .processes
            .sort_by_key(|p| order.iter().position(|&o| o == p.pid));
        image.forked_bytes = bytes;
        precopy.finish(&draft.pool_dir());
        Ok((image, frozen_ms + reap_ms))
    })();
    let _ = std::fs::remove_file(draft.dir().join(leftovers::NOTE_FILE));
    let (image, frozen_ms) = match frozen {
        Ok(v) => v,
        Err(e) => {
            match e.kind() {
                ErrorKind::Refused | ErrorKind::Busy | ErrorKind::NotFound if !reported => {
                    draft.discard()
                }
                _ => draft.fail(&e.message()),
            }
            return Err(e);
        }
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: draft.id().to_string(),
        name: opts.name.clone(),
        parent: parent_id,
        created_at: draft.created_at().to_string(),
        host: Host {
            kernel: kernel_release(),
            page_size: crate::sys::PAGE_SIZE,
            vdso_hash: host_vdso_hash()?,
            boot_id: boot_id()?,
        },
        shell_job: opts.shell_job,
        root_pid: opts.pid,
        processes: image.processes,
        zombies: image.zombies,
        files: image.files,
        open_files: image.open_files,
        shmem: image.shmem,
        shmem_pool: image.shmem_pool,
    };
    checkpoints.reach("capture:commit")?;
    let record = draft.commit(
        &manifest,
        crate::store::CaptureTimes {
            frozen_ms,
            capture_ms: started.elapsed().as_secs_f64() * 1e3,
            forked: image.forked,
            forked_bytes: image.forked_bytes,
        },
    )?;
    Ok(CaptureReport { record })
}

/// Reads the frozen tree: every process's state (refusing before any page is copied), then
/// every process's pages and the shared memory. The pages of a process forked for them
/// (see [`cow`]) are left for [`dump_forked`], after the thaw.
fn capture_frozen(
    tree: &mut tree::Frozen,
    opts: &CaptureOptions,
    draft: &crate::store::Draft,
    checkpoints: &Checkpoints,
    precopy: &mut precopy::Precopy,
    setup: &mut ForkSetup,
) -> Result<TreeImage> {
    checkpoints.reach("capture:frozen")?;
    precopy.note_lost();
    let pool_dir = draft.pool_dir();
    let mut shared = process::Shared {
        files: FileTable::new(&pool_dir),
        open_files: OpenFiles::default(),
        shmem: ShmemTable::default(),
        tree: crate::resource::tree::TreeView::new(tree.pids()),
    };
    // Each process is inspected, and forked at the end of the inspection if worth it (see
    // `cow`); should one be refused, the forks made go at once.
    let mut inspected = Vec::with_capacity(tree.members.len());
    let mut forks = Vec::with_capacity(tree.members.len());
    let inspection = (|| {
        for member in &mut tree.members {
            let pid = member.proc.pid();
            let known_maps = precopy.known_maps(pid);
            let room = setup.rooms.get(&pid).copied().flatten();
            let parent_start_time = setup.starts.get(&pid).copied().unwrap_or(0);
            let note = &mut setup.note;
            // (Noted before the calls run: should the capture be killed while they do, a
            // safety net sends the process back to its own state, dolly's memory left in it.)
            let mut note_calls = |area, len, runner| {
                if let Some(note) = note.as_mut() {
                    let _ = note.add(leftovers::Leftover::Calls(leftovers::CallsNote {
                        parent: pid.as_raw(),
                        parent_start_time,
                        area,
                        len,
                        runner,
                    }));
                }
            };
            let (process, fork) = process::inspect(
                member,
                &mut shared,
                crate::resource::files::FdPolicy {
                    shell_job: opts.shell_job,
                    file_locks: opts.file_locks,
                    tcp_established: opts.tcp_established,
                },
                known_maps.as_deref(),
                checkpoints,
                |memory| worth_forking(precopy, pid, memory, opts.fork, room),
                &mut note_calls,
            )?;
            // At once (still frozen: a copy into memory): should the capture be killed from
            // now on, the forks end with it (killed once taken over, else ending themselves)
            // and the note has their processes reap them.
            if let (Some(held), Some(note)) = (&fork, &mut setup.note) {
                let _ = note.add(leftovers::Leftover::Fork(held.note()));
            }
            inspected.push(process);
            forks.push(fork);
        }
        shared.shmem.check_sysv_private()
    })();
    let inspection = inspection.and_then(|()| checkpoints.reach("capture:pages"));
    if let Err(e) = inspection {
        end_forks(tree, forks);
        return Err(e);
    }
    let mut processes = Vec::with_capacity(inspected.len());
    let mut left_inspected = Vec::new();
    let dumped = (|| {
        for ((member, mut inspected), fork) in tree.members.iter().zip(inspected).zip(&forks) {
            let pid = member.proc.pid();
            if fork.is_some() {
                left_inspected.push(inspected);
            } else {
                if inspected.flags_unknown() {
                    inspected.fill_flags(&member.proc.maps()?, false)?;
                }
                let tracked = precopy.tracked(pid);
                processes.push(process::dump(pid, inspected, &pool_dir, tracked)?);
            }
        }
        crate::checkpoint::mark("capture: pages dumped");
        let shmem_name = format!("shmem{}", memory::POOL_FILE_SUFFIX);
        let (shmem, shmem_size) = shared.shmem.dump(&pool_dir.join(&shmem_name))?;
        Ok((shmem, shmem_size, shmem_name))
    })();
    let (shmem, shmem_size, shmem_name) = match dumped {
        Ok(v) => v,
        Err(e) => {
            end_forks(tree, forks);
            return Err(e);
        }
    };
    let left = forks.into_iter().flatten().zip(left_inspected).collect();
    Ok(TreeImage {
        processes,
        zombies: tree.zombies.clone(),
        files: shared.files.into_files(),
        open_files: shared.open_files.into_list(),
        shmem,
        shmem_pool: (shmem_size > 0).then_some(PoolFile {
            name: shmem_name,
            size: shmem_size,
        }),
        left,
        forked: 0,
        forked_bytes: 0,
    })
}

/// At the freeze, once process `pid` (with `memory`) is inspected: whether to fork it from
/// inside, as a pre-copied process that wrote too much since the last round for the freeze
/// to copy it quickly (see [`cow`]); its walk and copies then read the fork, after the
/// thaw. `room`: the memory it could still be given (see [`cow::room`]).
fn worth_forking(
    precopy: &mut precopy::Precopy,
    pid: Pid,
    memory: &crate::resource::memory::MemoryPlan,
    policy: ForkPolicy,
    room: Option<u64>,
) -> bool {
    let Some(tracked) = precopy.tracking_of(pid) else {
        return false;
    };
    // With the pool of huge pages empty, the process's copy-on-write of a hugetlb page takes
    // the page from the fork (which would then read as zeros).
    !memory.hugetlb
        && cow::worth_forking(policy, tracked, &memory.areas, room)
        && cow::forks_in_own_pid_ns(pid)
}

/// Ends the forks made at the freeze of a capture that fails before the thaw, reaped through
/// the frozen threads (a later stop could not seize them). `forks`: one entry per member
/// inspected, in order.
fn end_forks(tree: &mut tree::Frozen, forks: Vec<Option<cow::Held>>) {
    for (member, fork) in tree.members.iter_mut().zip(forks) {
        if let Some(held) = fork {
            let _ = held.end_frozen(member);
        }
    }
}

/// After the thaw: the pages of the processes forked at the freeze, read from their forks
/// (which then go). Returns their images, the bytes copied from the forks, and how long the
/// reaping of the forks stopped the processes, in ms.
fn dump_forked(
    forked: Vec<(cow::Held, process::Inspected)>,
    pool_dir: &std::path::Path,
    precopy: &mut precopy::Precopy,
) -> Result<(Vec<crate::image::Process>, u64, f64)> {
    let (mut processes, mut bytes, mut reap_ms) = (Vec::new(), 0, 0.0);
    // Each fork has all its process's areas (their flags from it where the freeze did not
    // read them); which pages changed since the last round, found by comparing each process
    // with its fork, then the ranges whose pages went since the freeze too (taken after:
    // see `Tracked::compare_with_copy`).
    // This work, and the copies below, run beside the processes again: they yield the CPU
    // to them (not the reaping stops, which they wait for).
    let mut forked = forked;
    let yielding = crate::sys::process::Lowered::by(YIELD_NICE);
    for (held, inspected) in &mut forked {
        let fork = ProcDir::new(held.pid());
        let maps = if inspected.flags_unknown() {
            fork.maps()
        } else {
            fork.maps_without_flags()
        };
        let maps = maps.map_err(|e| held.explain(e))?;
        // (A fork killed meanwhile shows no areas: said as such.)
        inspected
            .check_fork(&maps)
            .and_then(|()| inspected.fill_flags(&maps, true))
            .map_err(|e| held.explain(e))?;
    }
    for (held, inspected) in &forked {
        if let Some(tracked) = precopy.tracking_of(held.parent()) {
            let areas: Vec<(u64, u64)> =
                inspected.areas().iter().map(|a| (a.start, a.end)).collect();
            tracked
                .compare_with_copy(&areas)
                .map_err(|e| held.explain(e))?;
        }
    }
    if !forked.is_empty() {
        crate::checkpoint::mark("cow: compared with the forks");
        precopy.note_lost();
    }
    for (held, _) in &forked {
        if let Some(tracked) = precopy.tracking_of(held.parent()) {
            tracked.confirm_copy().map_err(|e| held.explain(e))?;
        }
    }
    drop(yielding);
    for (held, inspected) in forked {
        let parent = held.parent();
        let tracked = precopy.tracked(parent);
        let process = {
            let _yielding = crate::sys::process::Lowered::by(YIELD_NICE);
            process::dump(held.pid(), inspected, pool_dir, tracked)
        }
        .map_err(|e| held.explain(e))?;
        held.check_intact()?;
        bytes += precopy.tracking_of(parent).map_or(0, |t| t.freeze_bytes());
        crate::checkpoint::mark(&format!("cow: pages of {parent} copied from its fork"));
        // (Should the process not let dolly stop it, another tracer holding it, its fork
        // stays a zombie of it until it ends: the snapshot is sound.)
        match held.release() {
            Ok(ms) => reap_ms += ms,
            Err(e) => crate::checkpoint::mark(&format!("cow: not reaped: {}", e.message())),
        }
        processes.push(process);
    }
    Ok((processes, bytes, reap_ms))
}

/// How much lower the priority of the work done beside running processes is (pre-copy, the
/// reading of their forks after the thaw): it yields the CPU to them.
const YIELD_NICE: i32 = 10;

/// BLAKE3 of this kernel's vDSO image.
pub fn host_vdso_hash() -> Result<String> {
    let (_, bytes) = tracee::own_vdso()?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("reading the boot id")?
        .trim()
        .to_string())
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
