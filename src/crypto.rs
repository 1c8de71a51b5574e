//! Encryption of tokens at rest: AES-256-GCM with a random 96-bit nonce per token and the
//! tenant id as associated data (a ciphertext copied to another tenant's row does not decrypt).
//!
//! Each ciphertext is stored with the id of the key that made it, so keys can be rotated:
//! new tokens use the current key, old rows still decrypt with a retired key that is still
//! configured (`TOKEN_DECRYPTION_KEYS`).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};

use crate::domain::{TenantId, TenantToken};

const NONCE_LEN: usize = 12;

/// Why a key or ciphertext could not be used. Never contains key or token material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CryptoError {
    /// The configured key is not base64 of 32 bytes.
    #[error(
        "encryption key must be base64 of exactly 32 bytes (make one with `tenant-tokens keygen`)"
    )]
    BadKey,
    /// No configured key has this id.
    #[error("no configured key has id {0}; add the retired key to TOKEN_DECRYPTION_KEYS")]
    UnknownKey(String),
    /// Authentication failed: wrong key, wrong tenant, or a damaged row.
    #[error("stored token does not decrypt (wrong key, or the row was altered)")]
    Decrypt,
}

/// A parsed 32-byte key, kept secret.
#[derive(Clone)]
pub struct EncryptionKey(SecretSlice<u8>);

impl EncryptionKey {
    /// Parses base64 (standard or URL-safe, padding optional) of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let t = text.trim();
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ];
        let bytes = engines
            .iter()
            .find_map(|e| e.decode(t).ok())
            .or_else(|| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(t)
                    .ok()
            })
            .or_else(|| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
            })
            .ok_or(CryptoError::BadKey)?;
        if bytes.len() != 32 {
            return Err(CryptoError::BadKey);
        }
        Ok(Self(bytes.into()))
    }

    /// A fresh random key, base64 encoded (`tenant-tokens keygen`).
    pub fn generate_base64() -> String {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        base64::engine::general_purpose::STANDARD.encode(k)
    }

    /// The key's public id: 16 hex characters of a domain-separated SHA-256 of the key.
    pub(crate) fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tenant-tokens key id v1\0");
        h.update(self.0.expose_secret());
        hex::encode(&h.finalize()[..8])
    }
}

/// Encrypts new tokens with the current key and decrypts with any configured key.
pub struct TokenCipher {
    current_id: String,
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCipher")
            .field("current_key_id", &self.current_id)
            .finish_non_exhaustive()
    }
}

/// A token as stored: key id and `nonce || ciphertext+tag`. Public only for
/// `tests/instructions.rs` (the CPU path's instruction budget); not an API.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// Nonce followed by the AES-GCM output.
    pub blob: Vec<u8>,
}

impl TokenCipher {
    /// A cipher that encrypts with `current` and also decrypts with `retired`.
    pub fn new(current: &EncryptionKey, retired: &[EncryptionKey]) -> Result<Self, CryptoError> {
        let mut keys = Vec::with_capacity(1 + retired.len());
        for k in std::iter::once(current).chain(retired) {
            let aead =
                Aes256Gcm::new_from_slice(k.0.expose_secret()).map_err(|_| CryptoError::BadKey)?;
            keys.push((k.id(), aead));
        }
        Ok(Self {
            current_id: current.id(),
            keys,
        })
    }

    /// The id of the key new tokens are sealed with: what `rekey` moves every row to.
    pub(crate) fn current_key_id(&self) -> &str {
        &self.current_id
    }

    /// The ids of every configured key, current first: the rows this cipher can open.
    pub(crate) fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Seals a tenant's token. Public only for `tests/instructions.rs`; not an API.
    #[doc(hidden)]
    pub fn seal(&self, tenant: &TenantId, token: &TenantToken) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let (_, aead) = &self.keys[0];
        let payload = Payload {
            msg: token.expose().as_bytes(),
            aad: tenant.as_str().as_bytes(),
        };
        let ct = aead
            .encrypt(&Nonce::from(nonce), payload)
            .unwrap_or_default(); // AES-GCM encryption only fails past 64 GiB of plaintext
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Sealed {
            key_id: self.current_id.clone(),
            blob,
        }
    }

    /// Opens a stored token of `tenant`.
    pub(crate) fn open(
        &self,
        tenant: &TenantId,
        sealed: &Sealed,
    ) -> Result<TenantToken, CryptoError> {
        let (_, aead) = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.blob.len() < NONCE_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ct) = sealed.blob.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
        let plain = aead
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: tenant.as_str().as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        let text = String::from_utf8(plain).map_err(|_| CryptoError::Decrypt)?;
        TenantToken::parse(&text).ok_or(CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EncryptionKey {
        EncryptionKey::from_base64(&EncryptionKey::generate_base64()).expect("key")
    }

    #[test]
    fn round_trips_and_binds_to_the_tenant() {
        let c = TokenCipher::new(&key(), &[]).expect("cipher");
        let t1 = TenantId::parse("t1").expect("id");
        let t2 = TenantId::parse("t2").expect("id");
        let tok = TenantToken::parse("aaa.bbb.ccc").expect("token");
        let s = c.seal(&t1, &tok);
        assert!(!s.blob.windows(3).any(|w| w == b"aaa"));
        assert_eq!(c.open(&t1, &s).expect("opens").expose(), "aaa.bbb.ccc");
        assert!(matches!(c.open(&t2, &s), Err(CryptoError::Decrypt)));
    }

    #[test]
    fn rotation_keeps_old_rows_readable() {
        let (old, new) = (key(), key());
        let t = TenantId::parse("t").expect("id");
        let tok = TenantToken::parse("x.y.z").expect("token");
        let sealed = TokenCipher::new(&old, &[]).expect("cipher").seal(&t, &tok);
        let rotated = TokenCipher::new(&new, std::slice::from_ref(&old)).expect("cipher");
        assert_eq!(rotated.open(&t, &sealed).expect("opens").expose(), "x.y.z");
        assert_eq!(rotated.seal(&t, &tok).key_id, new.id());
        let forgot = TokenCipher::new(&new, &[]).expect("cipher");
        assert!(matches!(
            forgot.open(&t, &sealed),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn bad_keys_are_refused_without_echo() {
        for bad in ["", "abc", "c2hvcnQ="] {
            let e = EncryptionKey::from_base64(bad)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("keygen"));
        }
    }
}
