//! The state the workload holds: memory of every kind, fds, signals, timers, identity.

use std::cell::Cell;
use std::ffi::CString;
use std::num::NonZeroUsize;
use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use caps::{CapSet, Capability};
use nix::fcntl::{open, OFlag};
use nix::sys::mman::{mmap, mmap_anonymous, mprotect, MapFlags, ProtFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{lseek, Whence};

use crate::{vector, ALARMS, REPORT, USR2};

/// Words per page.
pub const PAGE_WORDS: usize = 512;
/// Bytes per page.
pub const PAGE: usize = 4096;
/// Tag of checked pages and blocks.
pub const MAGIC: u64 = 0x646f_6c6c_7900_0000;

/// Fixed fd numbers, so the checks know where to look.
pub const FD_LOG: RawFd = 10;
pub const FD_REPORT: RawFd = 11;
pub const FD_REPORT_DUP: RawFd = 12;
pub const FD_DATA_RO: RawFd = 13;
pub const FD_NULL: RawFd = 14;
pub const FD_ZERO: RawFd = 15;
pub const FD_URANDOM: RawFd = 16;
pub const FD_DELETED: RawFd = 17;
pub const FD_PIPE_READ: RawFd = 18;
pub const FD_PIPE_WRITE: RawFd = 19;
pub const FD_FIFO: RawFd = 20;
pub const FIFO_DATA: &[u8] = b"waiting in the fifo";

/// Bytes left buffered in the workload's own pipe, and its capacity.
pub const PIPE_DATA: &[u8] = b"buffered in the pipe";
pub const PIPE_CAPACITY: i32 = 1 << 20;

/// Offsets the checks expect.
pub const DATA_RO_OFFSET: i64 = 12345;
pub const DELETED_OFFSET: i64 = 777;
pub const DELETED_PAGES: usize = 3;
/// Pages of the private file mapping that the workload writes (the rest stay clean).
pub const DIRTY_FILE_PAGES: [usize; 2] = [2, 5];
pub const FILE_PAGES: usize = 16;
/// Value queued with the pending real-time signal.
pub const QUEUED_VALUE: usize = 4242;
pub const TIMER_SLACK: u64 = 123_456;
pub const NAME: &str = "dolly-workload";
pub const GROUPS: [u32; 3] = [4, 24, 1000];
pub const TLS_MAGIC: u64 = 0x7715_0000_0000_7715;
pub const NICE: i32 = 5;
pub const OOM_SCORE_ADJ: i32 = 321;

/// The first CPU this process may run on.
pub fn first_cpu() -> usize {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .find(|&c| set.is_set(c).unwrap_or(false))
        .unwrap()
}

thread_local! {
    /// A thread-local value (reached through the fs base).
    pub static TLS: Cell<u64> = const { Cell::new(0) };
}

/// The real-time signal kept blocked and pending.
pub fn queued_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

/// A mapped memory region viewed as words.
pub struct Region {
    pub ptr: *mut u64,
    pub len: usize,
}

impl Region {
    fn new(ptr: NonNull<libc::c_void>, len: usize) -> Region {
        Region {
            ptr: ptr.as_ptr().cast(),
            len,
        }
    }

    pub fn words(&self) -> &[u64] {
        // SAFETY: the region is a live mapping of `len` bytes owned by this process.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len / 8) }
    }

    pub fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as above; writable regions only.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len / 8) }
    }

    pub fn page(&self, i: usize) -> &[u64] {
        &self.words()[i * PAGE_WORDS..(i + 1) * PAGE_WORDS]
    }

    pub fn page_mut(&mut self, i: usize) -> &mut [u64] {
        &mut self.words_mut()[i * PAGE_WORDS..(i + 1) * PAGE_WORDS]
    }

    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub fn set_prot(&self, prot: ProtFlags) {
        // SAFETY: changes protection of our own mapping.
        unsafe { mprotect(NonNull::new(self.ptr.cast()).unwrap(), self.len, prot) }
            .expect("mprotect");
    }
}

/// Bytes of a word slice.
pub fn bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; any initialized u64 slice is valid as bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
}

