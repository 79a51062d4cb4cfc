//! IPv4 and IPv6 sockets that hold no connection: TCP listeners, bound or unbound sockets,
//! connected UDP sockets. Captured through a copy of the process's fd and sock_diag; made
//! anew at restore (in the clone's network namespace for a clone with `--net none`).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{self as sock, sockopt, SockaddrStorage};
use nix::unistd::Pid;

use super::tree::TreeView;
use crate::error::{Error, Result};
use crate::image::{InetProtocol, InetSocket};
use crate::sys::diag;
use crate::sys::socket as sys;

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

fn state_name(state: u8) -> &'static str {
    match state {
        1 => "established",
        2 => "connecting (SYN sent)",
        3 => "being accepted (SYN received)",
        4..=6 | 8 | 9 | 11 => "closing",
        12 => "a new SYN received",
        _ => "in an unknown state",
    }
}

/// Captures IPv4/IPv6 socket `fd` (inode `ino`, a copy of it in `s`) of process `pid`, and
/// the bytes queued in it (an established TCP connection's, with `tcp_established`).
pub fn capture(
    pid: Pid,
    fd: i32,
    ino: u64,
    s: &OwnedFd,
    domain: i32,
    tcp_established: bool,
    tree: &TreeView,
) -> Result<(InetSocket, Vec<u8>)> {
    let option =
        |what: &str, e| Error::sys(format!("reading {what} of fd {fd} of process {pid}"), e);
    let ty = sock::getsockopt(s, sockopt::SockType).map_err(|e| option("SO_TYPE", e))?;
    let protocol = match ty {
        sock::SockType::Stream => InetProtocol::Tcp,
        sock::SockType::Datagram => InetProtocol::Udp,
        _ => {
            return Err(Error::refused(
                format!("process {pid} has fd {fd}, a raw or other non-TCP/UDP internet socket: not supported yet"),
                "close it before capturing",
            ))
        }
    };
    let ipv6 = domain == libc::AF_INET6;
    let proto = match protocol {
        InetProtocol::Tcp => libc::IPPROTO_TCP,
        InetProtocol::Udp => libc::IPPROTO_UDP,
    };
    let d = diag::inet_socket(domain as u8, proto as u8, ino as u32)?;
    let local: Option<SocketAddr> = sock::getsockname::<SockaddrStorage>(s.as_raw_fd())
        .ok()
        .and_then(|a| std_addr(&a))
        .filter(|a| a.port() != 0);
    let mut established = None;
    let (backlog, peer) = match (protocol, d.as_ref().map(|d| d.state)) {
        (InetProtocol::Tcp, Some(TCP_LISTEN)) => (d.as_ref().map(|d| d.send_queue), None),
        (InetProtocol::Tcp, None | Some(TCP_CLOSE)) => (None, None),
        (InetProtocol::Tcp, Some(TCP_ESTABLISHED)) => {
            let d = d.as_ref().expect("matched Some");
            if !tcp_established {
                return Err(Error::refused(
                    format!("process {pid} has fd {fd}, a TCP connection from {} to {}", d.local, d.remote),
                    "pass --tcp-established to capture the tree's TCP connections (both ends must be in the tree), or capture when it holds none",
                ));
            }
            let peer_inode = diag::inet_sockets(domain as u8, proto as u8)?
                .into_iter()
                .find(|(_, p)| p.local == d.remote && p.remote == d.local)
                .map(|(i, _)| i as u64);
            if !peer_inode.is_some_and(|i| tree.holds_socket(i).unwrap_or(false)) {
                return Err(Error::refused(
                    format!("process {pid} has fd {fd}, a TCP connection from {} to {}, whose other end is outside the captured tree: not supported yet", d.local, d.remote),
                    "capture the tree that holds both ends",
                ));
            }
            established = Some(super::tcp::capture(s, d.remote).map_err(|e| {
                Error::sys(
                    format!(
                        "reading TCP connection {} -> {} in repair mode",
                        d.local, d.remote
                    ),
                    e,
                )
            })?);
            (None, None)
        }
        (InetProtocol::Tcp, Some(state)) => {
            let d = d.as_ref().expect("matched Some");
            return Err(Error::refused(
                format!(
                    "process {pid} has fd {fd}, a TCP connection from {} to {} ({}): not supported yet",
                    d.local,
                    d.remote,
                    state_name(state)
                ),
                "capture when the process holds no TCP connection",
            ));
        }
        (InetProtocol::Udp, state) => {
            if let Some(d) = d.as_ref().filter(|d| d.recv_queue > 0) {
                return Err(Error::refused(
                    format!("process {pid} has fd {fd}, a UDP socket on {} with datagrams waiting to be read: not supported yet", d.local),
                    "capture once the process has read them",
                ));
            }
            let peer = (state == Some(TCP_ESTABLISHED))
                .then(|| sock::getpeername::<SockaddrStorage>(s.as_raw_fd()).ok())
                .flatten()
                .and_then(|a| std_addr(&a));
            (None, peer)
        }
    };
    let device = sock::getsockopt(s, sockopt::BindToDevice)
        .map_err(|e| option("SO_BINDTODEVICE", e))?
        .to_string_lossy()
        .into_owned();
    let (connection, data) = match established {
        Some((c, data)) => (Some(c), data),
        None => (None, Vec::new()),
    };
    let socket = InetSocket {
        ipv6,
        protocol,
        local,
        backlog,
        peer,
        reuse_addr: sock::getsockopt(s, sockopt::ReuseAddr)
            .map_err(|e| option("SO_REUSEADDR", e))?,
        reuse_port: sock::getsockopt(s, sockopt::ReusePort)
            .map_err(|e| option("SO_REUSEPORT", e))?,
        v6_only: ipv6
            && sock::getsockopt(s, sockopt::Ipv6V6Only).map_err(|e| option("IPV6_V6ONLY", e))?,
        no_delay: protocol == InetProtocol::Tcp
            && sock::getsockopt(s, sockopt::TcpNoDelay).map_err(|e| option("TCP_NODELAY", e))?,
        keep_alive: sock::getsockopt(s, sockopt::KeepAlive)
            .map_err(|e| option("SO_KEEPALIVE", e))?,
        broadcast: sock::getsockopt(s, sockopt::Broadcast)
            .map_err(|e| option("SO_BROADCAST", e))?,
        device: (!device.is_empty()).then_some(device),
        rcvbuf: sock::getsockopt(s, sockopt::RcvBuf).map_err(|e| option("SO_RCVBUF", e))? as u32,
        sndbuf: sock::getsockopt(s, sockopt::SndBuf).map_err(|e| option("SO_SNDBUF", e))? as u32,
        connection,
    };
    Ok((socket, data))
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Some(SocketAddr::V4(std::net::SocketAddrV4::new(
            v4.ip(),
            v4.port(),
        )))
    } else {
        a.as_sockaddr_in6().map(|v6| {
            SocketAddr::V6(std::net::SocketAddrV6::new(
                v6.ip(),
                v6.port(),
                v6.flowinfo(),
                v6.scope_id(),
            ))
        })
    }
}

