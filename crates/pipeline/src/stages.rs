//! The sync stream stages: plain bytes → compress → encrypt → digest → inner writer, and
//! back. Each stage is generic over its neighbour and unit-tested against a `Vec<u8>`.

use std::io::{self, BufReader, Read, Write};

use age::secrecy::SecretString;
use sha2::{Digest as _, Sha256};

use crate::codec::{Compression, Decryption, EncodeSpec, Encryption};
use crate::error::{PipelineError, Result};

/// Size and SHA-256 (hex) of the bytes that reached storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub sha256: String,
}

/// Counts and hashes everything written through it.
pub struct Digesting<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Digesting<W> {
    pub fn new(inner: W) -> Self {
        Digesting { inner, hasher: Sha256::new(), size: 0 }
    }
    pub fn finish(self) -> (W, Digest) {
        let sha256 = hex::encode(self.hasher.finalize());
        (self.inner, Digest { size: self.size, sha256 })
    }
}

impl<W: Write> Write for Digesting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A running SHA-256 and byte count, for readers that hash what they pass on.
#[derive(Default)]
pub struct Hasher {
    hasher: Sha256,
    size: u64,
}

impl Hasher {
    pub fn update(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.size += b.len() as u64;
    }
    pub fn finish(self) -> Digest {
        Digest { size: self.size, sha256: hex::encode(self.hasher.finalize()) }
    }
}

enum Crypt<W: Write> {
    Plain(W),
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> Write for Crypt<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Crypt::Plain(w) => w.write(buf),
            Crypt::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Crypt::Plain(w) => w.flush(),
            Crypt::Age(w) => w.flush(),
        }
    }
}

enum Compress<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Lz4(lz4_flex::frame::FrameEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Compress<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compress::None(w) => w.write(buf),
            Compress::Gzip(w) => w.write(buf),
            Compress::Lz4(w) => w.write(buf),
            Compress::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compress::None(w) => w.flush(),
            Compress::Gzip(w) => w.flush(),
            Compress::Lz4(w) => w.flush(),
            Compress::Zstd(w) => w.flush(),
        }
    }
}

/// compress → encrypt → digest → `W`. Call [`Encoder::finish`]: dropping it truncates.
pub struct Encoder<W: Write> {
    stage: Compress<Crypt<Digesting<W>>>,
    raw: u64,
}

impl<W: Write> Encoder<W> {
    pub fn new(inner: W, spec: &EncodeSpec) -> io::Result<Self> {
        let digesting = Digesting::new(inner);
        let crypt = match &spec.encryption {
            Encryption::None => Crypt::Plain(digesting),
            Encryption::Passphrase(p) => {
                Crypt::Age(age::Encryptor::with_user_passphrase(p.clone()).wrap_output(digesting)?)
            }
            Encryption::Recipients(rs) => {
                let enc = age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Crypt::Age(enc.wrap_output(digesting)?)
            }
        };
        let level = spec.level;
        let stage = match spec.compression {
            Compression::None => Compress::None(crypt),
            Compression::Gzip => {
                Compress::Gzip(flate2::write::GzEncoder::new(crypt, flate2::Compression::new(level.clamp(1, 9) as u32)))
            }
            Compression::Lz4 => Compress::Lz4(lz4_flex::frame::FrameEncoder::new(crypt)),
            Compression::Zstd => {
                let mut z = zstd::stream::write::Encoder::new(crypt, level)?;
                z.include_checksum(true)?;
                if spec.threads > 0 {
                    z.multithread(spec.threads)?;
                }
                Compress::Zstd(z)
            }
        };
        Ok(Encoder { stage, raw: 0 })
    }

    /// Bytes accepted so far, before compression.
    pub fn raw_size(&self) -> u64 {
        self.raw
    }

    pub fn finish(self) -> io::Result<(W, Digest)> {
        let crypt = match self.stage {
            Compress::None(w) => w,
            Compress::Gzip(w) => w.finish()?,
            Compress::Lz4(w) => w.finish().map_err(io::Error::other)?,
            Compress::Zstd(w) => w.finish()?,
        };
        let digesting = match crypt {
            Crypt::Plain(w) => w,
            Crypt::Age(w) => w.finish()?,
        };
        Ok(digesting.finish())
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.stage.write(buf)?;
        self.raw += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stage.flush()
    }
}

