//! The workload's self-checks: one named check per piece of state, true while it holds.

use std::sync::atomic::Ordering;

use caps::{CapSet, Capability};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::mman::ProtFlags;
use nix::unistd::{lseek, Whence};
use serde_json::{json, Map, Value};

use crate::state::*;
use crate::{vector, ALARMS, USR2};

struct Checks {
    results: Map<String, Value>,
    failures: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) {
        self.results.insert(name.to_string(), Value::Bool(ok));
        if !ok {
            self.failures.push(format!("{name}: {}", detail()));
        }
    }
}

fn pages_ok(region: &Region, pages: impl Iterator<Item = usize>, tag: u64) -> Result<(), String> {
    for p in pages {
        if !block_ok(region.page(p), tag | p as u64) {
            return Err(format!(
                "page {p} at {:#x} is damaged",
                region.addr() + p * PAGE
            ));
        }
    }
    Ok(())
}

fn detail(r: &Result<(), String>) -> String {
    r.clone().err().unwrap_or_default()
}

fn sigaction_of(sig: i32) -> libc::sigaction {
    // SAFETY: reads the disposition into a zeroed struct.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    old
}

fn sigset_has(set: &libc::sigset_t, sig: i32) -> bool {
    // SAFETY: sigismember reads the set.
    unsafe { libc::sigismember(set, sig) == 1 }
}

fn memory_checks(c: &mut Checks, st: &State, stack_block: &[u64]) {
    let r = pages_ok(&st.anon, 0..st.anon_touched_pages, tag::ANON);
    c.check("mem_anonymous", r.is_ok(), || detail(&r));
    let lone = pages_ok(&st.anon, std::iter::once(st.anon_lone_page), tag::ANON);
    c.check("mem_lone_page_past_hole", lone.is_ok(), || detail(&lone));
    let hole_zero =
        (st.anon_touched_pages..st.anon_lone_page).all(|p| st.anon.page(p).iter().all(|&w| w == 0));
    c.check("mem_hole_reads_zero", hole_zero, || {
        "an untouched page is not zero".into()
    });
    let ro = pages_ok(&st.readonly, 0..8, tag::READONLY);
    c.check("mem_readonly", ro.is_ok(), || detail(&ro));
    st.hidden.set_prot(ProtFlags::PROT_READ);
    let hidden = pages_ok(&st.hidden, 0..2, tag::HIDDEN);
    st.hidden.set_prot(ProtFlags::PROT_NONE);
    c.check("mem_prot_none_with_data", hidden.is_ok(), || {
        detail(&hidden)
    });
    let brk = current_brk();
    c.check("mem_brk", brk >= st.expect.heap_brk_start, || {
        format!("brk {brk:#x}")
    });
    let heap_ok = st
        .heap
        .iter()
        .enumerate()
        .all(|(i, b)| block_ok(&b[..], tag::HEAP | i as u64));
    c.check("mem_heap", heap_ok, || "a heap block is damaged".into());
    let stack_ok = stack_block
        .chunks(PAGE_WORDS)
        .enumerate()
        .all(|(i, b)| block_ok(b, tag::STACK | i as u64));
    c.check(
        "mem_stack",
        stack_ok && stack_block.as_ptr() as usize == st.expect.stack_addr,
        || "the stack block is damaged or moved".into(),
    );
    let file = pages_ok(&st.file_private, 0..FILE_PAGES, tag::FILE);
    let mut clean_same = true;
    let mut from_file = vec![0u64; PAGE_WORDS];
    for p in (0..FILE_PAGES).filter(|p| !DIRTY_FILE_PAGES.contains(p)) {
        read_words_at(FD_DATA_RO, &mut from_file, p * PAGE);
        clean_same &= from_file.as_slice() == st.file_private.page(p);
    }
    c.check("mem_file_private", file.is_ok() && clean_same, || {
        format!(
            "{} / clean pages equal the file: {clean_same}",
            detail(&file)
        )
    });
    let mut shared_in_file = [0u64; 1];
    let shared_path = st.dir.join("shared.bin");
    let shared_file = std::fs::File::open(shared_path).unwrap();
    nix::sys::uio::pread(&shared_file, bytemuck_u64(&mut shared_in_file), 0).unwrap();
    c.check(
        "mem_file_shared",
        shared_in_file[0] == st.file_shared.words()[0],
        || {
            format!(
                "file holds {}, mapping {}",
                shared_in_file[0],
                st.file_shared.words()[0]
            )
        },
    );
    let shm = pages_ok(&st.shm, 0..4, tag::SHM);
    c.check("mem_shared_anonymous", shm.is_ok(), || detail(&shm));
    let guard_inaccessible = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| {
            l.starts_with(&format!("{:x}-", st.guard.addr()))
                && l.split_whitespace().nth(1) == Some("---p")
        });
    c.check("mem_guard_prot_none", guard_inaccessible, || {
        "the guard area is not ---p".into()
    });
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    // The vDSO is where the auxiliary vector (and so libc) says, and where it was; its
    // clock works.
    // SAFETY: getauxval only reads the auxiliary vector.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    let mapped = smaps
        .lines()
        .any(|l| l.starts_with(&format!("{vdso:x}-")) && l.ends_with("[vdso]"));
    let t0 = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let clock_ok = t0.elapsed() >= std::time::Duration::from_millis(2);
    c.check(
        "vdso_in_place",
        mapped && vdso == st.expect.vdso && clock_ok,
        || {
            format!(
                "auxv vdso {vdso:#x} (was {:#x}) mapped there: {mapped}, clock {clock_ok}",
                st.expect.vdso
            )
        },
    );
    let dontfork = smaps
        .split(&format!("{:x}-", st.dontfork.addr()))
        .nth(1)
        .and_then(|rest| rest.lines().find(|l| l.starts_with("VmFlags:")))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "dc"));
    c.check("mem_madvise_dontfork", dontfork, || {
        "MADV_DONTFORK lost".into()
    });
}

