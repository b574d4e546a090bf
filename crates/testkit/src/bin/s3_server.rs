//! `cloud-dump-s3-server ROOT [--port N] [--bucket B]…`: a local S3-compatible server for
//! the quickstart and benchmarks. Credentials: cloud-dump-test / cloud-dump-test-secret.
//! `--stats FILE` keeps the number of requests served in FILE (rewritten every 100 ms).

fn main() {
    let mut args = std::env::args().skip(1);
    let mut root = None;
    let mut port = 9000u16;
    let mut buckets = Vec::new();
    let mut stats: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| usage()),
            "--bucket" => buckets.push(args.next().unwrap_or_else(|| usage())),
            "--stats" => stats = Some(args.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            other if root.is_none() && !other.starts_with('-') => root = Some(other.to_owned()),
            _ => usage(),
        }
    }
    let root = root.unwrap_or_else(|| usage());
    let refs: Vec<&str> = buckets.iter().map(String::as_str).collect();
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    let server = match cloud_dump_testkit::S3Server::serve(std::path::Path::new(&root), addr, &refs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cloud-dump-s3-server: cannot serve {root} on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("S3 endpoint {} serving {root}", server.endpoint);
    loop {
        match &stats {
            Some(f) => {
                let n = server.requests.load(std::sync::atomic::Ordering::Relaxed);
                let tmp = format!("{f}.tmp");
                if std::fs::write(&tmp, format!("{n}\n")).is_ok() {
                    let _ = std::fs::rename(&tmp, f);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            None => std::thread::park(),
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: cloud-dump-s3-server ROOT [--port N] [--bucket NAME]... [--stats FILE]");
    std::process::exit(2);
}
