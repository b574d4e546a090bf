//! A stand-in for the Storj auth service (`POST /v1/access`), answering every access
//! grant equal to `grant` with credentials for a local S3 server, so the exchange is
//! tested end to end without the network.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct FakeStorjAuth {
    pub url: String,
    /// Successful exchanges so far.
    pub exchanges: Arc<AtomicU64>,
}

impl FakeStorjAuth {
    pub fn start(grant: &str, access_key: &str, secret_key: &str, endpoint: &str) -> FakeStorjAuth {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let exchanges = Arc::new(AtomicU64::new(0));
        let (grant, ak, sk, ep, count) =
            (grant.to_owned(), access_key.to_owned(), secret_key.to_owned(), endpoint.to_owned(), exchanges.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let body: serde_like::Value = serde_like::parse(&body);
                let (status, reply) = if request_line.starts_with("POST /v1/access") && body.grant == grant {
                    count.fetch_add(1, Ordering::Relaxed);
                    ("200 OK", format!(r#"{{"access_key_id":"{ak}","secret_key":"{sk}","endpoint":"{ep}"}}"#))
                } else {
                    ("401 Unauthorized", r#"{"error":"invalid access grant"}"#.to_owned())
                };
                let mut s = stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        FakeStorjAuth { url, exchanges }
    }
}

/// Just enough JSON reading for `{"access_grant": "...", ...}`.
mod serde_like {
    pub struct Value {
        pub grant: String,
    }
    pub fn parse(body: &[u8]) -> Value {
        let text = String::from_utf8_lossy(body);
        let grant =
            text.split("\"access_grant\"").nth(1).and_then(|rest| rest.split('"').nth(1)).unwrap_or("").to_owned();
        Value { grant }
    }
}
