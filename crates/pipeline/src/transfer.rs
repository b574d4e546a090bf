//! Bridges between the async world (sockets, object storage) and the sync stages.
//!
//! Upload: async producer → bounded channel → blocking encoder thread → bounded channel of
//! parts → multipart upload with a fixed number of parts in flight. Download: ranged reads
//! → bounded channel → blocking decoder thread → caller's consumer. Memory is the channel
//! capacities times the chunk sizes, whatever the size of the object.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cloud_dump_storage::{part_size_for, Repo};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::codec::{Compression, Decryption, EncodeSpec};
use crate::error::{PipelineError, Result};
use crate::stages::{decoder, Digest, Encoder, Hasher};

/// What one stored object turned out to be.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: String,
    /// Bytes stored (after compression and encryption).
    pub size: u64,
    pub sha256: String,
    /// Bytes before compression and encryption.
    pub raw_size: u64,
}

enum Msg {
    Data(Bytes),
    End,
}

/// An object being written through the encoder. [`Sink::finish`] makes it visible; any
/// other end (drop, error, [`Sink::abort`]) aborts the multipart upload.
pub struct Sink {
    key: String,
    tx: Option<mpsc::Sender<Msg>>,
    task: JoinHandle<Result<Stored>>,
    cancel: tokio::sync::watch::Sender<bool>,
}

/// An object whose data is all written and whose upload is finishing. [`Finishing::abort`]
/// stops it and aborts the multipart upload on the server (dropping it would leave the
/// parts behind, billed).
pub struct Finishing {
    task: JoinHandle<Result<Stored>>,
    cancel: tokio::sync::watch::Sender<bool>,
}

impl Finishing {
    pub async fn wait(self) -> Result<Stored> {
        self.task.await.map_err(|e| PipelineError::io("upload task", io::Error::other(e)))?
    }

    /// Cancels the upload (aborting it on the server) and waits until it has stopped.
    /// Returns the object's key when the upload had already completed.
    pub async fn abort(self) -> Option<String> {
        let _ = self.cancel.send(true);
        match self.task.await {
            Ok(Ok(stored)) => Some(stored.key),
            _ => None,
        }
    }
}

impl Sink {
    pub async fn start(repo: &Repo, key: &str, size_hint: Option<u64>, spec: Arc<EncodeSpec>) -> Result<Sink> {
        let part = part_size_for(size_hint);
        let mut upload = repo.upload(key, size_hint).await?;
        let (tx, mut rx) = mpsc::channel::<Msg>(64);
        let (part_tx, mut part_rx) = mpsc::channel::<Bytes>(1);
        let k = key.to_owned();
        let encoder = tokio::task::spawn_blocking(move || -> Result<(Digest, u64)> {
            let io = |e| PipelineError::io(&k, e);
            let mut enc = Encoder::new(PartWriter::new(part_tx, part), &spec).map_err(io)?;
            loop {
                match rx.blocking_recv() {
                    Some(Msg::Data(b)) => enc.write_all(&b).map_err(io)?,
                    Some(Msg::End) => break,
                    None => return Err(PipelineError::Cancelled { key: k }),
                }
            }
            let raw = enc.raw_size();
            let (mut parts, digest) = enc.finish().map_err(io)?;
            parts.flush_last().map_err(io)?;
            Ok((digest, raw))
        });
        let k = key.to_owned();
        let (cancel, mut cancelled) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut upload_err = None;
            loop {
                let part = tokio::select! {
                    p = part_rx.recv() => Some(p),
                    _ = until_cancelled(&mut cancelled) => None,
                };
                let put = match part {
                    Some(Some(p)) => {
                        tokio::select! {
                            r = upload.put(p) => Some(r),
                            _ = until_cancelled(&mut cancelled) => None,
                        }
                    }
                    Some(None) => break,
                    None => None,
                };
                match put {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        upload_err = Some(e);
                        break;
                    }
                    None => {
                        drop(part_rx);
                        let _ = upload.abort().await;
                        return Err(PipelineError::Cancelled { key: k });
                    }
                }
            }
            drop(part_rx);
            let encoded = encoder.await.map_err(|e| PipelineError::io(&k, io::Error::other(e)));
            match (upload_err, encoded) {
                (None, Ok(Ok((digest, raw_size)))) => {
                    upload.finish().await?;
                    Ok(Stored { key: k, size: digest.size, sha256: digest.sha256, raw_size })
                }
                (Some(e), _) => {
                    let _ = upload.abort().await;
                    Err(e.into())
                }
                (None, Ok(Err(e)) | Err(e)) => {
                    let _ = upload.abort().await;
                    Err(e)
                }
            }
        });
        Ok(Sink { key: key.to_owned(), tx: Some(tx), task, cancel })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| PipelineError::Cancelled { key: self.key.clone() })?;
        if tx.send(Msg::Data(data)).await.is_err() {
            // The encoder or the upload stopped: its error is the one to report.
            self.tx = None;
            return Err(self.wait_error().await);
        }
        Ok(())
    }

    async fn wait_error(&mut self) -> PipelineError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => PipelineError::Cancelled { key: self.key.clone() },
            Err(e) => PipelineError::io(&self.key, io::Error::other(e)),
        }
    }

    /// Returns a future that completes when the object is stored; the caller may go on
    /// producing other objects meanwhile.
    pub async fn finish(mut self) -> Result<Finishing> {
        let tx = self.tx.take().ok_or_else(|| PipelineError::Cancelled { key: self.key.clone() })?;
        if tx.send(Msg::End).await.is_err() {
            return Err(self.wait_error().await);
        }
        Ok(Finishing { task: self.task, cancel: self.cancel })
    }

    /// Stops the object: the encoder ends and the multipart upload is aborted on the
    /// server. Waits until that is done.
    pub async fn abort(mut self) {
        self.tx = None;
        let _ = self.cancel.send(true);
        let _ = (&mut self.task).await;
    }
}

