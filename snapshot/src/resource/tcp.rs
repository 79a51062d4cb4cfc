//! Established TCP connections, through TCP repair mode: the capture reads a connection's
//! sequence numbers, negotiated options, window and queued bytes (and leaves repair mode,
//! so the original goes on); a restore makes the socket in repair mode, sets all that,
//! "connects" without a handshake, refills the queues and leaves repair mode.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{self as sock, MsgFlags, SockaddrStorage};

use crate::error::{Error, Result};
use crate::image::TcpConnection;
use crate::sys::socket as sys;

const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = libc::FIONREAD;
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ;
/// Leave repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: i32 = -1;

fn repair(s: &OwnedFd, on: i32) -> std::result::Result<(), Errno> {
    sys::tcp_set(s, libc::TCP_REPAIR, on)
}

/// Reads `len` bytes of queue `queue` without taking them (in repair mode).
fn peek_queue(s: &OwnedFd, queue: i32, len: usize) -> std::result::Result<(u32, Vec<u8>), Errno> {
    sys::tcp_set(s, libc::TCP_REPAIR_QUEUE, queue)?;
    let seq = sys::tcp_get(s, libc::TCP_QUEUE_SEQ)? as u32;
    let mut data = vec![0u8; len];
    if len > 0 {
        let n = sock::recv(
            s.as_raw_fd(),
            &mut data,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )?;
        data.truncate(n);
    }
    Ok((seq, data))
}

