//! The `dolly` command line (specs/cli.md): parsing, dispatch, and how results and errors
//! are printed.

mod clone_cmd;
mod output;
mod snapshot_cmd;
mod worker;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use snapshot::{Error, ErrorKind, Store};

/// Snapshot running Linux processes and bring them back.
#[derive(Debug, Parser)]
#[command(
    name = "dolly",
    version,
    about = "Snapshot running Linux processes and bring them back: in place, or cloned.",
    max_term_width = 100
)]
pub struct Cli {
    /// Durable tier: catalog and manifests.
    #[arg(long, global = true, env = "DOLLY_ROOT", default_value = snapshot::store::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Memory tier: the page pool (tmpfs or a DAX mount).
    #[arg(long, global = true, env = "DOLLY_POOL", default_value = snapshot::store::DEFAULT_POOL)]
    pub pool: PathBuf,
    /// Print results as JSON (errors too, as {"error": ...}).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture, list, inspect, restore and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Start copies of a process (or snapshot) in fresh namespaces beside the original;
    /// list and kill them.
    Clone(CloneArgs),
}

/// `dolly clone ...`: start clones, or `list` / `kill` them.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CloneArgs {
    /// `list` or `kill`; without one, starts clones.
    #[command(subcommand)]
    pub command: Option<CloneCommand>,
    /// What to start, and how.
    #[command(flatten)]
    pub start: CloneStart,
}

/// `dolly clone list|kill`.
#[derive(Debug, Subcommand)]
pub enum CloneCommand {
    /// List clones and whether they still run.
    List,
    /// End clones (their whole namespaces) and remove what they left.
    Kill {
        /// Clone id (or unique prefix).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every clone of this store.
        #[arg(long)]
        all: bool,
    },
}

/// Where clones come from and what they get.
#[derive(Debug, Args)]
pub struct CloneStart {
    /// Capture this running process (it runs on) and clone it.
    #[arg(
        long,
        conflicts_with = "snapshot",
        required_unless_present = "snapshot"
    )]
    pub pid: Option<i32>,
    /// With --pid: capture the process's file locks too (each clone takes them again).
    #[arg(long, requires = "pid")]
    pub file_locks: bool,
    /// With --pid: capture established TCP connections within the tree too (a clone needs
    /// --net none to have them beside the original's).
    #[arg(long, requires = "pid")]
    pub tcp_established: bool,
    /// Clone this snapshot (id, id prefix or name).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// How many clones to start.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
    /// The clones' network: the host's, or their own with only loopback.
    #[arg(long, value_enum, default_value_t = NetArg::Host)]
    pub net: NetArg,
    /// Hostname inside the clones.
    #[arg(long)]
    pub hostname: Option<String>,
    /// A directory each clone sees through a private copy-on-write overlay (repeatable).
    #[arg(long = "overlay", value_name = "DIR")]
    pub overlays: Vec<PathBuf>,
}

/// `--net` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetArg {
    /// Share the host's network.
    Host,
    /// A network namespace with only `lo`, up.
    None,
}

/// `--fork` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ForkArg {
    /// When the pages written since the pre-copy would take longer to copy than a fork.
    Auto,
    /// Whenever the freeze has pages to copy.
    Always,
    /// Never: the freeze copies every page while the processes are stopped.
    Never,
}

impl From<ForkArg> for snapshot::capture::ForkPolicy {
    fn from(arg: ForkArg) -> Self {
        match arg {
            ForkArg::Auto => Self::Auto,
            ForkArg::Always => Self::Always,
            ForkArg::Never => Self::Never,
        }
    }
}

