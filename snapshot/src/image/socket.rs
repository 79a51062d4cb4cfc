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

/// An IPv4 or IPv6 socket: unbound, bound, listening, connected (UDP), or an established
/// TCP connection (captured with `--tcp-established`).
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
    /// An established TCP connection's state, from TCP repair mode.
    pub connection: Option<TcpConnection>,
}

/// What TCP repair mode reads of an established connection, to make it again without a
/// handshake. Its queued bytes are the file's `content`: the receive queue, then the send
/// queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpConnection {
    /// The peer's address.
    pub remote: std::net::SocketAddr,
    /// Sequence number of the next byte to be queued for sending (`TCP_QUEUE_SEQ` of the
    /// send queue).
    pub send_seq: u32,
    /// Sequence number of the next byte expected (`TCP_QUEUE_SEQ` of the receive queue).
    pub recv_seq: u32,
    /// Bytes in the send queue (sent but not acknowledged, then not sent).
    pub send_queue: u32,
    /// Of those, bytes not sent yet.
    pub unsent: u32,
    /// Bytes in the receive queue, not read yet.
    pub recv_queue: u32,
    /// Maximum segment size.
    pub mss: u32,
    /// Window scaling was negotiated.
    pub wscale: bool,
    /// The peer's window scale.
    pub snd_wscale: u8,
    /// Our window scale.
    pub rcv_wscale: u8,
    /// SACK was negotiated.
    pub sack: bool,
    /// Timestamps were negotiated.
    pub timestamps: bool,
    /// The connection's timestamp clock (`TCP_TIMESTAMP`).
    pub timestamp: u32,
    /// `struct tcp_repair_window`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}
