//! Namespaces and mounts for clones: a private mount tree with a fresh /proc, copy-on-write
//! overlays, a hostname, and a loopback-only network.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use snapshot::error::{Context, Error, Result};

/// The network a clone gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Net {
    /// The host's network namespace.
    #[default]
    Host,
    /// A network namespace of its own with only `lo`, up.
    None,
}

/// A directory a clone sees through a private copy-on-write overlay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overlay {
    /// The directory (the overlay's lower layer, and where it is mounted).
    pub dir: PathBuf,
    /// Where the clone's writes go (the upper layer).
    pub upper: PathBuf,
    /// overlayfs's work directory (same filesystem as `upper`).
    pub work: PathBuf,
}

/// Makes every mount of this (new) mount namespace private, so nothing mounted here reaches
/// the host and nothing the host mounts later reaches here.
pub fn make_mounts_private() -> Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the clone's mounts private")
}

/// Mounts a /proc that shows the current PID namespace (call from its PID 1).
pub fn mount_proc() -> Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>)
        .context("mounting the clone's /proc")
}

/// Mounts a devpts instance of the clone's own on /dev/pts (and /dev/ptmx), so that its
/// pseudo-terminals get the numbers they had, whatever the host's are.
pub fn mount_devpts() -> Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        flags,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .context("mounting the clone's /dev/pts")?;
    let ptmx = std::path::Path::new("/dev/ptmx");
    if !ptmx.is_symlink() {
        mount(
            Some("/dev/pts/ptmx"),
            ptmx,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("binding the clone's /dev/ptmx")?;
    }
    Ok(())
}

/// Mounts `overlay.dir` over itself as an overlay whose writes go to `overlay.upper`.
pub fn mount_overlay(overlay: &Overlay) -> Result<()> {
    for d in [&overlay.upper, &overlay.work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        overlay.dir.display(),
        overlay.upper.display(),
        overlay.work.display()
    );
    mount(Some("overlay"), &overlay.dir, Some("overlay"), MsFlags::empty(), Some(options.as_str())).map_err(|e| {
        Error::sys(format!("mounting a copy-on-write overlay on {}", overlay.dir.display()), e).with_remedy(
            "the directory must be on a filesystem overlayfs can use as a lower layer, and dolly's root on one it can write (not overlayfs or NFS)",
        )
    })
}

/// Sets the hostname of this (new) UTS namespace.
pub fn set_hostname(name: &str) -> Result<()> {
    nix::unistd::sethostname(name).context("setting the clone's hostname")
}

/// Brings `lo` up in this (new) network namespace.
pub fn loopback_up() -> Result<()> {
    // SAFETY: a socket we own; ifreq is plain data, its name NUL-terminated; the two ioctls
    // read and write exactly one ifreq.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(Error::io(
                "opening a socket",
                std::io::Error::last_os_error(),
            ));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(Error::io("bringing up lo in the clone's network", err));
        }
    }
    Ok(())
}

/// The inode of a process's namespace of `kind` (`pid`, `mnt`, `net` ...), which names it.
pub fn namespace_id(pid: i32, kind: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(Path::new(&format!("/proc/{pid}/ns/{kind}")))
        .ok()
        .map(|m| m.ino())
}
