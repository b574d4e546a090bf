//! Authentication of what a backup's folder says about it, on passphrase-encrypted
//! repositories: its manifest and its keep/release marks carry an HMAC-SHA256 under a key
//! derived from the backup's own X25519 identity (sealed in the manifest with the
//! passphrase). Someone who can write to the bucket but has no passphrase cannot make a
//! manifest or a mark that verifies. Key-pair (recipient) backups get none: anyone holding
//! the public recipient could make a key that the identity opens, so a MAC would prove
//! nothing there.

use sha2::{Digest, Sha256};

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// The MAC key of a backup whose identity is `identity` (its `AGE-SECRET-KEY-…` text).
pub fn backup_mac_key(identity: &str) -> [u8; 32] {
    Sha256::new().chain_update(b"cloud-dump backup mac v1\n").chain_update(identity.as_bytes()).finalize().into()
}

/// The MAC of `message` under `key`, hex.
pub fn mac_hex(key: &[u8; 32], message: &[u8]) -> String {
    hex::encode(hmac_sha256(key, message))
}

/// Whether `mac` (hex) is the MAC of `message` under `key` (compared in constant time).
pub fn verifies(key: &[u8; 32], message: &[u8], mac: &str) -> bool {
    let want = hmac_sha256(key, message);
    match hex::decode(mac.trim()) {
        Ok(got) if got.len() == 32 => got.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0,
        _ => false,
    }
}

/// The body of a keep or release mark named `name` (in its folder), with its MAC when the
/// backup's key is at hand.
pub fn mark_body(keep: bool, name: &str, key: Option<&[u8; 32]>) -> String {
    let word = if keep { "keep" } else { "release" };
    match key {
        Some(k) => format!("{word}\nmac {}\n", mac_hex(k, name.as_bytes())),
        None => format!("{word}\n"),
    }
}

/// Whether a mark's body carries a MAC of its name that verifies.
pub fn mark_verifies(key: &[u8; 32], name: &str, body: &str) -> bool {
    body.lines().find_map(|l| l.strip_prefix("mac ")).is_some_and(|m| verifies(key, name.as_bytes(), m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex::encode(mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn marks_and_messages_verify_only_under_their_key() {
        let k = backup_mac_key("AGE-SECRET-KEY-1TEST");
        let other = backup_mac_key("AGE-SECRET-KEY-1OTHER");
        let body = mark_body(false, "release-00000000000000000042", Some(&k));
        assert!(mark_verifies(&k, "release-00000000000000000042", &body));
        assert!(!mark_verifies(&other, "release-00000000000000000042", &body));
        assert!(!mark_verifies(&k, "release-00000000000000000043", &body), "moved to another name");
        assert!(!mark_verifies(&k, "release-00000000000000000042", "release\n"));
        assert!(verifies(&k, b"m", &mac_hex(&k, b"m")) && !verifies(&k, b"n", &mac_hex(&k, b"m")));
        assert!(!verifies(&k, b"m", "zz"));
    }
}
