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

/// Every asset the page links is served (no 404 in a browser's console).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_its_stylesheet_and_favicon() {
    let demo = start_demo();
    for path in ["/static/style.css", "/static/favicon.svg", "/favicon.ico"] {
        let (status, set, body, _) = fetch(demo.port, "GET", path, "", "").await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(set.is_empty(), "{path} sets no cookie");
    }
    let (_, _, body, _) = fetch(demo.port, "GET", "/", "", "").await;
    assert!(body.contains("name=\"viewport\""), "{body}");
    assert!(body.contains("href=\"/static/favicon.svg\""), "{body}");
}

/// A running ChromeDriver and the browser profile it uses.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    pub fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "sessiongate-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ChromeDriver on a free port, or None (a loud skip; a failure under CI).
fn start_chromedriver() -> Option<Driver> {
    let missing = |why: String| -> Option<Driver> {
        if common::redis_server::in_ci() {
            panic!(
                "headless Chromium is needed for the demo's browser test (CI must not skip): {why}"
            );
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: the demo's browser test: {why} (apt-get install chromium chromium-driver) ***\n"
        );
        None
    };
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !std::path::Path::new(bin).exists() {
            return missing(format!("{bin} not found"));
        }
    }
    let mut child = match Command::new("/usr/bin/chromedriver")
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return missing(format!("chromedriver did not start: {e}")),
    };
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    break rest.trim_end_matches('.').parse::<u16>().expect("a port");
                }
            }
            _ => return missing("chromedriver exited before it listened".into()),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Some(Driver {
        child,
        port,
        _profile: tempdir::new("chromium"),
    })
}

/// A person's first visit, driven through headless Chromium: the visit
/// count, the login-required page, login (the session id changes and `next`
/// is honoured), the cart, and a logout that says what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_walks_through_the_demo() {
    use fantoccini::{ClientBuilder, Locator};
    let Some(driver) = start_chromedriver() else {
        return;
    };
    let demo = start_demo();
    let base = format!("https://localhost:{}", demo.port);
    let mut caps = serde_json::Map::new();
    caps.insert("acceptInsecureCerts".into(), serde_json::json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--ignore-certificate-errors",
                format!("--user-data-dir={}", driver._profile.0.display()),
            ]
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let run = async {
        let c = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a WebDriver session");
        // A click that submits a form returns before the next page is
        // there: wait for its address.
        let arrive = |path: &'static str| {
            let c = c.clone();
            async move {
                let url = c.current_url().await.unwrap().join(path).unwrap();
                c.wait()
                    .at_most(Duration::from_secs(20))
                    .for_url(&url)
                    .await
                    .unwrap_or_else(|e| panic!("waiting for {path}: {e}"));
            }
        };
        let text = |sel: &'static str| {
            let c = c.clone();
            async move {
                c.find(Locator::Css(sel))
                    .await
                    .unwrap_or_else(|e| panic!("{sel}: {e}"))
                    .text()
                    .await
                    .unwrap()
            }
        };
        // First visit, then a reload: the count rises, the visitor is known.
        c.goto(&format!("{base}/")).await.unwrap();
        assert_eq!(text("#visits").await, "1");
        assert!(text("#visitor").await.contains("new visitor"));
        c.refresh().await.unwrap();
        assert_eq!(text("#visits").await, "2");
        assert!(text("#visitor").await.contains("Welcome back"));
        let id_before = text("#session-id").await;
        assert_eq!(id_before.len(), 32, "an X-Session-Id is shown: {id_before}");
        // The stylesheet applied (it was served).
        let bg = c
            .execute(
                "return getComputedStyle(document.body).backgroundColor",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(bg, serde_json::json!("rgb(250, 250, 250)"));
        // The account page needs a login: the proxy sends the browser to
        // the form, which says so.
        c.goto(&format!("{base}/account")).await.unwrap();
        assert_eq!(c.current_url().await.unwrap().path(), "/");
        assert!(text("#login-note")
            .await
            .contains("Log in to see your account"));
        // Log in: back on the account page, with a new session id.
        c.find(Locator::Css("input[name=username]"))
            .await
            .unwrap()
            .send_keys("ann")
            .await
            .unwrap();
        c.find(Locator::Css("form[action='/login'] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        arrive("/account").await;
        assert!(text("h1").await.contains("Account of ann"));
        let id_after = text("#session-id").await;
        assert_eq!(id_after.len(), 32);
        assert_ne!(id_after, id_before, "login cycles the key");
        // The cart.
        c.goto(&format!("{base}/")).await.unwrap();
        c.find(Locator::Css("input[name=item]"))
            .await
            .unwrap()
            .send_keys("apple")
            .await
            .unwrap();
        c.find(Locator::Css("form[action='/cart'] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        arrive("/?done=cart").await;
        assert!(text("#done").await.contains("added to the cart"));
        assert!(text("ul").await.contains("apple"));
        assert!(text("#session").await.contains("\"user\": \"ann\""));
        // Log out: the page says what happened, and it is a new visit.
        c.find(Locator::Css("form[action='/logout'] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        arrive("/?done=logout").await;
        let done = text("#done").await;
        assert!(done.contains("logged out"), "{done}");
        assert!(
            done.contains("deleted the session record and the cookie"),
            "{done}"
        );
        assert_eq!(text("#visits").await, "1");
        assert!(text("#visitor").await.contains("new visitor"));
        c.close().await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser walk finished in time");
}
