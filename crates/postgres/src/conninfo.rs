//! Connection settings: a `postgres://` URL or `key=value` string, completed from the libpq
//! environment variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE,
//! PGSSLROOTCERT, PGAPPNAME, PGCONNECT_TIMEOUT). Values in the string win.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

/// libpq's `channel_binding`: `prefer` binds SCRAM to the TLS connection when the server
/// offers SCRAM-SHA-256-PLUS; `require` refuses to authenticate otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBindingMode {
    Disable,
    Prefer,
    Require,
}

#[derive(Clone)]
pub struct ConnConfig {
    /// A host name, an IP address, or a directory holding the Unix socket.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// The `replication` startup parameter; `true` (physical) unless the URL says otherwise.
    pub replication: String,
    pub sslmode: SslMode,
    /// SCRAM channel binding over TLS (`tls-server-end-point`), as libpq's `channel_binding`.
    pub channel_binding: ChannelBindingMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl ConnConfig {
    /// `user@host:port/db` — what errors and logs may show (never the password).
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    pub fn target(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Parses `conninfo` (URL or `key=value` pairs, or nothing) and fills the gaps from `env`.
    pub fn parse(conninfo: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<ConnConfig> {
        let mut kv = match conninfo.map(str::trim).filter(|s| !s.is_empty()) {
            None => HashMap::new(),
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => parse_url(s)?,
            Some(s) if s.contains('=') => parse_keyword_value(s)?,
            Some(_) => return Err(Error::Config(
                "--db-url: expected postgres://user:password@host:port/dbname?replication=yes or host=… user=… pairs"
                    .into(),
            )),
        };
        let mut take = |key: &str, env_key: &str| kv.remove(key).or_else(|| env(env_key)).filter(|v| !v.is_empty());
        let host = take("host", "PGHOST").unwrap_or_else(|| "localhost".into());
        let port = match take("port", "PGPORT") {
            Some(p) => {
                p.parse::<u16>().map_err(|_| Error::Config(format!("invalid port {p:?} in the connection settings")))?
            }
            None => 5432,
        };
        let user = take("user", "PGUSER")
            .or_else(|| env("USER"))
            .ok_or_else(|| Error::Config("no user in --db-url and PGUSER is not set".into()))?;
        let password = take("password", "PGPASSWORD");
        let dbname = take("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
        let replication = match take("replication", "PGREPLICATION").as_deref() {
            None | Some("yes" | "on" | "1" | "true") => "true".to_owned(),
            Some("database") => "database".to_owned(),
            Some(other) => {
                return Err(Error::Config(format!(
                    "replication={other:?} cannot stream a base backup; use replication=yes or leave it out"
                )))
            }
        };
        let sslmode = match take("sslmode", "PGSSLMODE") {
            Some(m) => m.parse().map_err(Error::Config)?,
            None => SslMode::Prefer,
        };
        let sslrootcert = take("sslrootcert", "PGSSLROOTCERT").map(PathBuf::from);
        let channel_binding = match take("channel_binding", "PGCHANNELBINDING").as_deref() {
            None | Some("prefer") => ChannelBindingMode::Prefer,
            Some("disable") => ChannelBindingMode::Disable,
            Some("require") => ChannelBindingMode::Require,
            Some(other) => {
                return Err(Error::Config(format!("invalid channel_binding {other:?}: use disable, prefer or require")))
            }
        };
        if channel_binding == ChannelBindingMode::Require && sslmode == SslMode::Disable {
            return Err(Error::Config("channel_binding=require needs TLS, but sslmode=disable".into()));
        }
        let application_name = take("application_name", "PGAPPNAME").unwrap_or_else(|| "cloud-dump".into());
        let connect_timeout = match take("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => Duration::from_secs(
                t.parse::<u64>().map_err(|_| Error::Config(format!("invalid connect_timeout {t:?}")))?.max(2),
            ),
            None => Duration::from_secs(30),
        };
        if kv.keys().any(|k| k == "sslcert" || k == "sslkey") {
            return Err(Error::Config(
                "TLS client certificates (sslcert/sslkey) are not supported yet; use password or SCRAM authentication"
                    .into(),
            ));
        }
        // Anything left over is a typo or a setting we would silently ignore.
        let mut unknown: Vec<_> =
            kv.keys().filter(|k| !matches!(k.as_str(), "target_session_attrs" | "gssencmode")).cloned().collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::Config(format!("unknown connection parameter(s): {}", unknown.join(", "))));
        }
        Ok(ConnConfig {
            host,
            port,
            user,
            password,
            dbname,
            replication,
            sslmode,
            sslrootcert,
            channel_binding,
            application_name,
            connect_timeout,
        })
    }
}

fn parse_url(s: &str) -> Result<HashMap<String, String>> {
    let url = url::Url::parse(s).map_err(|e| Error::Config(format!("--db-url is not a valid URL: {e}")))?;
    let dec = |v: &str| {
        url::form_urlencoded::parse(format!("x={}", v.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let mut kv = HashMap::new();
    if let Some(h) = url.host_str().filter(|h| !h.is_empty()) {
        let h = dec(h);
        kv.insert("host".into(), h.trim_start_matches('[').trim_end_matches(']').to_owned());
    }
    if let Some(p) = url.port() {
        kv.insert("port".into(), p.to_string());
    }
    if !url.username().is_empty() {
        kv.insert("user".into(), dec(url.username()));
    }
    if let Some(p) = url.password() {
        kv.insert("password".into(), dec(p));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        kv.insert("dbname".into(), dec(db));
    }
    for (k, v) in url.query_pairs() {
        kv.insert(k.into_owned(), v.into_owned());
    }
    Ok(kv)
}

fn parse_keyword_value(s: &str) -> Result<HashMap<String, String>> {
    let mut kv = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(Error::Config(format!("connection string: missing '=' after {key:?}")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(Error::Config("connection string: unterminated quote".into())),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        kv.insert(key, value);
    }
    Ok(kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn url_with_replication_and_env_fallback() {
        let c = ConnConfig::parse(
            Some("postgres://repl_user:p%40ss@db.example:6543/postgres?replication=yes&sslmode=require"),
            &no_env,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.user.as_str()), ("db.example", 6543, "repl_user"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.replication, "true");
        assert_eq!(c.sslmode, SslMode::Require);
        assert!(!format!("{c:?}").contains("p@ss"));

        let env = |k: &str| match k {
            "PGHOST" => Some("/var/run/postgresql".to_owned()),
            "PGUSER" => Some("u".to_owned()),
            "PGPASSWORD" => Some("secret".to_owned()),
            _ => None,
        };
        let c = ConnConfig::parse(None, &env).unwrap();
        assert!(c.is_unix_socket());
        assert_eq!((c.user.as_str(), c.password.as_deref(), c.port), ("u", Some("secret"), 5432));
        assert_eq!(c.replication, "true");
    }

    #[test]
    fn keyword_value_form() {
        let c = ConnConfig::parse(Some("host=127.0.0.1 port=5433 user=x password='a b\\'c' sslmode=disable"), &no_env)
            .unwrap();
        assert_eq!(c.password.as_deref(), Some("a b'c"));
        assert_eq!(c.sslmode, SslMode::Disable);
    }

    #[test]
    fn bad_input_is_named() {
        for (s, want) in [
            ("postgres://u@h/db?sslmode=sometimes", "sslmode"),
            ("postgres://u@h:99999/db", "valid URL"),
            ("postgres://u@h/db?replication=no", "replication"),
            ("postgres://u@h/db?colour=blue", "colour"),
            ("postgres://u@h/db?sslcert=/c.pem", "not supported"),
            ("just-a-word", "expected"),
        ] {
            let e = ConnConfig::parse(Some(s), &no_env).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
