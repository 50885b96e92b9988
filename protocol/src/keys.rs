//! Key material of the envelope (see [`crate::envelope`] and `docs/protocol.md`).
//!
//! * Every sender signs with an **Ed25519** key (`ring`; verified with `ed25519-dalek`, which is
//!   faster at it). The agent's key is created on first
//!   start and kept in its state directory as a raw PKCS#8 v2 document
//!   ([`AGENT_SIGNING_FILE`]); the operator's key is one file written by
//!   [`write_new_operator_key`] (base64 of the PKCS#8 document, one line).
//! * Every agent has an **X25519** key (`hpke`, DHKEM(X25519, HKDF-SHA256)) that the operator
//!   encrypts to. It is kept as the raw 32-byte private key ([`AGENT_ENCRYPTION_FILE`]).
//! * Public keys travel as standard base64 of their 32 raw bytes. A key is named by its
//!   [fingerprint](fingerprint): lowercase hex of the first 16 bytes of SHA-256 of the raw public
//!   key. The fingerprint of a signing key is its *key id* in envelope headers.
//!
//! Key files are created with mode 0600 from the first byte (never chmod-ed afterwards), in a
//! directory created 0700; a key file that is readable or writable by group or others, or whose
//! content does not parse, is refused with an error naming the file.
//!
//! The operator-side pinning of agent keys lives in [`pinning`].

pub mod pinning;
mod trusted;

pub use trusted::TrustedKeys;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, Serializable};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The HPKE KEM used for every agent encryption key.
pub type AgentKem = X25519HkdfSha256;

/// File name of the agent's Ed25519 signing key (raw PKCS#8 v2 DER) in its state directory.
pub const AGENT_SIGNING_FILE: &str = "agent-signing.pk8";
/// File name of the agent's X25519 private key (raw 32 bytes) in its state directory.
pub const AGENT_ENCRYPTION_FILE: &str = "agent-encryption.key";
/// Largest key file read (a PKCS#8 Ed25519 document is 83 bytes; base64 of it 112).
const MAX_KEY_FILE: u64 = 4096;

/// Lowercase hex of the first 16 bytes of SHA-256 of `public_key`.
pub fn fingerprint(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..16])
}

/// Errors of loading, creating or parsing keys. Every variant names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}; it must not be accessible by {who} (expected 0600)"
    )]
    Permissions {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error("key file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("{what} is not a valid {kind} public key: {reason}")]
    BadPublicKey {
        what: String,
        kind: &'static str,
        reason: String,
    },
    #[error("could not generate a key: {0}")]
    Generate(String),
}

// ------------------------------------------------------------------------------------------
// public keys
// ------------------------------------------------------------------------------------------

macro_rules! public_key_type {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        ///
        /// Serialized (serde, text files) as standard base64 of the 32 raw bytes.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Parses standard base64 of 32 raw bytes; `what` names the source in errors.
            pub fn from_base64(text: &str, what: &str) -> Result<Self, KeyError> {
                let bytes = B64
                    .decode(text.trim())
                    .map_err(|e| KeyError::BadPublicKey {
                        what: what.to_string(),
                        kind: $kind,
                        reason: e.to_string(),
                    })?;
                let arr: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| KeyError::BadPublicKey {
                            what: what.to_string(),
                            kind: $kind,
                            reason: format!("{} bytes, expected 32", bytes.len()),
                        })?;
                Ok($name(arr))
            }
            pub fn to_base64(&self) -> String {
                B64.encode(self.0)
            }
            /// See [`fingerprint`].
            pub fn fingerprint(&self) -> String {
                fingerprint(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.fingerprint())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_base64())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_base64())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text: std::borrow::Cow<'de, str> = Deserialize::deserialize(d)?;
                if text.len() > 64 {
                    return Err(serde::de::Error::custom(concat!($kind, " key too long")));
                }
                $name::from_base64(&text, "public key").map_err(serde::de::Error::custom)
            }
        }
    };
}

public_key_type!(
    SigningPublicKey,
    "Ed25519",
    "An Ed25519 public key that verifies envelope signatures."
);
public_key_type!(
    EncryptionPublicKey,
    "X25519",
    "An X25519 public key that HPKE encrypts to."
);

impl SigningPublicKey {
    /// Verifies an Ed25519 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        // RFC 8032 verification as ring's: S must be canonical, R must equal [S]B - [k]A
        // (no cofactor); keys_tests checks the two agree
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .is_ok_and(|key| ed25519_dalek::Verifier::verify(&key, message, &signature).is_ok())
    }
}

