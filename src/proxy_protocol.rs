//! The PROXY protocol (v1 text and v2 binary, HAProxy's spec) on `listen`
//! when `[server] proxy_protocol = true`: the header a load balancer sends
//! before anything else gives the client's address. Parsed by the `ppp`
//! crate; this module only reads exactly the header's bytes off the socket
//! (nothing after it, which belongs to TLS or HTTP).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header's longest form, CRLF included.
const V1_MAX: usize = 107;
/// The shortest header of either version (`PROXY UNKNOWN\r\n`).
const MIN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("cannot read the PROXY protocol header: {0}")]
    Io(#[source] std::io::Error),
    #[error("not a PROXY protocol header")]
    Missing,
    #[error("invalid PROXY protocol v1 header: {0}")]
    V1(#[source] ppp::v1::BinaryParseError),
    #[error("invalid PROXY protocol v2 header: {0}")]
    V2(#[source] ppp::v2::ParseError),
    #[error("PROXY protocol header for a Unix socket or an unknown family")]
    Family,
}

/// Reads the header and returns the client address it names: `None` for
/// a v1 `UNKNOWN` or a v2 `LOCAL` header (a health check of the balancer
/// itself: the real peer is the client).
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match tokio::time::timeout(timeout, read(io)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyHeaderError::Timeout(timeout)),
    }
}

async fn read<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; MIN];
    io.read_exact(&mut buf).await.map_err(read_err)?;
    if buf.starts_with(V2_SIG) {
        // 16 fixed bytes, the last two the length of the rest.
        let mut rest = [0u8; 1];
        io.read_exact(&mut rest).await.map_err(read_err)?;
        buf.push(rest[0]);
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        let start = buf.len();
        buf.resize(start + len, 0);
        io.read_exact(&mut buf[start..]).await.map_err(read_err)?;
        let h = ppp::v2::Header::try_from(&buf[..]).map_err(ProxyHeaderError::V2)?;
        return match h.command {
            ppp::v2::Command::Local => Ok(None),
            ppp::v2::Command::Proxy => match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
                }
                ppp::v2::Addresses::Unspecified => Ok(None),
                ppp::v2::Addresses::Unix(_) => Err(ProxyHeaderError::Family),
            },
        };
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // v1: byte by byte to the CRLF, so nothing after it is consumed.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::V1(ppp::v1::BinaryParseError::Parse(
                ppp::v1::ParseError::HeaderTooLong,
            )));
        }
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.map_err(read_err)?;
        buf.push(b[0]);
    }
    let h = ppp::v1::Header::try_from(&buf[..]).map_err(ProxyHeaderError::V1)?;
    Ok(match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

fn read_err(e: std::io::Error) -> ProxyHeaderError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProxyHeaderError::Missing
    } else {
        ProxyHeaderError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r, Duration::from_secs(1)).await;
        (got, r.to_vec())
    }

    #[tokio::test]
    async fn v1_gives_the_source_and_leaves_the_rest() {
        let (got, rest) =
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(got.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (got, _) = parse(b"PROXY TCP6 2001:db8::1 ::1 4000 443\r\n").await;
        assert_eq!(got.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (got, rest) = parse(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(got.unwrap(), None);
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let src: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut h =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
                .build()
                .unwrap();
        h.extend_from_slice(b"\x16\x03\x01");
        let (got, rest) = parse(&h).await;
        assert_eq!(got.unwrap(), Some(src));
        assert_eq!(rest, b"\x16\x03\x01");

        let local = Builder::new(Version::Two | Command::Local, 0)
            .build()
            .unwrap();
        let (got, _) = parse(&local).await;
        assert_eq!(got.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 nonsense here 1 2\r\n",
            b"PROXY TCP4 1.2.3.4",
            b"",
        ] {
            let (got, _) = parse(bad).await;
            assert!(got.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(parse(long.as_bytes()).await.0.is_err());
    }
}
