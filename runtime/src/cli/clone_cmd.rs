//! `dolly clone`, `dolly clone list`, `dolly clone kill`.

use comfy_table::{presets, Table};
use serde_json::json;
use snapshot::{CaptureOptions, Error, Store};

use super::{output, worker, Cli, CloneArgs, CloneCommand, NetArg};
use crate::clone::{self, CloneOptions, CloneRecord};
use crate::ns::Net;

fn record_json(r: &CloneRecord, store: &Store) -> serde_json::Value {
    json!({
        "id": r.id,
        "snapshot": r.snapshot,
        "pid": r.pid,
        "host_pid": r.host_pid,
        "init_pid": r.init_pid,
        "net": r.net,
        "hostname": r.hostname,
        "overlays": r.overlays.iter().map(|o| o.dir.display().to_string()).collect::<Vec<_>>(),
        "created_at": r.created_at,
        "running": r.is_running(),
        "exit": r.exit(store),
    })
}

/// Runs `dolly clone ...`; returns the exit status.
pub fn run(cli: &Cli, args: &CloneArgs, store: &Store) -> Result<i32, Error> {
    match &args.command {
        Some(CloneCommand::List) => list(cli, store),
        Some(CloneCommand::Kill { id, all }) => {
            let doomed = if *all {
                clone::record::list(store)?
            } else {
                vec![clone::record::find(
                    store,
                    id.as_deref().unwrap_or_default(),
                )?]
            };
            for r in &doomed {
                clone::record::kill(store, r)?;
                if !cli.json {
                    println!("killed clone {}", r.id);
                }
            }
            if cli.json {
                output::print_json(
                    &json!({ "killed": doomed.iter().map(|r| &r.id).collect::<Vec<_>>() }),
                );
            }
            Ok(0)
        }
        None => start(cli, args, store),
    }
}

fn start(cli: &Cli, args: &CloneArgs, store: &Store) -> Result<i32, Error> {
    let s = &args.start;
    let snapshot = match (s.pid, &s.snapshot) {
        (Some(pid), _) => {
            let record = worker::capture(
                store,
                &CaptureOptions {
                    pid,
                    file_locks: s.file_locks,
                    tcp_established: s.tcp_established,
                    ..Default::default()
                },
                worker::Wait::Created,
            )?
            .record;
            if !cli.json {
                println!("captured process {pid} as snapshot {}", record.id);
            }
            record.id
        }
        (None, Some(key)) => store.resolve(key)?,
        (None, None) => unreachable!("clap requires --pid or --snapshot"),
    };
    let opts = CloneOptions {
        net: match s.net {
            NetArg::Host => Net::Host,
            NetArg::None => Net::None,
        },
        hostname: s.hostname.clone(),
        overlays: s.overlays.clone(),
    };
    let mut started = Vec::new();
    for _ in 0..s.count {
        let r = clone::start(store, &snapshot, &opts)?;
        if !cli.json {
            println!(
                "clone {}: process {} (host pid {}), init {}, from snapshot {}",
                r.id, r.pid, r.host_pid, r.init_pid, r.snapshot
            );
        }
        started.push(r);
    }
    if cli.json {
        output::print_json(&started.iter().map(|r| record_json(r, store)).collect());
    }
    Ok(0)
}

fn list(cli: &Cli, store: &Store) -> Result<i32, Error> {
    let clones = clone::record::list(store)?;
    if cli.json {
        output::print_json(&clones.iter().map(|r| record_json(r, store)).collect());
        return Ok(0);
    }
    if clones.is_empty() {
        println!("no clones in {}", store.root().display());
        return Ok(0);
    }
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "ID", "SNAPSHOT", "PID", "HOST PID", "INIT", "STATUS", "NET", "CREATED",
    ]);
    for r in &clones {
        let status = match (r.is_running(), r.exit(store)) {
            (true, _) => "running".to_string(),
            (false, Some(e)) => format!("exited ({})", e.status()),
            (false, None) => "gone".to_string(),
        };
        t.add_row([
            r.id.clone(),
            r.snapshot.clone(),
            r.pid.to_string(),
            r.host_pid.to_string(),
            r.init_pid.to_string(),
            status,
            format!("{:?}", r.net).to_lowercase(),
            r.created_at.clone(),
        ]);
    }
    println!("{t}");
    Ok(0)
}