/// Makes an internet socket anew, bound, listening or connected as it was. A port left
/// taken only by connections of a process that is gone (`TIME_WAIT`) is taken over; one a
/// running process listens on is refused.
pub fn make(s: &InetSocket, data: &[u8]) -> Result<OwnedFd> {
    let family = if s.ipv6 {
        sock::AddressFamily::Inet6
    } else {
        sock::AddressFamily::Inet
    };
    let ty = match s.protocol {
        InetProtocol::Tcp => sock::SockType::Stream,
        InetProtocol::Udp => sock::SockType::Datagram,
    };
    let fd = sock::socket(family, ty, sock::SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| Error::sys("making an internet socket", e))?;
    let fail = |what: &str, e| Error::sys(format!("setting {what} of an internet socket"), e);
    sock::setsockopt(&fd, sockopt::ReuseAddr, &s.reuse_addr)
        .map_err(|e| fail("SO_REUSEADDR", e))?;
    sock::setsockopt(&fd, sockopt::ReusePort, &s.reuse_port)
        .map_err(|e| fail("SO_REUSEPORT", e))?;
    if s.ipv6 {
        sock::setsockopt(&fd, sockopt::Ipv6V6Only, &s.v6_only)
            .map_err(|e| fail("IPV6_V6ONLY", e))?;
    }
    if s.protocol == InetProtocol::Tcp {
        sock::setsockopt(&fd, sockopt::TcpNoDelay, &s.no_delay)
            .map_err(|e| fail("TCP_NODELAY", e))?;
    }
    sock::setsockopt(&fd, sockopt::KeepAlive, &s.keep_alive)
        .map_err(|e| fail("SO_KEEPALIVE", e))?;
    sock::setsockopt(&fd, sockopt::Broadcast, &s.broadcast).map_err(|e| fail("SO_BROADCAST", e))?;
    let (rcv, snd) = ((s.rcvbuf / 2) as usize, (s.sndbuf / 2) as usize);
    if sock::setsockopt(&fd, sockopt::RcvBufForce, &rcv).is_err() {
        sock::setsockopt(&fd, sockopt::RcvBuf, &rcv).map_err(|e| fail("SO_RCVBUF", e))?;
    }
    if sock::setsockopt(&fd, sockopt::SndBufForce, &snd).is_err() {
        sock::setsockopt(&fd, sockopt::SndBuf, &snd).map_err(|e| fail("SO_SNDBUF", e))?;
    }
    if let Some(dev) = &s.device {
        sock::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev)).map_err(
            |e| {
                Error::refused(
                    format!("cannot bind a socket to interface {dev} ({e})"),
                    "restore where that interface exists (a clone with --net none has only lo)",
                )
            },
        )?;
    }
    if let (Some(c), Some(local)) = (&s.connection, s.local) {
        super::tcp::restore(&fd, local, c, data)?;
        return Ok(fd);
    }
    if let Some(local) = s.local {
        bind(&fd, s, local)?;
    }
    if let Some(backlog) = s.backlog {
        let backlog = sock::Backlog::new(backlog.min(libc::SOMAXCONN as u32) as i32)
            .unwrap_or(sock::Backlog::MAXCONN);
        sock::listen(&fd, backlog)
            .map_err(|e| Error::sys(format!("listening on {local:?}", local = s.local), e))?;
    }
    if let Some(peer) = s.peer {
        sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(peer))
            .map_err(|e| Error::sys(format!("connecting a UDP socket to {peer}"), e))?;
    }
    Ok(fd)
}