/// Checksum of a block's payload.
pub fn sum(words: &[u64]) -> u64 {
    u64::from_le_bytes(
        blake3::hash(bytes(words)).as_bytes()[..8]
            .try_into()
            .unwrap(),
    )
}

/// Fills a block: tag, checksum, payload derived from `seed`.
pub fn fill_block(block: &mut [u64], tag: u64, seed: u64) {
    block[0] = MAGIC ^ tag;
    let mut x = seed;
    for w in block[2..].iter_mut() {
        x = splitmix(x);
        *w = x;
    }
    block[1] = sum(&block[2..]);
}

/// Whether a block is intact: its tag and checksum match.
pub fn block_ok(block: &[u64], tag: u64) -> bool {
    block[0] == MAGIC ^ tag && block[1] == sum(&block[2..])
}

/// Changes one payload word of a block (deterministically from `r`) and fixes its sum.
pub fn touch_block(block: &mut [u64], r: u64) {
    let n = block.len() - 2;
    block[2 + (r as usize >> 7) % n] ^= splitmix(r);
    block[1] = sum(&block[2..]);
}

/// SplitMix64.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What setup recorded, for the checks to compare against.
pub struct Expected {
    pub cmdline: Vec<u8>,
    pub environ: Vec<u8>,
    pub exe: PathBuf,
    pub cwd: PathBuf,
    pub fs_base: u64,
    pub tid_address: u64,
    pub robust_list: (u64, usize),
    pub personality: i32,
    pub altstack: (usize, usize),
    pub stack_addr: usize,
    pub heap_brk_start: usize,
    pub usr1_handler: usize,
    pub usr2_handler: usize,
    pub vdso: usize,
}

/// Everything the workload holds.
pub struct State {
    pub dir: PathBuf,
    pub anon: Region,
    pub anon_touched_pages: usize,
    pub anon_lone_page: usize,
    pub guard: Region,
    pub readonly: Region,
    pub hidden: Region,
    /// Boxed on purpose: many small allocations that land in the brk heap.
    #[allow(clippy::vec_box)]
    pub heap: Vec<Box<[u64; 16]>>,
    pub file_private: Region,
    pub file_shared: Region,
    pub shm: Region,
    pub dontfork: Region,
    pub expect: Expected,
    pub vector_failures: u64,
}

/// Region tags (so a page of one region cannot pass as another's).
pub mod tag {
    pub const ANON: u64 = 1 << 40;
    pub const READONLY: u64 = 2 << 40;
    pub const HIDDEN: u64 = 3 << 40;
    pub const HEAP: u64 = 4 << 40;
    pub const STACK: u64 = 5 << 40;
    pub const FILE: u64 = 6 << 40;
    pub const SHM: u64 = 7 << 40;
    pub const DELETED: u64 = 8 << 40;
}

fn anon_map(len: usize, flags: MapFlags) -> NonNull<libc::c_void> {
    // SAFETY: a fresh anonymous mapping.
    unsafe {
        mmap_anonymous(
            None,
            NonZeroUsize::new(len).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            flags,
        )
    }
    .expect("mmap")
}

fn place_fd(fd: impl IntoRawFd, at: RawFd) {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is ours; `at` is a number this program reserves.
    unsafe {
        assert_eq!(libc::dup2(raw, at), at, "dup2");
        libc::close(raw);
    }
}

extern "C" fn on_usr1(_: libc::c_int) {
    REPORT.store(true, std::sync::atomic::Ordering::SeqCst);
}

extern "C" fn on_alarm(_: libc::c_int) {
    ALARMS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    USR2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// The handler address the kernel holds for `sig` (Rust does not promise one address per
/// function, so the checks compare against what setup read back, not `fn as usize`).
pub fn handler_of(sig: i32) -> usize {
    // SAFETY: reads the disposition into a zeroed struct.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    old.sa_sigaction
}

/// fs base (the TLS pointer).
pub fn fs_base() -> u64 {
    let mut base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one word.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut base as *mut u64) };
    base
}

/// The clear_child_tid address.
pub fn tid_address() -> u64 {
    let mut addr: u64 = 0;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer.
    unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut addr as *mut u64) };
    addr
}

