//! Unix sockets. Captured through a copy of the process's fd (`pidfd_getfd`: the same
//! socket) and sock_diag (peers, pending connections, shutdown); their queues are read with
//! `MSG_PEEK`, which leaves them in place. A restore makes them anew: listeners bound and
//! listening, connections remade through their listener when it is in the snapshot (so
//! both ends have their names) or as socket pairs, pending connections made again, queues
//! refilled from the peer, shutdowns and options applied.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{self as sock, sockopt, MsgFlags, UnixAddr};
use nix::unistd::Pid;

use super::tree::TreeView;
use crate::error::{Context, Error, Result};
use crate::image::{
    Bytes, File, FileKind, SocketFile, SocketType, UnixAddress, UnixPeer, UnixSocket,
};
use crate::sys::diag;
use crate::sys::socket as sys;

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
const SHUTDOWN_MASK: u8 = 3;

/// The listener of the tree whose backlog holds `client`'s connection.
fn listener_of(tree: &TreeView, client: u64) -> Result<Option<u64>> {
    Ok(tree
        .unix_sockets()?
        .iter()
        .find(|(_, d)| d.state == TCP_LISTEN && d.pending.contains(&(client as u32)))
        .map(|(&ino, _)| ino))
}
fn address_of(addr: &UnixAddr) -> Option<UnixAddress> {
    if let Some(path) = addr.path() {
        Some(UnixAddress::Path(path.to_string_lossy().into_owned()))
    } else {
        addr.as_abstract()
            .map(|n| UnixAddress::Abstract(Bytes(n.to_vec())))
    }
}

/// The kind of a socket of another family, for refusals.
fn family_name(domain: i32) -> String {
    match domain {
        libc::AF_INET => "an IPv4 socket".into(),
        libc::AF_INET6 => "an IPv6 socket".into(),
        libc::AF_NETLINK => "a netlink socket".into(),
        libc::AF_PACKET => "a packet socket".into(),
        d => format!("a socket of address family {d}"),
    }
}

/// Captures socket `fd` (inode `ino`) of process `pid`: its state, and the bytes waiting in
/// its receive queue. Refuses what a restore could not make again.
pub fn capture(
    pid: Pid,
    fd: i32,
    ino: u64,
    tree: &TreeView,
    tcp_established: bool,
) -> Result<(FileKind, Vec<u8>)> {
    let s = sys::borrow_fd(pid, fd)
        .map_err(|e| Error::sys(format!("borrowing fd {fd} of process {pid}"), e))?;
    let domain = sys::domain(&s).map_err(|e| Error::sys("reading a socket's family", e))?;
    match domain {
        libc::AF_UNIX => {
            capture_unix(pid, fd, ino, &s, tree).map(|(u, data)| (FileKind::UnixSocket(u), data))
        }
        libc::AF_INET | libc::AF_INET6 => {
            super::inet::capture(pid, fd, ino, &s, domain, tcp_established, tree)
                .map(|(i, data)| (FileKind::InetSocket(i), data))
        }
        _ => Err(Error::refused(
            format!(
                "process {pid} has fd {fd}, {}: not supported yet",
                family_name(domain)
            ),
            "close it before capturing",
        )),
    }
}

