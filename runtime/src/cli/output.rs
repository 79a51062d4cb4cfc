//! How the CLI prints: human text by default, one JSON document with `--json`.

use comfy_table::{presets, Table};
use serde_json::json;
use snapshot::{Error, Record};

/// Prints an error: "dolly: <cause>" and "hint: <remedy>" on stderr; with `--json`, also
/// `{"error": {...}}` on stdout.
pub fn error(e: &Error, json: bool) {
    eprintln!("dolly: {}", e.message());
    if let Some(remedy) = e.remedy() {
        eprintln!("hint: {remedy}");
    }
    if json {
        println!(
            "{}",
            json!({ "error": { "kind": e.kind(), "message": e.message(), "hint": e.remedy() } })
        );
    }
}

/// Prints a JSON value on one line.
pub fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

/// A byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} ms"))
}

/// A record as the JSON the CLI prints.
pub fn record_json(r: &Record) -> serde_json::Value {
    json!({
        "id": r.id,
        "name": r.name,
        "pid": r.pid,
        "comm": r.comm,
        "status": r.status,
        "reason": r.reason,
        "created_at": r.created_at,
        "bytes": r.bytes,
        "shared_bytes": r.shared_bytes,
        "forked": r.forked,
        "forked_bytes": r.forked_bytes,
        "parent": r.parent,
        "processes": r.processes,
        "frozen_ms": r.frozen_ms,
        "capture_ms": r.capture_ms,
        "created_ms": r.capture_ms,
        "persisted_ms": r.persisted_ms.map(|p| p + r.capture_ms.unwrap_or(0.0)),
        "persisting": r.persisting,
        "persist_done": r.persist_done,
        "persister": r.persister,
    })
}

/// The status as people read it: with how far making it durable has come.
fn status_text(r: &Record) -> String {
    match (r.persisting, r.persist_done) {
        (true, Some(done)) if r.bytes > 0 => format!(
            "{} (persisting {}%)",
            r.status,
            (done * 100 / r.bytes).min(99)
        ),
        (true, _) => format!("{} (persisting)", r.status),
        _ => r.status.to_string(),
    }
}

/// The `snapshot list` table.
pub fn records_table(records: &[Record]) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "ID", "NAME", "PID", "COMMAND", "STATUS", "MEMORY", "FROZEN", "CREATED",
    ]);
    for r in records {
        t.add_row([
            r.id.clone(),
            r.name.clone().unwrap_or_else(|| "-".into()),
            r.pid.to_string(),
            r.comm.clone(),
            status_text(r),
            human_bytes(r.bytes),
            ms(r.frozen_ms),
            r.created_at.clone(),
        ]);
    }
    t.to_string()
}

/// `snapshot info` for people.
pub fn record_text(r: &Record) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line("id", r.id.clone());
    line("name", r.name.clone().unwrap_or_else(|| "-".into()));
    line("status", status_text(r));
    if let Some(reason) = &r.reason {
        line("reason", reason.clone());
    }
    line("process", format!("{} ({})", r.pid, r.comm));
    line("created", r.created_at.clone());
    line("memory", human_bytes(r.bytes));
    if let Some(parent) = &r.parent {
        line("parent", parent.clone());
        line("shared", human_bytes(r.shared_bytes));
    }
    line("frozen", ms(r.frozen_ms));
    if r.forked > 0 {
        line(
            "forked",
            format!(
                "{} at the freeze, {} read from the fork after it",
                match r.forked {
                    1 => "1 process".to_string(),
                    n => format!("{n} processes"),
                },
                human_bytes(r.forked_bytes)
            ),
        );
    }
    line("to created", ms(r.capture_ms));
    line(
        "to persisted",
        ms(r.persisted_ms.map(|p| p + r.capture_ms.unwrap_or(0.0))),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
