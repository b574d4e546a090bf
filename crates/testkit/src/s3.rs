//! An S3-compatible server (s3s-fs) on loopback, in its own thread and runtime so that
//! synchronous tests can use it. Requests are signed (SigV4) with fixed test credentials.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

pub const ACCESS_KEY: &str = "cloud-dump-test";
pub const SECRET_KEY: &str = "cloud-dump-test-secret";

pub struct S3Server {
    pub endpoint: String,
    pub root: PathBuf,
    /// Requests served so far.
    pub requests: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl S3Server {
    /// A server over a fresh temporary directory with the given buckets.
    pub fn start(buckets: &[&str]) -> S3Server {
        let dir = tempfile::Builder::new().prefix("cloud-dump-s3-").tempdir().expect("temp dir");
        let mut s =
            S3Server::serve(dir.path(), "127.0.0.1:0".parse().expect("addr"), buckets).expect("start S3 server");
        s._dir = Some(dir);
        s
    }

    /// A server over a fresh temporary directory that accepts other credentials.
    pub fn start_with_credentials(buckets: &[&str], access_key: &str, secret_key: &str) -> S3Server {
        let dir = tempfile::Builder::new().prefix("cloud-dump-s3-").tempdir().expect("temp dir");
        let addr = "127.0.0.1:0".parse().expect("addr");
        let mut s = S3Server::serve_with(dir.path(), addr, buckets, access_key, secret_key).expect("start S3 server");
        s._dir = Some(dir);
        s
    }

    /// Serves `root` (one folder per bucket) at `addr`.
    pub fn serve(root: &Path, addr: SocketAddr, buckets: &[&str]) -> std::io::Result<S3Server> {
        S3Server::serve_with(root, addr, buckets, ACCESS_KEY, SECRET_KEY)
    }

    fn serve_with(
        root: &Path,
        addr: SocketAddr,
        buckets: &[&str],
        access_key: &str,
        secret_key: &str,
    ) -> std::io::Result<S3Server> {
        let (access_key, secret_key) = (access_key.to_owned(), secret_key.to_owned());
        for b in buckets {
            std::fs::create_dir_all(root.join(b))?;
        }
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let service = {
                    let mut b = S3ServiceBuilder::new(fs);
                    b.set_auth(SimpleAuth::from_single(access_key.as_str(), secret_key.as_str()));
                    b.build()
                };
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let http = ConnBuilder::new(TokioExecutor::new());
                loop {
                    let socket = tokio::select! {
                        r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                        _ = &mut rx => break,
                    };
                    let svc = service.clone();
                    let http = http.clone();
                    let counter = counter.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            counter.fetch_add(1, Ordering::Relaxed);
                            let svc = svc.clone();
                            async move { hyper::service::Service::call(&svc, req).await }
                        });
                        let _ = http.serve_connection(TokioIo::new(socket), svc).await;
                    });
                }
            });
        });
        Ok(S3Server {
            endpoint: format!("http://{local}"),
            root: root.to_owned(),
            requests,
            shutdown: Some(tx),
            thread: Some(thread),
            _dir: None,
        })
    }

    /// Environment for a cloud-dump process talking to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("CLOUD_DUMP_S3_ENDPOINT".into(), self.endpoint.clone()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
