//! A small PostgreSQL client for replication connections, on `postgres-protocol` and
//! tokio: startup, authentication (trust, password, md5, SCRAM-SHA-256), TLS, simple
//! queries and the raw message stream that `BASE_BACKUP` needs.

use std::collections::HashMap;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conninfo::{ChannelBindingMode, ConnConfig, SslMode};
use crate::error::{Error, Result};
use crate::lsn::Lsn;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Connection {
    stream: Box<dyn Stream>,
    /// `tls-server-end-point` data of the TLS connection (RFC 5929), for SCRAM channel
    /// binding; `None` without TLS or when the certificate's hash cannot be told.
    server_end_point: Option<Vec<u8>>,
    tls: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    target: String,
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
}

/// Turns an ErrorResponse into our error, keeping what an operator needs to act.
pub(crate) fn server_error(mut fields: ErrorFields<'_>) -> Error {
    let (mut code, mut message, mut detail, mut hint) = (String::new(), String::new(), None, None);
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    Error::Server { code, message, detail, hint }
}

impl Connection {
    pub async fn connect(cfg: &ConnConfig) -> Result<Connection> {
        tokio::time::timeout(cfg.connect_timeout, Self::connect_inner(cfg)).await.map_err(|_| Error::Connect {
            target: cfg.target(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
        })?
    }

    async fn connect_inner(cfg: &ConnConfig) -> Result<Connection> {
        let target = cfg.target();
        let conn_err = |source| Error::Connect { target: target.clone(), source };
        let (stream, tls, server_end_point): (Box<dyn Stream>, bool, Option<Vec<u8>>) = if cfg.is_unix_socket() {
            let path = format!("{}/.s.PGSQL.{}", cfg.host, cfg.port);
            (Box::new(tokio::net::UnixStream::connect(&path).await.map_err(conn_err)?), false, None)
        } else {
            let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await.map_err(conn_err)?;
            tcp.set_nodelay(true).ok();
            match crate::tls::client_config(cfg)? {
                None => (Box::new(tcp), false, None),
                Some(tls) => Self::negotiate_tls(tcp, cfg, tls).await?,
            }
        };
        let mut conn = Connection {
            stream,
            tls,
            server_end_point,
            rbuf: BytesMut::with_capacity(1 << 20),
            wbuf: BytesMut::with_capacity(4096),
            params: HashMap::new(),
            target,
        };
        conn.startup(cfg).await?;
        Ok(conn)
    }

    async fn negotiate_tls(
        mut tcp: TcpStream,
        cfg: &ConnConfig,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<(Box<dyn Stream>, bool, Option<Vec<u8>>)> {
        let tls_err = |reason: String| Error::Tls { target: cfg.target(), reason };
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        tcp.write_all(&buf).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
                    .map_err(|e| tls_err(format!("invalid host name for TLS: {e}")))?;
                let s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_err(e.to_string()))?;
                let end_point = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::tls::server_end_point(c.as_ref()));
                Ok((Box::new(s), true, end_point))
            }
            b'N' if matches!(cfg.sslmode, SslMode::Prefer | SslMode::Allow) => Ok((Box::new(tcp), false, None)),
            b'N' => Err(tls_err("the server does not accept TLS (sslmode requires it)".into())),
            other => Err(Error::Protocol(format!("unexpected answer {other:#x} to SSLRequest"))),
        }
    }

    async fn startup(&mut self, cfg: &ConnConfig) -> Result<()> {
        let params = [
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", cfg.replication.as_str()),
            ("application_name", cfg.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let auth_err = |message: String| Error::Auth { user: cfg.user.clone(), message };
        let need_password = || {
            cfg.password
                .clone()
                .ok_or_else(|| auth_err("the server asks for a password and none was given (URL or PGPASSWORD)".into()))
        };
        let mut scram: Option<ScramSha256> = None;
        let (mut bound, mut scram_done) = (false, false);
        let require = cfg.channel_binding == ChannelBindingMode::Require;
        let not_bound = |how: &str| {
            auth_err(format!(
                "channel_binding=require, but the server {how}; not sending the password (is something between us and the server?)"
            ))
        };
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => {
                    // As libpq: a server that skips or cuts short the exchange proves nothing.
                    if scram.is_some() && !scram_done {
                        return Err(auth_err("the server ended SCRAM authentication before proving itself".into()));
                    }
                    if require && !(bound && scram_done) {
                        return Err(not_bound("accepted the login without SCRAM channel binding"));
                    }
                }
                Message::AuthenticationCleartextPassword if require => {
                    return Err(not_bound("asked for the password in clear"))
                }
                Message::AuthenticationMd5Password(_) if require => return Err(not_bound("asked for an MD5 password")),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(need_password()?.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        cfg.user.as_bytes(),
                        need_password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = mechs.next()? {
                        plain |= m == SCRAM_SHA_256;
                        plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    let password = need_password()?;
                    // Channel binding as libpq does it: bound when TLS and the server offer
                    // it (prefer, require); "supported but not offered" otherwise, so a
                    // downgrade by a man in the middle fails the SCRAM exchange.
                    let mode = cfg.channel_binding;
                    let binding = match (&self.server_end_point, plus, mode) {
                        (_, _, ChannelBindingMode::Disable) => None,
                        (Some(ep), true, _) => Some(ChannelBinding::tls_server_end_point(ep.clone())),
                        _ => None,
                    };
                    if binding.is_none() && mode == ChannelBindingMode::Require {
                        return Err(auth_err(if !self.tls {
                            "channel_binding=require, but the connection is not encrypted".into()
                        } else if !plus {
                            "channel_binding=require, but the server does not offer SCRAM-SHA-256-PLUS".into()
                        } else {
                            "channel_binding=require, but the server certificate's signature algorithm is not one cloud-dump can bind to".into()
                        }));
                    }
                    let (mech, s) = match binding {
                        Some(b) => (SCRAM_SHA_256_PLUS, ScramSha256::new(password.as_bytes(), b)),
                        None if !plain => {
                            return Err(auth_err(
                                "the server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                            ))
                        }
                        // "Supported, but you did not offer it" — only when that is true: with
                        // PLUS offered but a certificate we cannot hash, say "unsupported"
                        // (the server would take "y" for a downgrade attack).
                        None if self.tls && mode != ChannelBindingMode::Disable && !plus => {
                            (SCRAM_SHA_256, ScramSha256::new(password.as_bytes(), ChannelBinding::unrequested()))
                        }
                        None => (SCRAM_SHA_256, ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported())),
                    };
                    frontend::sasl_initial_response(mech, s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                    scram = Some(s);
                    bound = mech == SCRAM_SHA_256_PLUS;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| Error::Protocol("SASL continue without start".into()))?;
                    s.update(body.data()).map_err(|e| auth_err(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| Error::Protocol("SASL final without start".into()))?;
                    s.finish(body.data()).map_err(|e| auth_err(format!("the server's SCRAM proof is wrong: {e}")))?;
                    scram_done = true;
                }
                Message::ParameterStatus(p) => {
                    self.params.insert(p.name()?.to_owned(), p.value()?.to_owned());
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let e = server_error(body.fields());
                    return Err(match e {
                        Error::Server { code, message, .. } if code.starts_with("28") => auth_err(message),
                        other => other,
                    });
                }
                Message::AuthenticationGss | Message::AuthenticationSspi | Message::AuthenticationKerberosV5 => {
                    return Err(auth_err("GSSAPI/SSPI/Kerberos authentication is not supported".into()))
                }
                _ => return Err(Error::Protocol("unexpected message during startup".into())),
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// The next message from the server (NoticeResponses are logged and skipped).
    pub async fn read_message(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = Message::parse(&mut self.rbuf)? {
                if let Message::NoticeResponse(n) = &m {
                    if let Error::Server { message, .. } = server_error(n.fields()) {
                        tracing::info!(target: "postgres", "server notice: {message}");
                    }
                    continue;
                }
                return Ok(m);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 64 << 10 {
                self.rbuf.reserve(1 << 20);
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} closed the connection", self.target),
                )));
            }
        }
    }

    pub async fn send_query(&mut self, sql: &str) -> Result<()> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await
    }

    /// Runs a command and returns the rows of its (last) result set as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.read_message().await? {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(r) => rows.push(data_row(&r)?),
                Message::ErrorResponse(body) => failure = Some(server_error(body.fields())),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or_else(|| Error::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemInfo {
            system_id: get(0),
            timeline: get(1).parse().map_err(|_| Error::Protocol("bad timeline in IDENTIFY_SYSTEM".into()))?,
            xlogpos: get(2).parse().map_err(Error::Protocol)?,
        })
    }

    /// `server_version` as reported at startup, e.g. "17.2" or "15.18 (Debian 15.18-0+deb12u1)".
    pub fn server_version(&self) -> &str {
        self.params.get("server_version").map(String::as_str).unwrap_or("")
    }

    /// 150018 for "15.18", 100005 for "10.5", 90603 for "9.6.3".
    pub fn server_version_num(&self) -> u32 {
        version_num(self.server_version())
    }

    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }
}

pub(crate) fn data_row(r: &postgres_protocol::message::backend::DataRowBody) -> Result<Vec<Option<String>>> {
    let buf = r.buffer();
    let mut out = Vec::new();
    let mut ranges = r.ranges();
    while let Some(range) = ranges.next()? {
        out.push(range.map(|rg| String::from_utf8_lossy(&buf[rg]).into_owned()));
    }
    Ok(out)
}

pub fn version_num(v: &str) -> u32 {
    let head = v.split_whitespace().next().unwrap_or("");
    let nums: Vec<u32> = head
        .split('.')
        .map(|p| p.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(0))
        .collect();
    match nums.as_slice() {
        [major, minor, patch, ..] if *major < 10 => major * 10000 + minor * 100 + patch,
        [major, minor, ..] => major * 10000 + minor,
        [major] => major * 10000,
        [] => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_numbers() {
        assert_eq!(super::version_num("15.18 (Debian 15.18-0+deb12u1)"), 150018);
        assert_eq!(super::version_num("17.2"), 170002);
        assert_eq!(super::version_num("10.5"), 100005);
        assert_eq!(super::version_num("9.6.3"), 90603);
        assert_eq!(super::version_num("18beta1"), 180000);
    }
}