fn bytemuck_u64(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding; any byte pattern is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

fn fd_checks(c: &mut Checks) {
    let pos = lseek(borrow(FD_DATA_RO), 0, Whence::SeekCur).unwrap_or(-1);
    c.check("fd_offset", pos == DATA_RO_OFFSET, || {
        format!("offset {pos}")
    });
    let log_flags = fcntl(borrow(FD_LOG), FcntlArg::F_GETFL).map(OFlag::from_bits_truncate);
    c.check(
        "fd_append_flag",
        log_flags.is_ok_and(|f| f.contains(OFlag::O_APPEND)),
        || format!("{log_flags:?}"),
    );
    let cloexec = fcntl(borrow(FD_URANDOM), FcntlArg::F_GETFD).map(FdFlag::from_bits_truncate);
    let not_cloexec = fcntl(borrow(FD_DATA_RO), FcntlArg::F_GETFD).map(FdFlag::from_bits_truncate);
    c.check(
        "fd_cloexec_flag",
        cloexec.is_ok_and(|f| f.contains(FdFlag::FD_CLOEXEC))
            && not_cloexec.is_ok_and(|f| f.is_empty()),
        || format!("{cloexec:?} {not_cloexec:?}"),
    );
    lseek(borrow(FD_REPORT_DUP), 4242, Whence::SeekSet).unwrap();
    let shared = lseek(borrow(FD_REPORT), 0, Whence::SeekCur).unwrap_or(-1);
    c.check("fd_dup_shares_offset", shared == 4242, || {
        format!("offset {shared}")
    });
    let rdev = |fd| {
        nix::sys::stat::fstat(borrow(fd))
            .map(|s| s.st_rdev)
            .unwrap_or(0)
    };
    let mut zeros = [1u8; 64];
    let zero_ok =
        nix::unistd::read(borrow(FD_ZERO), &mut zeros).is_ok() && zeros.iter().all(|&b| b == 0);
    let mut random = [0u8; 64];
    let random_ok = nix::unistd::read(borrow(FD_URANDOM), &mut random).is_ok()
        && random.iter().any(|&b| b != 0);
    let null_ok = nix::unistd::write(borrow(FD_NULL), b"x").is_ok();
    c.check(
        "fd_devices",
        rdev(FD_NULL) == nix::sys::stat::makedev(1, 3) && null_ok && zero_ok && random_ok,
        || "a device fd is wrong".into(),
    );
    let st = nix::sys::stat::fstat(borrow(FD_DELETED));
    let mut del = vec![0u64; DELETED_PAGES * PAGE_WORDS];
    read_words_at(FD_DELETED, &mut del, 0);
    let content_ok = del
        .chunks(PAGE_WORDS)
        .enumerate()
        .all(|(p, b)| block_ok(b, tag::DELETED | p as u64));
    let del_pos = lseek(borrow(FD_DELETED), 0, Whence::SeekCur).unwrap_or(-1);
    c.check(
        "fd_deleted_file",
        st.is_ok_and(|s| s.st_nlink == 0) && content_ok && del_pos == DELETED_OFFSET,
        || {
            format!(
                "nlink {:?} content {content_ok} offset {del_pos}",
                st.map(|s| s.st_nlink)
            )
        },
    );
}

fn pipe_checks(c: &mut Checks) {
    let mut buffered: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(FD_PIPE_READ, libc::FIONREAD, &mut buffered) };
    let capacity = fcntl(borrow(FD_PIPE_WRITE), FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
    let read_flags = fcntl(borrow(FD_PIPE_READ), FcntlArg::F_GETFL).map(OFlag::from_bits_truncate);
    let write_flags =
        fcntl(borrow(FD_PIPE_WRITE), FcntlArg::F_GETFL).map(OFlag::from_bits_truncate);
    let flags_ok = read_flags.is_ok_and(|f| f.contains(OFlag::O_NONBLOCK))
        && write_flags.is_ok_and(|f| !f.contains(OFlag::O_NONBLOCK));
    let mut in_fifo: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(FD_FIFO, libc::FIONREAD, &mut in_fifo) };
    let fifo_path = std::fs::read_link(format!("/proc/self/fd/{FD_FIFO}")).unwrap_or_default();
    c.check(
        "fifo_buffered_data",
        in_fifo as usize == FIFO_DATA.len() && fifo_path.ends_with("fifo"),
        || format!("{in_fifo} bytes in {}", fifo_path.display()),
    );
    // Read the bytes, check them, and put them back.
    let mut data = vec![0u8; PIPE_DATA.len()];
    let read = nix::unistd::read(borrow(FD_PIPE_READ), &mut data).unwrap_or(0);
    if read > 0 {
        nix::unistd::write(borrow(FD_PIPE_WRITE), &data[..read]).unwrap();
    }
    c.check(
        "pipe_buffered_data",
        buffered as usize == PIPE_DATA.len()
            && data == PIPE_DATA
            && capacity == PIPE_CAPACITY
            && flags_ok,
        || {
            format!(
                "{buffered} bytes buffered ({:?}), capacity {capacity}, flags ok {flags_ok}",
                String::from_utf8_lossy(&data)
            )
        },
    );
}

