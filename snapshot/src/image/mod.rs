//! The snapshot image: one versioned JSON manifest per snapshot (this module's types) plus
//! the page pool (see [`crate::pool`]). specs/image-format.md is the contract; the JSON
//! schema there is generated from these types.

mod bytes;
mod socket;
mod tty;

pub use bytes::Bytes;
pub use socket::{
    InetProtocol, InetSocket, SocketFile, SocketType, TcpConnection, UnixAddress, UnixPeer,
    UnixSocket,
};
pub use tty::{Pty, Termios};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `format` field of every manifest.
pub const FORMAT: &str = "dolly-snapshot";

/// The manifest version this build writes and the only one it reads.
pub const VERSION: u32 = 2;
/// The oldest manifest version this dolly still reads (version 1 had no incremental
/// snapshots: no `parent`, `base_pools` or shared runs).
pub const OLDEST_VERSION: u32 = 1;

/// A snapshot of a process tree: everything a restore needs except the page contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `"dolly-snapshot"`.
    pub format: String,
    /// Manifest version; readers refuse versions they do not know.
    pub version: u32,
    /// Snapshot id (16 lowercase hex digits).
    pub id: String,
    /// Optional name the user gave.
    pub name: Option<String>,
    /// The snapshot this one was captured against (`--parent`): pages that had not changed
    /// since are shared with it rather than stored again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// When the capture began (RFC 3339, UTC).
    pub created_at: String,
    /// The machine the snapshot was taken on.
    pub host: Host,
    /// Whether the tree was captured with its terminal (`--shell-job`).
    pub shell_job: bool,
    /// PID of the tree's root process.
    pub root_pid: i32,
    /// Every live process of the tree, parents before children.
    pub processes: Vec<Process>,
    /// Children of the tree's processes that had exited but were not reaped yet.
    pub zombies: Vec<Zombie>,
    /// Files (inodes) the processes have open or mapped.
    pub files: Vec<File>,
    /// Open file descriptions (file, flags, offset), shared by the fds of every process that
    /// holds them.
    pub open_files: Vec<OpenFile>,
    /// Shared anonymous memory objects, each once however many processes map it.
    pub shmem: Vec<ShmemObject>,
    /// Pool file holding the pages of the shared memory objects.
    pub shmem_pool: Option<PoolFile>,
}

/// A child that had exited and was waiting for its parent to reap it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Zombie {
    /// Its PID.
    pub pid: i32,
    /// Its parent's PID.
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
    /// The status its parent will read (as `wait(2)` gives it).
    pub wait_status: i32,
}

/// What a restore needs to know of the kernel the snapshot came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// `uname -r`.
    pub kernel: String,
    /// Page size in bytes.
    pub page_size: u64,
    /// BLAKE3 of the vDSO image; a restore needs the same vDSO.
    pub vdso_hash: String,
    /// `/proc/sys/kernel/random/boot_id`: the monotonic clocks of the snapshot are this
    /// boot's.
    pub boot_id: String,
}