/// Completes when the upload is cancelled, or when nobody can finish it any more (the
/// Sink or Finishing was dropped).
async fn until_cancelled(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}

/// Collects encoded bytes into upload parts and hands them to the async side.
struct PartWriter {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    part: usize,
}

impl PartWriter {
    fn new(tx: mpsc::Sender<Bytes>, part: usize) -> Self {
        PartWriter { tx, buf: BytesMut::with_capacity(part), part }
    }

    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buf, BytesMut::with_capacity(self.part)).freeze();
        self.tx.blocking_send(full).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))
    }

    fn flush_last(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.part - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A sync reader over chunks arriving from an async task, hashing what passes.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    hasher: Hasher,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.hasher.update(&b);
                    self.cur = b;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Where an object is and what it should hash to.
#[derive(Debug, Clone)]
pub struct Source {
    pub key: String,
    pub size: u64,
    /// Hex SHA-256 the stored bytes must have; `None` skips the check (no manifest).
    pub sha256: Option<String>,
    pub compression: Compression,
    pub encrypted: bool,
}

/// Downloads `src`, decodes it and hands the plain stream to `consume` on a blocking
/// thread. The stored bytes are verified against `src.sha256` and `src.size` at the end;
/// when `consume` fails and the bytes do not match, the mismatch is the error reported.
pub async fn read_decoded<T, F>(repo: &Repo, src: &Source, concurrency: usize, dec: Decryption, consume: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
{
    let mut stream = repo.read(&src.key, src.size, concurrency).await?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(2);
    let fetch_key = src.key.clone();
    let fetch = tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let stop = item.is_err();
            let item = item.map_err(|e| io::Error::other(e.to_string()));
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
        drop(fetch_key);
    });
    let s = src.clone();
    let joined = tokio::task::spawn_blocking(move || -> (Result<T>, Digest) {
        let mut reader = ChannelReader { rx, cur: Bytes::new(), hasher: Hasher::default() };
        let result = decoder(&mut reader, s.compression, s.encrypted, &dec, &s.key).and_then(|mut plain| {
            let value = consume(&mut plain)?;
            // Read to the end so the decoder checks its own trailer (zstd checksum, age tag).
            io::copy(&mut plain, &mut io::sink()).map_err(|e| PipelineError::io(&s.key, e))?;
            Ok(value)
        });
        // Hash everything that is left, so a failure can be told apart from corruption.
        let mut rest = [0u8; 64 << 10];
        while let Ok(n) = reader.read(&mut rest) {
            if n == 0 {
                break;
            }
        }
        (result, reader.hasher.finish())
    })
    .await
    .map_err(|e| PipelineError::io(&src.key, io::Error::other(e)))?;
    let _ = fetch.await;
    let (result, digest) = joined;
    let mismatch = if digest.size != src.size {
        Some(PipelineError::Size { key: src.key.clone(), expected: src.size, actual: digest.size })
    } else {
        match &src.sha256 {
            Some(want) if *want != digest.sha256 => Some(PipelineError::Checksum {
                key: src.key.clone(),
                expected: want.clone(),
                actual: digest.sha256.clone(),
            }),
            _ => None,
        }
    };
    match (result, mismatch) {
        (Err(e @ PipelineError::Storage(_)), _) => Err(e),
        (Err(e @ PipelineError::Decrypt { .. }), None) => Err(e),
        (_, Some(m)) => Err(m),
        (r, None) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encryption;
    use cloud_dump_storage::StorageOptions;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sink_then_read_round_trip_and_corruption_is_named() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let spec =
            Arc::new(EncodeSpec { compression: Compression::Zstd, level: 1, threads: 2, encryption: Encryption::None });
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 97) as u8).collect();
        let mut sink = Sink::start(&repo, "x/base.tar.zst", None, spec).await.unwrap();
        for c in data.chunks(100_000) {
            sink.write(Bytes::copy_from_slice(c)).await.unwrap();
        }
        assert!(repo.head("x/base.tar.zst").await.unwrap().is_none(), "visible before finish");
        let stored = sink.finish().await.unwrap().wait().await.unwrap();
        assert_eq!(stored.raw_size, data.len() as u64);
        let src = Source {
            key: stored.key.clone(),
            size: stored.size,
            sha256: Some(stored.sha256.clone()),
            compression: Compression::Zstd,
            encrypted: false,
        };
        let back = read_decoded(&repo, &src, 2, Decryption::None, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map_err(|e| PipelineError::io("x", e))?;
            Ok(v)
        })
        .await
        .unwrap();
        assert_eq!(back, data);

        let mut wrong = src.clone();
        wrong.sha256 = Some("00".repeat(32));
        let err = read_decoded(&repo, &wrong, 1, Decryption::None, |_| Ok(())).await.unwrap_err();
        assert!(matches!(err, PipelineError::Checksum { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_sink_leaves_nothing() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let mut sink = Sink::start(&repo, "y/base.tar", None, Arc::new(EncodeSpec::plain())).await.unwrap();
        sink.write(Bytes::from_static(b"partial")).await.unwrap();
        sink.abort().await;
        assert!(repo.list("").await.unwrap().is_empty());
    }
}