fn signal_checks(c: &mut Checks, st: &State) {
    let usr2 = sigaction_of(libc::SIGUSR2);
    let want = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
    let usr1 = sigaction_of(libc::SIGUSR1);
    let parts = [
        ("usr2 handler", usr2.sa_sigaction == st.expect.usr2_handler),
        ("usr2 flags", usr2.sa_flags & want == want),
        (
            "usr2 mask",
            sigset_has(&usr2.sa_mask, libc::SIGHUP) && !sigset_has(&usr2.sa_mask, libc::SIGINT),
        ),
        ("usr1 handler", usr1.sa_sigaction == st.expect.usr1_handler),
        (
            "pipe ignored",
            sigaction_of(libc::SIGPIPE).sa_sigaction == libc::SIG_IGN,
        ),
        (
            "term default",
            sigaction_of(libc::SIGTERM).sa_sigaction == libc::SIG_DFL,
        ),
    ];
    c.check("signal_dispositions", parts.iter().all(|p| p.1), || {
        let wrong: Vec<&str> = parts.iter().filter(|p| !p.1).map(|p| p.0).collect();
        format!(
            "wrong: {wrong:?} (usr2 {:#x} flags {:#x}, usr1 {:#x})",
            usr2.sa_sigaction, usr2.sa_flags, usr1.sa_sigaction
        )
    });
    // SAFETY: plain signal-mask queries on this process.
    let (mask, pending) = unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        (mask, pending)
    };
    c.check(
        "signal_blocked_mask",
        sigset_has(&mask, queued_signal()) && !sigset_has(&mask, libc::SIGUSR1),
        || "the blocked mask changed".into(),
    );
    // Take the queued signal to read its value, then queue it again.
    let mut value = 0usize;
    let mut code = 0;
    if sigset_has(&pending, queued_signal()) {
        // SAFETY: sigtimedwait on a blocked, pending signal returns at once.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, queued_signal());
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if libc::sigtimedwait(&set, &mut info, &zero) == queued_signal() {
                value = info.si_value().sival_ptr as usize;
                code = info.si_code;
            }
            libc::sigqueue(
                libc::getpid(),
                queued_signal(),
                libc::sigval {
                    sival_ptr: value as *mut libc::c_void,
                },
            );
        }
    }
    c.check(
        "signal_pending_queued",
        value == QUEUED_VALUE && code == libc::SI_QUEUE,
        || format!("pending value {value}, si_code {code}"),
    );
    // SAFETY: sigaltstack with a null new stack only reports.
    let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaltstack(std::ptr::null(), &mut old) };
    c.check(
        "signal_altstack",
        (old.ss_sp as usize, old.ss_size) == st.expect.altstack,
        || format!("{:#x}+{}", old.ss_sp as usize, old.ss_size),
    );
    let (interval, _) = get_itimer(libc::ITIMER_REAL);
    let (_, prof_left) = get_itimer(libc::ITIMER_PROF);
    c.check(
        "itimers",
        interval == 20_000 && prof_left > 0 && prof_left <= 100_000_000,
        || format!("real interval {interval}us, prof left {prof_left}us"),
    );
}