/// One process: its identity, resources and threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// PID as dolly saw it when capturing.
    pub pid: i32,
    /// PID in each PID namespace the process was in, outermost first.
    pub ns_pids: Vec<i32>,
    /// Parent PID.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// Command name (`comm`).
    pub comm: String,
    /// The process was stopped (job control) when captured.
    pub stopped: bool,
    /// Path of the executable (`/proc/PID/exe`).
    pub exe: String,
    /// Execution domain (`personality(2)`).
    pub personality: u32,
    /// File-mode creation mask.
    pub umask: u32,
    /// Working directory.
    pub cwd: String,
    /// Root directory (`chroot`).
    pub root: String,
    /// Resource limits that differ from "unlimited".
    pub rlimits: Vec<Rlimit>,
    /// User and group ids, groups and capabilities.
    pub creds: Credentials,
    /// Process-wide `prctl` settings.
    pub flags: ProcessFlags,
    /// Scheduling: policy, priority, nice value, CPU affinity.
    pub sched: Scheduling,
    /// `/proc/PID/oom_score_adj`.
    pub oom_score_adj: i32,
    /// The kernel's view of the address-space layout.
    pub mm: MmLayout,
    /// Every memory area, in address order.
    pub areas: Vec<Area>,
    /// Pool file (in the snapshot's pool directory) holding this process's pages.
    pub pool: Option<PoolFile>,
    /// Pool files of earlier snapshots whose pages this one shares (an incremental
    /// snapshot): hard links in this snapshot's pool directory, named
    /// `SNAPSHOT-PID.dolly-pages` after the snapshot and process that wrote them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_pools: Vec<PoolFile>,
    /// The fd table.
    pub fds: Vec<Fd>,
    /// File locks it holds (captured with `--file-locks`).
    pub locks: Vec<FileLock>,
    /// Signal dispositions and process-wide pending signals.
    pub signals: Signals,
    /// Interval timers (`setitimer(2)`).
    pub itimers: ITimers,
    /// The threads; the first is the thread-group leader.
    pub threads: Vec<Thread>,
}

/// A resource limit (`setrlimit(2)`); `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    /// Resource number (`RLIMIT_*`).
    pub resource: u32,
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// Credentials of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Real, effective, saved and filesystem user ids.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem group ids.
    pub gid: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Inheritable capabilities (bit n = capability n).
    pub cap_inheritable: u64,
    /// Permitted capabilities.
    pub cap_permitted: u64,
    /// Effective capabilities.
    pub cap_effective: u64,
    /// Capability bounding set.
    pub cap_bounding: u64,
    /// Ambient capabilities.
    pub cap_ambient: u64,
    /// `SECBIT_*` securebits.
    pub securebits: u32,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
}

/// Process-wide settings made with `prctl(2)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessFlags {
    /// `PR_SET_DUMPABLE`.
    pub dumpable: u32,
    /// `PR_SET_TIMERSLACK`, in nanoseconds.
    pub timerslack_ns: u64,
    /// `PR_SET_THP_DISABLE`.
    pub thp_disable: bool,
    /// `PR_SET_CHILD_SUBREAPER`.
    pub child_subreaper: bool,
    /// `PR_SET_PDEATHSIG` (0: none).
    pub pdeathsig: i32,
    /// `/proc/PID/coredump_filter`.
    pub coredump_filter: u32,
}

/// How the scheduler treats a process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scheduling {
    /// `SCHED_*` policy (with `SCHED_RESET_ON_FORK` if set).
    pub policy: i32,
    /// Static priority (real-time policies).
    pub priority: i32,
    /// Nice value.
    pub nice: i32,
    /// CPUs it may run on (bit n = CPU n), in 64-bit words.
    pub affinity: Vec<u64>,
    /// I/O priority (`ioprio_get(2)`: class << 13 | data).
    pub io_priority: u32,
}

/// The address-space fields `PR_SET_MM_MAP` sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MmLayout {
    /// Start of program text.
    pub start_code: u64,
    /// End of program text.
    pub end_code: u64,
    /// Start of initialized data.
    pub start_data: u64,
    /// End of initialized data.
    pub end_data: u64,
    /// Start of the heap.
    pub start_brk: u64,
    /// Current program break.
    pub brk: u64,
    /// Bottom of the main stack at exec.
    pub start_stack: u64,
    /// Start of the argument strings.
    pub arg_start: u64,
    /// End of the argument strings.
    pub arg_end: u64,
    /// Start of the environment strings.
    pub env_start: u64,
    /// End of the environment strings.
    pub env_end: u64,
    /// The auxiliary vector, as (type, value) words ending with AT_NULL.
    pub auxv: Vec<u64>,
}

