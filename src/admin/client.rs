//! The client side of the sessions API (SPEC 9), for `sessiongate sessions
//! list` and `sessiongate sessions revoke`: one HTTP/1.1 request to the
//! admin listener that a configuration file names, with its token.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::Config;

/// Why a sessions command failed, as the user reads it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{file}: no [admin] section: the sessions commands reach the running proxy through its admin listener (add [admin] listen and token)")]
    NoAdmin { file: String },
    #[error("{file}: [admin] token (or token_file) is not set: the sessions API requires it")]
    NoToken { file: String },
    #[error("{file}: [session] user_key is not set: the proxy keeps no index of a user's sessions without it")]
    NoUserKey { file: String },
    #[error("the admin listener at {addr} is not running (connection refused): is sessiongate running with this configuration?")]
    Refused { addr: SocketAddr },
    #[error("cannot reach the admin listener at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin listener at {addr} did not answer within {secs}s")]
    Timeout { addr: SocketAddr, secs: u64 },
    #[error("the admin listener at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the admin listener at {addr} refused the token (401): [admin] token in {file} is not the running proxy's")]
    Unauthorized { addr: SocketAddr, file: String },
    #[error("the admin listener at {addr} answered {status}: {message}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        message: String,
    },
    #[error("the admin listener at {addr} answered what is not the sessions API's JSON: {source}")]
    Json {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error("--id {0:?}: expected a session's X-Session-Id (32 lower-case hex digits)")]
    BadId(String),
}

/// One session as `GET /sessions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Listed {
    pub id: String,
    pub created: String,
    pub last_write: String,
    pub expires: String,
}

/// Which sessions `revoke` ends.
#[derive(Debug, Clone)]
pub enum Target {
    User(String),
    Id(String),
}

/// Everything in a query value but unreserved characters is encoded.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The sessions API of the proxy that a configuration describes.
pub struct SessionsClient {
    addr: SocketAddr,
    token: String,
    file: String,
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl SessionsClient {
    /// The admin listener and token of `config` (whose file is `file`).
    pub fn new(config: &Config, file: &str) -> Result<SessionsClient, ClientError> {
        let file = file.to_string();
        let Some(admin) = &config.admin else {
            return Err(ClientError::NoAdmin { file });
        };
        let Some(token) = &admin.token else {
            return Err(ClientError::NoToken { file });
        };
        if config.session.user_key.is_none() {
            return Err(ClientError::NoUserKey { file });
        }
        Ok(SessionsClient {
            addr: admin.listen,
            token: String::from_utf8_lossy(token).into_owned(),
            file,
        })
    }

    /// `GET /sessions?user=V`.
    pub async fn list(&self, user: &str) -> Result<Vec<Listed>, ClientError> {
        let body = self
            .call(
                Method::GET,
                &format!("/sessions?user={}", utf8_percent_encode(user, QUERY)),
            )
            .await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Json {
            addr: self.addr,
            source,
        })
    }

    /// `DELETE /sessions?user=V` or `DELETE /sessions/ID`: how many ended.
    pub async fn revoke(&self, target: &Target) -> Result<u64, ClientError> {
        let path = match target {
            Target::User(u) => format!("/sessions?user={}", utf8_percent_encode(u, QUERY)),
            Target::Id(id) => {
                let ok = id.len() == 32
                    && id
                        .bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
                if !ok {
                    return Err(ClientError::BadId(id.clone()));
                }
                format!("/sessions/{id}")
            }
        };
        let body = self.call(Method::DELETE, &path).await?;
        #[derive(serde::Deserialize)]
        struct Deleted {
            deleted: u64,
        }
        serde_json::from_slice::<Deleted>(&body)
            .map(|d| d.deleted)
            .map_err(|source| ClientError::Json {
                addr: self.addr,
                source,
            })
    }

    async fn call(&self, method: Method, path: &str) -> Result<Bytes, ClientError> {
        let addr = self.addr;
        let timeout = || ClientError::Timeout {
            addr,
            secs: TIMEOUT.as_secs(),
        };
        let http = |source| ClientError::Http { addr, source };
        let stream = match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await
        {
            Err(_) => return Err(timeout()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(ClientError::Refused { addr })
            }
            Ok(Err(source)) => return Err(ClientError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let answer = tokio::time::timeout(TIMEOUT, async {
            let resp = send.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        driver.abort();
        let (status, body) = answer.map_err(|_| timeout())?.map_err(http)?;
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized {
                addr,
                file: self.file.clone(),
            }),
            status => Err(ClientError::Status {
                addr,
                status,
                message: String::from_utf8_lossy(&body).trim().to_string(),
            }),
        }
    }
}

/// The table `sessiongate sessions list` prints.
pub fn table(sessions: &[Listed]) -> String {
    let mut out = format!(
        "{:<32}  {:<20}  {:<20}  {}\n",
        "ID", "CREATED", "LAST WRITE", "EXPIRES"
    );
    for s in sessions {
        out.push_str(&format!(
            "{:<32}  {:<20}  {:<20}  {}\n",
            s.id, s.created, s.last_write, s.expires
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_percent_encoded_in_the_query() {
        assert_eq!(
            utf8_percent_encode("a b+c&d=é", QUERY).to_string(),
            "a%20b%2Bc%26d%3D%C3%A9"
        );
    }

    #[test]
    fn the_table_has_a_header_and_a_line_per_session() {
        let s = Listed {
            id: "0123456789abcdef0123456789abcdef".into(),
            created: "2026-12-02T03:04:05Z".into(),
            last_write: "2026-12-02T03:05:05Z".into(),
            expires: "2026-12-16T03:05:05Z".into(),
        };
        let t = table(&[s.clone(), s]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID") && lines[0].contains("LAST WRITE"));
        assert!(lines[1].starts_with("0123456789abcdef0123456789abcdef  2026-12-02T03:04:05Z"));
    }
}
