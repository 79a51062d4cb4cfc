//! While processes are pre-copied, a thread reads the events of their userfaultfds: which
//! tracked ranges lose their pages (`madvise` drops, `munmap`, `mremap`). The kernel holds
//! the process's call until its event is read, so the thread reads at once; the freeze then
//! looks page by page only at those ranges (and at what was written), not at every page.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{Context, Result};
use crate::sys::uffd;

type Lost = Arc<Mutex<HashMap<i32, Vec<(u64, u64)>>>>;

/// The reading thread. Dropping it stops the thread (do so before the userfaultfds close).
#[derive(Debug)]
pub struct LostPages {
    uffds: Vec<(i32, RawFd)>,
    wake: Arc<EventFd>,
    lost: Lost,
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
        let lost: Lost = Arc::default();
        let thread = {
            let (uffds, wake, lost) = (uffds.clone(), wake.clone(), lost.clone());
            std::thread::Builder::new()
                .name("dolly-uffd-events".into())
                .spawn(move || read_events(&uffds, &wake, &lost))
                .context("starting a thread")?
        };
        Ok(LostPages {
            uffds,
            wake,
            lost,
            thread: Some(thread),
        })
    }

    /// Every range reported so far, by PID, pending events included. (With the processes
    /// stopped none is pending: a process waiting for its event to be read cannot stop
    /// before it is.)
    pub fn take(&self) -> HashMap<i32, Vec<(u64, u64)>> {
        // The thread reads only while it holds the lock, so what it read is recorded.
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        drain(&self.uffds, &mut lost);
        std::mem::take(&mut *lost)
    }
}

impl Drop for LostPages {
    fn drop(&mut self) {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(STOP, Vec::new());
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The key that tells the thread to end.
const STOP: i32 = -1;

/// Reads every pending event of `uffds` into `lost`.
fn drain(uffds: &[(i32, RawFd)], lost: &mut HashMap<i32, Vec<(u64, u64)>>) {
    for &(pid, fd) in uffds {
        // SAFETY: the owner keeps the fd open while a `LostPages` lives (see `start`).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(ranges) = uffd::read_lost(&fd) {
            if !ranges.is_empty() {
                lost.entry(pid).or_default().extend(ranges);
            }
        }
    }
}

fn read_events(
    uffds: &[(i32, RawFd)],
    wake: &EventFd,
    lost: &Mutex<HashMap<i32, Vec<(u64, u64)>>>,
) {
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
        let mut lost = lost.lock().unwrap_or_else(|e| e.into_inner());
        if lost.contains_key(&STOP) {
            return;
        }
        drain(uffds, &mut lost);
    }
}