/// One memory area (VMA).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Area {
    /// First address (page aligned).
    pub start: u64,
    /// One past the last address (page aligned).
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared rather than private.
    pub shared: bool,
    /// What backs the area.
    pub kind: AreaKind,
    /// Kernel flags to give back (`madvise`, `mlock`, grows-down).
    pub flags: AreaFlags,
    /// Pages of the area stored in the pool (private areas only).
    pub pages: Option<Pages>,
}

impl Area {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the area has no bytes (never, for a valid image).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// What backs a memory area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AreaKind {
    /// Private anonymous memory, optionally named (`PR_SET_VMA_ANON_NAME`).
    Anonymous {
        /// The area's name.
        name: Option<String>,
    },
    /// The brk heap.
    Heap,
    /// The main thread's stack (grows down).
    Stack,
    /// Shared anonymous memory: a range of a [`ShmemObject`].
    SharedAnonymous {
        /// Index into [`Manifest::shmem`].
        object: u32,
        /// Byte offset into the object.
        offset: u64,
    },
    /// A System V shared memory segment, attached whole (`shmat`).
    SysvShm {
        /// Index into [`Manifest::shmem`].
        object: u32,
    },
    /// A file mapping.
    File {
        /// Index into [`Manifest::files`].
        file: u32,
        /// Byte offset into the file.
        offset: u64,
    },
    /// The vDSO code.
    Vdso,
    /// The vDSO data pages.
    Vvar,
    /// The vDSO clock pages.
    VvarVclock,
}

/// The kernel's flags of an area that a restore gives back (`VmFlags` in smaps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AreaFlags {
    /// Grows down (`MAP_GROWSDOWN`), like a stack.
    pub grows_down: bool,
    /// May be made writable: for a shared file mapping, the file was open for writing.
    pub may_write: bool,
    /// `MADV_DONTFORK`.
    pub dont_fork: bool,
    /// `MADV_DONTDUMP`.
    pub dont_dump: bool,
    /// `MADV_WIPEONFORK`.
    pub wipe_on_fork: bool,
    /// `MADV_HUGEPAGE`.
    pub huge_page: bool,
    /// `MADV_NOHUGEPAGE`.
    pub no_huge_page: bool,
    /// `MADV_MERGEABLE`.
    pub mergeable: bool,
    /// `mlock`ed.
    pub locked: bool,
}

/// Where an area's (or object's) pages are in the pool file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pages {
    /// Slot of the pool file: page `n` of the area is at byte
    /// `(slot << 47) + (offset + n) * 4096`.
    pub slot: u32,
    /// Pages of the slot before the area's first (an area split off a larger one that was
    /// copied into the slot while the process ran).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Runs of stored pages as `[first page, page count]`, page numbers counted from the
    /// start of the area; pages outside every run (and every shared run) were never touched
    /// (read as zeros, or come from the mapped file for file areas).
    pub runs: Vec<[u64; 2]>,
    /// Pages an incremental snapshot shares with earlier ones: runs in the process's
    /// `base_pools`. Disjoint from `runs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<SharedRuns>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Pages {
    /// Byte offset in the pool file of page `page` of the area.
    pub fn byte_offset(&self, page: u64) -> u64 {
        crate::pool::page_offset(self.slot, self.offset + page)
    }

    /// Number of pages stored in the snapshot's own pool file.
    pub fn page_count(&self) -> u64 {
        self.runs.iter().map(|r| r[1]).sum()
    }

    /// Number of pages shared with earlier snapshots.
    pub fn shared_page_count(&self) -> u64 {
        self.shared.iter().flat_map(|s| &s.runs).map(|r| r[1]).sum()
    }
}

/// Pages an area shares with an earlier snapshot, all in one of its pool files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharedRuns {
    /// Index in the process's `base_pools`.
    pub pool: u32,
    /// Runs as `[first page in the area, page count, first page in the pool file]` (a page
    /// of the file is at byte `page * 4096`).
    pub runs: Vec<[u64; 3]>,
}

