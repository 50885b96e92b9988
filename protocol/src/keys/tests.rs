//! Keys: fingerprints, encodings, signatures, trusted-key files.

use super::*;

#[test]
fn fingerprint_is_first_16_bytes_of_sha256_hex() {
    // SHA-256("") = e3b0c442 98fc1c14 9afbf4c8 996fb924 27ae41e4 649b934c a495991b 7852b855
    assert_eq!(fingerprint(b""), "e3b0c44298fc1c149afbf4c8996fb924");
}

#[test]
fn public_keys_round_trip_base64_and_refuse_wrong_lengths() {
    let (k, _) = SigningKey::generate().unwrap();
    let b = k.public().to_base64();
    assert_eq!(SigningPublicKey::from_base64(&b, "x").unwrap(), k.public());
    let json = serde_json::to_string(&k.public()).unwrap();
    assert_eq!(json, format!("\"{b}\""));
    let err = EncryptionPublicKey::from_base64(&B64.encode([1u8; 31]), "pin of h1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pin of h1") && err.contains("31 bytes"),
        "{err}"
    );
    assert!(SigningPublicKey::from_base64("***", "x").is_err());
}

#[test]
fn signatures_verify_only_with_the_right_key_and_message() {
    let (a, _) = SigningKey::generate().unwrap();
    let (b, _) = SigningKey::generate().unwrap();
    let sig = a.sign(b"hello");
    assert!(a.public().verify(b"hello", &sig));
    assert!(!a.public().verify(b"hellO", &sig));
    assert!(!b.public().verify(b"hello", &sig));
}

#[test]
fn encryption_key_bytes_round_trip() {
    let k = EncryptionKey::generate();
    let back = EncryptionKey::from_bytes(&k.to_bytes()).unwrap();
    assert_eq!(back.public(), k.public());
    assert!(EncryptionKey::from_bytes(&[0u8; 5]).is_err());
}

#[test]
fn trusted_keys_parse_lines_and_name_a_bad_line() {
    let (a, _) = SigningKey::generate().unwrap();
    let text = format!("# operator keys\n\n{}\n", a.public());
    let t = TrustedKeys::parse(&text, "operator-keys").unwrap();
    assert!(t.contains(&a.public()));
    assert_eq!(t.len(), 1);
    let err = TrustedKeys::parse(&format!("{}\nnope\n", a.public()), "operator-keys")
        .unwrap_err()
        .to_string();
    assert!(err.contains("operator-keys line 2"), "{err}");
}