fn identity_checks(c: &mut Checks, st: &State) {
    let e = &st.expect;
    c.check(
        "tls_value",
        TLS.with(|t| t.get()).count_ones() == TLS_MAGIC.count_ones() && fs_base() == e.fs_base,
        || format!("fs base {:#x} (was {:#x})", fs_base(), e.fs_base),
    );
    let (mxcsr, cw) = vector::control_words();
    c.check(
        "fpu_control_words",
        mxcsr & !0x3f == vector::MXCSR && cw == vector::X87_CW,
        || format!("mxcsr {mxcsr:#x} x87 cw {cw:#x}"),
    );
    c.check("vector_registers", st.vector_failures == 0, || {
        format!("{} spins lost their ymm/zmm values", st.vector_failures)
    });
    // Registering rseq again answers EBUSY (or EINVAL for other arguments) while one is
    // registered; 0 would mean the restore lost it.
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: glibc's exported rseq symbols; the syscall only checks the registration.
    let rseq_rc = unsafe {
        let area = (fs_base() as isize + __rseq_offset) as u64;
        libc::syscall(libc::SYS_rseq, area, __rseq_size.max(32), 0, 0x5305_3053)
    };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    c.check(
        "rseq_registered",
        rseq_rc == -1 && matches!(errno, libc::EBUSY | libc::EINVAL | libc::EPERM),
        || format!("rseq() returned {rseq_rc} (errno {errno})"),
    );
    c.check("tid_address", tid_address() == e.tid_address, || {
        format!("{:#x}", tid_address())
    });
    c.check("robust_list", robust_list() == e.robust_list, || {
        format!("{:?}", robust_list())
    });
    let name = nix::sys::prctl::get_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    c.check("process_name", name == NAME, || name.clone());
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let environ = std::fs::read("/proc/self/environ").unwrap_or_default();
    c.check(
        "cmdline_environ",
        cmdline == e.cmdline && environ == e.environ,
        || String::from_utf8_lossy(&cmdline).into_owned(),
    );
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    c.check("exe_link", exe == e.exe, || exe.display().to_string());
    let persona = nix::sys::personality::get().map(|p| p.bits()).unwrap_or(-1);
    c.check("personality", persona == e.personality, || {
        format!("{persona:#x}")
    });
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    c.check("umask", umask.bits() == 0o027, || {
        format!("{:o}", umask.bits())
    });
    let cwd = std::env::current_dir().unwrap_or_default();
    c.check("cwd", cwd == e.cwd, || cwd.display().to_string());
    use nix::sys::resource::{getrlimit, Resource};
    let nofile = getrlimit(Resource::RLIMIT_NOFILE).map(|l| l.0).unwrap_or(0);
    let core = getrlimit(Resource::RLIMIT_CORE).unwrap_or((1, 1));
    c.check("rlimits", nofile == 1000 && core == (0, 0), || {
        format!("nofile {nofile} core {core:?}")
    });
    // SAFETY: getpriority takes integers.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    let oom: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    c.check(
        "scheduling",
        nice == NICE && cpus.len() == 1 && oom == OOM_SCORE_ADJ,
        || format!("nice {nice}, cpus {cpus:?}, oom_score_adj {oom}"),
    );
    let slack = nix::sys::prctl::get_timerslack().unwrap_or(0) as u64;
    c.check("timer_slack", slack == TIMER_SLACK, || slack.to_string());
    let groups: Vec<u32> = nix::unistd::getgroups()
        .unwrap_or_default()
        .iter()
        .map(|g| g.as_raw())
        .collect();
    c.check("groups", groups == GROUPS, || format!("{groups:?}"));
    let caps_ok = !caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_RAW).unwrap_or(true)
        && caps::has_cap(None, CapSet::Permitted, Capability::CAP_NET_RAW).unwrap_or(false)
        && !caps::has_cap(None, CapSet::Bounding, Capability::CAP_SYS_BOOT).unwrap_or(true)
        && caps::has_cap(None, CapSet::Ambient, Capability::CAP_CHOWN).unwrap_or(false)
        && caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false);
    c.check("capabilities", caps_ok, || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .collect::<Vec<_>>()
            .join(" ")
    });
}

/// Checks every piece of state and returns the report.
pub fn report(st: &State, stack_block: &[u64], tick: u64) -> Value {
    let mut c = Checks {
        results: Map::new(),
        failures: Vec::new(),
    };
    memory_checks(&mut c, st, stack_block);
    fd_checks(&mut c);
    pipe_checks(&mut c);
    signal_checks(&mut c, st);
    identity_checks(&mut c, st);
    json!({
        "pid": std::process::id(),
        "proc_self": std::fs::read_link("/proc/self").map(|p| p.display().to_string()).unwrap_or_default(),
        "tick": tick,
        "alarms": ALARMS.load(Ordering::SeqCst),
        "usr2": USR2.load(Ordering::SeqCst),
        "shared_counter": st.file_shared.words()[0],
        "brk": current_brk(),
        "checks": c.results,
        "failures": c.failures,
    })
}
