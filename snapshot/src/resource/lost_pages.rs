//! While processes are pre-copied, a thread reads the events of their userfaultfds: which
//! tracked ranges lose their pages (`madvise` drops, `munmap`, `mremap`). The kernel holds
//! the process's call until its event is read, so the thread reads at once; the freeze then
//! looks page by page only at those ranges (and at what was written), not at every page.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{Context, Result};
use crate::sys::uffd;

/// What the thread found, shared with the capture.
#[derive(Debug, Default)]
struct Found {
    /// Ranges whose pages may have gone (and of those, the ones unmapped), by PID.
    lost: HashMap<i32, uffd::Events>,
    /// The thread is to end.
    stop: bool,
}

type Shared = Arc<Mutex<Found>>;

/// The reading thread. Dropping it stops the thread (do so before the userfaultfds close).
#[derive(Debug)]
pub struct LostPages {
    uffds: Vec<(i32, RawFd)>,
    wake: Arc<EventFd>,
    found: Shared,
    thread: Option<JoinHandle<()>>,
}

impl LostPages {
    /// Starts reading the events of `uffds`, `(pid, userfaultfd)` pairs. The fds must stay
    /// open until this is dropped.
    pub fn start(uffds: Vec<(i32, RawFd)>) -> Result<LostPages> {
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .context("creating an eventfd")?,
        );
        let found: Shared = Arc::default();
        let thread = {
            let (uffds, wake, found) = (uffds.clone(), wake.clone(), found.clone());
            std::thread::Builder::new()
                .name("dolly-uffd-events".into())
                .spawn(move || read_all(&uffds, &wake, &found))
                .context("starting a thread")?
        };
        Ok(LostPages {
            uffds,
            wake,
            found,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Found> {
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every range reported so far, by PID, pending events included. (With the processes
    /// stopped none is pending: a process waiting for its event to be read cannot stop
    /// before it is.)
    pub fn take(&self) -> HashMap<i32, uffd::Events> {
        // The thread reads only while it holds the lock, so what it read is recorded.
        let mut found = self.lock();
        drain(&self.uffds, &mut found);
        std::mem::take(&mut found.lost)
    }
}

impl Drop for LostPages {
    fn drop(&mut self) {
        self.lock().stop = true;
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads every pending event of `uffds` into `found`.
fn drain(uffds: &[(i32, RawFd)], found: &mut Found) {
    for &(pid, fd) in uffds {
        // SAFETY: the owner keeps the fd open while a `LostPages` lives (see `start`).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(events) = uffd::read_events(&fd) else {
            continue;
        };
        if !events.lost.is_empty() {
            let all = found.lost.entry(pid).or_default();
            all.lost.extend(events.lost);
            all.unmapped.extend(events.unmapped);
        }
    }
}

fn read_all(uffds: &[(i32, RawFd)], wake: &EventFd, shared: &Mutex<Found>) {
    loop {
        {
            let borrowed: Vec<BorrowedFd> = uffds
                .iter()
                // SAFETY: as in `drain`.
                .map(|&(_, fd)| unsafe { BorrowedFd::borrow_raw(fd) })
                .collect();
            let mut fds: Vec<PollFd> = borrowed
                .iter()
                .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
                .collect();
            fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
        let _ = wake.read();
        let mut found = shared.lock().unwrap_or_else(|e| e.into_inner());
        if found.stop {
            return;
        }
        drain(uffds, &mut found);
    }
}
