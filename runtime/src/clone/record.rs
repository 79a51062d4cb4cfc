//! The clone registry: one record per clone in `ROOT/clones/ID/record.json`, with what
//! `clone list` shows and what `clone kill` needs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapshot::error::{Context, Error, Result};
use snapshot::Store;

use crate::ns::{Net, Overlay};

/// A clone as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRecord {
    /// Clone id.
    pub id: String,
    /// The snapshot it was started from.
    pub snapshot: String,
    /// PID of the restored root process inside the clone (the original's PID).
    pub pid: i32,
    /// The same process as the host sees it.
    pub host_pid: i32,
    /// The clone's PID 1 (its init) as the host sees it.
    pub init_pid: i32,
    /// Start time of the init (clock ticks since boot), to tell it from a later process
    /// with the same PID.
    pub init_start: u64,
    /// When it started (RFC 3339).
    pub created_at: String,
    /// Its network.
    pub net: Net,
    /// Its hostname, if set.
    pub hostname: Option<String>,
    /// Copy-on-write views of host directories.
    pub overlays: Vec<Overlay>,
}

/// How a clone ended, written by its init.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exit {
    /// The restored process exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The exit status a shell would report (128 + N for signal N).
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Directory of all clone records of a store.
pub fn clones_dir(store: &Store) -> PathBuf {
    store.root().join("clones")
}

/// Directory of one clone: its record, exit status and overlay layers.
pub fn clone_dir(store: &Store, id: &str) -> PathBuf {
    clones_dir(store).join(id)
}

/// Start time of a process (field 22 of /proc/PID/stat), if it exists and is not a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl CloneRecord {
    /// Whether the clone's init still runs.
    pub fn is_running(&self) -> bool {
        start_time(self.init_pid) == Some(self.init_start)
    }

    /// How it ended, once it has.
    pub fn exit(&self, store: &Store) -> Option<Exit> {
        let text = std::fs::read(clone_dir(store, &self.id).join("exit.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes the record.
    pub fn save(&self, store: &Store) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(self).expect("record serializes");
        text.push(b'\n');
        snapshot::store::write_atomic(&clone_dir(store, &self.id).join("record.json"), &text)
    }
}

/// Records the exit of a clone (called by its init) in its directory, given as an fd opened
/// before the clone's overlays were mounted (the directory may lie under one of them).
pub fn save_exit(dir: &std::fs::File, exit: Exit) -> Result<()> {
    use nix::fcntl::{openat, renameat, OFlag};
    use nix::sys::stat::Mode;
    let text = serde_json::to_vec(&exit).expect("exit serializes");
    let tmp = openat(
        dir,
        ".exit.json.tmp",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .context("recording the clone's exit")?;
    nix::unistd::write(&tmp, &text).context("recording the clone's exit")?;
    nix::unistd::fsync(&tmp).context("recording the clone's exit")?;
    renameat(dir, ".exit.json.tmp", dir, "exit.json").context("recording the clone's exit")
}

/// Every clone of a store, oldest first.
pub fn list(store: &Store) -> Result<Vec<CloneRecord>> {
    let dir = clones_dir(store);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<CloneRecord> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("record.json")).ok())
        .filter_map(|t| serde_json::from_slice(&t).ok())
        .collect();
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Finds a clone by id or unique id prefix.
pub fn find(store: &Store, key: &str) -> Result<CloneRecord> {
    let matches: Vec<CloneRecord> = list(store)?
        .into_iter()
        .filter(|c| c.id == key || (key.len() >= 4 && c.id.starts_with(key)))
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap()),
        0 => Err(Error::not_found(
            format!("no clone {key:?} in {}", store.root().display()),
            "run `dolly clone list` to see the clones",
        )),
        _ => Err(Error::refused(
            format!("{key:?} matches several clones"),
            "use the full clone id",
        )),
    }
}

/// Ends a clone: kills its init (the kernel then ends every process of its PID namespace,
/// and its mount, network, UTS and IPC namespaces go with them), and removes its record and
/// overlay layers.
pub fn kill(store: &Store, record: &CloneRecord) -> Result<()> {
    if record.is_running() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(record.init_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while record.is_running() {
            if std::time::Instant::now() > deadline {
                return Err(Error::new(
                    snapshot::ErrorKind::System,
                    format!(
                        "clone {}: its init {} did not end after SIGKILL",
                        record.id, record.init_pid
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let dir = clone_dir(store, &record.id);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}
