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

/// ring's verifier, which signed envelopes were checked with before.
fn ring_verifies(key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(message, signature)
        .is_ok()
}

#[test]
fn signatures_are_judged_as_ring_judged_them() {
    // S + L: the same signature with a non-canonical scalar (L, the group order, little-endian)
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let rng = SystemRandom::new();
    let mut checked = 0;
    for round in 0..40u32 {
        let (k, _) = SigningKey::generate().unwrap();
        let key = k.public().0;
        let mut message = vec![0u8; (round as usize * 37) % 300];
        ring::rand::SecureRandom::fill(&rng, &mut message).unwrap();
        let sig = k.sign(&message);
        let mut cases = vec![(key, message.clone(), sig.to_vec())];
        for i in 0..64 {
            let mut bad = sig;
            bad[i] ^= 1 << (round % 8);
            cases.push((key, message.clone(), bad.to_vec()));
        }
        let mut s_plus_l = sig;
        let mut carry = 0u16;
        for i in 0..32 {
            let v = s_plus_l[32 + i] as u16 + L[i] as u16 + carry;
            s_plus_l[32 + i] = v as u8;
            carry = v >> 8;
        }
        cases.push((key, message.clone(), s_plus_l.to_vec()));
        cases.push((key, message.clone(), sig[..63].to_vec()));
        let mut other = message.clone();
        other.push(1);
        cases.push((key, other, sig.to_vec()));
        // a small-order key (the identity), and random bytes as a key
        cases.push((
            [1u8; 1]
                .iter()
                .chain([0u8; 31].iter())
                .copied()
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
            message.clone(),
            sig.to_vec(),
        ));
        let mut random = [0u8; 32];
        ring::rand::SecureRandom::fill(&rng, &mut random).unwrap();
        cases.push((random, message.clone(), sig.to_vec()));
        for (key, message, sig) in cases {
            assert_eq!(
                SigningPublicKey(key).verify(&message, &sig),
                ring_verifies(&key, &message, &sig),
                "key {key:?} signature {sig:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 2000);
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