fn bind(fd: &OwnedFd, s: &InetSocket, local: SocketAddr) -> Result<()> {
    let addr = SockaddrStorage::from(local);
    let mut result = sock::bind(fd.as_raw_fd(), &addr);
    if result == Err(Errno::EADDRINUSE) && s.protocol == InetProtocol::Tcp && !port_served(local) {
        // Only connections of the gone original hold the port: take it over, as the
        // original itself could have (repair mode forces the reuse).
        sys::set_tcp_repair(fd, true).map_err(|e| Error::sys("entering TCP repair mode", e))?;
        result = sock::bind(fd.as_raw_fd(), &addr);
        sys::set_tcp_repair(fd, false).map_err(|e| Error::sys("leaving TCP repair mode", e))?;
    }
    match result {
        Ok(()) => Ok(()),
        Err(Errno::EADDRINUSE) => Err(Error::refused(
            format!("{local} is in use"),
            "stop the process that uses it (the original?) first; a clone beside the original needs --net none",
        )),
        Err(Errno::EADDRNOTAVAIL) => Err(Error::refused(
            format!("address {} does not exist here", local.ip()),
            "restore where that address is configured (a clone with --net none has only lo)",
        )),
        Err(e) => Err(Error::sys(format!("binding a socket to {local}"), e)),
    }
}

/// Whether something accepts connections at `local` (a wildcard address asked on loopback).
fn port_served(local: SocketAddr) -> bool {
    let mut target = local;
    if target.ip().is_unspecified() {
        target.set_ip(match local {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_millis(200)).is_ok()
}