impl EncryptionPublicKey {
    /// The key as the `hpke` crate's type. Every 32-byte string is a valid X25519 public key.
    pub(crate) fn to_hpke(self) -> Result<<AgentKem as hpke::Kem>::PublicKey, hpke::HpkeError> {
        <AgentKem as hpke::Kem>::PublicKey::from_bytes(&self.0)
    }
}

// ------------------------------------------------------------------------------------------
// private keys
// ------------------------------------------------------------------------------------------

/// An Ed25519 signing key (ring).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: SigningPublicKey,
}

impl SigningKey {
    /// Generates a new key; returns it with its PKCS#8 v2 document (to be stored).
    pub fn generate() -> Result<(SigningKey, Zeroizing<Vec<u8>>), KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError::Generate("ring could not generate an Ed25519 key".into()))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        let key = SigningKey::from_pkcs8(&pkcs8)
            .map_err(|e| KeyError::Generate(format!("generated key does not parse: {e}")))?;
        Ok((key, pkcs8))
    }

    /// Parses a PKCS#8 (v1 or v2) Ed25519 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|e| e.to_string())?;
        let public = SigningPublicKey(
            pair.public_key()
                .as_ref()
                .try_into()
                .map_err(|_| "public key is not 32 bytes".to_string())?,
        );
        Ok(SigningKey { pair, public })
    }

    pub fn public(&self) -> SigningPublicKey {
        self.public
    }

    /// The key id carried in envelope headers: the public key's [`fingerprint`].
    pub fn key_id(&self) -> String {
        self.public.fingerprint()
    }

    /// Ed25519 signature (64 bytes) over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let sig = self.pair.sign(message);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public.fingerprint())
    }
}

/// An X25519 private key for HPKE (the `hpke` crate's type; zeroized on drop).
#[derive(Clone)]
pub struct EncryptionKey {
    secret: <AgentKem as hpke::Kem>::PrivateKey,
    public: EncryptionPublicKey,
}

impl EncryptionKey {
    pub fn generate() -> EncryptionKey {
        let (secret, public) = AgentKem::gen_keypair();
        EncryptionKey::from_parts(secret, public)
    }

    /// The RFC 9180 `DeriveKeyPair(ikm)` of the KEM (deterministic; tests and vectors).
    pub fn derive(ikm: &[u8]) -> EncryptionKey {
        let (secret, public) = AgentKem::derive_keypair(ikm);
        EncryptionKey::from_parts(secret, public)
    }

    /// Parses the raw 32-byte private key.
    pub fn from_bytes(bytes: &[u8]) -> Result<EncryptionKey, String> {
        let secret =
            <AgentKem as hpke::Kem>::PrivateKey::from_bytes(bytes).map_err(|e| e.to_string())?;
        let public = AgentKem::sk_to_pk(&secret);
        Ok(EncryptionKey::from_parts(secret, public))
    }

    fn from_parts(
        secret: <AgentKem as hpke::Kem>::PrivateKey,
        public: <AgentKem as hpke::Kem>::PublicKey,
    ) -> EncryptionKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&public.to_bytes());
        EncryptionKey {
            secret,
            public: EncryptionPublicKey(raw),
        }
    }

    /// The raw 32-byte private key (for storing it).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.secret.to_bytes().to_vec())
    }

    pub fn public(&self) -> EncryptionPublicKey {
        self.public
    }

    pub(crate) fn hpke_secret(&self) -> &<AgentKem as hpke::Kem>::PrivateKey {
        &self.secret
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey({})", self.public.fingerprint())
    }
}

// ------------------------------------------------------------------------------------------
// key files
// ------------------------------------------------------------------------------------------

/// Which permission bits make a key file unacceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilePolicy {
    /// Nothing for group or others (the agent's own files; 0600 or 0400).
    OwnerOnly,
    /// Group may read, nothing else (a Kubernetes Secret mounted with `defaultMode: 0440` and
    /// an `fsGroup`; 0400 and 0600 pass too).
    GroupRead,
}

impl FilePolicy {
    fn forbidden(self) -> (u32, &'static str) {
        match self {
            FilePolicy::OwnerOnly => (0o077, "group or others"),
            FilePolicy::GroupRead => (0o037, "others, or writable by group"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a key file after checking its permissions (following symlinks, as a Secret mount
/// uses them). Never reads more than [`MAX_KEY_FILE`] bytes.
pub fn read_key_file(path: &Path, policy: FilePolicy) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    let (forbidden, who) = policy.forbidden();
    if mode & forbidden != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
            who,
        });
    }
    if !meta.is_file() {
        return Err(KeyError::Corrupt {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut buf = Zeroizing::new(Vec::new());
    (&mut file)
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_KEY_FILE} bytes"),
        });
    }
    Ok(buf)
}

