//! Socket diagnostics (`NETLINK_SOCK_DIAG`): what the kernel tells of a socket that its fd
//! does not (its peer, its pending connections, its queues, its shutdown state).

use std::net::SocketAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::inet::{self, ExtensionFlags, InetRequest, SocketId};
use netlink_packet_sock_diag::unix::{nlas::Nla, ShowFlags, StateFlags, UnixRequest};
use netlink_packet_sock_diag::{SockDiagMessage, TCP_LISTEN};
use netlink_packet_utils::Emitable;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

use crate::error::{Error, ErrorKind, Result};

/// What sock_diag reports of one unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: u8,
    /// `TCP_ESTABLISHED`, `TCP_LISTEN` or `TCP_CLOSE` (7).
    pub state: u8,
    /// Inode of the peer socket; 0 when it has none, or when the peer is a connection
    /// not accepted yet or a socket that was closed.
    pub peer: u32,
    /// For a listener: the inodes of the clients whose connections wait in its backlog.
    pub pending: Vec<u32>,
    /// For a listener: its backlog; otherwise the bytes in its receive queue.
    pub backlog_or_rqueue: u32,
    /// Bytes it sent that its peer has not read yet (memory charged to it).
    pub wqueue: u32,
    /// `RCV_SHUTDOWN` (1) and `SEND_SHUTDOWN` (2).
    pub shutdown: u8,
    /// Device and inode of the file it is bound to, if bound to a path.
    pub vfs: Option<(u32, u32)>,
}

/// A sock_diag socket talking to the kernel.
fn open() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// The kernel's view of the unix socket with inode `ino` in dolly's network namespace, or
/// `None` if there is none.
pub fn unix_socket(ino: u32) -> Result<Option<UnixDiag>> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::System,
            format!("asking the kernel about unix socket {ino} (sock_diag: {what}): {e}"),
        )
    };
    let socket = open().map_err(|e| fail("socket", &e))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::all(),
            inode: ino,
            show_flags: ShowFlags::NAME
                | ShowFlags::VFS
                | ShowFlags::PEER
                | ShowFlags::ICONS
                | ShowFlags::RQLEN
                | ShowFlags::MEMINFO,
            // No cookie: look the socket up by inode alone.
            cookie: [0xff; 8],
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(|e| fail("send", &e))?;
    let mut reply = vec![0u8; 1 << 16];
    let n = socket
        .recv(&mut &mut reply[..], 0)
        .map_err(|e| fail("recv", &e))?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..n])
        .map_err(|e| fail("parse", &e))?;
    let response = match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => r,
        NetlinkPayload::Error(e) if e.code.is_some_and(|c| c.get() == -libc::ENOENT) => {
            return Ok(None)
        }
        other => return Err(fail("reply", &format!("{other:?}"))),
    };
    let mut diag = UnixDiag {
        kind: response.header.kind,
        state: response.header.state,
        ..Default::default()
    };
    for nla in &response.nlas {
        match nla {
            Nla::Peer(p) => diag.peer = *p,
            Nla::PendingConnections(p) => diag.pending = p.clone(),
            Nla::ReceiveQueueLength(r, w) => {
                if diag.state == TCP_LISTEN {
                    diag.backlog_or_rqueue = *w;
                } else {
                    (diag.backlog_or_rqueue, diag.wqueue) = (*r, *w);
                }
            }
            Nla::Shutdown(s) => diag.shutdown = *s,
            Nla::Vfs(v) => {
                // struct unix_diag_vfs { u32 ino; u32 dev; } (the crate keeps its fields
                // private: read them from its wire form).
                let mut raw = [0u8; 8];
                v.emit(&mut raw);
                let word = |i: usize| u32::from_ne_bytes(raw[i..i + 4].try_into().unwrap());
                diag.vfs = Some((word(4), word(0)));
            }
            _ => {}
        }
    }
    Ok(Some(diag))
}