/// Captures established connection `s` (a copy of the process's socket): its state and its
/// queued bytes (receive queue, then send queue). The socket is in repair mode only while
/// it is read.
pub fn capture(
    s: &OwnedFd,
    remote: SocketAddr,
) -> std::result::Result<(TcpConnection, Vec<u8>), Errno> {
    repair(s, 1)?;
    let result = (|| {
        let mut info = [0u8; 8];
        sys::get_raw(s, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
        let (options, scales) = (info[5], info[6]);
        let mss = sys::tcp_get(s, libc::TCP_MAXSEG)? as u32;
        let send_queue = sys::ioctl_int(s, SIOCOUTQ)? as u32;
        let unsent = sys::ioctl_int(s, libc::SIOCOUTQNSD)? as u32;
        let recv_queue = sys::ioctl_int(s, SIOCINQ)? as u32;
        let (recv_seq, mut data) = peek_queue(s, TCP_RECV_QUEUE, recv_queue as usize)?;
        let (send_seq, sent) = peek_queue(s, TCP_SEND_QUEUE, send_queue as usize)?;
        if data.len() != recv_queue as usize || sent.len() != send_queue as usize {
            return Err(Errno::EAGAIN);
        }
        data.extend_from_slice(&sent);
        let mut window = [0u8; 20];
        sys::get_raw(s, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &mut window)?;
        let word = |i: usize| u32::from_ne_bytes(window[4 * i..4 * i + 4].try_into().unwrap());
        let timestamps = options & TCPI_OPT_TIMESTAMPS != 0;
        Ok((
            TcpConnection {
                remote,
                send_seq,
                recv_seq,
                send_queue,
                unsent,
                recv_queue,
                mss,
                wscale: options & TCPI_OPT_WSCALE != 0,
                snd_wscale: scales & 0xf,
                rcv_wscale: scales >> 4,
                sack: options & TCPI_OPT_SACK != 0,
                timestamps,
                timestamp: if timestamps {
                    sys::tcp_get(s, libc::TCP_TIMESTAMP)? as u32
                } else {
                    0
                },
                window: [word(0), word(1), word(2), word(3), word(4)],
            },
            data,
        ))
    })();
    // The original goes on: out of repair mode, as it was.
    let left = repair(s, 0);
    let out = result?;
    left?;
    Ok(out)
}

/// Makes established connection `c` again on the new socket `s` (options already set),
/// from `local`, with `data` its queued bytes.
pub fn restore(s: &OwnedFd, local: SocketAddr, c: &TcpConnection, data: &[u8]) -> Result<()> {
    let fail = |what: &str, e: Errno| {
        Error::sys(
            format!("{what} of the TCP connection {local} -> {}", c.remote),
            e,
        )
    };
    repair(s, 1).map_err(|e| fail("entering repair mode", e))?;
    let set_seq = |queue: i32, seq: u32| -> std::result::Result<(), Errno> {
        sys::tcp_set(s, libc::TCP_REPAIR_QUEUE, queue)?;
        sys::tcp_set(s, libc::TCP_QUEUE_SEQ, seq as i32)
    };
    set_seq(TCP_RECV_QUEUE, c.recv_seq.wrapping_sub(c.recv_queue))
        .map_err(|e| fail("setting the receive sequence", e))?;
    set_seq(TCP_SEND_QUEUE, c.send_seq.wrapping_sub(c.send_queue))
        .map_err(|e| fail("setting the send sequence", e))?;
    sock::bind(s.as_raw_fd(), &SockaddrStorage::from(local)).map_err(|e| match e {
        Errno::EADDRINUSE => Error::refused(
            format!("the TCP connection {local} -> {} exists already", c.remote),
            "stop the original first; a clone beside it needs --net none",
        ),
        e => fail("binding", e),
    })?;
    sock::connect(s.as_raw_fd(), &SockaddrStorage::from(c.remote)).map_err(|e| match e {
        Errno::EADDRNOTAVAIL | Errno::EADDRINUSE => Error::refused(
            format!("the TCP connection {local} -> {} exists already (or its old self is still in TIME_WAIT)", c.remote),
            "stop the original first and restore a second later; a clone beside it needs --net none",
        ),
        e => fail("connecting (in repair mode)", e),
    })?;
    let mut options: Vec<u8> = Vec::new();
    let mut opt = |code: u32, val: u32| {
        options.extend_from_slice(&code.to_ne_bytes());
        options.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MAXSEG, c.mss);
    if c.wscale {
        opt(
            TCPOPT_WINDOW,
            c.snd_wscale as u32 | (c.rcv_wscale as u32) << 16,
        );
    }
    if c.sack {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if c.timestamps {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    sys::set_raw(s, libc::SOL_TCP, libc::TCP_REPAIR_OPTIONS, &options)
        .map_err(|e| fail("setting the options", e))?;
    if c.timestamps {
        sys::tcp_set(s, libc::TCP_TIMESTAMP, c.timestamp as i32)
            .map_err(|e| fail("setting the timestamp", e))?;
    }
    let (recv, rest) = data.split_at((c.recv_queue as usize).min(data.len()));
    let sent_len = (c.send_queue - c.unsent) as usize;
    let (sent, unsent) = rest.split_at(sent_len.min(rest.len()));
    let refill = |queue: i32, bytes: &[u8]| -> std::result::Result<(), Errno> {
        sys::tcp_set(s, libc::TCP_REPAIR_QUEUE, queue)?;
        let mut at = 0;
        while at < bytes.len() {
            at += sock::send(s.as_raw_fd(), &bytes[at..], MsgFlags::MSG_DONTWAIT)?;
        }
        Ok(())
    };
    refill(TCP_RECV_QUEUE, recv).map_err(|e| fail("refilling the receive queue", e))?;
    // In repair mode, bytes queued for sending count as sent: the ones that were.
    refill(TCP_SEND_QUEUE, sent).map_err(|e| fail("refilling the send queue", e))?;
    let mut window = Vec::with_capacity(20);
    for w in c.window {
        window.extend_from_slice(&w.to_ne_bytes());
    }
    sys::set_raw(s, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &window)
        .map_err(|e| fail("setting the window", e))?;
    repair(s, TCP_REPAIR_OFF_NO_WP).map_err(|e| fail("leaving repair mode", e))?;
    let mut at = 0;
    while at < unsent.len() {
        at += sock::send(
            s.as_raw_fd(),
            &unsent[at..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|e| fail("sending what was not sent yet", e))?;
    }
    Ok(())
}
