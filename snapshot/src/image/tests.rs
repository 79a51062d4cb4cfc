use super::*;

fn sample() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: "0123456789abcdef".into(),
        name: Some("demo".into()),
        parent: None,
        created_at: "2026-01-01T00:00:00Z".into(),
        host: Host {
            kernel: "6.18.0".into(),
            page_size: 4096,
            vdso_hash: "00".into(),
            boot_id: "b".into(),
        },
        shell_job: false,
        root_pid: 7,
        processes: vec![],
        zombies: vec![],
        files: vec![],
        open_files: vec![],
        shmem: vec![],
        shmem_pool: None,
    }
}

#[test]
fn round_trips() {
    let m = sample();
    assert_eq!(serde_json::from_slice::<Manifest>(&m.to_json()).unwrap(), m);
}

#[test]
fn refuses_dangling_references_and_escaping_names() {
    let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
    assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap())
        .unwrap_err()
        .to_string()
        .contains("no root process"));
    let process = minimal_process();
    v["processes"] = serde_json::json!([process]);
    let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("open file that does not exist"),
        "{err}"
    );
    v["processes"][0]["fds"] = serde_json::json!([]);
    Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    v["processes"][0]["pool"] = serde_json::json!({"name": "../../etc/passwd", "size": 0});
    let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(err.to_string().contains("plain name"), "{err}");
}

#[test]
fn refuses_unknown_version() {
    let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
    v["version"] = 99.into();
    let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[test]
fn refuses_other_formats_and_garbage() {
    let err = Manifest::from_json(br#"{"format":"oci","version":1}"#).unwrap_err();
    assert!(err.to_string().contains("not a dolly snapshot"), "{err}");
    let err = Manifest::from_json(b"{\"format\": \"dolly-sn").unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");
}

#[test]
fn refuses_unknown_fields() {
    let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
    v["surprise"] = true.into();
    assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
}

/// specs/image-format.schema.json is generated from these types; this keeps it true.
/// Run with DOLLY_BLESS=1 to rewrite it after changing the image types.
#[test]
fn published_schema_matches_types() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/image-format.schema.json");
    let mut generated = serde_json::to_string_pretty(&Manifest::json_schema()).unwrap();
    generated.push('\n');
    if std::env::var_os("DOLLY_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let published = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        published == generated,
        "specs/image-format.schema.json is out of date: run `DOLLY_BLESS=1 cargo test -p dolly-snapshot` and update specs/image-format.md"
    );
}

/// A manifest with one minimal, valid process (for tests elsewhere in the crate).
pub(crate) fn valid_manifest(id: &str) -> Manifest {
    let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
    v["id"] = id.into();
    v["processes"] = serde_json::json!([minimal_process()]);
    v["processes"][0]["fds"] = serde_json::json!([]);
    serde_json::from_value(v).unwrap()
}

fn minimal_process() -> serde_json::Value {
    serde_json::json!({
        "pid": 7, "ns_pids": [7], "ppid": 1, "pgid": 7, "sid": 7, "comm": "x", "stopped": false,
        "exe": "/x", "personality": 0, "umask": 18, "cwd": "/", "root": "/", "rlimits": [],
        "creds": {"uid": [0,0,0,0], "gid": [0,0,0,0], "groups": [], "cap_inheritable": 0,
                  "cap_permitted": 0, "cap_effective": 0, "cap_bounding": 0, "cap_ambient": 0,
                  "securebits": 0, "no_new_privs": false},
        "flags": {"dumpable": 1, "timerslack_ns": 50000, "thp_disable": false,
                  "child_subreaper": false, "pdeathsig": 0, "coredump_filter": 51},
        "sched": {"policy": 0, "priority": 0, "nice": 0, "affinity": [1], "io_priority": 0},
        "oom_score_adj": 0,
        "mm": {"start_code": 0, "end_code": 0, "start_data": 0, "end_data": 0, "start_brk": 0,
               "brk": 0, "start_stack": 0, "arg_start": 0, "arg_end": 0, "env_start": 0,
               "env_end": 0, "auxv": []},
        "areas": [], "pool": null,
        "fds": [{"fd": 3, "open_file": 0, "cloexec": false}], "locks": [],
        "signals": {"actions": [], "pending": []},
        "itimers": {"real": {"interval_us": 0, "value_us": 0}, "virtual": {"interval_us": 0, "value_us": 0}, "prof": {"interval_us": 0, "value_us": 0}},
        "threads": [{"tid": 7, "ns_tids": [7], "comm": "x", "regs": serde_json::to_value(Registers::default()).unwrap(),
                     "xstate": "", "sigmask": 0, "pending": [], "altstack": {"sp": 0, "size": 0, "flags": 2},
                     "rseq": null, "robust_list": null, "clear_child_tid": 0}]
    })
}