/// A shared anonymous memory object (`mmap(MAP_SHARED|MAP_ANONYMOUS)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShmemObject {
    /// Inode number of the object when captured (identifies sharing).
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Its pages (page numbers counted from the start of the object).
    pub pages: Option<Pages>,
    /// For a System V segment: what identifies it (else it is anonymous shared memory).
    pub sysv: Option<SysvSegment>,
}

/// A System V shared memory segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SysvSegment {
    /// Its key (0: `IPC_PRIVATE`).
    pub key: i32,
    /// Its id.
    pub shmid: i32,
    /// Permission bits.
    pub mode: u32,
    /// Marked for removal (`IPC_RMID`): it goes when its last process detaches.
    pub removed: bool,
    /// Size in bytes.
    pub size: u64,
    /// Attaches when captured (all of them the tree's).
    pub attaches: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// A pool file of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// File name in the snapshot's pool directory.
    pub name: String,
    /// Its size (the end of its last slot).
    pub size: u64,
}

/// A file (inode) the process has open or mapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Path when captured (for a deleted file: the path it had).
    pub path: String,
    /// What kind of file.
    pub kind: FileKind,
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Size in bytes when captured.
    pub size: u64,
    /// Modification time when captured (ns since the epoch).
    pub mtime_ns: i128,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// The file had been deleted; its content is in the pool directory.
    pub deleted: bool,
    /// Name, in the snapshot's pool directory, of the file's saved content: a deleted file's
    /// data, or the bytes buffered in a pipe.
    pub content: Option<String>,
}

/// Kinds of file dolly restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A character device that is the same everywhere (`/dev/null`, `/dev/zero`, ...).
    CharDevice {
        /// Device number.
        rdev: u64,
    },
    /// A terminal; restored as the terminal dolly runs on (`--shell-job`).
    Terminal,
    /// An anonymous pipe (`pipe(2)`), every end of it held inside the snapshot; its
    /// buffered data is in `content`.
    Pipe {
        /// Buffer capacity (`F_GETPIPE_SZ`).
        capacity: u64,
    },
    /// A named pipe (FIFO) at `path`, every open end of it held inside the snapshot; its
    /// buffered data is in `content`.
    Fifo {
        /// Buffer capacity (`F_GETPIPE_SZ`).
        capacity: u64,
    },
    /// A memfd (`memfd_create`): `path` is `/memfd:NAME`, its data is saved (`content`).
    Memfd {
        /// Its `F_SEAL_*` seals.
        seals: u32,
    },
    /// A unix socket.
    UnixSocket(UnixSocket),
    /// An IPv4 or IPv6 socket.
    InetSocket(InetSocket),
    /// An inotify instance (one per open file description).
    Inotify {
        /// Its watches, by watch descriptor.
        watches: Vec<InotifyWatch>,
    },
    /// The master of a pseudo-terminal (one per open file description: a master is opened
    /// once), with the terminal's state.
    PtyMaster(Pty),
    /// The slave of a pseudo-terminal whose master the snapshot holds: `path` is
    /// `/dev/pts/INDEX`.
    PtySlave {
        /// N of `/dev/pts/N`.
        index: u32,
    },
    /// An eventfd (one per open file description).
    EventFd {
        /// Its counter.
        count: u64,
        /// `EFD_SEMAPHORE`.
        semaphore: bool,
    },
    /// A timerfd (one per open file description).
    TimerFd {
        /// `CLOCK_*` it counts on.
        clock: i32,
        /// Expirations not read yet.
        ticks: u64,
        /// Period in nanoseconds (0: one-shot).
        interval_ns: u64,
        /// Time to the next expiration in nanoseconds (0: disarmed, or expired and re-armed
        /// when read).
        value_ns: u64,
        /// When the next expiration is due, on `clock` (0: disarmed). A restore on the same
        /// boot arms the timer for this instant, so the time the process spent captured
        /// passes for its timers as it does for its clocks.
        deadline_ns: u64,
    },
    /// A signalfd (one per open file description).
    SignalFd {
        /// The signals it reads (bit n-1 = signal n).
        mask: u64,
    },
    /// An epoll instance (one per open file description) with its registrations.
    Epoll {
        /// What it watches, by the fd numbers of the first process of the snapshot that
        /// holds it.
        items: Vec<EpollItem>,
    },
}