/// The robust list registration.
pub fn robust_list() -> (u64, usize) {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list(0) writes a pointer and a size.
    unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    (head, len)
}

/// The current program break.
pub fn current_brk() -> usize {
    // SAFETY: brk(0) only reports.
    unsafe { libc::syscall(libc::SYS_brk, 0) as usize }
}

impl State {
    /// Builds all the state.
    pub fn setup(dir: &Path, mem_mib: usize, stack_block: &mut [u64]) -> State {
        let dir = dir.canonicalize().expect("--dir exists");
        std::env::set_current_dir(&dir).unwrap();
        nix::sys::stat::umask(Mode::from_bits_truncate(0o027));
        nix::sys::prctl::set_name(&CString::new(NAME).unwrap()).unwrap();
        nix::sys::prctl::set_timerslack(TIMER_SLACK as _).unwrap();
        let persona = nix::sys::personality::get().unwrap();
        nix::sys::personality::set(persona | nix::sys::personality::Persona::ADDR_NO_RANDOMIZE)
            .unwrap();
        vector::set_control_words();
        TLS.with(|t| t.set(TLS_MAGIC));

        // Identity.
        nix::unistd::setgroups(&GROUPS.map(nix::unistd::Gid::from_raw)).unwrap();
        caps::drop(None, CapSet::Bounding, Capability::CAP_SYS_BOOT).unwrap();
        caps::drop(None, CapSet::Effective, Capability::CAP_NET_RAW).unwrap();
        caps::raise(None, CapSet::Inheritable, Capability::CAP_CHOWN).unwrap();
        caps::raise(None, CapSet::Ambient, Capability::CAP_CHOWN).unwrap();
        let (_, nofile_hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            1000,
            nofile_hard,
        )
        .unwrap();
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0).unwrap();
        // Scheduling: a nice value, one CPU, a raised OOM score.
        // SAFETY: setpriority takes integers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
        let cpu = first_cpu();
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
        std::fs::write("/proc/self/oom_score_adj", OOM_SCORE_ADJ.to_string()).unwrap();

