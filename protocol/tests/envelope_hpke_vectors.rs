//! The HPKE construction the envelope relies on, checked against RFC 9180 Appendix A.1.1
//! (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode) with the `hpke` crate,
//! plus a round trip of the production suite (AES-256-GCM) through the envelope's key type.

use dog_protocol::keys::EncryptionKey;
use hpke::aead::{AesGcm128, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::rand_core::{TryCryptoRng, TryRng};
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use serde::Deserialize;
use std::convert::Infallible;

#[derive(Deserialize)]
struct Encryption {
    sequence: u64,
    aad: String,
    pt: String,
    ct: String,
}

#[derive(Deserialize)]
struct Export {
    exporter_context: String,
    #[serde(rename = "L")]
    len: usize,
    exported_value: String,
}

#[derive(Deserialize)]
struct Vector {
    info: String,
    #[serde(rename = "ikmE")]
    ikm_e: String,
    #[serde(rename = "pkEm")]
    pk_em: String,
    #[serde(rename = "ikmR")]
    ikm_r: String,
    #[serde(rename = "pkRm")]
    pk_rm: String,
    #[serde(rename = "skRm")]
    sk_rm: String,
    enc: String,
    encryptions: Vec<Encryption>,
    exports: Vec<Export>,
}

fn vector() -> Vector {
    let text = include_str!("vectors/rfc9180_a1.json");
    serde_json::from_str(text).unwrap()
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

/// An "RNG" that replays fixed bytes: makes the sender's ephemeral key the RFC's ikmE.
struct Fixed(Vec<u8>);

impl TryRng for Fixed {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        unreachable!("only fill_bytes is used")
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        unreachable!("only fill_bytes is used")
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        assert!(dst.len() <= self.0.len(), "asked for more fixed bytes");
        let rest = self.0.split_off(dst.len());
        dst.copy_from_slice(&self.0);
        self.0 = rest;
        Ok(())
    }
}
impl TryCryptoRng for Fixed {}

#[test]
fn derive_keypair_gives_the_rfc_public_keys() {
    let v = vector();
    let (sk_r, pk_r) = X25519HkdfSha256::derive_keypair(&h(&v.ikm_r));
    assert_eq!(pk_r.to_bytes().to_vec(), h(&v.pk_rm));
    // The crate stores the X25519 scalar clamped (RFC 7748 §5); clamping the RFC's skRm
    // gives the same bytes, i.e. the same key.
    let mut clamped = h(&v.sk_rm);
    clamped[0] &= 248;
    clamped[31] &= 127;
    clamped[31] |= 64;
    assert_eq!(sk_r.to_bytes().to_vec(), clamped);
    let (_, pk_e) = X25519HkdfSha256::derive_keypair(&h(&v.ikm_e));
    assert_eq!(pk_e.to_bytes().to_vec(), h(&v.pk_em));
    // our key type derives the same
    assert_eq!(
        EncryptionKey::derive(&h(&v.ikm_r)).public().0.to_vec(),
        h(&v.pk_rm)
    );
    assert_eq!(
        EncryptionKey::from_bytes(&h(&v.sk_rm))
            .unwrap()
            .public()
            .0
            .to_vec(),
        h(&v.pk_rm)
    );
}

#[test]
fn receiver_opens_the_rfc_ciphertexts_and_exports_the_rfc_values() {
    let v = vector();
    let (sk_r, _) = X25519HkdfSha256::derive_keypair(&h(&v.ikm_r));
    let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&h(&v.enc)).unwrap();
    let mut ctx = hpke::setup_receiver::<AesGcm128, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &sk_r,
        &enc,
        &h(&v.info),
    )
    .unwrap();
    // sequences 0, 1, 2 are consecutive in the vector
    for e in v.encryptions.iter().take_while(|e| e.sequence < 3) {
        let pt = ctx.open(&h(&e.ct), &h(&e.aad)).unwrap();
        assert_eq!(pt, h(&e.pt), "sequence {}", e.sequence);
    }
    // a wrong aad fails and does not advance the sequence
    assert!(ctx.open(&h(&v.encryptions[0].ct), b"Count-3").is_err());
    for e in &v.exports {
        let mut out = vec![0u8; e.len];
        ctx.export(&h(&e.exporter_context), &mut out).unwrap();
        assert_eq!(out, h(&e.exported_value));
    }
}

#[test]
fn sender_with_the_rfc_ephemeral_key_reproduces_every_listed_sequence() {
    let v = vector();
    let (sk_r, pk_r) = X25519HkdfSha256::derive_keypair(&h(&v.ikm_r));
    let (enc, mut sender) = hpke::setup_sender_with_rng::<AesGcm128, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &pk_r,
        &h(&v.info),
        &mut Fixed(h(&v.ikm_e)),
    )
    .unwrap();
    assert_eq!(enc.to_bytes().to_vec(), h(&v.enc));
    let mut receiver = hpke::setup_receiver::<AesGcm128, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &sk_r,
        &enc,
        &h(&v.info),
    )
    .unwrap();
    let pt = h(&v.encryptions[0].pt);
    let last = v.encryptions.iter().map(|e| e.sequence).max().unwrap();
    let mut checked = 0;
    for seq in 0..=last {
        let aad = format!("Count-{seq}").into_bytes();
        let ct = sender.seal(&pt, &aad).unwrap();
        if let Some(e) = v.encryptions.iter().find(|e| e.sequence == seq) {
            assert_eq!(aad, h(&e.aad));
            assert_eq!(hex::encode(&ct), e.ct, "sequence {seq}");
            checked += 1;
        }
        assert_eq!(receiver.open(&ct, &aad).unwrap(), pt);
    }
    assert_eq!(checked, v.encryptions.len());
    for e in &v.exports {
        let mut out = vec![0u8; e.len];
        sender.export(&h(&e.exporter_context), &mut out).unwrap();
        assert_eq!(out, h(&e.exported_value));
    }
}

#[test]
fn production_suite_round_trips_and_binds_aad_and_info() {
    let agent = EncryptionKey::generate();
    let pk = <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&agent.public().0).unwrap();
    let msg = vec![7u8; 4096];
    let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &pk,
        b"info",
        &msg,
        b"header",
    )
    .unwrap();
    assert_eq!(ct.len(), msg.len() + 16);
    let sk = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&agent.to_bytes()).unwrap();
    let open = |info: &[u8], aad: &[u8]| {
        hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &sk,
            &enc,
            info,
            &ct,
            aad,
        )
    };
    assert_eq!(open(b"info", b"header").unwrap(), msg);
    assert!(open(b"info", b"headex").is_err());
    assert!(open(b"infx", b"header").is_err());
}
