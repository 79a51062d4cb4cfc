//! A process that blocks in one system call, for the tests of interrupted calls.
//!
//! ```text
//! blocker read-pipe | vfork
//! ```
//!
//! `read-pipe`: makes a pipe of its own, installs a SIGUSR1 handler (SA_RESTART) that writes
//! one byte into it, prints "blocking", then blocks in read(2) on the pipe. When the read
//! returns it prints "read <rc> <errno> <byte>" and exits 0. A read that a capture and
//! restore interrupted must go on waiting and then return the byte: with SA_RESTART, the
//! handler's return restarts it.
//!
//! `vfork`: prints "blocking", then `vfork`s a child that waits in `pause(2)` until it is
//! killed: the process itself waits for it in uninterruptible sleep (state D), where no
//! ptrace stop reaches it. Once the child is gone it prints "vfork returned" and exits 0.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};

static WRITE_END: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_usr1(_: libc::c_int) {
    let byte = b'x';
    // SAFETY: write(2) is async-signal-safe; the fd stays open.
    unsafe {
        libc::write(
            WRITE_END.load(Ordering::SeqCst),
            (&byte as *const u8).cast(),
            1,
        )
    };
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "read-pipe" => read_pipe(),
        "vfork" => vfork(),
        _ => panic!("usage: blocker read-pipe | vfork"),
    }
}

extern "C" fn vfork_child(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: pause(2) takes nothing.
    unsafe { libc::pause() };
    0
}

fn vfork() {
    println!("blocking");
    std::io::stdout().flush().unwrap();
    let mut stack = vec![0u8; 64 << 10];
    // SAFETY: the child runs `vfork_child` on a stack of its own (only this process's memory
    // is shared, as vfork shares it), and this process waits until it has ended.
    let child = unsafe {
        libc::clone(
            vfork_child,
            stack.as_mut_ptr().add(stack.len()).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::null_mut(),
        )
    };
    assert!(child > 0, "clone: {}", std::io::Error::last_os_error());
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
    println!("vfork returned");
}

fn read_pipe() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds; sigaction installs a handler that only calls write.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        WRITE_END.store(fds[1], Ordering::SeqCst);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    println!("blocking");
    std::io::stdout().flush().unwrap();
    let mut byte = 0u8;
    // SAFETY: reads one byte into `byte`.
    let rc = unsafe { libc::read(fds[0], (&mut byte as *mut u8).cast(), 1) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    println!(
        "read {rc} {} {}",
        if rc < 0 { errno } else { 0 },
        byte as char
    );
}
