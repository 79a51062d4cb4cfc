//! Pseudo-terminals in the manifest.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A terminal's settings (`struct termios`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Termios {
    /// Input modes.
    pub iflag: u32,
    /// Output modes.
    pub oflag: u32,
    /// Control modes.
    pub cflag: u32,
    /// Local modes.
    pub lflag: u32,
    /// Line discipline.
    pub line: u8,
    /// Control characters.
    pub cc: Vec<u8>,
    /// Input speed.
    pub ispeed: u32,
    /// Output speed.
    pub ospeed: u32,
}

/// A pseudo-terminal whose master the snapshot holds (its slave is `/dev/pts/INDEX`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pty {
    /// N of `/dev/pts/N`.
    pub index: u32,
    /// The slave's settings.
    pub termios: Termios,
    /// Window size: rows.
    pub rows: u16,
    /// Window size: columns.
    pub cols: u16,
    /// Window size: width in pixels.
    pub xpixel: u16,
    /// Window size: height in pixels.
    pub ypixel: u16,
    /// Packet mode (`TIOCPKT`).
    pub packet: bool,
    /// The session it is the controlling terminal of (the session leader's PID; 0: none).
    pub session: i32,
    /// Its foreground process group (0: none).
    pub foreground: i32,
}
