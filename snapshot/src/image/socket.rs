//! Sockets in the manifest.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Bytes;

/// The kind of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SocketType {
    /// `SOCK_STREAM`.
    Stream,
    /// `SOCK_DGRAM`.
    Dgram,
    /// `SOCK_SEQPACKET`.
    Seqpacket,
}

/// A unix socket address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum UnixAddress {
    /// A path in the filesystem (absolute).
    Path(String),
    /// A name in the network namespace's abstract namespace (without the leading NUL).
    Abstract(Bytes),
}

impl std::fmt::Display for UnixAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnixAddress::Path(p) => f.write_str(p),
            UnixAddress::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(&name.0)),
        }
    }
}

/// Who a unix socket is connected to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum UnixPeer {
    /// Nobody.
    None,
    /// Another socket of the snapshot, by inode (see [`super::File::inode`]).
    Socket {
        /// The peer's inode.
        inode: u64,
    },
    /// A listener of the snapshot, which has not accepted the connection yet.
    Pending {
        /// The listener's inode.
        listener: u64,
    },
    /// A named socket outside the snapshot (a datagram socket `connect`ed to it, such as a
    /// logging daemon's).
    Address {
        /// Its address.
        address: UnixAddress,
    },
    /// The peer closed the connection: what is left in the queue is read, then end of file.
    Closed,
}

/// Owner and permissions of the file a socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SocketFile {
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// A unix socket with its connections, queue and options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnixSocket {
    /// Stream, datagram or seqpacket.
    pub socket_type: SocketType,
    /// Its address: bound, or (`accepted`) inherited from the listener it came from.
    pub address: Option<UnixAddress>,
    /// Made by `accept` on a listener (its address is the listener's).
    pub accepted: bool,
    /// The bound path's file, `None` when it was unlinked after `bind` (or is abstract).
    pub file: Option<SocketFile>,
    /// `Some(backlog)` for a listening socket.
    pub backlog: Option<u32>,
    /// For a listener: the inodes of the snapshot's sockets whose connections wait to be
    /// accepted, oldest first.
    pub pending: Vec<u64>,
    /// Its peer.
    pub peer: UnixPeer,
    /// `RCV_SHUTDOWN` (1) | `SEND_SHUTDOWN` (2).
    pub shutdown: u8,
    /// `SO_PASSCRED`.
    pub pass_cred: bool,
    /// `SO_PASSSEC`.
    pub pass_sec: bool,
    /// `SO_RCVBUF` as `getsockopt` gives it.
    pub rcvbuf: u32,
    /// `SO_SNDBUF` as `getsockopt` gives it.
    pub sndbuf: u32,
    /// `SO_PEEK_OFF`.
    pub peek_off: i32,
    /// Lengths of the messages in its receive queue (a stream socket's bytes count as one),
    /// whose bytes are the file's `content`.
    pub queue: Vec<u32>,
}

/// The transport protocol of an internet socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InetProtocol {
    /// TCP (`SOCK_STREAM`).
    Tcp,
    /// UDP (`SOCK_DGRAM`).
    Udp,
}

/// An IPv4 or IPv6 socket that holds no connection: unbound, bound, listening, or (UDP)
/// connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InetSocket {
    /// `AF_INET6` (else `AF_INET`).
    pub ipv6: bool,
    /// TCP or UDP.
    pub protocol: InetProtocol,
    /// The address it is bound to.
    pub local: Option<std::net::SocketAddr>,
    /// `Some(backlog)` for a listening TCP socket.
    pub backlog: Option<u32>,
    /// The peer a UDP socket is connected to.
    pub peer: Option<std::net::SocketAddr>,
    /// `SO_REUSEADDR`.
    pub reuse_addr: bool,
    /// `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// `IPV6_V6ONLY` (IPv6 sockets).
    pub v6_only: bool,
    /// `TCP_NODELAY` (TCP sockets).
    pub no_delay: bool,
    /// `SO_KEEPALIVE`.
    pub keep_alive: bool,
    /// `SO_BROADCAST`.
    pub broadcast: bool,
    /// `SO_BINDTODEVICE`: the interface it is bound to.
    pub device: Option<String>,
    /// `SO_RCVBUF` as `getsockopt` gives it.
    pub rcvbuf: u32,
    /// `SO_SNDBUF` as `getsockopt` gives it.
    pub sndbuf: u32,
}