/// What sock_diag reports of one TCP or UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetDiag {
    /// `TCP_*` state (UDP: `TCP_CLOSE`, or `TCP_ESTABLISHED` when connected).
    pub state: u8,
    /// Its local address.
    pub local: SocketAddr,
    /// Its peer's address.
    pub remote: SocketAddr,
    /// Listeners: connections waiting to be accepted; others: bytes not read yet.
    pub recv_queue: u32,
    /// Listeners: the backlog; others: bytes not sent or not acknowledged yet.
    pub send_queue: u32,
}

/// The kernel's view of the TCP (`protocol` = `IPPROTO_TCP`) or UDP socket of `family`
/// (`AF_INET`, `AF_INET6`) with inode `ino`, in dolly's network namespace.
pub fn inet_socket(family: u8, protocol: u8, ino: u32) -> Result<Option<InetDiag>> {
    Ok(inet_sockets(family, protocol)?
        .into_iter()
        .find(|(i, _)| *i == ino)
        .map(|(_, d)| d))
}

/// Every TCP or UDP socket of `family` in dolly's network namespace, with its inode.
pub fn inet_sockets(family: u8, protocol: u8) -> Result<Vec<(u32, InetDiag)>> {
    let ino = "*";
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::System,
            format!("asking the kernel about socket {ino} (sock_diag: {what}): {e}"),
        )
    };
    let socket = open().map_err(|e| fail("socket", &e))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == libc::AF_INET6 as u8 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: inet::StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(|e| fail("send", &e))?;
    let mut found = Vec::new();
    let mut reply = vec![0u8; 1 << 16];
    'dump: loop {
        let n = socket
            .recv(&mut &mut reply[..], 0)
            .map_err(|e| fail("recv", &e))?;
        let mut at = 0;
        while at < n {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[at..n])
                .map_err(|e| fail("parse", &e))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    found.push((
                        r.header.inode,
                        InetDiag {
                            state: r.header.state,
                            local: SocketAddr::new(id.source_address, id.source_port),
                            remote: SocketAddr::new(id.destination_address, id.destination_port),
                            recv_queue: r.header.recv_queue,
                            send_queue: r.header.send_queue,
                        },
                    ));
                }
                NetlinkPayload::Done(_) => break 'dump,
                NetlinkPayload::Error(e) => return Err(fail("reply", &format!("{e:?}"))),
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    fn ino(fd: impl AsFd) -> u32 {
        let link = std::fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
        ))
        .unwrap();
        link.ino() as u32
    }

    #[test]
    fn sees_peers_queues_and_pending_connections() {
        use std::io::Write;
        use std::os::unix::net::{UnixListener, UnixStream};
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"12345").unwrap();
        let da = unix_socket(ino(&a)).unwrap().unwrap();
        let db = unix_socket(ino(&b)).unwrap().unwrap();
        assert_eq!(da.peer, ino(&b));
        assert_eq!(db.peer, ino(&a));
        assert_eq!(db.backlog_or_rqueue, 5, "5 bytes wait in b");
        assert_eq!(da.kind, libc::SOCK_STREAM as u8);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let dl = unix_socket(ino(&listener)).unwrap().unwrap();
        assert_eq!(dl.state, TCP_LISTEN);
        assert_eq!(dl.pending, vec![ino(&client)]);
        let file = std::fs::metadata(&path).unwrap();
        assert_eq!(dl.vfs, Some((dl.vfs.unwrap().0, file.ino() as u32)));
        assert!(unix_socket(u32::MAX).unwrap().is_none());
    }

    #[test]
    fn sees_tcp_listeners_and_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let tcp = libc::IPPROTO_TCP as u8;
        let l = inet_socket(libc::AF_INET as u8, tcp, ino(&listener))
            .unwrap()
            .unwrap();
        assert_eq!(l.state, TCP_LISTEN);
        assert_eq!(l.local, listener.local_addr().unwrap());
        assert_eq!(l.recv_queue, 1, "one connection waits to be accepted");
        let c = inet_socket(libc::AF_INET as u8, tcp, ino(&client))
            .unwrap()
            .unwrap();
        assert_eq!(c.remote, listener.local_addr().unwrap());
        assert!(inet_socket(libc::AF_INET6 as u8, tcp, ino(&client))
            .unwrap()
            .is_none());
    }
}
