//! A fault-injecting store for drills: wraps any `ObjectStore` and, driven by a seeded
//! generator, makes requests fail the ways real stores fail — a transient error before or
//! after the request reached the store, a 404 for an object that exists, a short or
//! corrupted body, a stall. Tests use it to prove properties such as "wal-push exits 0
//! only when the object is durably stored" and "wal-fetch never serves unverified bytes".
//!
//! The binary enables it only through `CLOUD_DUMP_FAULTS` (a test hook, documented as
//! such): `seed=7,rate=0.2,kinds=error+lost+notfound+short+corrupt+stall,ops=get+put`.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result, UploadPart,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One way a request can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request fails before it reaches the store.
    Error,
    /// The request is carried out, then reported as failed (a PUT that landed; a lost reply).
    Lost,
    /// A GET or HEAD answers 404 for an object that exists.
    NotFound,
    /// A GET body ends early.
    Short,
    /// One byte of a GET body is flipped.
    Corrupt,
    /// The request waits before it is carried out.
    Stall,
}

/// Request classes faults apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Head,
    Put,
    List,
    Delete,
}

#[derive(Debug, Clone)]
pub struct FaultConfig {
    pub seed: u64,
    /// Probability that one request gets a fault.
    pub rate: f64,
    pub kinds: Vec<Fault>,
    pub ops: Vec<Op>,
    pub stall: Duration,
}

impl FaultConfig {
    /// `seed=7,rate=0.2,kinds=error+short,ops=get+put,stall-ms=200`.
    pub fn parse(s: &str) -> std::result::Result<FaultConfig, String> {
        let mut c = FaultConfig {
            seed: 0,
            rate: 0.1,
            kinds: vec![Fault::Error, Fault::Lost, Fault::NotFound, Fault::Short, Fault::Corrupt, Fault::Stall],
            ops: vec![Op::Get, Op::Head, Op::Put, Op::List, Op::Delete],
            stall: Duration::from_millis(300),
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("fault setting {part:?}: expected key=value"))?;
            match k {
                "seed" => c.seed = v.parse().map_err(|_| format!("fault seed {v:?}"))?,
                "rate" => c.rate = v.parse().map_err(|_| format!("fault rate {v:?}"))?,
                "stall-ms" => c.stall = Duration::from_millis(v.parse().map_err(|_| format!("stall-ms {v:?}"))?),
                "kinds" => {
                    c.kinds = v
                        .split('+')
                        .map(|k| match k {
                            "error" => Ok(Fault::Error),
                            "lost" => Ok(Fault::Lost),
                            "notfound" => Ok(Fault::NotFound),
                            "short" => Ok(Fault::Short),
                            "corrupt" => Ok(Fault::Corrupt),
                            "stall" => Ok(Fault::Stall),
                            o => Err(format!("unknown fault {o:?}")),
                        })
                        .collect::<std::result::Result<_, _>>()?
                }
                "ops" => {
                    c.ops = v
                        .split('+')
                        .map(|o| match o {
                            "get" => Ok(Op::Get),
                            "head" => Ok(Op::Head),
                            "put" => Ok(Op::Put),
                            "list" => Ok(Op::List),
                            "delete" => Ok(Op::Delete),
                            o => Err(format!("unknown operation {o:?}")),
                        })
                        .collect::<std::result::Result<_, _>>()?
                }
                other => return Err(format!("unknown fault setting {other:?}")),
            }
        }
        if !(0.0..=1.0).contains(&c.rate) {
            return Err(format!("fault rate {} is not between 0 and 1", c.rate));
        }
        Ok(c)
    }
}

/// The wrapper. `injected()` counts the faults it caused.
#[derive(Clone)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    cfg: FaultConfig,
    rng: Arc<Mutex<StdRng>>,
    injected: Arc<AtomicU64>,
}

impl fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({:?})", self.cfg)
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

