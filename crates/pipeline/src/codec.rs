//! Compression and encryption settings and the parsing of key files.

use std::str::FromStr;

use age::secrecy::SecretString;

use crate::error::{PipelineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Lz4,
    Zstd,
}

impl Compression {
    /// Object-name suffix, as in the seed layout (`base.tar.gz`).
    pub fn ext(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("gz"),
            Compression::Lz4 => Some("lz4"),
            Compression::Zstd => Some("zst"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Levels favour speed: a backup is read from disk once and should not wait on the CPU.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 1,
            Compression::Gzip => 1,
            _ => 0,
        }
    }

    pub fn from_ext(ext: &str) -> Option<Compression> {
        match ext {
            "gz" => Some(Compression::Gzip),
            "lz4" => Some(Compression::Lz4),
            "zst" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "off" | "false" => Ok(Compression::None),
            "gzip" | "gz" | "true" => Ok(Compression::Gzip),
            "lz4" => Ok(Compression::Lz4),
            "zstd" | "zst" => Ok(Compression::Zstd),
            other => Err(format!("unknown compression {other:?}: use zstd, gzip, lz4 or none")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How stored bytes are encrypted.
#[derive(Clone)]
pub enum Encryption {
    None,
    Passphrase(SecretString),
    Recipients(Vec<age::x25519::Recipient>),
}

impl Encryption {
    pub fn mode(&self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Passphrase(_) => "passphrase",
            Encryption::Recipients(_) => "x25519",
        }
    }
    pub fn is_on(&self) -> bool {
        !matches!(self, Encryption::None)
    }
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mode())
    }
}

/// How stored bytes are decrypted.
#[derive(Clone, Default)]
pub enum Decryption {
    #[default]
    None,
    Passphrase(SecretString),
    Identities(Vec<age::x25519::Identity>),
}

impl std::fmt::Debug for Decryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decryption::None => "none",
            Decryption::Passphrase(_) => "passphrase",
            Decryption::Identities(_) => "x25519",
        })
    }
}

/// A stored object's name: a stem, then the codec's suffixes (`base.tar.zst.age`,
/// `000000010000000000000002.lz4`). The one place names are both written and read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub stem: String,
    pub compression: Compression,
    pub encrypted: bool,
}

impl ObjectName {
    pub fn new(stem: impl Into<String>, compression: Compression, encrypted: bool) -> ObjectName {
        ObjectName { stem: stem.into(), compression, encrypted }
    }

    /// `stem[.zst|.gz|.lz4][.age]`.
    pub fn render(&self) -> String {
        let mut s = self.stem.clone();
        if let Some(ext) = self.compression.ext() {
            s.push('.');
            s.push_str(ext);
        }
        if self.encrypted {
            s.push_str(".age");
        }
        s
    }

    /// Reads the suffixes back: `.age` last, before it at most one compression suffix;
    /// what is left is the stem (a name without suffixes is plain).
    pub fn parse(name: &str) -> ObjectName {
        let (base, encrypted) = match name.strip_suffix(".age") {
            Some(b) => (b, true),
            None => (name, false),
        };
        match base.rsplit_once('.').and_then(|(s, ext)| Some((s, Compression::from_ext(ext)?))) {
            Some((stem, c)) => ObjectName::new(stem, c, encrypted),
            None => ObjectName::new(base, Compression::None, encrypted),
        }
    }
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// Everything the encoder needs, shared by all archives of one backup.
#[derive(Debug, Clone)]
pub struct EncodeSpec {
    pub compression: Compression,
    pub level: i32,
    /// Compression worker threads (zstd only); 0 compresses on the calling thread.
    pub threads: u32,
    pub encryption: Encryption,
}

impl EncodeSpec {
    pub fn plain() -> EncodeSpec {
        EncodeSpec { compression: Compression::None, level: 0, threads: 0, encryption: Encryption::None }
    }