        // Memory: a large private area, half touched, one lone page past a hole.
        let len = mem_mib << 20;
        let mut anon = Region::new(anon_map(len, MapFlags::MAP_PRIVATE), len);
        let pages = len / PAGE;
        let touched = pages / 2;
        let lone = pages * 3 / 4;
        for p in (0..touched).chain(std::iter::once(lone)) {
            fill_block(anon.page_mut(p), tag::ANON | p as u64, p as u64);
        }
        // PROT_NONE guard, read-only data, and data hidden behind PROT_NONE.
        let guard = Region::new(anon_map(16 * PAGE, MapFlags::MAP_PRIVATE), 16 * PAGE);
        guard.set_prot(ProtFlags::PROT_NONE);
        let mut readonly = Region::new(anon_map(8 * PAGE, MapFlags::MAP_PRIVATE), 8 * PAGE);
        for p in 0..8 {
            fill_block(
                readonly.page_mut(p),
                tag::READONLY | p as u64,
                100 + p as u64,
            );
        }
        readonly.set_prot(ProtFlags::PROT_READ);
        let mut hidden = Region::new(anon_map(2 * PAGE, MapFlags::MAP_PRIVATE), 2 * PAGE);
        for p in 0..2 {
            fill_block(hidden.page_mut(p), tag::HIDDEN | p as u64, 200 + p as u64);
        }
        hidden.set_prot(ProtFlags::PROT_NONE);
        // Heap (brk) blocks and the main stack.
        let heap_brk_start = current_brk();
        let heap: Vec<Box<[u64; 16]>> = (0..512)
            .map(|i| {
                let mut b = Box::new([0u64; 16]);
                fill_block(&mut b[..], tag::HEAP | i, 300 + i);
                b
            })
            .collect();
        for (i, chunk) in stack_block.chunks_mut(PAGE_WORDS).enumerate() {
            fill_block(chunk, tag::STACK | i as u64, 400 + i as u64);
        }
        // A file mapped private (some pages then written) and one mapped shared.
        let data_path = dir.join("data.bin");
        let mut data = vec![0u64; FILE_PAGES * PAGE_WORDS];
        for (p, page) in data.chunks_mut(PAGE_WORDS).enumerate() {
            fill_block(page, tag::FILE | p as u64, 500 + p as u64);
        }
        std::fs::write(&data_path, bytes(&data)).unwrap();
        let data_file = std::fs::File::open(&data_path).unwrap();
        // SAFETY: a private mapping of a file we just wrote.
        let fp = unsafe {
            mmap(
                None,
                NonZeroUsize::new(FILE_PAGES * PAGE).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
                &data_file,
                0,
            )
        }
        .unwrap();
        let mut file_private = Region::new(fp, FILE_PAGES * PAGE);
        for p in DIRTY_FILE_PAGES {
            touch_block(file_private.page_mut(p), p as u64);
        }
        let shared_path = dir.join("shared.bin");
        std::fs::write(&shared_path, vec![0u8; PAGE]).unwrap();
        let shared_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&shared_path)
            .unwrap();
        // SAFETY: a shared mapping of a file we just wrote.
        let sp = unsafe {
            mmap(
                None,
                NonZeroUsize::new(PAGE).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &shared_file,
                0,
            )
        }
        .unwrap();
        let file_shared = Region::new(sp, PAGE);
        // Shared anonymous memory, and an area not inherited by fork.
        let mut shm = Region::new(anon_map(4 * PAGE, MapFlags::MAP_SHARED), 4 * PAGE);
        for p in 0..4 {
            fill_block(shm.page_mut(p), tag::SHM | p as u64, 600 + p as u64);
        }
        let dontfork = Region::new(anon_map(PAGE, MapFlags::MAP_PRIVATE), PAGE);
        // SAFETY: advice on our own mapping.
        unsafe {
            nix::sys::mman::madvise(
                NonNull::new(dontfork.ptr.cast()).unwrap(),
                PAGE,
                nix::sys::mman::MmapAdvise::MADV_DONTFORK,
            )
        }
        .unwrap();

        // Fds at fixed numbers: an append log, a report with a dup sharing its offset, a
        // read-only file at an offset, devices, a deleted file.
        let flags_log = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND;
        place_fd(
            open(&dir.join("log"), flags_log, Mode::from_bits_truncate(0o644)).unwrap(),
            FD_LOG,
        );
        place_fd(
            open(
                &dir.join("report.json"),
                OFlag::O_RDWR | OFlag::O_CREAT,
                Mode::from_bits_truncate(0o644),
            )
            .unwrap(),
            FD_REPORT,
        );
        // SAFETY: FD_REPORT is open; dup2 makes FD_REPORT_DUP share its description.
        assert_eq!(
            unsafe { libc::dup2(FD_REPORT, FD_REPORT_DUP) },
            FD_REPORT_DUP
        );
        place_fd(
            open(&data_path, OFlag::O_RDONLY, Mode::empty()).unwrap(),
            FD_DATA_RO,
        );
        lseek(borrow(FD_DATA_RO), DATA_RO_OFFSET, Whence::SeekSet).unwrap();
        place_fd(
            open("/dev/null", OFlag::O_WRONLY, Mode::empty()).unwrap(),
            FD_NULL,
        );
        place_fd(
            open("/dev/zero", OFlag::O_RDONLY, Mode::empty()).unwrap(),
            FD_ZERO,
        );
        place_fd(
            open("/dev/urandom", OFlag::O_RDONLY, Mode::empty()).unwrap(),
            FD_URANDOM,
        );
        nix::fcntl::fcntl(
            borrow(FD_URANDOM),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
        let deleted_path = dir.join("deleted.bin");
        let mut del = vec![0u64; DELETED_PAGES * PAGE_WORDS];
        for (p, page) in del.chunks_mut(PAGE_WORDS).enumerate() {
            fill_block(page, tag::DELETED | p as u64, 800 + p as u64);
        }
        std::fs::write(&deleted_path, bytes(&del)).unwrap();
        place_fd(
            open(&deleted_path, OFlag::O_RDWR, Mode::empty()).unwrap(),
            FD_DELETED,
        );
        std::fs::remove_file(&deleted_path).unwrap();
        lseek(borrow(FD_DELETED), DELETED_OFFSET, Whence::SeekSet).unwrap();
        // A pipe of its own, non-blocking on the read side, with bytes left in it.
        let (pr, pw) = nix::unistd::pipe2(OFlag::O_NONBLOCK).unwrap();
        place_fd(pr, FD_PIPE_READ);
        place_fd(pw, FD_PIPE_WRITE);
        nix::fcntl::fcntl(
            borrow(FD_PIPE_WRITE),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()),
        )
        .unwrap();
        nix::fcntl::fcntl(
            borrow(FD_PIPE_WRITE),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY),
        )
        .unwrap();
        nix::unistd::write(borrow(FD_PIPE_WRITE), PIPE_DATA).unwrap();
        // A FIFO, open both ways, with bytes in it.
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        place_fd(
            open(&fifo, OFlag::O_RDWR | OFlag::O_NONBLOCK, Mode::empty()).unwrap(),
            FD_FIFO,
        );
        nix::unistd::write(borrow(FD_FIFO), FIFO_DATA).unwrap();

        // Signals: handlers, an ignored signal, a blocked and pending queued signal, an
        // alternate stack, interval timers.
        let install = |sig: Signal, handler: SigHandler, flags: SaFlags, mask: SigSet| {
            // SAFETY: the handlers only touch atomics.
            unsafe { sigaction(sig, &SigAction::new(handler, flags, mask)) }.unwrap();
        };
        install(
            Signal::SIGUSR1,
            SigHandler::Handler(on_usr1),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        install(
            Signal::SIGALRM,
            SigHandler::Handler(on_alarm),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut usr2_mask = SigSet::empty();
        usr2_mask.add(Signal::SIGHUP);
        install(
            Signal::SIGUSR2,
            SigHandler::SigAction(on_usr2),
            SaFlags::SA_SIGINFO | SaFlags::SA_NODEFER | SaFlags::SA_RESTART,
            usr2_mask,
        );
        install(
            Signal::SIGPIPE,
            SigHandler::SigIgn,
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: plain signal-mask and queue calls on this process.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, queued_signal());
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::sigqueue(
                libc::getpid(),
                queued_signal(),
                libc::sigval {
                    sival_ptr: QUEUED_VALUE as *mut libc::c_void,
                },
            );
        }
        let altstack: &'static mut [u8] = Box::leak(vec![0u8; 64 * 1024].into_boxed_slice());
        let ss = libc::stack_t {
            ss_sp: altstack.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: altstack.len(),
        };
        // SAFETY: the leaked buffer lives forever.
        unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
        set_itimer(libc::ITIMER_REAL, 20_000, 20_000);
        set_itimer(libc::ITIMER_PROF, 0, 100_000_000);

        let expect = Expected {
            cmdline: std::fs::read("/proc/self/cmdline").unwrap(),
            environ: std::fs::read("/proc/self/environ").unwrap(),
            exe: std::fs::read_link("/proc/self/exe").unwrap(),
            cwd: std::env::current_dir().unwrap(),
            fs_base: fs_base(),
            tid_address: tid_address(),
            robust_list: robust_list(),
            personality: nix::sys::personality::get().unwrap().bits(),
            altstack: (altstack.as_ptr() as usize, altstack.len()),
            stack_addr: stack_block.as_ptr() as usize,
            heap_brk_start,
            usr1_handler: handler_of(libc::SIGUSR1),
            usr2_handler: handler_of(libc::SIGUSR2),
            // SAFETY: getauxval only reads the auxiliary vector.
            vdso: unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize,
        };
        State {
            dir,
            anon,
            anon_touched_pages: touched,
            anon_lone_page: lone,
            guard,
            readonly,
            hidden,
            heap,
            file_private,
            file_shared,
            shm,
            dontfork,
            expect,
            vector_failures: 0,
        }
    }

    /// One tick's deterministic change of the private state.
    pub fn mutate(&mut self, tick: u64, stack_block: &mut [u64]) {
        let r = splitmix(tick);
        let p = (r % self.anon_touched_pages as u64) as usize;
        touch_block(self.anon.page_mut(p), r);
        let b = (splitmix(r) % self.heap.len() as u64) as usize;
        touch_block(&mut self.heap[b][..], r);
        let s = (r % (stack_block.len() / PAGE_WORDS) as u64) as usize;
        touch_block(&mut stack_block[s * PAGE_WORDS..(s + 1) * PAGE_WORDS], r);
        let f = DIRTY_FILE_PAGES[(r % 2) as usize];
        touch_block(self.file_private.page_mut(f), r);
        let m = (r % 4) as usize;
        touch_block(self.shm.page_mut(m), r);
        // The deleted file's content evolves too.
        let d = (r % DELETED_PAGES as u64) as usize;
        let mut page = vec![0u64; PAGE_WORDS];
        read_words_at(FD_DELETED, &mut page, d * PAGE);
        touch_block(&mut page, r);
        write_words_at(FD_DELETED, &page, d * PAGE);
        TLS.with(|t| t.set(t.get().rotate_left(1)));
        // The shared file counts ticks; that is file state, not part of the digest.
        self.file_shared.words_mut()[0] += 1;
    }

    /// Hash of every piece of private state that `mutate` evolves.
    pub fn digest(&self, tick: u64, stack_block: &[u64]) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&tick.to_le_bytes());
        h.update(bytes(
            &self.anon.words()[..self.anon_touched_pages * PAGE_WORDS],
        ));
        h.update(bytes(self.anon.page(self.anon_lone_page)));
        for b in &self.heap {
            h.update(bytes(&b[..]));
        }
        h.update(bytes(stack_block));
        h.update(bytes(self.file_private.words()));
        h.update(bytes(self.shm.words()));
        h.update(bytes(self.readonly.words()));
        let mut del = vec![0u64; DELETED_PAGES * PAGE_WORDS];
        read_words_at(FD_DELETED, &mut del, 0);
        h.update(bytes(&del));
        h.update(&TLS.with(|t| t.get()).to_le_bytes());
        h.finalize().to_hex()[..16].to_string()
    }

    /// Appends a line to the log.
    pub fn log_line(&self, line: &str) {
        let mut text = line.to_string();
        text.push('\n');
        nix::unistd::write(borrow(FD_LOG), text.as_bytes()).unwrap();
    }

    /// Replaces the report file's content through its fd.
    pub fn write_report(&self, report: &serde_json::Value) {
        let mut text = serde_json::to_vec_pretty(report).unwrap();
        text.push(b'\n');
        let fd = borrow(FD_REPORT);
        nix::unistd::ftruncate(fd, 0).unwrap();
        nix::sys::uio::pwrite(fd, &text, 0).unwrap();
    }
}