fn capture_unix(
    pid: Pid,
    fd: i32,
    ino: u64,
    s: &OwnedFd,
    tree: &TreeView,
) -> Result<(UnixSocket, Vec<u8>)> {
    let refuse = |what: String, remedy: &str| {
        Error::refused(
            format!("process {pid} has fd {fd}, {what}: not supported yet"),
            remedy,
        )
    };
    let d = match tree.unix_sockets()?.get(&ino) {
        Some(d) => d.clone(),
        None => diag::unix_socket(ino as u32)?.ok_or_else(|| {
            Error::new(
                crate::ErrorKind::System,
                format!("the kernel does not know unix socket {ino} (fd {fd} of process {pid})"),
            )
        })?,
    };
    let socket_type = match d.kind as i32 {
        libc::SOCK_STREAM => SocketType::Stream,
        libc::SOCK_DGRAM => SocketType::Dgram,
        libc::SOCK_SEQPACKET => SocketType::Seqpacket,
        k => {
            return Err(refuse(
                format!("a unix socket of type {k}"),
                "close it before capturing",
            ))
        }
    };
    let name: UnixAddr =
        sock::getsockname(s.as_raw_fd()).map_err(|e| Error::sys("reading a socket's name", e))?;
    let address = address_of(&name);
    if let Some(UnixAddress::Path(p)) = &address {
        if !p.starts_with('/') {
            return Err(refuse(
                format!("a unix socket bound to the relative path {p:?}"),
                "bind it to an absolute path",
            ));
        }
    }
    let listening = d.state == TCP_LISTEN;
    let connected_kind = socket_type != SocketType::Dgram;
    let peer = if listening {
        UnixPeer::None
    } else if d.peer != 0 {
        let inode = d.peer as u64;
        if tree.unix_sockets()?.contains_key(&inode) {
            UnixPeer::Socket { inode }
        } else {
            let peer_name: Option<UnixAddress> = sock::getpeername::<UnixAddr>(s.as_raw_fd())
                .ok()
                .and_then(|a| address_of(&a));
            match peer_name {
                Some(address) if !connected_kind => UnixPeer::Address { address },
                _ => {
                    let link = format!("socket:[{inode}]");
                    let who = super::files::holder_outside(pid, &link, &tree.pids)
                        .map(|(p, comm)| format!("process {p} ({comm})"))
                        .unwrap_or_else(|| "a process outside the tree".into());
                    return Err(Error::refused(
                        format!("process {pid} has fd {fd}, a unix socket connected to {who}, outside the captured tree: not supported yet"),
                        "capture the tree that holds both ends (their common ancestor)",
                    ));
                }
            }
        }
    } else if d.state == TCP_ESTABLISHED && connected_kind {
        if d.shutdown == SHUTDOWN_MASK {
            UnixPeer::Closed
        } else if let Some(listener) = listener_of(tree, ino)? {
            if d.wqueue > 0 {
                return Err(refuse(
                    "a unix socket that sent data over a connection its server has not accepted yet".into(),
                    "capture once the server has accepted the connection",
                ));
            }
            UnixPeer::Pending { listener }
        } else {
            let server = sock::getpeername::<UnixAddr>(s.as_raw_fd())
                .ok()
                .and_then(|a| address_of(&a))
                .map_or_else(|| "a server".to_string(), |a| a.to_string());
            return Err(Error::refused(
                format!("process {pid} has fd {fd}, a unix socket whose connection to {server}, outside the captured tree, is not accepted yet: not supported yet"),
                "capture once the server has accepted it, or capture the server with it",
            ));
        }
    } else {
        UnixPeer::None
    };
    let accepted = connected_kind && d.state == TCP_ESTABLISHED && address.is_some();
    let file = match (&address, d.vfs) {
        (Some(UnixAddress::Path(p)), Some((_, vfs_ino))) if !accepted => {
            std::fs::symlink_metadata(p).ok().and_then(|m| {
                (m.file_type().is_socket() && m.ino() == vfs_ino as u64).then(|| SocketFile {
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                })
            })
        }
        _ => None,
    };
    let pending: Vec<u64> = if listening {
        let diags = tree.unix_sockets()?;
        // Connections from outside the tree are not the tree's: their clients keep them
        // with the original.
        d.pending
            .iter()
            .map(|&c| c as u64)
            .filter(|c| diags.contains_key(c))
            .collect()
    } else {
        Vec::new()
    };
    let option =
        |what: &str, e| Error::sys(format!("reading {what} of fd {fd} of process {pid}"), e);
    let peek_off = sys::peek_offset(s).map_err(|e| option("SO_PEEK_OFF", e))?;
    let (queue, data) = if listening {
        (Vec::new(), Vec::new())
    } else {
        peek_queue(s, socket_type, peek_off).map_err(|e| match e {
            PeekError::Fds => refuse(
                "a unix socket with fds in flight (SCM_RIGHTS) in its queue".into(),
                "capture once the process has read them",
            ),
            PeekError::Sys(e) => {
                Error::sys(format!("reading the queue of fd {fd} of process {pid}"), e)
            }
        })?
    };
    Ok((
        UnixSocket {
            socket_type,
            address,
            accepted,
            file,
            backlog: listening.then_some(d.backlog_or_rqueue),
            pending,
            peer,
            shutdown: d.shutdown,
            pass_cred: sock::getsockopt(s, sockopt::PassCred)
                .map_err(|e| option("SO_PASSCRED", e))?,
            pass_sec: sys::pass_sec(s).map_err(|e| option("SO_PASSSEC", e))?,
            rcvbuf: sock::getsockopt(s, sockopt::RcvBuf).map_err(|e| option("SO_RCVBUF", e))?
                as u32,
            sndbuf: sock::getsockopt(s, sockopt::SndBuf).map_err(|e| option("SO_SNDBUF", e))?
                as u32,
            peek_off,
            queue,
        },
        data,
    ))
}

