//! Credentials: user and group ids, supplementary groups, capabilities, securebits and
//! `no_new_privs`. Restored last, since they can take away the power to restore the rest.

use crate::error::{Error, Result};
use crate::image::Credentials;
use crate::proc::Status;
use crate::tracee::Remote;

const SECBIT_NO_SETUID_FIXUP: u64 = 1 << 2;
const SECBIT_KEEP_CAPS: u64 = 1 << 4;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Credentials from a process's status and its securebits.
pub fn capture(status: &Status, securebits: u32) -> Credentials {
    Credentials {
        uid: status.uid,
        gid: status.gid,
        groups: status.groups.clone(),
        cap_inheritable: status.cap_inheritable,
        cap_permitted: status.cap_permitted,
        cap_effective: status.cap_effective,
        cap_bounding: status.cap_bounding,
        cap_ambient: status.cap_ambient,
        securebits,
        no_new_privs: status.no_new_privs,
    }
}

/// Refuses credentials a process restored by this dolly could not have: capabilities
/// outside dolly's own bounding set (they cannot be added back), or no_new_privs off when
/// dolly runs with it on (it is inherited and cannot be cleared).
pub fn check_restorable(c: &Credentials, own: &Status) -> Result<()> {
    let missing = (c.cap_bounding | c.cap_permitted) & !(own.cap_bounding & own.cap_permitted);
    if missing != 0 {
        return Err(Error::refused(
            format!("the process had capabilities this dolly lacks (bits {missing:#x})"),
            "run dolly with at least the capabilities the process had",
        ));
    }
    if own.no_new_privs && !c.no_new_privs {
        return Err(Error::refused(
            "dolly runs with no_new_privs and the process did not: a restored process would inherit it",
            "run dolly without no_new_privs",
        ));
    }
    Ok(())
}

/// Bytes of scratch memory [`restore`] needs.
pub fn scratch_needed(creds: &Credentials) -> u64 {
    (creds.groups.len() as u64 * 4).max(32)
}

/// Gives a process being rebuilt (still root with every capability) the captured
/// credentials: groups, gids, uids (keeping capabilities across the switch), bounding set,
/// securebits, capability sets, ambient set, no_new_privs.
pub fn restore(remote: &mut Remote, scratch: u64, c: &Credentials, own: &Status) -> Result<()> {
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    remote.write_mem(scratch, &groups)?;
    remote.call(
        "setting groups",
        libc::SYS_setgroups,
        &[c.groups.len() as u64, scratch],
    )?;
    let [rg, eg, sg, fg] = c.gid.map(u64::from);
    remote.call("setting group ids", libc::SYS_setresgid, &[rg, eg, sg])?;
    remote.raw(libc::SYS_setfsgid, &[fg])?;
    let prctl = libc::SYS_prctl;
    remote.call(
        "keeping capabilities across the uid change",
        prctl,
        &[
            libc::PR_SET_SECUREBITS as u64,
            SECBIT_KEEP_CAPS | SECBIT_NO_SETUID_FIXUP,
        ],
    )?;
    let [ru, eu, su, fu] = c.uid.map(u64::from);
    remote.call("setting user ids", libc::SYS_setresuid, &[ru, eu, su])?;
    remote.raw(libc::SYS_setfsuid, &[fu])?;
    for cap in 0..64u64 {
        let bit = 1u64 << cap;
        if own.cap_bounding & bit != 0 && c.cap_bounding & bit == 0 {
            remote.call(
                &format!("dropping capability {cap} from the bounding set"),
                prctl,
                &[libc::PR_CAPBSET_DROP as u64, cap],
            )?;
        }
    }

    // While every capability is still permitted (CAP_SETPCAP among them): take the
    // inheritable set, raise the ambient ones (they must be permitted and inheritable), set
    // the securebits (they may forbid raising ambient capabilities, and need CAP_SETPCAP);
    // then drop to the captured sets, which takes no privilege.
    let capset = |remote: &mut Remote, what: &str, e: u64, p: u64, i: u64| -> Result<()> {
        let mut data = Vec::with_capacity(32);
        data.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_ne_bytes());
        data.extend_from_slice(&0i32.to_ne_bytes());
        for half in [0u32, 32] {
            for set in [e, p, i] {
                data.extend_from_slice(&((set >> half) as u32).to_ne_bytes());
            }
        }
        remote.write_mem(scratch, &data)?;
        remote
            .call(what, libc::SYS_capset, &[scratch, scratch + 8])
            .map(drop)
    };
    capset(
        remote,
        "setting inheritable capabilities",
        own.cap_permitted,
        own.cap_permitted,
        c.cap_inheritable,
    )?;
    for cap in (0..64u64).filter(|cap| c.cap_ambient & (1 << cap) != 0) {
        remote.call(
            &format!("raising ambient capability {cap}"),
            prctl,
            &[
                libc::PR_CAP_AMBIENT as u64,
                libc::PR_CAP_AMBIENT_RAISE as u64,
                cap,
            ],
        )?;
    }
    remote.call(
        "setting securebits",
        prctl,
        &[libc::PR_SET_SECUREBITS as u64, c.securebits as u64],
    )?;
    capset(
        remote,
        "setting capabilities",
        c.cap_effective,
        c.cap_permitted,
        c.cap_inheritable,
    )?;
    if c.no_new_privs {
        remote.call(
            "setting no_new_privs",
            prctl,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1],
        )?;
    }
    Ok(())
}
