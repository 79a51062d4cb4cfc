use super::*;

fn sample() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: "0123456789abcdef".into(),
        name: Some("demo".into()),
        created_at: "2026-01-01T00:00:00Z".into(),
        host: Host {
            kernel: "6.18.0".into(),
            page_size: 4096,
            vdso_hash: "00".into(),
        },
        shell_job: false,
        root_pid: 42,
        processes: vec![],
    }
}

#[test]
fn round_trips() {
    let m = sample();
    assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
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