/// Who owns a file lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    /// `flock(2)`: the open file description.
    Flock,
    /// `fcntl(F_SETLK)`: the process.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: the open file description.
    Ofd,
}

/// A file lock a process holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileLock {
    /// An fd of the process the lock is held through.
    pub fd: i32,
    /// flock, POSIX or OFD.
    pub kind: LockKind,
    /// An exclusive (write) lock, else shared (read).
    pub write: bool,
    /// First byte locked.
    pub start: u64,
    /// Last byte locked; `None`: to the end of the file, however long.
    pub end: Option<u64>,
}

/// One watch of an inotify instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InotifyWatch {
    /// Its watch descriptor.
    pub wd: i32,
    /// The watched file or directory.
    pub path: String,
    /// `IN_*` events and flags.
    pub mask: u32,
}

/// One registration of an epoll instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EpollItem {
    /// The watched fd's number.
    pub fd: i32,
    /// `EPOLL*` events and flags.
    pub events: u32,
    /// The data returned with its events.
    pub data: u64,
}

/// An open file description: what one or more fds point at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenFile {
    /// Index into [`Manifest::files`].
    pub file: u32,
    /// `O_*` status flags and access mode (without `O_CLOEXEC`).
    pub flags: u32,
    /// File offset.
    pub pos: u64,
}

/// One entry of the fd table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fd {
    /// The fd number.
    pub fd: i32,
    /// Index into [`Manifest::open_files`].
    pub open_file: u32,
    /// `FD_CLOEXEC`.
    pub cloexec: bool,
}

/// Signal state shared by the threads of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Signals {
    /// Every disposition that is not the default.
    pub actions: Vec<SignalAction>,
    /// Signals pending for the process as a whole, oldest first.
    pub pending: Vec<QueuedSignal>,
}

/// A signal disposition in the kernel's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalAction {
    /// Signal number.
    pub signal: i32,
    /// Handler address (0: default, 1: ignore).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// Signal-return trampoline (`SA_RESTORER`).
    pub restorer: u64,
    /// Signals blocked during the handler (bit n-1 = signal n).
    pub mask: u64,
}

/// A queued signal with its `siginfo_t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueuedSignal {
    /// Signal number.
    pub signal: i32,
    /// The raw 128-byte `siginfo_t`.
    pub info: Bytes,
}

/// The three interval timers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ITimers {
    /// `ITIMER_REAL`.
    pub real: ITimer,
    /// `ITIMER_VIRTUAL`.
    #[serde(rename = "virtual")]
    pub virtual_: ITimer,
    /// `ITIMER_PROF`.
    pub prof: ITimer,
}

/// One interval timer, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ITimer {
    /// Period (0: one-shot).
    pub interval_us: u64,
    /// Time left until it fires (0: disarmed).
    pub value_us: u64,
}

/// One thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Thread {
    /// Thread id as dolly saw it.
    pub tid: i32,
    /// Thread id in each PID namespace, outermost first.
    pub ns_tids: Vec<i32>,
    /// Thread name.
    pub comm: String,
    /// General-purpose registers.
    pub regs: Registers,
    /// The XSAVE area (x87, SSE, AVX, AVX-512 state) as the kernel's regset gives it.
    pub xstate: Bytes,
    /// Blocked signals.
    pub sigmask: u64,
    /// Signals pending for this thread, oldest first.
    pub pending: Vec<QueuedSignal>,
    /// Alternate signal stack.
    pub altstack: AltStack,
    /// rseq registration.
    pub rseq: Option<Rseq>,
    /// Robust futex list.
    pub robust_list: Option<RobustList>,
    /// `set_tid_address` (clear_child_tid).
    pub clear_child_tid: u64,
}