/// Borrows one of the fixed fds.
pub fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fixed fds stay open for the life of the program.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Reads words from an fd at a byte offset (offset unchanged).
pub fn read_words_at(fd: RawFd, words: &mut [u64], offset: usize) {
    // SAFETY: u64 has no padding; any byte pattern is a valid u64.
    let buf =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
    nix::sys::uio::pread(borrow(fd), buf, offset as i64).unwrap();
}

fn write_words_at(fd: RawFd, words: &[u64], offset: usize) {
    nix::sys::uio::pwrite(borrow(fd), bytes(words), offset as i64).unwrap();
}

fn set_itimer(which: i32, interval_us: i64, value_us: i64) {
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: interval_us / 1_000_000,
            tv_usec: interval_us % 1_000_000,
        },
        it_value: libc::timeval {
            tv_sec: value_us / 1_000_000,
            tv_usec: value_us % 1_000_000,
        },
    };
    // SAFETY: setitimer reads one itimerval.
    unsafe { libc::setitimer(which as _, &t, std::ptr::null_mut()) };
}

/// Reads an interval timer: (interval, value) in microseconds.
pub fn get_itimer(which: i32) -> (i64, i64) {
    // SAFETY: getitimer writes one itimerval.
    let mut t: libc::itimerval = unsafe { std::mem::zeroed() };
    unsafe { libc::getitimer(which as _, &mut t) };
    (
        t.it_interval.tv_sec * 1_000_000 + t.it_interval.tv_usec,
        t.it_value.tv_sec * 1_000_000 + t.it_value.tv_usec,
    )
}
