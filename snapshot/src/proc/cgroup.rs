//! The memory limits of a process's control groups (`/proc/PID/cgroup`, then the cgroup
//! files): how much more memory the process may use before its cgroup runs out.

use std::path::Path;

/// A limit at or above this is no limit (the kernel's "max" as v1 shows it).
const NO_LIMIT: u64 = 1 << 60;

/// How much more memory the process whose `/proc/PID/cgroup` reads `cgroups` may use, the
/// least over its memory cgroup and the cgroups above it (limit minus usage, under cgroup v2
/// or v1 mounted at `root`, usually `/sys/fs/cgroup`); `None` if no limit applies. (Usage
/// counts reclaimable page cache: this errs on the small side.)
pub fn memory_headroom(cgroups: &str, root: &Path) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (bases, limit_file, usage_file) = if id == "0" && controllers.is_empty() {
            (
                vec![root.to_path_buf(), root.join("unified")],
                "memory.max",
                "memory.current",
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                vec![root.join("memory")],
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        for base in bases {
            let mut dir = base.join(relative);
            loop {
                let read = |name: &str| -> Option<u64> {
                    std::fs::read_to_string(dir.join(name))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                };
                if let (Some(limit), Some(usage)) = (read(limit_file), read(usage_file)) {
                    if limit < NO_LIMIT {
                        let room = limit.saturating_sub(usage);
                        least = Some(least.map_or(room, |l| l.min(room)));
                    }
                }
                if dir == base || !dir.pop() {
                    break;
                }
            }
        }
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_least_room_over_the_cgroup_and_its_ancestors() {
        let root = tempfile::tempdir().unwrap();
        let write = |dir: &str, limit: &str, usage: &str| {
            let d = root.path().join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("memory.limit_in_bytes"), limit).unwrap();
            std::fs::write(d.join("memory.usage_in_bytes"), usage).unwrap();
        };
        write("memory", "9223372036854771712", "500");
        write("memory/app", "1000", "900");
        write("memory/app/leaf", "9223372036854771712", "400");
        let cgroups = "9:name=systemd:/\n4:memory:/app/leaf\n0::/\n";
        assert_eq!(memory_headroom(cgroups, root.path()), Some(100));
        // cgroup v2: memory.max "max" is no limit; a number is.
        let v2 = root.path().join("svc");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        std::fs::write(v2.join("memory.current"), "10\n").unwrap();
        assert_eq!(memory_headroom("0::/svc\n", root.path()), None);
        std::fs::write(v2.join("memory.max"), "4096\n").unwrap();
        assert_eq!(memory_headroom("0::/svc\n", root.path()), Some(4086));
    }
}
