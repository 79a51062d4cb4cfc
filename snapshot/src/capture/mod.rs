//! Capture: freeze a process tree, read each process's state, copy their pages into the
//! pool, let them run on, and record the snapshot. The resource modules do the reading;
//! this only orchestrates.

mod checks;
mod parent;
pub use parent::{auto_parent, restored_from};
mod precopy;
mod process;
mod tree;

use std::time::Instant;

use nix::unistd::Pid;

use crate::checkpoint::Checkpoints;
use crate::error::{Context, ErrorKind, Result};
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
}

/// What became of a capture.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// The snapshot's catalog record (id, status, bytes, frozen time).
    pub record: Record,
}

/// The image of a tree, but the header.
struct TreeImage {
    processes: Vec<crate::image::Process>,
    zombies: Vec<crate::image::Zombie>,
    files: Vec<crate::image::File>,
    open_files: Vec<crate::image::OpenFile>,
    shmem: Vec<crate::image::ShmemObject>,
    shmem_pool: Option<PoolFile>,
}

/// Captures process `opts.pid` and its descendants into a new snapshot of `store`. The tree
/// is frozen only while its state and pages are read, then runs on; on any failure it runs on
/// exactly as before and no usable snapshot is left.
pub fn capture(
    store: &Store,
    opts: &CaptureOptions,
    checkpoints: &Checkpoints,
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
    let draft = store.begin(opts.name.as_deref(), opts.pid, &status.name)?;
    let frozen: Result<(TreeImage, f64)> = (|| {
        checkpoints.reach("capture:locked")?;
        let mut precopy = precopy::run(root, &draft.pool_dir(), parent.as_ref())?;
        checkpoints.reach("capture:precopied")?;
        let mut tree = tree::freeze(root)?;
        crate::checkpoint::mark("capture: frozen");
        let frozen_at = tree.since;
        let image = capture_frozen(&mut tree, opts, &draft, checkpoints, &mut precopy);
        let thawed = tree.thaw();
        crate::checkpoint::mark("capture: thawed");
        // Both freezes: the one that set up write tracking, and this one.
        let final_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
        let frozen_ms = precopy.frozen_ms + final_ms;
        crate::checkpoint::mark(&format!(
            "capture: frozen {:.3} ms to set up tracking + {final_ms:.3} ms",
            precopy.frozen_ms
        ));
        precopy.finish(&draft.pool_dir());
        let image = image?;
        thawed?;
        Ok((image, frozen_ms))
    })();
    let (image, frozen_ms) = match frozen {
        Ok(v) => v,
        Err(e) => {
            match e.kind() {
                ErrorKind::Refused | ErrorKind::Busy | ErrorKind::NotFound => draft.discard(),
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
    let record = draft.commit(&manifest, frozen_ms, started.elapsed().as_secs_f64() * 1e3)?;
    Ok(CaptureReport { record })
}

/// Reads the frozen tree: every process's state (refusing before any page is copied), then
/// every process's pages and the shared memory.
fn capture_frozen(
    tree: &mut tree::Frozen,
    opts: &CaptureOptions,
    draft: &crate::store::Draft,
    checkpoints: &Checkpoints,
    precopy: &mut precopy::Precopy,
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
    let mut inspected = Vec::with_capacity(tree.members.len());
    for member in &mut tree.members {
        let known_maps = precopy.known_maps(member.proc.pid());
        inspected.push(process::inspect(
            member,
            &mut shared,
            crate::resource::files::FdPolicy {
                shell_job: opts.shell_job,
                file_locks: opts.file_locks,
                tcp_established: opts.tcp_established,
            },
            known_maps.as_deref(),
            checkpoints,
        )?);
    }
    shared.shmem.check_sysv_private()?;
    checkpoints.reach("capture:pages")?;
    let mut processes = Vec::with_capacity(inspected.len());
    for (member, inspected) in tree.members.iter().zip(inspected) {
        let tracked = precopy.tracked(member.proc.pid());
        processes.push(process::dump(member, inspected, &pool_dir, tracked)?);
    }
    crate::checkpoint::mark("capture: pages dumped");
    let shmem_name = format!("shmem{}", memory::POOL_FILE_SUFFIX);
    let (shmem, shmem_size) = shared.shmem.dump(&pool_dir.join(&shmem_name))?;
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
    })
}

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