/// The x86_64 general-purpose registers (`struct user_regs_struct`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// The syscall number if the thread was in a system call, else `u64::MAX`.
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// An alternate signal stack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AltStack {
    /// Base address.
    pub sp: u64,
    /// Size in bytes.
    pub size: u64,
    /// `SS_*` flags.
    pub flags: i32,
}

/// An rseq registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rseq {
    /// Address of `struct rseq`.
    pub pointer: u64,
    /// Registered size.
    pub size: u32,
    /// Abort signature.
    pub signature: u32,
    /// Flags.
    pub flags: u32,
}

/// A robust futex list registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RobustList {
    /// Address of the list head.
    pub head: u64,
    /// Size of the head.
    pub len: u64,
}

impl Manifest {
    /// Reads a manifest, refusing other formats and versions.
    pub fn from_json(text: &[u8]) -> Result<Manifest> {
        let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
            Error::corrupt(
                format!("the manifest is not valid JSON ({e})"),
                "the snapshot is damaged; delete it and capture again",
            )
        })?;
        let format = value.get("format").and_then(|v| v.as_str());
        if format != Some(FORMAT) {
            return Err(Error::corrupt(
                format!("the manifest is not a dolly snapshot (format {format:?})"),
                "the snapshot is damaged; delete it and capture again",
            ));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if !version.is_some_and(|v| (OLDEST_VERSION as u64..=VERSION as u64).contains(&v)) {
            return Err(Error::corrupt(
                format!(
                    "the manifest has version {}, this dolly reads versions {OLDEST_VERSION} to {VERSION}",
                    version.map_or("(none)".to_string(), |v| v.to_string())
                ),
                "use the dolly that wrote the snapshot, or capture it again with this one",
            ));
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| {
            Error::corrupt(
                format!("the manifest does not match format version {VERSION} ({e})"),
                "the snapshot is damaged; delete it and capture again",
            )
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks what the schema cannot: every cross-reference points at an entry, and every
    /// name of a file in the pool directory is a plain file name.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| {
            Error::corrupt(
                format!("the manifest is inconsistent: {what}"),
                "the snapshot is damaged; delete it and capture again",
            )
        };
        let plain =
            |name: &str| !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        if self.processes.is_empty() || self.processes[0].pid != self.root_pid {
            return Err(bad("it has no root process first".into()));
        }
        let pids: std::collections::HashSet<i32> = self.processes.iter().map(|p| p.pid).collect();
        for z in &self.zombies {
            if !pids.contains(&z.ppid) {
                return Err(bad(format!(
                    "zombie {} has no parent in the snapshot",
                    z.pid
                )));
            }
        }
        if self
            .files
            .iter()
            .filter_map(|f| f.content.as_deref())
            .any(|c| !plain(c))
        {
            return Err(bad("a saved-content name is not a plain name".into()));
        }
        if self
            .open_files
            .iter()
            .any(|o| o.file as usize >= self.files.len())
        {
            return Err(bad(
                "an open file points at a file that does not exist".into()
            ));
        }
        if self.shmem.iter().any(|o| o.pages.is_some()) && self.shmem_pool.is_none() {
            return Err(bad(
                "shared memory stores pages but there is no pool file for them".into(),
            ));
        }
        for pf in self
            .processes
            .iter()
            .flat_map(|p| p.pool.iter().chain(&p.base_pools))
            .chain(self.shmem_pool.as_ref())
        {
            if !plain(&pf.name) {
                return Err(bad("a pool file name is not a plain name".into()));
            }
        }
        for (i, p) in self.processes.iter().enumerate() {
            if p.threads.is_empty() {
                return Err(bad(format!("process {} has no thread", p.pid)));
            }
            if i > 0 && !self.processes[..i].iter().any(|q| q.pid == p.ppid) {
                return Err(bad(format!(
                    "process {} comes before its parent {}",
                    p.pid, p.ppid
                )));
            }
            for a in &p.areas {
                let page = crate::sys::PAGE_SIZE;
                if a.start >= a.end || a.start % page != 0 || a.end % page != 0 {
                    return Err(bad(format!(
                        "area {:#x}-{:#x} is not a page range",
                        a.start, a.end
                    )));
                }
                match a.kind {
                    AreaKind::File { file, .. } if file as usize >= self.files.len() => {
                        return Err(bad(format!(
                            "area {:#x} maps file #{file}, which does not exist",
                            a.start
                        )))
                    }
                    AreaKind::SharedAnonymous { object, .. }
                        if object as usize >= self.shmem.len() =>
                    {
                        return Err(bad(format!(
                            "area {:#x} maps object #{object}, which does not exist",
                            a.start
                        )))
                    }
                    _ => {}
                }
                if let Some(pages) = &a.pages {
                    if pages
                        .runs
                        .iter()
                        .any(|r| r[1] == 0 || (r[0] + r[1]) * page > a.len())
                    {
                        return Err(bad(format!("area {:#x} has pages outside it", a.start)));
                    }
                    for shared in &pages.shared {
                        if shared.pool as usize >= p.base_pools.len() {
                            return Err(bad(format!(
                                "area {:#x} shares pages of a pool file that does not exist",
                                a.start
                            )));
                        }
                        if shared
                            .runs
                            .iter()
                            .any(|r| r[1] == 0 || (r[0] + r[1]) * page > a.len())
                        {
                            return Err(bad(format!(
                                "area {:#x} shares pages outside it",
                                a.start
                            )));
                        }
                    }
                }
            }
            if p.areas
                .iter()
                .any(|a| a.pages.as_ref().is_some_and(|p| !p.runs.is_empty()))
                && p.pool.is_none()
            {
                return Err(bad(format!(
                    "process {} stores pages but has no pool file",
                    p.pid
                )));
            }
            if p.fds
                .iter()
                .any(|f| f.open_file as usize >= self.open_files.len() || f.fd < 0)
            {
                return Err(bad(
                    "an fd points at an open file that does not exist".into()
                ));
            }
            if let Some(l) = p.locks.iter().find(|l| !p.fds.iter().any(|f| f.fd == l.fd)) {
                return Err(bad(format!(
                    "process {} holds a lock through fd {}, which it does not have",
                    p.pid, l.fd
                )));
            }
        }
        Ok(())
    }

    /// Writes the manifest as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("manifest serializes");
        out.push(b'\n');
        out
    }

    /// The JSON schema of the manifest (published in specs/).
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(Manifest)).expect("schema serializes")
    }

    /// The root process.
    pub fn root(&self) -> &Process {
        &self.processes[0]
    }

    /// Bytes of memory stored in the pool for the whole tree.
    pub fn stored_bytes(&self) -> u64 {
        let pages = |p: &Option<Pages>| p.as_ref().map_or(0, Pages::page_count);
        let areas: u64 = self
            .processes
            .iter()
            .flat_map(|p| &p.areas)
            .map(|a| pages(&a.pages))
            .sum();
        let shm: u64 = self.shmem.iter().map(|o| pages(&o.pages)).sum();
        (areas + shm) * crate::sys::PAGE_SIZE
    }

    /// Bytes of memory shared with earlier snapshots (an incremental snapshot).
    pub fn shared_bytes(&self) -> u64 {
        self.processes
            .iter()
            .flat_map(|p| &p.areas)
            .filter_map(|a| a.pages.as_ref())
            .map(Pages::shared_page_count)
            .sum::<u64>()
            * crate::sys::PAGE_SIZE
    }
}

#[cfg(test)]
pub(crate) mod tests;
