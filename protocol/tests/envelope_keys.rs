//! Key files: created 0600 on first start, loaded later, refused when too open or corrupt.

use dog_protocol::keys::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn agent_keys_are_created_0600_once_and_loaded_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (k1, created) = AgentKeys::load_or_create(&state).unwrap();
    assert_eq!(
        created,
        KeysCreated {
            signing: true,
            encryption: true
        }
    );
    assert_eq!(mode(&state), 0o700);
    for f in [AGENT_SIGNING_FILE, AGENT_ENCRYPTION_FILE] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
        assert!(!state.join(format!("{f}.tmp")).exists());
    }
    let (k2, created) = AgentKeys::load_or_create(&state).unwrap();
    assert_eq!(
        created,
        KeysCreated {
            signing: false,
            encryption: false
        }
    );
    assert_eq!(k1.signing.public(), k2.signing.public());
    assert_eq!(k1.encryption.public(), k2.encryption.public());
    // the loaded keys work: sign/verify
    let sig = k2.signing.sign(b"x");
    assert!(k1.signing.public().verify(b"x", &sig));
}

#[test]
fn a_key_file_open_to_group_or_others_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    AgentKeys::load_or_create(dir.path()).unwrap();
    for (file, m) in [
        (AGENT_SIGNING_FILE, 0o644),
        (AGENT_ENCRYPTION_FILE, 0o640),
        (AGENT_ENCRYPTION_FILE, 0o602),
    ] {
        let p = dir.path().join(file);
        fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
        let err = AgentKeys::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(&err, KeyError::Permissions { path, mode, .. } if *path == p && *mode == m),
            "{err}"
        );
        assert!(err.to_string().contains(file), "{err}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    }
    // 0400 is fine
    let p = dir.path().join(AGENT_SIGNING_FILE);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
    AgentKeys::load_or_create(dir.path()).unwrap();
}

#[test]
fn corrupt_key_files_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    AgentKeys::load_or_create(dir.path()).unwrap();
    let sp = dir.path().join(AGENT_SIGNING_FILE);
    let good = fs::read(&sp).unwrap();
    fs::write(&sp, &good[..good.len() - 3]).unwrap();
    let err = AgentKeys::load_or_create(dir.path()).unwrap_err();
    assert!(
        matches!(&err, KeyError::Corrupt { path, .. } if *path == sp),
        "{err}"
    );
    assert!(err.to_string().contains(AGENT_SIGNING_FILE));
    fs::write(&sp, &good).unwrap();

    let ep = dir.path().join(AGENT_ENCRYPTION_FILE);
    fs::write(&ep, [1u8; 33]).unwrap();
    let err = AgentKeys::load_or_create(dir.path()).unwrap_err();
    assert!(
        matches!(&err, KeyError::Corrupt { path, .. } if *path == ep),
        "{err}"
    );
}

#[test]
fn a_missing_key_is_created_and_the_other_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, _) = AgentKeys::load_or_create(dir.path()).unwrap();
    fs::remove_file(dir.path().join(AGENT_ENCRYPTION_FILE)).unwrap();
    let (k2, created) = AgentKeys::load_or_create(dir.path()).unwrap();
    assert!(created.encryption && !created.signing);
    assert_eq!(k1.signing.public(), k2.signing.public());
    assert_ne!(k1.encryption.public(), k2.encryption.public());
}

#[test]
fn operator_key_is_written_once_and_loads_from_base64_or_raw_der() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("operator.key");
    let public = write_new_operator_key(&p).unwrap();
    assert_eq!(mode(&p), 0o600);
    assert!(matches!(
        write_new_operator_key(&p),
        Err(KeyError::Exists { .. })
    ));
    let k = load_operator_key(&p).unwrap();
    assert_eq!(k.public(), public);
    assert_eq!(k.key_id(), public.fingerprint());
    assert_eq!(k.key_id().len(), 32);

    // the same key as a raw DER file
    use base64::Engine as _;
    let text = fs::read_to_string(&p).unwrap();
    let der = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap();
    let raw = dir.path().join("operator.der");
    write_key_file(&raw, &der).unwrap();
    assert_eq!(load_operator_key(&raw).unwrap().public(), public);

    // a Secret mounted 0440 is accepted; world-readable is not
    fs::set_permissions(&p, fs::Permissions::from_mode(0o440)).unwrap();
    load_operator_key(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).unwrap();
    assert!(matches!(
        load_operator_key(&p),
        Err(KeyError::Permissions { .. })
    ));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&p, "not a key\n").unwrap();
    let err = load_operator_key(&p).unwrap_err();
    assert!(err.to_string().contains("operator.key"), "{err}");
}
