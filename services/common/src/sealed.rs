//! Sealed env values: a job's env value marked secret is stored only
//! sealed (ChaCha20-Poly1305 under the mesh's secrets key), by every
//! service and in every database, and opened only by the runner that
//! starts the job.
//!
//! A sealed value is `tmsealed:v1:` and the hex of a random nonce followed
//! by the ciphertext. The variable's name and the job's owner are bound to
//! it (associated data): a sealed value copied into another variable, or
//! into another user's job, does not open.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// What every sealed value starts with; a plain value may not.
pub const PREFIX: &str = "tmsealed:v1:";

/// Bytes sealing adds to a value before hex (nonce and tag).
const OVERHEAD: usize = NONCE_LEN + 16;

/// The length of `value` once sealed.
pub fn sealed_len(value: &str) -> usize {
    PREFIX.len() + 2 * (value.len() + OVERHEAD)
}

pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX)
}

/// The mesh's secrets key: 32 random bytes, kept as 64 hex characters in
/// a file private to the services that seal and open (job-service and the
/// runners).
pub struct SecretsKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(…)")
    }
}

impl SecretsKey {
    pub fn from_hex(text: &str) -> anyhow::Result<Self> {
        let bytes = hex::decode(text.trim())
            .map_err(|e| anyhow::anyhow!("a secrets key is 64 hex characters: {e}"))?;
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| {
            anyhow::anyhow!(
                "a secrets key is 32 bytes (64 hex characters), not {}",
                bytes.len()
            )
        })?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the secrets key {}: {e}", path.display()))?;
        Self::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The key at `path`, `None` when the file does not exist.
    pub fn load_optional(path: &Path) -> anyhow::Result<Option<Self>> {
        if path.exists() {
            Self::load(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A new random key, as hex.
    pub fn generate_hex() -> String {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source");
        hex::encode(bytes)
    }

    pub fn seal(&self, owner: &str, variable: &str, value: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut data = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound(owner, variable)),
                &mut data,
            )
            .expect("a value within the AEAD's length limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{PREFIX}{}", hex::encode(out))
    }

    /// The value sealed for `owner`'s `variable`; an error says why not
    /// (not sealed, damaged, another key, or bound to another variable or
    /// owner).
    pub fn open(&self, owner: &str, variable: &str, sealed: &str) -> Result<String, String> {
        let hex_part = sealed
            .strip_prefix(PREFIX)
            .ok_or_else(|| "the value is not sealed".to_string())?;
        let bytes = hex::decode(hex_part).map_err(|_| "the sealed value is damaged".to_string())?;
        if bytes.len() < OVERHEAD {
            return Err("the sealed value is damaged".into());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| "the sealed value is damaged".to_string())?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(bound(owner, variable)), &mut data)
            .map_err(|_| {
                "the sealed value does not open: sealed under another secrets key, for another \
                 variable or owner, or damaged"
                    .to_string()
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "the sealed value is not UTF-8".into())
    }
}

fn bound(owner: &str, variable: &str) -> Vec<u8> {
    format!("trainmesh env\0{owner}\0{variable}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretsKey {
        SecretsKey::from_hex(&SecretsKey::generate_hex()).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_for_its_owner_variable_and_key() {
        let k = key();
        let sealed = k.seal("alice", "API_KEY", "sk-live-1234567");
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("sk-live"));
        assert_eq!(sealed.len(), sealed_len("sk-live-1234567"));
        assert_eq!(
            k.open("alice", "API_KEY", &sealed).unwrap(),
            "sk-live-1234567"
        );
        // Sealing twice gives two different values.
        assert_ne!(k.seal("alice", "API_KEY", "sk-live-1234567"), sealed);
        assert!(k.open("bob", "API_KEY", &sealed).is_err());
        assert!(k.open("alice", "OTHER", &sealed).is_err());
        assert!(key().open("alice", "API_KEY", &sealed).is_err());
        let mut damaged = sealed.clone();
        let last = if sealed.ends_with('0') { "1" } else { "0" };
        damaged.replace_range(sealed.len() - 1.., last);
        assert!(k.open("alice", "API_KEY", &damaged).is_err());
        assert!(k.open("alice", "API_KEY", "plain").is_err());
        assert!(k.open("alice", "API_KEY", &format!("{PREFIX}zz")).is_err());
        assert!(k.open("alice", "API_KEY", PREFIX).is_err());
    }

    #[test]
    fn a_bad_key_is_refused_saying_why() {
        assert!(SecretsKey::from_hex("abcd")
            .unwrap_err()
            .to_string()
            .contains("32 bytes"));
        assert!(SecretsKey::from_hex("not hex").is_err());
    }
}
