//! `/proc/PID/status`.

use std::collections::HashMap;

use crate::error::{Error, ErrorKind, Result};

/// The fields of `/proc/PID/status` dolly uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Command name.
    pub name: String,
    /// File-mode creation mask.
    pub umask: u32,
    /// Thread-group (process) id.
    pub tgid: i32,
    /// PID of the tracer, 0 when not traced.
    pub tracer_pid: i32,
    /// Real, effective, saved and filesystem user ids.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem group ids.
    pub gid: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The PID in each PID namespace, outermost first.
    pub ns_pid: Vec<i32>,
    /// Number of threads.
    pub threads: u32,
    /// Signals pending for the process as a whole.
    pub shared_pending: u64,
    /// Signals ignored.
    pub sig_ignored: u64,
    /// Signals caught.
    pub sig_caught: u64,
    /// Inheritable capabilities.
    pub cap_inheritable: u64,
    /// Permitted capabilities.
    pub cap_permitted: u64,
    /// Effective capabilities.
    pub cap_effective: u64,
    /// Capability bounding set.
    pub cap_bounding: u64,
    /// Ambient capabilities.
    pub cap_ambient: u64,
    /// `no_new_privs` flag.
    pub no_new_privs: bool,
    /// Seccomp mode (0: none, 1: strict, 2: filter).
    pub seccomp: u32,
}

/// Parses `/proc/PID/status`.
pub fn parse_status(text: &str) -> Result<Status> {
    let fields: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k, v.trim()))
        .collect();
    let bad = |key: &str| {
        Error::new(
            ErrorKind::System,
            format!("/proc status has no readable {key:?} field"),
        )
    };
    let get = |key: &str| fields.get(key).copied().ok_or_else(|| bad(key));
    let dec = |key: &str| -> Result<u64> { get(key)?.parse().map_err(|_| bad(key)) };
    let hex =
        |key: &str| -> Result<u64> { u64::from_str_radix(get(key)?, 16).map_err(|_| bad(key)) };
    let ids = |key: &str| -> Result<[u32; 4]> {
        let v: Vec<u32> = get(key)?
            .split_whitespace()
            .map(|s| s.parse().map_err(|_| bad(key)))
            .collect::<Result<_>>()?;
        v.try_into().map_err(|_| bad(key))
    };
    let list = |key: &str| -> Result<Vec<i64>> {
        fields
            .get(key)
            .map(|s| {
                s.split_whitespace()
                    .map(|x| x.parse().map_err(|_| bad(key)))
                    .collect()
            })
            .unwrap_or(Ok(Vec::new()))
    };
    Ok(Status {
        name: get("Name")?.to_string(),
        umask: fields
            .get("Umask")
            .map(|s| u32::from_str_radix(s, 8).map_err(|_| bad("Umask")))
            .transpose()?
            .unwrap_or(0o022),
        tgid: dec("Tgid")? as i32,
        tracer_pid: dec("TracerPid")? as i32,
        uid: ids("Uid")?,
        gid: ids("Gid")?,
        groups: list("Groups")?.into_iter().map(|g| g as u32).collect(),
        ns_pid: list("NSpid")?.into_iter().map(|p| p as i32).collect(),
        threads: dec("Threads")? as u32,
        shared_pending: hex("ShdPnd")?,
        sig_ignored: hex("SigIgn")?,
        sig_caught: hex("SigCgt")?,
        cap_inheritable: hex("CapInh")?,
        cap_permitted: hex("CapPrm")?,
        cap_effective: hex("CapEff")?,
        cap_bounding: hex("CapBnd")?,
        cap_ambient: hex("CapAmb")?,
        no_new_privs: dec("NoNewPrivs").unwrap_or(0) != 0,
        seccomp: dec("Seccomp").unwrap_or(0) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_caps_and_masks() {
        let text = "Name:\tsleep\nUmask:\t0027\nState:\tS (sleeping)\nTgid:\t77\nPid:\t77\n\
                    TracerPid:\t0\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t6\t7\t8\nGroups:\t4 24 \n\
                    NStgid:\t77\nNSpid:\t77\t1\nThreads:\t1\nShdPnd:\t0000000000000200\n\
                    SigIgn:\t0000000000001000\nSigCgt:\t0000000180000002\nCapInh:\t0000000000000000\n\
                    CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t0\n";
        let s = parse_status(text).unwrap();
        assert_eq!(s.name, "sleep");
        assert_eq!(s.umask, 0o027);
        assert_eq!(s.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(s.gid, [5, 6, 7, 8]);
        assert_eq!(s.groups, vec![4, 24]);
        assert_eq!(s.ns_pid, vec![77, 1]);
        assert_eq!(s.shared_pending, 0x200);
        assert_eq!(s.sig_caught, 0x1_8000_0002);
        assert!(s.no_new_privs);
    }
}