    /// `base.tar` → `base.tar.zst.age`.
    pub fn object_name(&self, stem: &str) -> String {
        ObjectName::new(stem, self.compression, self.encryption.is_on()).render()
    }
}

/// Reads recipients from a file: `age1…` lines; an `AGE-SECRET-KEY-…` line (an
/// `age-keygen` output file) contributes its public half. `#` starts a comment.
pub fn parse_recipients(text: &str, origin: &str) -> Result<Vec<age::x25519::Recipient>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("AGE-SECRET-KEY-") {
            let id = age::x25519::Identity::from_str(line)
                .map_err(|_| PipelineError::Config(format!("{origin}: line {}: not a valid age secret key", n + 1)))?;
            out.push(id.to_public());
        } else {
            let r = age::x25519::Recipient::from_str(line).map_err(|e| {
                PipelineError::Config(format!("{origin}: line {}: not an age X25519 recipient: {e}", n + 1))
            })?;
            out.push(r);
        }
    }
    if out.is_empty() {
        return Err(PipelineError::Config(format!("{origin}: no age recipient (age1…) found")));
    }
    Ok(out)
}

/// Reads `AGE-SECRET-KEY-…` lines (as written by `age-keygen`). Errors never quote the key.
pub fn parse_identities(text: &str, origin: &str) -> Result<Vec<age::x25519::Identity>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let id = age::x25519::Identity::from_str(line).map_err(|_| {
            PipelineError::Config(format!("{origin}: line {}: not an age X25519 secret key (AGE-SECRET-KEY-…)", n + 1))
        })?;
        out.push(id);
    }
    if out.is_empty() {
        return Err(PipelineError::Config(format!("{origin}: no age secret key found")));
    }
    Ok(out)
}

/// A fresh key pair in `age-keygen`'s file format, and its public half.
pub fn generate_identity() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let file = format!("# created by cloud-dump\n# public key: {public}\n{}\n", id.to_string().expose_secret());
    (file, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_names_round_trip() {
        for c in [Compression::None, Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
            if let Some(e) = c.ext() {
                assert_eq!(Compression::from_ext(e), Some(c));
            }
        }
        assert!("brotli".parse::<Compression>().unwrap_err().contains("brotli"));
    }

    #[test]
    fn key_files_parse_and_errors_hide_keys() {
        let (secret_file, public) = generate_identity();
        let ids = parse_identities(&secret_file, "k").unwrap();
        assert_eq!(ids.len(), 1);
        let from_secret = parse_recipients(&secret_file, "k").unwrap();
        assert_eq!(from_secret[0].to_string(), public);
        let from_pub = parse_recipients(&format!("# c\n{public}\n"), "k").unwrap();
        assert_eq!(from_pub[0].to_string(), public);
        let err = parse_identities("AGE-SECRET-KEY-1NOTAKEY", "file.key").err().unwrap().to_string();
        assert!(err.contains("file.key") && !err.contains("NOTAKEY"), "{err}");
        assert!(parse_recipients("", "empty").is_err());
    }

    #[test]
    fn object_names_read_back_as_written() {
        for c in [Compression::None, Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            for enc in [false, true] {
                for stem in ["base.tar", "000000010000000000000002", "00000002.history", "1_2_3.snapshot"] {
                    let n = ObjectName::new(stem, c, enc);
                    assert_eq!(ObjectName::parse(&n.render()), n);
                }
            }
        }
        assert_eq!(ObjectName::parse("x.zst.zst").stem, "x.zst");
        assert_eq!(ObjectName::parse("x.age.zst"), ObjectName::new("x.age", Compression::Zstd, false));
    }

    #[test]
    fn object_names_follow_the_seed_layout() {
        let mut s = EncodeSpec::plain();
        assert_eq!(s.object_name("base.tar"), "base.tar");
        s.compression = Compression::Gzip;
        assert_eq!(s.object_name("base.tar"), "base.tar.gz");
        s.encryption = Encryption::Passphrase("x".to_owned().into());
        assert_eq!(s.object_name("16384.tar"), "16384.tar.gz.age");
    }
}