enum PeekError {
    Fds,
    Sys(nix::errno::Errno),
}

/// Reads a socket's receive queue without taking anything from it: the message lengths
/// (one for a stream) and their bytes. Leaves `SO_PEEK_OFF` as it was (`peek_off`).
fn peek_queue(
    s: &OwnedFd,
    kind: SocketType,
    peek_off: i32,
) -> std::result::Result<(Vec<u32>, Vec<u8>), PeekError> {
    sys::set_peek_offset(s, 0).map_err(PeekError::Sys)?;
    let result = (|| {
        let (mut lengths, mut data) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 1 << 18];
        loop {
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 253]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = match sock::recvmsg::<()>(
                s.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(PeekError::Sys(e)),
            };
            let mut fds_in_flight = false;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let sock::ControlMessageOwned::ScmRights(fds) = c {
                        fds_in_flight = true;
                        for fd in fds {
                            let _ = nix::unistd::close(fd);
                        }
                    }
                }
            }
            if fds_in_flight {
                return Err(PeekError::Fds);
            }
            let n = msg.bytes;
            if n == 0 && kind != SocketType::Dgram {
                break; // end of file
            }
            lengths.push(n as u32);
            data.extend_from_slice(&buf[..n]);
        }
        if kind == SocketType::Stream && !lengths.is_empty() {
            lengths = vec![data.len() as u32];
        }
        Ok((lengths, data))
    })();
    let reset = sys::set_peek_offset(s, peek_off).map_err(PeekError::Sys);
    let out = result?;
    reset?;
    Ok(out)
}

/// The restore side: every unix socket of a snapshot made at once, since they are made
/// together (pairs, listeners and their connections).
struct Maker<'a> {
    files: &'a [File],
    pool_dir: &'a Path,
    /// Index of each unix socket's file, by inode.
    by_inode: HashMap<u64, u32>,
    made: HashMap<u32, OwnedFd>,
    /// Made for filling a socket's queue and shutting it, then closed: the peer of a socket
    /// whose peer had closed.
    ghosts: HashMap<u32, OwnedFd>,
}

fn sock_type(t: SocketType) -> sock::SockType {
    match t {
        SocketType::Stream => sock::SockType::Stream,
        SocketType::Dgram => sock::SockType::Datagram,
        SocketType::Seqpacket => sock::SockType::SeqPacket,
    }
}

fn unix_addr(a: &UnixAddress) -> Result<UnixAddr> {
    match a {
        UnixAddress::Path(p) => UnixAddr::new(p.as_str()),
        UnixAddress::Abstract(name) => UnixAddr::new_abstract(&name.0),
    }
    .map_err(|e| Error::sys(format!("making the address {a}"), e))
}