/// `dolly snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Freeze a process, capture it, and let it run on. Prints the snapshot id last.
    Capture {
        /// The process to capture.
        #[arg(long)]
        pid: i32,
        /// A name for the snapshot (usable instead of the id).
        #[arg(long)]
        name: Option<String>,
        /// Allow a process that has a terminal open; a restore gives it the terminal the
        /// restoring dolly runs on.
        #[arg(long)]
        shell_job: bool,
        /// Capture the file locks the processes hold (flock, POSIX and OFD); a restore takes
        /// them again. Without it, a process holding a lock is refused.
        #[arg(long)]
        file_locks: bool,
        /// Capture established TCP connections whose both ends are in the tree (TCP repair
        /// mode); a restore makes them again, queued bytes and all. Without it, a process
        /// holding one is refused.
        #[arg(long)]
        tcp_established: bool,
        /// Capture incrementally against an earlier snapshot (id, id prefix or name) of the
        /// same program: only pages found nowhere in it (at the same address, or anywhere
        /// by content) are stored, the rest is shared with it (deleting it later keeps this
        /// one restorable). `auto`: the snapshot the process was restored from, else the
        /// newest restorable one of the same process (PID and command), else of the same
        /// command, if there is one. Without --parent: the snapshot the process was
        /// restored or cloned from, if it still maps its pool; `none`: a full capture.
        #[arg(long, value_name = "ID|auto|none")]
        parent: Option<String>,
        /// At the freeze, copy the pages a process wrote since the pre-copy from a
        /// copy-on-write fork of it made inside it, after it runs on: it is then stopped
        /// about as long as a fork() takes, however fast it writes. The fork never runs,
        /// shares the process's fd table (it opens nothing of its own), and is reaped by the
        /// process (one more brief stop) when the capture is over.
        #[arg(long, value_enum, default_value = "auto")]
        fork: ForkArg,
        /// Return once the freeze is over (the default: the snapshot is `capturing` while
        /// its last pages are stored, and a restore of it waits for that), once it is
        /// `created` (restorable), or `persisted` (durable too). The rest goes on in the
        /// background either way.
        #[arg(long, value_enum, default_value = "frozen")]
        wait: worker::Wait,
    },
    /// List snapshots with their status.
    List,
    /// Show one snapshot.
    Info {
        /// Snapshot id, id prefix or name.
        id: String,
        /// First wait until it is `created` (restorable) or `persisted` (durable); fails at
        /// once, naming why, if it never will be (failed, incomplete, or left created with
        /// nobody making it durable).
        #[arg(long, value_enum)]
        wait: Option<Reached>,
        /// How long --wait may wait, in seconds.
        #[arg(long, default_value_t = 300, requires = "wait")]
        timeout: u64,
    },
    /// Make a snapshot durable now, one whose persister ended before it was done.
    ///
    /// A snapshot still being captured, or made durable by its capture, is waited for.
    Persist {
        /// Snapshot id, id prefix or name.
        id: String,
    },
    /// Start the process again from the snapshot, with its PID, detached from dolly.
    Restore {
        /// Snapshot id, id prefix or name.
        id: String,
        /// Give the process the terminal dolly runs on, keep it in the foreground, and wait
        /// for it (dolly exits with its status).
        #[arg(long)]
        shell_job: bool,
    },
    /// Delete a snapshot (manifest and pages).
    Delete {
        /// Snapshot id, id prefix or name.
        id: String,
    },
}

/// A status `snapshot info --wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reached {
    /// Restorable (or persisted already).
    Created,
    /// Durable.
    Persisted,
}

impl Reached {
    /// The status it stands for.
    pub fn status(self) -> snapshot::Status {
        match self {
            Reached::Created => snapshot::Status::Created,
            Reached::Persisted => snapshot::Status::Persisted,
        }
    }
}

/// Exit status for any failure or refusal (clap uses 2 for usage errors).
pub const EXIT_FAILURE: i32 = 1;

/// Runs the command line and returns the exit status.
pub fn main() -> i32 {
    // Like any Unix filter: a closed stdout (`dolly snapshot list | head -1`) ends dolly
    // quietly instead of with a panic.
    // SAFETY: restores the default disposition; no handler code is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // (With DOLLY_TRACE, the marks count from here.)
    snapshot::checkpoint::mark("dolly: started");
    let cli = Cli::parse();
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            output::error(&e, cli.json);
            EXIT_FAILURE
        }
    };
    snapshot::checkpoint::flush_marks();
    code
}

fn open_store(cli: &Cli) -> Result<Store, Error> {
    Store::open(&cli.root, &cli.pool).map_err(|e| {
        let hint = if nix::unistd::geteuid().is_root() {
            "check --root and --pool (or DOLLY_ROOT, DOLLY_POOL)".to_string()
        } else {
            format!(
                "run as root, or point --root and --pool at directories you own (now {} and {})",
                cli.root.display(),
                cli.pool.display()
            )
        };
        Error::new(ErrorKind::System, e.message()).with_remedy(hint)
    })
}

fn run(cli: &Cli) -> Result<i32, Error> {
    match &cli.command {
        Command::Snapshot(cmd) => snapshot_cmd::run(cli, cmd, &open_store(cli)?),
        Command::Clone(args) => clone_cmd::run(cli, args, &open_store(cli)?),
    }
}
