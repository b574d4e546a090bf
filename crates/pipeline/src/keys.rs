//! Which key opens which object: the one place that decides, for backups, WAL and SQLite
//! replicas alike. It is pure; what it asks for (open the repository key, open a backup's
//! sealed key: one scrypt each) is done by the caller, which has the repository at hand.
//!
//! How objects are sealed:
//! - a backup's archives: to the backup's own X25519 key, whose private half its manifest
//!   holds sealed with the passphrase; or, with `--recipient-key`, to the user's key;
//! - WAL: to the repository key (sealed with the passphrase in the WAL folder), or to the
//!   user's key; WAL archived by early versions: with the passphrase itself (scrypt);
//! - SQLite replicas: to the user's key.

/// How one object was encrypted, as far as opening it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    Plain,
    /// With the passphrase itself (an age scrypt stanza).
    ToPassphrase,
    /// To X25519 recipients: the user's key, or a repository key the passphrase opens.
    ToRecipients,
    /// To a backup's own key, sealed in its manifest with the passphrase.
    ToBackupKey,
}

/// What opens it, given the keys at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// Nothing: a plain object, or no key that can (the decoder then names what is missing).
    Nothing,
    Passphrase,
    Identities,
    /// The repository key, opened with the passphrase.
    RepositoryKey,
    /// The backup's sealed key, opened with the passphrase.
    BackupKey,
}

/// The decision. Identities the user gave win over the passphrase for recipient-sealed
/// objects (no scrypt); the passphrase opens what was sealed with it.
pub fn opener(sealing: Sealing, has_passphrase: bool, has_identities: bool) -> Opener {
    match sealing {
        Sealing::Plain => Opener::Nothing,
        Sealing::ToPassphrase if has_passphrase => Opener::Passphrase,
        Sealing::ToRecipients if has_identities => Opener::Identities,
        Sealing::ToRecipients if has_passphrase => Opener::RepositoryKey,
        Sealing::ToBackupKey if has_passphrase => Opener::BackupKey,
        Sealing::ToBackupKey if has_identities => Opener::Identities,
        _ => Opener::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sealing_with_every_key_set() {
        use Opener::*;
        use Sealing::*;
        // (sealing, passphrase, identities) → opener
        let table = [
            (Plain, true, true, Nothing),
            (ToPassphrase, true, false, Passphrase),
            (ToPassphrase, false, true, Nothing),
            (ToRecipients, true, true, Identities),
            (ToRecipients, true, false, RepositoryKey),
            (ToRecipients, false, false, Nothing),
            (ToBackupKey, true, false, BackupKey),
            (ToBackupKey, true, true, BackupKey),
            (ToBackupKey, false, true, Identities),
            (ToBackupKey, false, false, Nothing),
        ];
        for (s, p, i, want) in table {
            assert_eq!(opener(s, p, i), want, "{s:?} passphrase={p} identities={i}");
        }
    }
}
