//! `sessiongate demo` on a fresh machine: the real binary starts the proxy
//! with a generated self-signed certificate in front of the bundled app, and
//! a browser-like client (cookies kept, TLS) sees the visit count rise, logs
//! in (new key), adds to the cart, reaches the login-required page and logs
//! out.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The demo's certificate is made at start-up; like a person clicking
/// through the browser warning, the test accepts it.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Demo {
    child: Child,
    port: u16,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo() -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("the demo prints its URL")
            .expect("read stdout");
        if let Some(rest) = line.split("https://localhost:").nth(1) {
            break rest.trim_end_matches('/').parse::<u16>().expect("a port");
        }
    };
    // Keep draining stdout, as a terminal would.
    std::thread::spawn(move || lines.for_each(drop));
    Demo { child, port }
}

/// One HTTP/1.1 request over a fresh TLS connection; returns the status,
/// the `Set-Cookie` values and the body.
async fn fetch(
    port: u16,
    method: &str,
    path: &str,
    cookie: &str,
    body: &str,
) -> (u16, Vec<String>, String, Option<String>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n");
    if !cookie.is_empty() {
        req.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut cookies = Vec::new();
    let mut location = None;
    for l in head.lines().skip(1) {
        let (n, v) = l.split_once(':').unwrap();
        match n.to_ascii_lowercase().as_str() {
            "set-cookie" => cookies.push(v.trim().to_string()),
            "location" => location = Some(v.trim().to_string()),
            _ => {}
        }
    }
    (status, cookies, body.to_string(), location)
}

fn visits(body: &str) -> u64 {
    let at = body.find("id=\"visits\">").expect("the visit counter") + "id=\"visits\">".len();
    body[at..].split('<').next().unwrap().parse().unwrap()
}

/// Keeps the session cookie like a browser.
fn update_jar(jar: &mut String, set: &[String]) {
    for c in set {
        let pair = c.split(';').next().unwrap();
        if pair.starts_with("sessionid=") {
            *jar = if c.contains("Max-Age=0") {
                String::new()
            } else {
                pair.to_string()
            };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_counts_visits_and_logs_in_and_out() {
    let demo = start_demo();
    let port = demo.port;
    let mut jar = String::new();
    let run = async {
        let mut last = 0;
        for expected in 1..=3 {
            let (status, set, body, _) = fetch(port, "GET", "/", &jar, "").await;
            assert_eq!(status, 200);
            update_jar(&mut jar, &set);
            last = visits(&body);
            assert_eq!(last, expected, "the count rises");
        }
        assert!(body_has_cookie(&jar));
        // The login page is protected.
        let (status, _, _, location) = fetch(port, "GET", "/account", &jar, "").await;
        assert_eq!(status, 302);
        assert_eq!(location.as_deref(), Some("/?next=/account"));
        // Log in: a new key (Cycle-Key), the user in the session.
        let before = jar.clone();
        let (status, set, _, _) = fetch(port, "POST", "/login", &jar, "username=ann").await;
        assert_eq!(status, 303);
        update_jar(&mut jar, &set);
        assert_ne!(jar, before, "the key changed at login");
        let (status, set, body, _) = fetch(port, "POST", "/cart", &jar, "item=apple").await;
        assert_eq!(status, 303, "{body}");
        update_jar(&mut jar, &set);
        let (_, set, body, _) = fetch(port, "GET", "/", &jar, "").await;
        update_jar(&mut jar, &set);
        assert_eq!(visits(&body), last + 1, "the count survived the login");
        assert!(body.contains("Logged in as <b>ann</b>"), "{body}");
        assert!(body.contains("<li>apple</li>"), "{body}");
        let (status, _, body, _) = fetch(port, "GET", "/account", &jar, "").await;
        assert_eq!(status, 200);
        assert!(body.contains("Account of ann"));
        // Log out: the cookie is deleted, the count starts again.
        let (_, set, _, _) = fetch(port, "POST", "/logout", &jar, "").await;
        assert!(set.iter().any(|c| c.contains("Max-Age=0")));
        update_jar(&mut jar, &set);
        let (_, _, body, _) = fetch(port, "GET", "/", &jar, "").await;
        assert_eq!(visits(&body), 1);
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the demo answered in time");
}

fn body_has_cookie(jar: &str) -> bool {
    jar.starts_with("sessionid=") && jar.len() == "sessionid=".len() + 32
}