fn injected_error(what: &str, path: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "fault-injection",
        source: format!("injected fault: {what} {path} failed (connection reset)").into(),
    }
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>, cfg: FaultConfig) -> FaultStore {
        let rng = StdRng::seed_from_u64(cfg.seed);
        FaultStore { inner, cfg, rng: Arc::new(Mutex::new(rng)), injected: Arc::new(AtomicU64::new(0)) }
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The fault for this request, if any (only kinds that make sense for `op`).
    fn draw(&self, op: Op) -> Option<Fault> {
        if !self.cfg.ops.contains(&op) {
            return None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        if rng.gen::<f64>() >= self.cfg.rate {
            return None;
        }
        let usable: Vec<Fault> = self
            .cfg
            .kinds
            .iter()
            .copied()
            .filter(|k| match k {
                Fault::NotFound => matches!(op, Op::Get | Op::Head),
                Fault::Short | Fault::Corrupt => op == Op::Get,
                Fault::Lost => matches!(op, Op::Put | Op::Delete),
                _ => true,
            })
            .collect();
        if usable.is_empty() {
            return None;
        }
        let f = usable[rng.gen_range(0..usable.len())];
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(f)
    }

    async fn stall(&self) {
        tokio::time::sleep(self.cfg.stall).await;
    }

    async fn delete_one(&self, p: Path) -> Result<Path> {
        let once = futures::stream::once(async move { Ok(p) }).boxed();
        match self.inner.delete_stream(once).next().await {
            Some(r) => r,
            None => Err(object_store::Error::Generic {
                store: "fault-injection",
                source: "the store answered a delete with nothing".into(),
            }),
        }
    }
}

/// Reads a whole GET result into memory and damages it as asked.
async fn damaged(r: GetResult, fault: Fault, seed: u64) -> Result<GetResult> {
    let meta = r.meta.clone();
    let range = r.range.clone();
    let attributes = r.attributes.clone();
    let extensions = r.extensions.clone();
    let mut body = r.bytes().await?.to_vec();
    match fault {
        Fault::Short if !body.is_empty() => body.truncate(body.len() / 2),
        Fault::Corrupt if !body.is_empty() => {
            let i = (seed as usize) % body.len();
            body[i] ^= 0x20;
        }
        _ => {}
    }
    let bytes = Bytes::from(body);
    let stream = futures::stream::once(async move { Ok(bytes) }).boxed();
    Ok(GetResult { payload: GetResultPayload::Stream(stream), meta, range, attributes, extensions })
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        match self.draw(Op::Put) {
            Some(Fault::Error) => Err(injected_error("PUT", location)),
            Some(Fault::Lost) => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(injected_error("PUT (after it landed)", location))
            }
            Some(Fault::Stall) => {
                self.stall().await;
                self.inner.put_opts(location, payload, opts).await
            }
            _ => self.inner.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        if let Some(Fault::Error) = self.draw(Op::Put) {
            return Err(injected_error("CreateMultipartUpload", location));
        }
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultUpload { inner, store: self.clone_shallow(), location: location.clone() }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        match self.draw(op) {
            Some(Fault::Error) => Err(injected_error("GET", location)),
            Some(Fault::NotFound) => Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: "injected fault: 404 for an existing object".into(),
            }),
            Some(Fault::Stall) => {
                self.stall().await;
                self.inner.get_opts(location, options).await
            }
            Some(f @ (Fault::Short | Fault::Corrupt)) if !options.head => {
                let r = self.inner.get_opts(location, options).await?;
                let seed = self.cfg.seed ^ self.injected();
                damaged(r, f, seed).await
            }
            _ => self.inner.get_opts(location, options).await,
        }
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        match self.draw(Op::Get) {
            Some(Fault::Error) => Err(injected_error("GET (ranges)", location)),
            Some(Fault::Short) => {
                let mut v = self.inner.get_ranges(location, ranges).await?;
                if let Some(last) = v.last_mut() {
                    *last = last.slice(..last.len() / 2);
                }
                Ok(v)
            }
            Some(Fault::Corrupt) => {
                let v = self.inner.get_ranges(location, ranges).await?;
                Ok(v.into_iter()
                    .map(|b| {
                        let mut m = b.to_vec();
                        if let Some(x) = m.first_mut() {
                            *x ^= 0x20;
                        }
                        Bytes::from(m)
                    })
                    .collect())
            }
            _ => self.inner.get_ranges(location, ranges).await,
        }
    }

    /// Each path draws its own fault (a batch can half succeed, as on S3): an error before
    /// the delete, a stall, or a delete carried out whose reply is lost.
    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let me = self.clone();
        locations
            .then(move |p| {
                let me = me.clone();
                async move {
                    let p = p?;
                    match me.draw(Op::Delete) {
                        Some(Fault::Error) => Err(injected_error("DELETE", &p)),
                        Some(Fault::Stall) => {
                            me.stall().await;
                            me.delete_one(p).await
                        }
                        Some(Fault::Lost) => {
                            me.delete_one(p.clone()).await?;
                            Err(injected_error("DELETE (reply lost)", &p))
                        }
                        _ => me.delete_one(p).await,
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Some(Fault::Error) = self.draw(Op::List) {
            let p = prefix.cloned().unwrap_or_default();
            return futures::stream::once(async move { Err(injected_error("LIST", &p)) }).boxed();
        }
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Some(Fault::Error) = self.draw(Op::List) {
            let p = prefix.cloned().unwrap_or_default();
            return futures::stream::once(async move { Err(injected_error("LIST", &p)) }).boxed();
        }
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        if let Some(Fault::Error) = self.draw(Op::List) {
            return Err(injected_error("LIST", &prefix.cloned().unwrap_or_default()));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

impl FaultStore {
    fn clone_shallow(&self) -> FaultStore {
        FaultStore {
            inner: self.inner.clone(),
            cfg: self.cfg.clone(),
            rng: self.rng.clone(),
            injected: self.injected.clone(),
        }
    }
}

#[derive(Debug)]
struct FaultUpload {
    inner: Box<dyn MultipartUpload>,
    store: FaultStore,
    location: Path,
}

#[async_trait]
impl MultipartUpload for FaultUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        match self.store.draw(Op::Put) {
            Some(Fault::Error) => {
                let e = injected_error("UploadPart", &self.location);
                Box::pin(async move { Err(e) })
            }
            Some(Fault::Stall) => {
                let stall = self.store.cfg.stall;
                let part = self.inner.put_part(data);
                Box::pin(async move {
                    tokio::time::sleep(stall).await;
                    part.await
                })
            }
            _ => self.inner.put_part(data),
        }
    }

    async fn complete(&mut self) -> Result<PutResult> {
        match self.store.draw(Op::Put) {
            Some(Fault::Error) => Err(injected_error("CompleteMultipartUpload", &self.location)),
            Some(Fault::Lost) => {
                self.inner.complete().await?;
                Err(injected_error("CompleteMultipartUpload (after it completed)", &self.location))
            }
            _ => self.inner.complete().await,
        }
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}