/// Builds decrypt → decompress over `inner`. `key` names the object in errors.
pub fn decoder<'a, R: Read + Send + 'a>(
    inner: R,
    compression: Compression,
    encrypted: bool,
    dec: &Decryption,
    key: &str,
) -> Result<Box<dyn Read + Send + 'a>> {
    let plain: Box<dyn Read + Send + 'a> = if encrypted {
        let d = age::Decryptor::new_buffered(BufReader::with_capacity(256 << 10, inner))
            .map_err(|e| decrypt_err(key, e))?;
        let reader = match dec {
            Decryption::None => {
                return Err(PipelineError::Decrypt {
                    key: key.into(),
                    reason: "it is encrypted; give --passphrase or --identity-key".into(),
                })
            }
            Decryption::Passphrase(p) => {
                if !d.is_scrypt() {
                    return Err(PipelineError::Decrypt {
                        key: key.into(),
                        reason: "it was encrypted to a key pair; give --identity-key, not a passphrase".into(),
                    });
                }
                let id = passphrase_identity(p);
                d.decrypt(std::iter::once(&id as &dyn age::Identity))
            }
            Decryption::Identities(ids) => {
                if d.is_scrypt() {
                    return Err(PipelineError::Decrypt {
                        key: key.into(),
                        reason: "it was encrypted with a passphrase; give --passphrase, not a key".into(),
                    });
                }
                d.decrypt(ids.iter().map(|i| i as &dyn age::Identity))
            }
        }
        .map_err(|e| decrypt_err(key, e))?;
        Box::new(reader)
    } else {
        Box::new(inner)
    };
    let io = |e| PipelineError::io(key, e);
    Ok(match compression {
        Compression::None => plain,
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(256 << 10, plain))),
        Compression::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(plain)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(plain).map_err(io)?),
    })
}

fn passphrase_identity(p: &SecretString) -> age::scrypt::Identity {
    let mut id = age::scrypt::Identity::new(p.clone());
    // Our own files use the default work factor (18); accept up to age's CLI maximum.
    id.set_max_work_factor(22);
    id
}

fn decrypt_err(key: &str, e: age::DecryptError) -> PipelineError {
    let reason = match e {
        age::DecryptError::NoMatchingKeys => "wrong key: none of the given identities can open it".to_owned(),
        age::DecryptError::DecryptionFailed => "wrong passphrase or damaged file".to_owned(),
        age::DecryptError::InvalidHeader => "not an age file (damaged header)".to_owned(),
        other => other.to_string(),
    };
    PipelineError::Decrypt { key: key.into(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..300_000u32).flat_map(|i| (i / 7).to_le_bytes()).collect()
    }

    fn round_trip(spec: &EncodeSpec, dec: &Decryption) -> (Vec<u8>, Digest, Vec<u8>) {
        let mut enc = Encoder::new(Vec::new(), spec).unwrap();
        enc.write_all(&sample()).unwrap();
        assert_eq!(enc.raw_size(), sample().len() as u64);
        let (stored, digest) = enc.finish().unwrap();
        let mut out = Vec::new();
        decoder(&stored[..], spec.compression, spec.encryption.is_on(), dec, "k")
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        (stored, digest, out)
    }

    #[test]
    fn every_compression_round_trips_and_digest_covers_stored_bytes() {
        for c in [Compression::None, Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            let spec =
                EncodeSpec { compression: c, level: c.default_level(), threads: 2, encryption: Encryption::None };
            let (stored, digest, out) = round_trip(&spec, &Decryption::None);
            assert_eq!(out, sample(), "{c}");
            assert_eq!(digest.size, stored.len() as u64);
            assert_eq!(digest.sha256, hex::encode(Sha256::digest(&stored)));
            if c != Compression::None {
                assert!(stored.len() < sample().len() / 2, "{c} did not compress");
            }
        }
        let gz = round_trip(
            &EncodeSpec { compression: Compression::Gzip, level: 1, threads: 0, encryption: Encryption::None },
            &Decryption::None,
        );
        assert_eq!(&gz.0[..2], &[0x1f, 0x8b]);
    }

    #[test]
    fn passphrase_and_key_pair_encryption() {
        let p: SecretString = "correct horse".to_owned().into();
        let spec = EncodeSpec {
            compression: Compression::Zstd,
            level: 1,
            threads: 0,
            encryption: Encryption::Passphrase(p.clone()),
        };
        let (stored, _, out) = round_trip(&spec, &Decryption::Passphrase(p));
        assert_eq!(out, sample());
        assert!(stored.starts_with(b"age-encryption.org/v1"));
        let wrong =
            decoder(&stored[..], Compression::Zstd, true, &Decryption::Passphrase("nope".to_owned().into()), "k")
                .err()
                .unwrap();
        assert!(matches!(wrong, PipelineError::Decrypt { .. }), "{wrong}");

        let id = age::x25519::Identity::generate();
        let spec = EncodeSpec {
            compression: Compression::Gzip,
            level: 1,
            threads: 0,
            encryption: Encryption::Recipients(vec![id.to_public()]),
        };
        let (stored, _, out) = round_trip(&spec, &Decryption::Identities(vec![id]));
        assert_eq!(out, sample());
        let other = age::x25519::Identity::generate();
        let err = decoder(&stored[..], Compression::Gzip, true, &Decryption::Identities(vec![other]), "k")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("wrong key"), "{err}");
        let err = decoder(&stored[..], Compression::Gzip, true, &Decryption::None, "k").err().unwrap().to_string();
        assert!(err.contains("--identity-key") || err.contains("--passphrase"), "{err}");
    }
}
