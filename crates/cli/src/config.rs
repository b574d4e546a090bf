//! The config file's PostgreSQL clusters (`postgres: clusters: NAME: {…}` beside Litestream's
//! `dbs:`), turned into the settings the flags read.
//!
//! Precedence is flag > environment > file: a file value becomes the environment variable
//! its flag reads, and only when that variable is unset (so clap's own flag > environment
//! rule finishes the job). Keys that go together (the ways to give a key; the credentials
//! of one store) are taken from the file only when neither a flag nor the environment gives
//! any of them. Everything here is pure: the caller reads the file and sets the variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default config file, shared with `cloud-dump sqlite`.
pub const DEFAULT_CONFIG: &str = "/etc/cloud-dump.yml";

#[derive(Debug, Default, Deserialize)]
struct FileTop {
    #[serde(default)]
    postgres: Option<PgSection>,
    /// Litestream's keys (`dbs`, `addr`, …): read by `cloud-dump sqlite`.
    #[serde(flatten)]
    _sqlite: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSection {
    #[serde(default)]
    pub clusters: BTreeMap<String, Cluster>,
}

/// One cluster. Every key is optional; names are the long flags'.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Cluster {
    pub repo: Option<String>,
    /// The cluster's data directory: `wal-push`/`wal-fetch` run there pick this cluster.
    pub pgdata: Option<PathBuf>,
    pub db_url: Option<String>,
    pub compression: Option<String>,
    pub compression_level: Option<i32>,
    pub compression_threads: Option<u32>,
    pub wal_compression: Option<String>,
    pub checkpoint: Option<String>,
    pub max_rate: Option<String>,
    pub encrypt: Option<bool>,
    pub passphrase: Option<String>,
    pub passphrase_file: Option<PathBuf>,
    pub recipient_key: Option<PathBuf>,
    pub identity_key: Option<PathBuf>,
    pub prefetch: Option<u32>,
    pub parallel: Option<u16>,
    pub retain_full: Option<usize>,
    pub retain_days: Option<f64>,
    pub io_timeout: Option<u64>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_virtual_hosted_style: Option<bool>,
    pub s3_allow_http: Option<bool>,
    pub s3_skip_verify: Option<bool>,
    pub s3_object_lock: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub storj_access: Option<String>,
    pub google_service_account: Option<PathBuf>,
    pub azure_storage_account_name: Option<String>,
    pub azure_storage_account_key: Option<String>,
}

/// Parses the file's `postgres` section (the rest belongs to `cloud-dump sqlite`).
pub fn parse(text: &str, origin: &str) -> Result<PgSection, String> {
    let expanded = cloud_dump_sqlite::config::expand_env(text);
    if expanded.trim().is_empty() {
        return Ok(PgSection::default());
    }
    let top: FileTop = serde_yaml::from_str(&expanded)
        .map_err(|e| format!("{origin}: {}", cloud_dump_sqlite::config::redact_yaml_values(&e.to_string())))?;
    let section = top.postgres.unwrap_or_default();
    for (name, c) in &section.clusters {
        cloud_dump_postgres::Layout::new(Some(name), None)
            .map_err(|e| format!("{origin}: postgres.clusters.{name}: not a usable cluster name: {e}"))?;
        if c.passphrase.is_some() as u8 + c.passphrase_file.is_some() as u8 + c.recipient_key.is_some() as u8 > 1 {
            return Err(format!(
                "{origin}: postgres.clusters.{name}: give one of passphrase, passphrase-file and recipient-key"
            ));
        }
    }
    Ok(section)
}

