//! System V shared memory calls.

use std::fs::File;

use nix::errno::Errno;

use super::check;

/// What `IPC_STAT` tells of a segment.
#[derive(Debug, Clone, Copy)]
pub struct ShmStat {
    /// Its key.
    pub key: i32,
    /// Its size in bytes.
    pub size: u64,
    /// How many attaches it has.
    pub attaches: u64,
}

/// `shmctl(IPC_STAT)`.
pub fn stat(id: i32) -> Result<ShmStat, Errno> {
    // SAFETY: shmid_ds is plain data the kernel fills.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds.
    check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } as libc::c_long)?;
    Ok(ShmStat {
        key: ds.shm_perm.__key,
        size: ds.shm_segsz as u64,
        attaches: ds.shm_nattch as u64,
    })
}

/// Creates a segment that the kernel numbers `id` (through `kernel.shm_next_id`).
pub fn create_at(id: i32, key: i32, size: u64, mode: u32) -> Result<i32, Errno> {
    std::fs::write("/proc/sys/kernel/shm_next_id", id.to_string())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: shmget takes integers.
    let got = check(unsafe { libc::shmget(key, size as usize, flags) } as libc::c_long);
    // Unused, the next id would surprise the next shmget of this namespace.
    let _ = std::fs::write("/proc/sys/kernel/shm_next_id", "-1");
    got.map(|id| id as i32)
}

/// `shmctl(IPC_SET)`: owner, group and permissions.
pub fn set_owner(id: i32, uid: u32, gid: u32, mode: u32) -> Result<(), Errno> {
    // SAFETY: shmid_ds is plain data.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds.
    check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } as libc::c_long)?;
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = (mode & 0o777) as _;
    // SAFETY: IPC_SET reads one shmid_ds.
    check(unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) } as libc::c_long).map(drop)
}

/// `shmctl(IPC_RMID)`.
pub fn remove(id: i32) -> Result<(), Errno> {
    // SAFETY: IPC_RMID takes no buffer.
    check(unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } as libc::c_long)
        .map(drop)
}

/// The segment's memory as a file (attached for a moment to find it).
pub fn open_memory(id: i32) -> Result<File, Errno> {
    // SAFETY: shmat maps the segment anywhere; detached below.
    let addr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if addr as isize == -1 {
        return Err(Errno::last());
    }
    let size = stat(id)?.size;
    let start = addr as u64;
    let end = start + super::page_ceil(size.max(1));
    let file = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/map_files/{start:x}-{end:x}"))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
    // SAFETY: `addr` is the attach made above.
    unsafe { libc::shmdt(addr) };
    file
}