impl Maker<'_> {
    fn socket(&self, index: u32) -> &UnixSocket {
        match &self.files[index as usize].kind {
            FileKind::UnixSocket(s) => s,
            _ => unreachable!("indexed as a socket"),
        }
    }

    fn new_socket(&self, kind: SocketType) -> Result<OwnedFd> {
        sock::socket(
            sock::AddressFamily::Unix,
            sock_type(kind),
            sock::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| Error::sys("making a unix socket", e))
    }

    /// Gives a new socket its buffer sizes and credential options (before any data).
    fn set_options(&self, fd: &OwnedFd, s: &UnixSocket) -> Result<()> {
        let fail = |what: &str, e| Error::sys(format!("setting {what} of a unix socket"), e);
        // The kernel doubles what it is given; the force variants pass the sysctl limits.
        let (rcv, snd) = ((s.rcvbuf / 2) as usize, (s.sndbuf / 2) as usize);
        if sock::setsockopt(fd, sockopt::RcvBufForce, &rcv).is_err() {
            sock::setsockopt(fd, sockopt::RcvBuf, &rcv).map_err(|e| fail("SO_RCVBUF", e))?;
        }
        if sock::setsockopt(fd, sockopt::SndBufForce, &snd).is_err() {
            sock::setsockopt(fd, sockopt::SndBuf, &snd).map_err(|e| fail("SO_SNDBUF", e))?;
        }
        sock::setsockopt(fd, sockopt::PassCred, &s.pass_cred)
            .map_err(|e| fail("SO_PASSCRED", e))?;
        sys::set_pass_sec(fd, s.pass_sec).map_err(|e| fail("SO_PASSSEC", e))?;
        Ok(())
    }

    /// Binds a socket to its captured address. A socket file left at the path by a process
    /// that is gone is removed first; one that a running process listens on is refused.
    fn bind(&self, fd: &OwnedFd, s: &UnixSocket) -> Result<()> {
        let Some(address) = &s.address else {
            return Ok(());
        };
        let addr = unix_addr(address)?;
        let mut result = sock::bind(fd.as_raw_fd(), &addr);
        if result == Err(Errno::EADDRINUSE) {
            if let UnixAddress::Path(p) = address {
                let stale = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
                    && self.new_socket(s.socket_type).ok().is_some_and(|probe| {
                        sock::connect(probe.as_raw_fd(), &addr) == Err(Errno::ECONNREFUSED)
                    });
                if stale {
                    let _ = std::fs::remove_file(p);
                    result = sock::bind(fd.as_raw_fd(), &addr);
                }
            }
        }
        match result {
            Ok(()) => {}
            Err(Errno::EADDRINUSE) => {
                let remedy = match address {
                    UnixAddress::Path(_) => "stop the process that uses it (the original?) first; a clone beside the original needs --overlay over the socket's directory",
                    UnixAddress::Abstract(_) => "stop the process that uses it (the original?) first; a clone beside the original needs --net none",
                };
                return Err(Error::refused(
                    format!("the unix socket address {address} is in use"),
                    remedy,
                ));
            }
            Err(e) => return Err(Error::sys(format!("binding a unix socket to {address}"), e)),
        }
        if let UnixAddress::Path(p) = address {
            match &s.file {
                Some(f) => {
                    nix::unistd::chown(p.as_str(), Some(f.uid.into()), Some(f.gid.into()))
                        .map_err(|e| Error::sys(format!("giving {p} its owner"), e))?;
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(f.mode))
                        .with_context(|| format!("giving {p} its mode"))?;
                }
                // It had been unlinked after the bind.
                None => {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok(())
    }

    fn listeners(&mut self) -> Result<()> {
        for (&_, &index) in &self.by_inode.clone() {
            let s = self.socket(index);
            let Some(backlog) = s.backlog else { continue };
            let fd = self.new_socket(s.socket_type)?;
            self.set_options(&fd, s)?;
            self.bind(&fd, s)?;
            let backlog = sock::Backlog::new(backlog.min(libc::SOMAXCONN as u32) as i32)
                .unwrap_or(sock::Backlog::MAXCONN);
            sock::listen(&fd, backlog).map_err(|e| Error::sys("listening on a unix socket", e))?;
            self.made.insert(index, fd);
        }
        Ok(())
    }

    /// The listener of the snapshot bound to `address`.
    fn listener_at(&self, address: &UnixAddress) -> Option<u32> {
        self.by_inode.values().copied().find(|&i| {
            let s = self.socket(i);
            s.backlog.is_some() && s.address.as_ref() == Some(address)
        })
    }

    /// Connected pairs of the snapshot: through their listener when it is there (so both
    /// ends keep their names), else as a socket pair.
    fn pairs(&mut self) -> Result<()> {
        let mut indexes: Vec<u32> = self.by_inode.values().copied().collect();
        indexes.sort_unstable();
        for index in indexes {
            if self.made.contains_key(&index) {
                continue;
            }
            let s = self.socket(index).clone();
            let other = match &s.peer {
                UnixPeer::Socket { inode } => match self.by_inode.get(inode) {
                    Some(&o) if matches!(&self.socket(o).peer, UnixPeer::Socket { inode } if self.files[index as usize].inode == *inode) => {
                        Some(o)
                    }
                    _ => continue, // one-way (a datagram socket connected to a named one)
                },
                UnixPeer::Closed => None,
                _ => continue,
            };
            let (a, b) = match other {
                Some(o) => {
                    let t = self.socket(o).clone();
                    // `a` the accepted end, `b` the client, when their listener is here.
                    let via = |acc: &UnixSocket| {
                        acc.accepted
                            .then(|| acc.address.as_ref().and_then(|x| self.listener_at(x)))
                            .flatten()
                    };
                    if let Some(l) = via(&s) {
                        let (acc, cli) = self.connect_through(l, &s, &t)?;
                        self.made.insert(index, acc);
                        self.made.insert(o, cli);
                        continue;
                    }
                    if let Some(l) = via(&t) {
                        let (acc, cli) = self.connect_through(l, &t, &s)?;
                        self.made.insert(o, acc);
                        self.made.insert(index, cli);
                        continue;
                    }
                    let (a, b) = self.pair(&s, &t)?;
                    if !s.accepted {
                        self.bind(&a, &s)?;
                    }
                    if !t.accepted {
                        self.bind(&b, &t)?;
                    }
                    self.made.insert(o, b);
                    (a, None)
                }
                None => {
                    let (a, ghost) = self.pair(&s, &s)?;
                    if !s.accepted {
                        self.bind(&a, &s)?;
                    }
                    (a, Some(ghost))
                }
            };
            self.made.insert(index, a);
            if let Some(g) = b {
                self.ghosts.insert(index, g);
            }
        }
        Ok(())
    }

    fn pair(&self, s: &UnixSocket, t: &UnixSocket) -> Result<(OwnedFd, OwnedFd)> {
        let (a, b) = sock::socketpair(
            sock::AddressFamily::Unix,
            sock_type(s.socket_type),
            None,
            sock::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::sys("making a unix socket pair", e))?;
        self.set_options(&a, s)?;
        self.set_options(&b, t)?;
        Ok((a, b))
    }

    /// Connects a new client to listener `l` and accepts it: `(accepted end, client)`.
    fn connect_through(
        &self,
        l: u32,
        acc: &UnixSocket,
        cli: &UnixSocket,
    ) -> Result<(OwnedFd, OwnedFd)> {
        let listener = &self.made[&l];
        let address = self.socket(l).address.clone().expect("a bound listener");
        let client = self.new_socket(cli.socket_type)?;
        self.set_options(&client, cli)?;
        if cli.address.is_some() && !cli.accepted {
            self.bind(&client, cli)?;
        }
        sock::connect(client.as_raw_fd(), &unix_addr(&address)?)
            .map_err(|e| Error::sys(format!("connecting to {address}"), e))?;
        let accepted = sock::accept4(listener, sock::SockFlag::SOCK_CLOEXEC)
            .map_err(|e| Error::sys(format!("accepting on {address}"), e))?;
        self.set_options(&accepted, acc)?;
        Ok((accepted, client))
    }

    /// Sockets neither listening nor paired: made, bound, then connected where they were.
    fn singles(&mut self) -> Result<()> {
        let mut indexes: Vec<u32> = self.by_inode.values().copied().collect();
        indexes.sort_unstable();
        for &index in &indexes {
            if self.made.contains_key(&index) {
                continue;
            }
            let s = self.socket(index).clone();
            let fd = self.new_socket(s.socket_type)?;
            self.set_options(&fd, &s)?;
            if !s.accepted {
                self.bind(&fd, &s)?;
            }
            self.made.insert(index, fd);
        }
        // Pending connections, in each listener's backlog order; one-way connections.
        for &index in &indexes {
            let s = self.socket(index);
            if let Some(_backlog) = s.backlog {
                for client in &s.pending {
                    let c = self.by_inode[client];
                    let address = s.address.clone().expect("a bound listener");
                    sock::connect(self.made[&c].as_raw_fd(), &unix_addr(&address)?)
                        .map_err(|e| Error::sys(format!("connecting again to {address}"), e))?;
                }
                continue;
            }
            let target = match &s.peer {
                UnixPeer::Socket { inode } if !self.is_mutual(index, *inode) => {
                    let peer = self.socket(self.by_inode[inode]);
                    peer.address.clone().ok_or_else(|| {
                        Error::corrupt(
                            "a datagram socket is connected to an unnamed one",
                            "the snapshot is damaged: capture again",
                        )
                    })?
                }
                UnixPeer::Address { address } => address.clone(),
                _ => continue,
            };
            sock::connect(self.made[&index].as_raw_fd(), &unix_addr(&target)?).map_err(|e| {
                Error::refused(
                    format!("cannot connect a datagram socket to {target} again ({e})"),
                    "start the service that listens there, or capture again",
                )
            })?;
        }
        Ok(())
    }

    fn is_mutual(&self, index: u32, peer: u64) -> bool {
        self.by_inode.get(&peer).is_some_and(|&o| {
            matches!(&self.socket(o).peer, UnixPeer::Socket { inode } if *inode == self.files[index as usize].inode)
        })
    }

    /// Refills every queue from the socket's peer (or a helper socket for datagrams sent by
    /// others), then applies shutdowns and peek offsets and closes the helpers.
    fn queues(&mut self) -> Result<()> {
        let mut indexes: Vec<u32> = self.by_inode.values().copied().collect();
        indexes.sort_unstable();
        for &index in &indexes {
            let s = self.socket(index).clone();
            if s.queue.is_empty() {
                continue;
            }
            let file = &self.files[index as usize];
            let content = file.content.as_deref().ok_or_else(|| {
                Error::corrupt(
                    format!("unix socket {} has a queue but no saved data", file.path),
                    "the snapshot is damaged: capture again",
                )
            })?;
            let data = std::fs::read(self.pool_dir.join(content)).map_err(|e| {
                Error::corrupt(
                    format!(
                        "saved queue {content} of unix socket {} is missing ({e})",
                        file.path
                    ),
                    "the snapshot is damaged: capture again",
                )
            })?;
            let sender: Option<&OwnedFd> = match &s.peer {
                UnixPeer::Socket { inode } if self.is_mutual(index, *inode) => {
                    Some(&self.made[&self.by_inode[inode]])
                }
                UnixPeer::Closed => self.ghosts.get(&index),
                _ => None,
            };
            let helper;
            let (from, to) = match sender {
                Some(fd) => (fd, None),
                None if s.socket_type == SocketType::Dgram && s.address.is_some() => {
                    helper = self.new_socket(SocketType::Dgram)?;
                    (&helper, s.address.as_ref().map(unix_addr).transpose()?)
                }
                None => {
                    return Err(Error::corrupt(
                        format!(
                            "unix socket {} has a queue but nothing can send to it",
                            file.path
                        ),
                        "the snapshot is damaged: capture again",
                    ))
                }
            };
            let mut at = 0usize;
            for &len in &s.queue {
                let msg = data.get(at..at + len as usize).ok_or_else(|| {
                    Error::corrupt(
                        format!("the saved queue of unix socket {} is short", file.path),
                        "the snapshot is damaged: capture again",
                    )
                })?;
                at += len as usize;
                send_all(from, msg, to.as_ref(), s.socket_type)
                    .with_context(|| format!("refilling the queue of unix socket {}", file.path))?;
            }
        }
        for &index in &indexes {
            let s = self.socket(index);
            let fd = &self.made[&index];
            if s.shutdown & 2 != 0 {
                let _ = sock::shutdown(fd.as_raw_fd(), sock::Shutdown::Write);
            }
            if s.shutdown & 1 != 0 && !matches!(s.peer, UnixPeer::Closed) {
                let _ = sock::shutdown(fd.as_raw_fd(), sock::Shutdown::Read);
            }
            sys::set_peek_offset(fd, s.peek_off)
                .map_err(|e| Error::sys("setting SO_PEEK_OFF of a unix socket", e))?;
        }
        self.ghosts.clear();
        Ok(())
    }
}

fn send_all(from: &OwnedFd, msg: &[u8], to: Option<&UnixAddr>, kind: SocketType) -> Result<()> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let mut sent = 0;
    loop {
        let n = match to {
            Some(addr) => sock::sendto(from.as_raw_fd(), &msg[sent..], addr, flags),
            None => sock::send(from.as_raw_fd(), &msg[sent..], flags),
        }
        .map_err(|e| Error::sys("sending queued data", e))?;
        sent += n;
        // A message goes whole; a stream may take several writes.
        if kind != SocketType::Stream || sent == msg.len() {
            return Ok(());
        }
    }
}

/// Makes every unix socket of a snapshot: returns them by file index.
pub fn make(files: &[File], pool_dir: &Path) -> Result<HashMap<u32, OwnedFd>> {
    let by_inode = files
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.kind, FileKind::UnixSocket(_)))
        .map(|(i, f)| (f.inode, i as u32))
        .collect();
    let mut maker = Maker {
        files,
        pool_dir,
        by_inode,
        made: HashMap::new(),
        ghosts: HashMap::new(),
    };
    maker.listeners()?;
    maker.pairs()?;
    maker.singles()?;
    maker.queues()?;
    Ok(maker.made)
}
