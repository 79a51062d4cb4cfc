//! System V shared memory segments: captured with their key, id, owner and mode (their
//! pages like any shared memory object's), made again at the same id (in the clone's own
//! IPC namespace for a clone), and attached again with `shmat` where they were.

use std::fs::File;

use crate::error::{Context, Error, Result};
use crate::image::SysvSegment;
use crate::sys::sysv as sys;

/// The mode bit of a segment marked for removal.
const SHM_DEST: u32 = 0o1000;

/// The segment with id `shmid`, from `/proc/sysvipc/shm`.
pub fn capture(shmid: i32) -> Result<SysvSegment> {
    let table =
        std::fs::read_to_string("/proc/sysvipc/shm").context("reading /proc/sysvipc/shm")?;
    for line in table.lines().skip(1) {
        // key shmid perms size cpid lpid nattch uid gid cuid cgid atime dtime ctime rss swap
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 11 || f[1].parse() != Ok(shmid) {
            continue;
        }
        let num = |i: usize| f[i].parse::<i64>().unwrap_or_default();
        let perms = u32::from_str_radix(f[2], 8).unwrap_or_default();
        return Ok(SysvSegment {
            key: num(0) as i32,
            shmid,
            mode: perms & 0o777,
            removed: perms & SHM_DEST != 0,
            size: num(3) as u64,
            attaches: num(6) as u32,
            uid: num(7) as u32,
            gid: num(8) as u32,
        });
    }
    Err(Error::new(
        crate::ErrorKind::System,
        format!("System V shared memory segment {shmid} is not in /proc/sysvipc/shm"),
    ))
}

/// Makes segment `seg` again at its id (or takes it over if it survived its processes, as
/// segments do, with nobody attached) and returns its memory as a file, to fill.
pub fn make(seg: &SysvSegment) -> Result<File> {
    let id = match sys::stat(seg.shmid) {
        Ok(s) if s.key == seg.key && s.size == seg.size && s.attaches == 0 => seg.shmid,
        Ok(_) => {
            return Err(Error::refused(
                format!("System V shared memory id {} is in use by another segment", seg.shmid),
                "remove it (ipcrm -m ID) if it is a leftover of the original; a clone has an IPC namespace of its own",
            ))
        }
        Err(_) => {
            let id = sys::create_at(seg.shmid, seg.key, seg.size, seg.mode).map_err(|e| {
                Error::refused(
                    format!("cannot make System V shared memory segment {} (key {:#x}) again ({e})", seg.shmid, seg.key),
                    "remove what holds its key (ipcrm -M KEY) if it is a leftover of the original",
                )
            })?;
            if id != seg.shmid {
                let _ = sys::remove(id);
                return Err(Error::new(
                    crate::ErrorKind::System,
                    format!("the kernel gave System V shared memory id {id}, not {}", seg.shmid),
                ));
            }
            id
        }
    };
    sys::set_owner(id, seg.uid, seg.gid, seg.mode)
        .map_err(|e| Error::sys(format!("giving System V segment {id} its owner"), e))?;
    sys::open_memory(id).map_err(|e| Error::sys(format!("opening System V segment {id}"), e))
}

/// Marks the restored segments that had been removed (`IPC_RMID` while attached) removed
/// again, once their processes are attached.
pub fn remove_again(segments: &[&SysvSegment]) {
    for seg in segments.iter().filter(|s| s.removed) {
        let _ = sys::remove(seg.shmid);
    }
}