/// Where a file holds secrets itself, as `postgres.clusters.prod.passphrase` or
/// `dbs[0].replicas[1].secret-access-key`, read from the text before `$VAR` expansion (a
/// value that only names a variable is not a secret in the file). Such a file must not be
/// readable by others.
pub fn file_secrets(text: &str) -> Vec<String> {
    use serde_yaml::Value;
    let Ok(top) = serde_yaml::from_str::<Value>(text) else { return Vec::new() };
    let mut out = Vec::new();
    let literal = |v: &Value| match v {
        Value::String(s) => {
            let t = s.trim();
            let var = t.strip_prefix("${").and_then(|r| r.strip_suffix('}')).or_else(|| t.strip_prefix('$'));
            !t.is_empty()
                && !var.is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        }
        Value::Null => false,
        _ => true,
    };
    let check = |out: &mut Vec<String>, at: String, map: &Value, keys: &[&str]| {
        for k in keys {
            if let Some(v) = map.get(*k) {
                let secret = if *k == "db-url" {
                    v.as_str().is_some_and(|u| literal(v) && url_has_password(u))
                } else {
                    literal(v)
                };
                if secret {
                    out.push(format!("{at}{k}"));
                }
            }
        }
    };
    let s3 = ["secret-access-key", "session-token"];
    check(&mut out, String::new(), &top, &s3);
    if let Some(Value::Mapping(clusters)) = top.get("postgres").and_then(|p| p.get("clusters")) {
        for (name, c) in clusters {
            let at = format!("postgres.clusters.{}.", name.as_str().unwrap_or("?"));
            check(
                &mut out,
                at,
                c,
                &[
                    "passphrase",
                    "secret-access-key",
                    "session-token",
                    "storj-access",
                    "azure-storage-account-key",
                    "db-url",
                ],
            );
        }
    }
    // `db` is Litestream's other spelling of `dbs`.
    for dbs in [top.get("dbs"), top.get("db")].into_iter().flatten() {
        let Value::Sequence(dbs) = dbs else { continue };
        for (i, db) in dbs.iter().enumerate() {
            if let Some(Value::Sequence(reps)) = db.get("replicas") {
                for (j, r) in reps.iter().enumerate() {
                    let at = format!("dbs[{i}].replicas[{j}].");
                    check(&mut out, at.clone(), r, &s3);
                    match r.get("age").and_then(|a| a.get("identities")) {
                        Some(Value::Sequence(ids)) if ids.iter().any(literal) => {
                            out.push(format!("{at}age.identities"))
                        }
                        // A single key written as a scalar is still a key in the file.
                        Some(v @ Value::String(_)) if literal(v) => out.push(format!("{at}age.identities")),
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// Whether a connection string carries a password: in a URL's user info
/// (`postgres://user:pw@host`) or its query (`?password=…`), or as libpq's `password`
/// keyword (`password=…`, `password = …`).
pub(crate) fn url_has_password(conn: &str) -> bool {
    let t = conn.trim();
    if let Some(rest) = t.strip_prefix("postgres://").or_else(|| t.strip_prefix("postgresql://")) {
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = before_query.split('/').next().unwrap_or("");
        let in_userinfo = authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'));
        let in_query = query.split('&').any(|kv| kv.split('=').next().is_some_and(|k| k.trim() == "password"));
        return in_userinfo || in_query;
    }
    // Keyword/value form: whitespace around '=' is allowed.
    let mut words = t.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let key = match w.split_once('=') {
            Some((k, _)) => k,
            None if words.peek().is_some_and(|n| n.starts_with('=')) => w,
            None => continue,
        };
        if key == "password" {
            return true;
        }
    }
    false
}

/// A file that holds a secret must be readable by its owner only, or by a group when root
/// owns it (root:postgres 0640), as libpq requires of `.pgpass`.
pub fn check_permissions(path: &Path, mode: u32, owner_uid: u32, secrets: &[String]) -> Result<(), String> {
    if secrets.is_empty() {
        return Ok(());
    }
    let too_open = if owner_uid == 0 { mode & 0o027 != 0 } else { mode & 0o077 != 0 };
    if too_open {
        return Err(format!(
            "config file {} holds a secret ({}) but its mode {:04o} lets others read it; run chmod 600 {} \
             (or chown root:GROUP and chmod 640)",
            path.display(),
            secrets.join(", "),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// What picks the cluster: `--cluster`/CLOUD_DUMP_CLUSTER, or the data directory a WAL
/// command runs in (PostgreSQL starts archive_command and restore_command there).
pub struct Selector<'a> {
    pub named: Option<&'a str>,
    pub cwd: Option<&'a Path>,
    /// Whether the command is told its repository some other way (flag or environment).
    pub repo_given: bool,
}

/// The cluster this command is about, if the file describes one for it.
pub fn select<'a>(section: &'a PgSection, how: &Selector) -> Result<Option<(&'a str, &'a Cluster)>, String> {
    if let Some(name) = how.named {
        return match section.clusters.get_key_value(name) {
            Some((k, v)) => Ok(Some((k.as_str(), v))),
            // Named but not described: fine when the command is told where to go otherwise.
            None if how.repo_given || section.clusters.is_empty() => Ok(None),
            None => Err(format!(
                "cluster {name:?} is not in the config file (it describes {}), and no repository is given",
                section.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        };
    }
    if let Some(cwd) = how.cwd {
        let same = |p: &Path| p == cwd || std::fs::canonicalize(p).is_ok_and(|c| c == cwd);
        let hits: Vec<_> = section.clusters.iter().filter(|(_, c)| c.pgdata.as_deref().is_some_and(same)).collect();
        if let [(name, c)] = hits.as_slice() {
            return Ok(Some((name.as_str(), c)));
        }
    }
    match section.clusters.len() {
        0 => Ok(None),
        // Given a repository, the command is about that one: a file's only cluster is not
        // applied unasked.
        _ if how.repo_given => Ok(None),
        1 => {
            let (name, c) = section.clusters.iter().next().expect("one cluster");
            // A WAL command run in another data directory (a restored copy that kept the
            // archive_command, another cluster on the host) must not archive into this one.
            if let (Some(cwd), Some(pgdata)) = (how.cwd, &c.pgdata) {
                return Err(format!(
                    "this runs in {} but cluster {name:?} of the config file has pgdata {}: it is not that cluster's \
                     WAL; give --cluster {name} if it really is",
                    cwd.display(),
                    pgdata.display()
                ));
            }
            Ok(Some((name.as_str(), c)))
        }
        _ => Err(format!(
            "the config file describes clusters {}: choose one with --cluster (or CLOUD_DUMP_CLUSTER), or set its pgdata",
            section.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Settings that go together, with every flag and variable that can give them: the file
/// gives a group only when none of these is given (its values then come from one place).
const GROUPS: &[(&[&str], &[&str])] = &[
    (
        &["--passphrase", "--passphrase-file", "--recipient-key", "--identity-key"],
        &[
            "CLOUD_DUMP_PASSPHRASE",
            "WAL_PASSPHRASE",
            "CLOUD_DUMP_PASSPHRASE_FILE",
            "CLOUD_DUMP_RECIPIENT_KEY",
            "WAL_RECIPIENT_KEY",
            "CLOUD_DUMP_IDENTITY_KEY",
            "WAL_IDENTITY_KEY",
        ],
    ),
    // S3 credentials, and the other sources of them the AWS chain reads.
    (
        &[],
        &[
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ],
    ),
    (&["--s3-endpoint"], &["CLOUD_DUMP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
    (&["--s3-region"], &["CLOUD_DUMP_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"]),
    (
        &[],
        &[
            "GOOGLE_SERVICE_ACCOUNT",
            "GOOGLE_SERVICE_ACCOUNT_PATH",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
            "GOOGLE_APPLICATION_CREDENTIALS",
        ],
    ),
    (
        &[],
        &[
            "AZURE_STORAGE_ACCOUNT_NAME",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_ACCESS_KEY",
            "AZURE_STORAGE_MASTER_KEY",
            "AZURE_STORAGE_SAS_KEY",
            "AZURE_STORAGE_SAS_TOKEN",
            "AZURE_STORAGE_TOKEN",
            "AZURE_CLIENT_ID",
            "AZURE_CLIENT_SECRET",
            "AZURE_FEDERATED_TOKEN_FILE",
        ],
    ),
    (&["--storj-access"], &["STORJ_ACCESS"]),
    (&["--db-url"], &["CLOUD_DUMP_DB_URL"]),
];

/// The environment variables the cluster's settings become, leaving out any variable that
/// is set and any group that a flag or the environment already gives.
pub fn env_settings(
    name: &str,
    c: &Cluster,
    env_is_set: &dyn Fn(&str) -> bool,
    flag_given: &dyn Fn(&str) -> bool,
) -> Vec<(&'static str, String)> {
    let mut all: Vec<(&'static str, String)> = vec![("CLOUD_DUMP_CLUSTER", name.to_owned())];
    let mut put = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            all.push((k, v));
        }
    };
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    put("CLOUD_DUMP_REPO", c.repo.clone());
    put("CLOUD_DUMP_DB_URL", c.db_url.clone());
    put("CLOUD_DUMP_COMPRESSION", c.compression.clone());
    put("CLOUD_DUMP_COMPRESSION_LEVEL", c.compression_level.map(|v| v.to_string()));
    put("CLOUD_DUMP_COMPRESSION_THREADS", c.compression_threads.map(|v| v.to_string()));
    put("CLOUD_DUMP_WAL_COMPRESSION", c.wal_compression.clone());
    put("CLOUD_DUMP_CHECKPOINT", c.checkpoint.clone());
    put("CLOUD_DUMP_MAX_RATE", c.max_rate.clone());
    put("CLOUD_DUMP_ENCRYPT", c.encrypt.map(|v| v.to_string()));
    put("WAL_ENCRYPT", c.encrypt.map(|v| v.to_string()));
    put("CLOUD_DUMP_PASSPHRASE", c.passphrase.clone());
    put("WAL_PASSPHRASE", c.passphrase.clone());
    put("CLOUD_DUMP_PASSPHRASE_FILE", path(&c.passphrase_file));
    put("CLOUD_DUMP_RECIPIENT_KEY", path(&c.recipient_key));
    put("WAL_RECIPIENT_KEY", path(&c.recipient_key));
    put("CLOUD_DUMP_IDENTITY_KEY", path(&c.identity_key));
    put("WAL_IDENTITY_KEY", path(&c.identity_key));
    put("CLOUD_DUMP_PREFETCH", c.prefetch.map(|v| v.to_string()));
    put("CLOUD_DUMP_PARALLEL", c.parallel.map(|v| v.to_string()));
    put("CLOUD_DUMP_RETAIN_FULL", c.retain_full.map(|v| v.to_string()));
    put("CLOUD_DUMP_RETAIN_DAYS", c.retain_days.map(|v| v.to_string()));
    put("CLOUD_DUMP_IO_TIMEOUT", c.io_timeout.map(|v| v.to_string()));
    put("CLOUD_DUMP_S3_ENDPOINT", c.s3_endpoint.clone());
    put("CLOUD_DUMP_S3_REGION", c.s3_region.clone());
    put("CLOUD_DUMP_S3_VIRTUAL_HOSTED_STYLE", c.s3_virtual_hosted_style.map(|v| v.to_string()));
    put("CLOUD_DUMP_S3_ALLOW_HTTP", c.s3_allow_http.map(|v| v.to_string()));
    put("CLOUD_DUMP_S3_SKIP_VERIFY", c.s3_skip_verify.map(|v| v.to_string()));
    put("CLOUD_DUMP_S3_OBJECT_LOCK", c.s3_object_lock.map(|v| v.to_string()));
    put("AWS_ACCESS_KEY_ID", c.access_key_id.clone());
    put("AWS_SECRET_ACCESS_KEY", c.secret_access_key.clone());
    put("AWS_SESSION_TOKEN", c.session_token.clone());
    put("STORJ_ACCESS", c.storj_access.clone());
    put("GOOGLE_SERVICE_ACCOUNT", path(&c.google_service_account));
    put("AZURE_STORAGE_ACCOUNT_NAME", c.azure_storage_account_name.clone());
    put("AZURE_STORAGE_ACCOUNT_KEY", c.azure_storage_account_key.clone());

    let blocked: Vec<&str> = GROUPS
        .iter()
        .filter(|(flags, vars)| flags.iter().any(|f| flag_given(f)) || vars.iter().any(|v| env_is_set(v)))
        .flat_map(|(_, vars)| vars.iter().copied())
        .collect();
    all.into_iter().filter(|(k, _)| !env_is_set(k) && !blocked.contains(k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
addr: \":9090\"
dbs:
  - path: /var/lib/app/db.sqlite
    replicas:
      - url: s3://bkt/app
postgres:
  clusters:
    prod:
      repo: s3://bkt/pg
      pgdata: /var/lib/postgresql/15/main
      compression: zstd
      encrypt: true
      passphrase-file: /etc/cloud-dump/prod.pass
      prefetch: 4
      secret-access-key: s3cr3t
    test:
      repo: file:///var/backups/pg
";

    #[test]
    fn the_postgres_section_beside_litestreams_keys() {
        let s = parse(FILE, "f").unwrap();
        assert_eq!(s.clusters.len(), 2);
        assert_eq!(s.clusters["prod"].prefetch, Some(4));
        assert_eq!(file_secrets(FILE), vec!["postgres.clusters.prod.secret-access-key"]);
        let e = parse("postgres:\n  clusters:\n    a:\n      repo: x\n      retain: 3\n", "f").unwrap_err();
        assert!(e.contains("unknown field `retain`"), "{e}");
        let r = parse("postgres:\n  clusters:\n    a:\n      retain-full: 3\n      retain-days: 7.5\n", "f").unwrap();
        let got = env_settings("a", &r.clusters["a"], &|_| false, &|_| false);
        assert!(
            got.contains(&("CLOUD_DUMP_RETAIN_FULL", "3".into()))
                && got.contains(&("CLOUD_DUMP_RETAIN_DAYS", "7.5".into()))
        );
        let e =
            parse("postgres:\n  clusters:\n    a:\n      passphrase: x\n      passphrase-file: y\n", "f").unwrap_err();
        assert!(e.contains("give one of"), "{e}");
        assert!(parse("postgres:\n  clusters:\n    \"a/b\":\n      repo: x\n", "f").is_err());
        assert!(parse("", "f").unwrap().clusters.is_empty());
    }

    #[test]
    fn secrets_are_literal_values_not_variables() {
        let text = "secret-access-key: $AWS_SECRET\ndbs:\n  - path: /a\n    replicas:\n      - url: s3://b/a\n        \
                    secret-access-key: ${S}\n        age:\n          identities: [AGE-SECRET-KEY-1XYZ]\n\
                    postgres:\n  clusters:\n    a:\n      db-url: postgres://u:pw@h/db\n      passphrase: ${P}\n";
        assert_eq!(file_secrets(text), vec!["postgres.clusters.a.db-url", "dbs[0].replicas[0].age.identities"]);
        assert!(file_secrets(
            "dbs:\n  - path: /a\n    replicas:\n      - url: s3://b/a\n        age:\n          identities: [$ID]\n"
        )
        .is_empty());
        assert_eq!(file_secrets("secret-access-key: abc\n"), vec!["secret-access-key"]);
        let alias = "db:\n  - path: /a\n    replicas:\n      - url: s3://b/a\n        secret-access-key: abc\n";
        assert_eq!(file_secrets(alias), vec!["dbs[0].replicas[0].secret-access-key"]);
        let scalar = "dbs:\n  - path: /a\n    replicas:\n      - url: s3://b/a\n        age:\n          identities: AGE-SECRET-KEY-1X\n";
        assert_eq!(file_secrets(scalar), vec!["dbs[0].replicas[0].age.identities"]);
    }

    #[test]
    fn passwords_in_connection_strings_are_secrets() {
        assert!(url_has_password("postgres://u:pw@h/db"));
        assert!(!url_has_password("postgres://u@h/db?replication=yes"));
        assert!(!url_has_password("postgresql://h:5432/db"));
        assert!(url_has_password("host=h user=u password=pw"));
        assert!(url_has_password("host=h user=u password = pw"));
        assert!(url_has_password("host=h password =pw"));
        assert!(url_has_password("postgres://u@h/db?sslmode=require&password=pw"));
        assert!(!url_has_password("postgres://u@h/db?passfile=/x"));
        assert!(!url_has_password("host=h passfile=/x"));
    }

    #[test]
    fn yaml_errors_do_not_repeat_values() {
        let e = parse("postgres:\n  clusters:\n    a:\n      encrypt: hunter2-secret\n", "f").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
        assert_eq!(
            cloud_dump_sqlite::config::redact_yaml_values("invalid type: string \"AGE-SECRET\", expected a sequence"),
            "invalid type: string, expected a sequence"
        );
    }

    #[test]
    fn permissions_as_libpq_asks() {
        let p = Path::new("/etc/cloud-dump.yml");
        let s = vec!["postgres.clusters.a.passphrase".to_owned()];
        assert!(check_permissions(p, 0o644, 1000, &s).is_err());
        assert!(check_permissions(p, 0o640, 1000, &s).is_err());
        assert!(check_permissions(p, 0o600, 1000, &s).is_ok());
        assert!(check_permissions(p, 0o640, 0, &s).is_ok());
        assert!(check_permissions(p, 0o644, 0, &s).is_err());
        assert!(check_permissions(p, 0o660, 0, &s).is_err());
        assert!(check_permissions(p, 0o644, 1000, &[]).is_ok());
        let e = check_permissions(p, 0o100644, 1000, &s).unwrap_err();
        assert_eq!(
            e,
            "config file /etc/cloud-dump.yml holds a secret (postgres.clusters.a.passphrase) but its mode 0644 lets \
             others read it; run chmod 600 /etc/cloud-dump.yml (or chown root:GROUP and chmod 640)"
        );
    }

    #[test]
    fn choosing_the_cluster() {
        let s = parse(FILE, "f").unwrap();
        let pick = |named, cwd: Option<&str>, repo_given| {
            select(&s, &Selector { named, cwd: cwd.map(Path::new), repo_given }).map(|o| o.map(|(n, _)| n.to_owned()))
        };
        assert_eq!(pick(Some("test"), None, false).unwrap().as_deref(), Some("test"));
        assert!(pick(Some("other"), None, false).is_err());
        assert_eq!(pick(Some("other"), None, true).unwrap(), None);
        assert_eq!(pick(None, Some("/var/lib/postgresql/15/main"), false).unwrap().as_deref(), Some("prod"));
        assert!(pick(None, Some("/elsewhere"), false).unwrap_err().contains("clusters prod, test"));
        assert_eq!(pick(None, None, true).unwrap(), None);
        let one = parse("postgres:\n  clusters:\n    only:\n      repo: x\n", "f").unwrap();
        let with_pgdata =
            parse("postgres:\n  clusters:\n    only:\n      repo: x\n      pgdata: /data/a\n", "f").unwrap();
        let e = select(&with_pgdata, &Selector { named: None, cwd: Some(Path::new("/data/b")), repo_given: false })
            .unwrap_err();
        assert!(e.contains("it is not that cluster's WAL"), "{e}");
        assert!(select(
            &with_pgdata,
            &Selector { named: Some("only"), cwd: Some(Path::new("/data/b")), repo_given: false }
        )
        .unwrap()
        .is_some());
        let e = select(&s, &Selector { named: Some("prdo"), cwd: None, repo_given: false }).unwrap_err();
        assert!(e.contains("cluster \"prdo\" is not in the config file"), "{e}");
        let got = select(&one, &Selector { named: None, cwd: None, repo_given: false }).unwrap();
        assert_eq!(got.map(|(n, _)| n), Some("only"));
        assert!(select(&one, &Selector { named: None, cwd: None, repo_given: true }).unwrap().is_none());
    }

    #[test]
    fn flag_then_environment_then_file() {
        let s = parse(FILE, "f").unwrap();
        let c = &s.clusters["prod"];
        let none = |_: &str| false;
        let all = env_settings("prod", c, &none, &none);
        let get = |v: &[(&str, String)], k: &str| v.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get(&all, "CLOUD_DUMP_REPO").as_deref(), Some("s3://bkt/pg"));
        assert_eq!(get(&all, "CLOUD_DUMP_CLUSTER").as_deref(), Some("prod"));
        assert_eq!(get(&all, "WAL_ENCRYPT").as_deref(), Some("true"));
        assert_eq!(get(&all, "CLOUD_DUMP_PASSPHRASE_FILE").as_deref(), Some("/etc/cloud-dump/prod.pass"));
        // A variable that is set wins over the file.
        let repo_set = |k: &str| k == "CLOUD_DUMP_REPO";
        assert_eq!(get(&env_settings("prod", c, &repo_set, &none), "CLOUD_DUMP_REPO"), None);
        // A passphrase from the environment or a flag keeps the file's key file out.
        let pass_env = |k: &str| k == "CLOUD_DUMP_PASSPHRASE";
        assert_eq!(get(&env_settings("prod", c, &pass_env, &none), "CLOUD_DUMP_PASSPHRASE_FILE"), None);
        let flag = |f: &str| f == "--recipient-key";
        assert_eq!(get(&env_settings("prod", c, &none, &flag), "CLOUD_DUMP_PASSPHRASE_FILE"), None);
        // Half of the file's S3 credentials never pairs with half from the environment, nor
        // do they beat another credential source the environment names.
        for var in ["AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE"] {
            let env = |k: &str| k == var;
            assert_eq!(get(&env_settings("prod", c, &env, &none), "AWS_SECRET_ACCESS_KEY"), None, "{var}");
        }
        assert_eq!(get(&all, "AWS_SECRET_ACCESS_KEY").as_deref(), Some("s3cr3t"));
    }
}