/// Writes a new key file created with mode 0600 (via a temporary file in the same directory,
/// fsync-ed and renamed, so a crash never leaves a half-written key under the final name).
/// Refuses to replace an existing file.
pub fn write_key_file(path: &Path, content: &[u8]) -> Result<(), KeyError> {
    if fs::symlink_metadata(path).is_ok() {
        return Err(KeyError::Exists {
            path: path.to_path_buf(),
        });
    }
    let mut tmp_name = path.as_os_str().to_os_string();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(content).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    // hard_link fails if the destination appeared meanwhile: never overwrite a key.
    fs::hard_link(&tmp, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    fs::remove_file(&tmp).map_err(io_err(&tmp))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The agent's two keys, kept in its state directory.
#[derive(Debug)]
pub struct AgentKeys {
    pub signing: SigningKey,
    pub encryption: EncryptionKey,
}

/// What [`AgentKeys::load_or_create`] did, for the agent's start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysCreated {
    pub signing: bool,
    pub encryption: bool,
}

impl AgentKeys {
    /// Loads the agent's keys from `state_dir`, creating any that does not exist yet (the
    /// directory too, mode 0700). Refuses a key file with group/other permission bits or
    /// corrupt content, naming the file.
    pub fn load_or_create(state_dir: &Path) -> Result<(AgentKeys, KeysCreated), KeyError> {
        if !state_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(io_err(state_dir))?;
        }
        let sp = state_dir.join(AGENT_SIGNING_FILE);
        let ep = state_dir.join(AGENT_ENCRYPTION_FILE);
        let mut created = KeysCreated {
            signing: false,
            encryption: false,
        };
        let signing = if exists(&sp)? {
            let raw = read_key_file(&sp, FilePolicy::OwnerOnly)?;
            SigningKey::from_pkcs8(&raw).map_err(|reason| KeyError::Corrupt {
                path: sp.clone(),
                reason: format!("not an Ed25519 PKCS#8 document: {reason}"),
            })?
        } else {
            let (key, pkcs8) = SigningKey::generate()?;
            write_key_file(&sp, &pkcs8)?;
            created.signing = true;
            key
        };
        let encryption = if exists(&ep)? {
            let raw = read_key_file(&ep, FilePolicy::OwnerOnly)?;
            if raw.len() != 32 {
                return Err(KeyError::Corrupt {
                    path: ep,
                    reason: format!("{} bytes, expected a 32-byte X25519 key", raw.len()),
                });
            }
            EncryptionKey::from_bytes(&raw).map_err(|reason| KeyError::Corrupt {
                path: ep.clone(),
                reason,
            })?
        } else {
            let key = EncryptionKey::generate();
            write_key_file(&ep, &key.to_bytes())?;
            created.encryption = true;
            key
        };
        Ok((
            AgentKeys {
                signing,
                encryption,
            },
            created,
        ))
    }
}

fn exists(path: &Path) -> Result<bool, KeyError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

// ------------------------------------------------------------------------------------------
// operator key
// ------------------------------------------------------------------------------------------

/// Writes a new operator signing key to `path` (base64 of its PKCS#8 v2 document and a
/// newline, mode 0600; refuses to overwrite) and returns its public key — the value to give
/// agents (chart value `operatorPublicKeys`). This is what `dog-operator keygen` runs.
pub fn write_new_operator_key(path: &Path) -> Result<SigningPublicKey, KeyError> {
    let (key, pkcs8) = SigningKey::generate()?;
    let mut text = Zeroizing::new(B64.encode(&*pkcs8).into_bytes());
    text.push(b'\n');
    write_key_file(path, &text)?;
    Ok(key.public())
}

/// Loads the operator's signing key: the file holds either base64 of a PKCS#8 Ed25519
/// document (as [`write_new_operator_key`] writes it; surrounding whitespace ignored) or the
/// raw DER document itself. The file must not be accessible by others nor writable by group
/// (see [`FilePolicy::GroupRead`]).
pub fn load_operator_key(path: &Path) -> Result<SigningKey, KeyError> {
    let raw = read_key_file(path, FilePolicy::GroupRead)?;
    let decoded = std::str::from_utf8(&raw)
        .ok()
        .and_then(|t| B64.decode(t.trim()).ok())
        .map(Zeroizing::new);
    let der: &[u8] = decoded.as_deref().map_or(&raw[..], |v| &v[..]);
    SigningKey::from_pkcs8(der).map_err(|reason| KeyError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("neither base64 of nor a raw Ed25519 PKCS#8 document: {reason}"),
    })
}

#[cfg(test)]
mod tests;
