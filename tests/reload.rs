//! Reload (SPEC 7.1) on the real binary: SIGHUP under a running client
//! loop (no refused connection, no non-2xx, the new upstream used soon
//! after, the memory session kept), an invalid file and a `[store]` change
//! keep the running configuration, a certificate swap reaches new TLS
//! connections, and `sessiongate_config_reloads_total{result}` counts them.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::e2e::*;
use common::*;
use http_body_util::{BodyExt, Full};

const LIMIT: Duration = Duration::from_secs(20);

struct Running {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<tokio::sync::Notify>,
}

impl Running {
    async fn start(config: &std::path::Path) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env("SESSIONGATE_WORKERS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sessiongate");
        let pipe = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let new_line = Arc::new(tokio::sync::Notify::new());
        let (sink, notify) = (lines.clone(), new_line.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
                notify.notify_waiters();
            }
        });
        let mut r = Running {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            new_line,
        };
        let line = r.wait_for("sessiongate listening", 1).await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("addr= in the listening line");
        r.addr = addr.parse().unwrap();
        r
    }

    /// Waits until `count` stderr lines contain `needle`; returns the last.
    async fn wait_for(&self, needle: &str, count: usize) -> String {
        let wait = async {
            loop {
                let next = self.new_line.notified();
                {
                    let lines = self.lines.lock().unwrap();
                    let found: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
                    if found.len() >= count {
                        return found[count - 1].clone();
                    }
                }
                next.await;
            }
        };
        match tokio::time::timeout(LIMIT, wait).await {
            Ok(l) => l,
            Err(_) => panic!(
                "no {needle:?} line (#{count}); stderr: {:#?}",
                self.lines.lock().unwrap()
            ),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(upstream: &str, admin: u16, extra_store: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
tls = false
shutdown_grace = "5s"
access_log = "off"

[session]
secret_key = "{SECRET}"
cookie_secure = false

[store]
clear_expired_interval = "0s"
{extra_store}

[admin]
listen = "127.0.0.1:{admin}"

[[route]]
name = "app"
upstream = "{upstream}"
"#
    )
}

/// Two upstreams that say their names, and the binary running on a config
/// file (in its own directory) routing to the first, with an admin listener.
struct OneTwo {
    one: Upstream,
    two: Upstream,
    admin: u16,
    path: std::path::PathBuf,
    sg: Running,
    dir: TempDir,
}

async fn one_then_two(dir: &str) -> OneTwo {
    let one = upstream(named_upstream("one")).await;
    let two = upstream(named_upstream("two")).await;
    let dir = TempDir::new(dir);
    let admin = common::redis_server::free_port();
    let path = dir.write("sessiongate.toml", &config_text(&one.url(), admin, ""));
    let sg = Running::start(&path).await;
    OneTwo {
        one,
        two,
        admin,
        path,
        sg,
        dir,
    }
}

fn named_upstream(name: &'static str) -> impl Fn(&Seen) -> http::Response<Full<Bytes>> {
    move |s: &Seen| {
        if s.uri.path() == "/login" {
            directives(&[("x-session-update", r#"{"user": "ann"}"#)])
        } else {
            text(&format!("{name} {}", s.header("x-session").unwrap_or("")))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_load_and_refuses_what_it_must() {
    let OneTwo {
        one,
        two,
        admin,
        path,
        sg,
        dir,
    } = one_then_two("reload").await;
    let base = format!("http://{}", sg.addr);

    let http = client::<Full<Bytes>>();
    let login = http
        .get(format!("{base}/login").parse().unwrap())
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    // The client loop: keep-alive connections and new ones, until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let served_by_two = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for fresh in [false, true] {
        let (stop, failures, two_count, total) = (
            stop.clone(),
            failures.clone(),
            served_by_two.clone(),
            total.clone(),
        );
        let (base, cookie) = (base.clone(), cookie.clone());
        loops.push(tokio::spawn(async move {
            let mut keep = client::<Full<Bytes>>();
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    keep = client::<Full<Bytes>>();
                }
                let req = http::Request::get(format!("{base}/page"))
                    .header("cookie", &cookie)
                    .body(Full::default())
                    .unwrap();
                match keep.request(req).await {
                    Ok(r) => {
                        let status = r.status();
                        let body = r.into_body().collect().await.unwrap().to_bytes();
                        let body = String::from_utf8_lossy(&body).into_owned();
                        if !status.is_success() {
                            failures.lock().unwrap().push(format!("{status}: {body}"));
                        } else if !body.contains(r#""user":"ann""#) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("session lost: {body}"));
                        } else if body.starts_with("two") {
                            two_count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("request failed: {e}")),
                }
                total.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // A valid reload: the second upstream.
    within("some requests before the reload", async {
        while total.load(Ordering::Relaxed) < 50 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    std::fs::write(&path, config_text(&two.url(), admin, "")).unwrap();
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 1).await;
    // Used within 2 s (in practice by the next request of each loop).
    tokio::time::timeout(Duration::from_secs(2), async {
        while served_by_two.load(Ordering::Relaxed) < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the new upstream serves within 2 s of the reload");

    // An invalid file: the check message is logged, the old config serves on.
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n").unwrap();
    sg.signal("HUP");
    let line = sg.wait_for("reload failed", 1).await;
    assert!(line.contains("sessiongate.toml:3:1"), "{line}");
    assert!(line.contains("unknown field"), "{line}");

    // A [store] change is refused with a clear line.
    std::fs::write(
        &path,
        config_text(
            &one.url(),
            admin,
            &format!("engine = \"file\"\npath = \"{}\"", dir.join("s").display()),
        ),
    )
    .unwrap();
    sg.signal("HUP");
    let line = sg.wait_for("reload failed", 2).await;
    assert!(line.contains("[store] changed"), "{line}");

    let before = total.load(Ordering::Relaxed);
    within("requests after the refused reloads", async {
        while total.load(Ordering::Relaxed) < before + 50 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    // Still the second upstream: the refused reloads changed nothing.
    let last = two.count();
    let r = http
        .request(
            http::Request::get(format!("{base}/page"))
                .header("cookie", &cookie)
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(two.count(), last + 1);

    let metrics = raw_request(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .text();
    for line in [
        r#"sessiongate_config_reloads_total{result="ok"} 1"#,
        r#"sessiongate_config_reloads_total{result="invalid"} 1"#,
        r#"sessiongate_config_reloads_total{result="refused"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

/// The certificate a new TLS connection to `addr` is served, trusting `roots`.
async fn served_certificate(
    addr: SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> rustls::pki_types::CertificateDer<'static> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = within(
        "the TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        ),
    )
    .await
    .expect("a TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_served_to_new_connections_after_sighup() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("reload-tls");
    let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    dir.write("cert.pem", &a.cert.pem());
    dir.write("key.pem", &a.signing_key.serialize_pem());
    let text = config_text(&up.url(), common::redis_server::free_port(), "")
        .replace(
            "tls = false",
            "tls = true\ncert = \"cert.pem\"\nkey = \"key.pem\"",
        )
        .replace("cookie_secure = false", "");
    let path = dir.write("sessiongate.toml", &text);
    let sg = Running::start(&path).await;
    let roots = [a.cert.der().clone(), b.cert.der().clone()];
    assert_eq!(&served_certificate(sg.addr, &roots).await, a.cert.der());

    // A key that does not match: refused, the old certificate serves on.
    dir.write("cert.pem", &b.cert.pem());
    sg.signal("HUP");
    let line = sg.wait_for("reload failed", 1).await;
    assert!(line.contains("key does not match certificate"), "{line}");
    assert_eq!(&served_certificate(sg.addr, &roots).await, a.cert.der());

    dir.write("key.pem", &b.signing_key.serialize_pem());
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 1).await;
    assert_eq!(&served_certificate(sg.addr, &roots).await, b.cert.der());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_command_reaches_the_server_through_the_admin_listener() {
    let one = upstream(named_upstream("one")).await;
    let two = upstream(named_upstream("two")).await;
    let dir = TempDir::new("reload-cmd");
    let admin = common::redis_server::free_port();
    let with_token = |up: &Upstream| {
        config_text(&up.url(), admin, "").replace(
            &format!("listen = \"127.0.0.1:{admin}\""),
            &format!("listen = \"127.0.0.1:{admin}\"\ntoken = \"s3cret-admin-token\""),
        )
    };
    let path = dir.write("sessiongate.toml", &with_token(&one));
    let sg = Running::start(&path).await;
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();

    // Without the token, no reload.
    let r = raw_request(
        admin_addr,
        "POST /reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 401);

    std::fs::write(&path, with_token(&two)).unwrap();
    let cmd = |path: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["reload", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = tokio::task::spawn_blocking({
        let p = path.clone();
        move || cmd(&p)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        out.contains(&format!("configuration reloaded from {}", path.display())),
        "{out}"
    );
    let got = client::<Full<Bytes>>()
        .get(format!("http://{}/page", sg.addr).parse().unwrap())
        .await
        .unwrap();
    let body = got.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"two"), "{body:?}");

    // An invalid route: the command fails with the check message.
    std::fs::write(
        &path,
        with_token(&two).replace("name = \"app\"", "name = \"app\"\nstrip_prefix = 3"),
    )
    .unwrap();
    let keep = dir.write("good.toml", &with_token(&two));
    let (code, _, err) = tokio::task::spawn_blocking({
        let p = path.clone();
        move || cmd(&p)
    })
    .await
    .unwrap();
    // The command reads the same (now invalid) file first and says so.
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("sessiongate.toml:"), "{err}");
    // Through a valid file naming the same admin listener, the server is
    // asked; it re-reads its own (invalid) file and answers with the check
    // message, which the command prints.
    let (code, _, err) = tokio::task::spawn_blocking({
        let keep = keep.clone();
        move || cmd(&keep)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("sessiongate.toml:21:16: invalid type"),
        "{err}"
    );
    // Once its own file is valid again, the answer names that file, not
    // the one the command was given.
    std::fs::write(&path, with_token(&two)).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || cmd(&keep))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("configuration reloaded from {}", path.display())),
        "{out}"
    );
    assert!(!out.contains("good.toml"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listen_is_rebound_and_a_taken_port_keeps_the_old_one_serving() {
    // The upstream holds `/slow` until the test opens the gate: a request
    // in flight on the old port across the reload.
    let gate = Gate::default();
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let up = {
        let gate = gate.clone();
        upstream_async(move |s: Seen| {
            let (gate, arrived) = (gate.clone(), arrived_tx.clone());
            Box::pin(async move {
                if s.uri.path() == "/slow" {
                    let _ = arrived.send(());
                    gate.wait().await;
                }
                text("served")
            })
        })
        .await
    };
    let dir = TempDir::new("reload-listen");
    let (p1, p2) = (
        common::redis_server::free_port(),
        common::redis_server::free_port(),
    );
    let (a1, a2) = (
        common::redis_server::free_port(),
        common::redis_server::free_port(),
    );
    let text_for = |listen: u16, admin: u16| {
        config_text(&up.url(), admin, "").replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{listen}\""),
        )
    };
    let path = dir.write("sessiongate.toml", &text_for(p1, a1));
    let sg = Running::start(&path).await;
    let old: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let new: SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    assert_eq!(sg.addr, old);

    let slow = tokio::spawn(async move {
        raw_request(
            old,
            "GET /slow HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    within("the slow request to reach the upstream", arrived.recv()).await;

    // `listen` and `[admin] listen` move.
    std::fs::write(&path, text_for(p2, a2)).unwrap();
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 1).await;
    let line = sg.wait_for("sessiongate listening", 2).await;
    assert!(line.contains(&format!("addr=127.0.0.1:{p2}")), "{line}");
    let r = raw_request(
        new,
        "GET /page HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "served"));
    // The old sockets are closed once the reload is reported.
    for (what, addr) in [
        ("listen", old),
        ("admin", format!("127.0.0.1:{a1}").parse().unwrap()),
    ] {
        let e = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err(&format!("the old {what} port refuses"));
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{what}");
    }
    let admin_new: SocketAddr = format!("127.0.0.1:{a2}").parse().unwrap();
    let r = raw_request(
        admin_new,
        "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    // The request in flight on the old port finishes there.
    gate.open();
    let r = within("the slow request", slow).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "served"));

    // A port another process holds: the reload fails with the message a
    // start prints, and the running listener serves on.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    std::fs::write(&path, text_for(taken, a2)).unwrap();
    sg.signal("HUP");
    let line = sg.wait_for("reload failed", 1).await;
    assert!(
        line.contains(&format!("cannot listen on 127.0.0.1:{taken} (listen)"))
            && line.contains("in use"),
        "{line}"
    );
    // Another process listening with SO_REUSEPORT, as a second
    // sessiongate does: a reload never shares its port (that would split
    // the traffic between the two), whatever the kernel would allow.
    let shared = {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        s.set_reuseport(true).unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.listen(16).unwrap()
    };
    let taken = shared.local_addr().unwrap().port();
    std::fs::write(&path, text_for(taken, a2)).unwrap();
    sg.signal("HUP");
    let line = sg.wait_for("reload failed", 2).await;
    assert!(
        line.contains(&format!("cannot listen on 127.0.0.1:{taken} (listen)"))
            && line.contains("in use by another process"),
        "{line}"
    );
    let r = raw_request(
        new,
        "GET /page HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "served"));
    let metrics = raw_request(
        admin_new,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .text();
    for line in [
        r#"sessiongate_config_reloads_total{result="ok"} 1"#,
        r#"sessiongate_config_reloads_total{result="invalid"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    drop((held, shared));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_redirect_http_is_rebound_and_turning_tls_off_is_refused() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("reload-redirect");
    let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    dir.write("cert.pem", &a.cert.pem());
    dir.write("key.pem", &a.signing_key.serialize_pem());
    let (r1, r2) = (
        common::redis_server::free_port(),
        common::redis_server::free_port(),
    );
    let base = config_text(&up.url(), common::redis_server::free_port(), "")
        .replace("cookie_secure = false", "");
    let tls = |redirect: u16| {
        base.replace(
            "tls = false",
            &format!(
                "tls = true\ncert = \"cert.pem\"\nkey = \"key.pem\"\nredirect_http = \"127.0.0.1:{redirect}\""
            ),
        )
    };
    let path = dir.write("sessiongate.toml", &tls(r1));
    let sg = Running::start(&path).await;
    let ask = |port: u16| async move {
        raw_request(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "GET /x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        )
        .await
    };
    assert_eq!(ask(r1).await.status, 308);

    std::fs::write(&path, tls(r2)).unwrap();
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 1).await;
    let r = ask(r2).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.test:{}/x", sg.addr.port()).as_str())
    );
    let e = tokio::net::TcpStream::connect(format!("127.0.0.1:{r1}"))
        .await
        .expect_err("the old redirect port refuses");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);

    // TLS off needs a restart: refused, and TLS serves on.
    std::fs::write(&path, &base).unwrap();
    sg.signal("HUP");
    let line = sg.wait_for("reload failed", 1).await;
    assert!(
        line.contains("[server] tls (turning TLS on or off) changed: this needs a restart"),
        "{line}"
    );
    assert_eq!(
        &served_certificate(sg.addr, &[a.cert.der().clone()]).await,
        a.cert.der()
    );
    assert_eq!(ask(r2).await.status, 308);
}

/// SPEC 7.1 "each reload is logged with its result": a reload that changes
/// keys read once at start (`keepalive_timeout`, `max_connections`, ...)
/// takes effect for the rest and says which keys keep their start-up
/// values, rather than seem to apply them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_keys_it_leaves_at_their_start_up_values() {
    let OneTwo {
        two,
        admin,
        path,
        sg,
        dir: _dir,
        ..
    } = one_then_two("reload-kept").await;
    let changed = config_text(&two.url(), admin, "").replace(
        "access_log = \"off\"",
        "access_log = \"off\"\nkeepalive_timeout = \"30s\"\nmax_connections = 5",
    );
    std::fs::write(&path, changed).unwrap();
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 1).await;
    let line = sg
        .wait_for("the reload keeps the start-up value until a restart", 1)
        .await;
    assert!(
        line.contains("[server] keepalive_timeout, max_connections changed"),
        "{line}"
    );
    // Reloading the same file again: the values in effect are still the
    // start-up ones, so it says so again (the previous file is not what
    // serves).
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 2).await;
    let line = sg
        .wait_for("the reload keeps the start-up value until a restart", 2)
        .await;
    assert!(
        line.contains("[server] keepalive_timeout, max_connections changed"),
        "{line}"
    );
    // The routes did change (each worker takes the new configuration up
    // from its next connection: asked until the new upstream answers).
    within("the new upstream to answer", async {
        loop {
            let got = client::<Full<Bytes>>()
                .get(format!("http://{}/page", sg.addr).parse().unwrap())
                .await
                .unwrap();
            let body = got.into_body().collect().await.unwrap().to_bytes();
            if body.starts_with(b"two") {
                return;
            }
        }
    })
    .await;
}

/// A key rotation by reload (SPEC 7.1: the reload re-reads the key files)
/// reaches the engines that sign with `secret_key`: `signed_cookies` (the
/// cookie) and `db` (Django's `session_data`). Before, both kept the keys
/// they opened with until a restart: a reload that dropped a leaked key
/// still accepted it, and the cookies made after the reload were signed
/// with the old key, so the restart that finally applied the rotation
/// ended them.
async fn a_reload_rotates_the_keys_of(tag: &str, store: &str) {
    let one = upstream(named_upstream("one")).await;
    let dir = TempDir::new(tag);
    let admin = common::redis_server::free_port();
    let keyed = |secret: &str, fallbacks: &str| {
        config_text(&one.url(), admin, store).replace(
            &format!("secret_key = \"{SECRET}\""),
            &format!("secret_key = \"{secret}\"\nsecret_key_fallbacks = [{fallbacks}]"),
        )
    };
    const NEW: &str = "a-new-secret-after-the-rotation-0123456789";
    let path = dir.write("sessiongate.toml", &keyed(SECRET, ""));
    if store.contains("\"db\"") {
        let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["migrate", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let sg = Running::start(&path).await;
    let login = || async {
        let r = raw_request(
            sg.addr,
            "GET /login HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        let c = r.header("set-cookie").expect("a session cookie");
        c.split(';').next().unwrap().to_string()
    };
    let page = |cookie: String| async move {
        let r = raw_request(
            sg.addr,
            &format!(
                "GET /page HTTP/1.1\r\nHost: a\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    };
    let signed_before = login().await;
    assert_eq!(page(signed_before.clone()).await, r#"one {"user":"ann"}"#);

    // The new key signs, the old one still verifies (as a fallback).
    std::fs::write(&path, keyed(NEW, &format!("\"{SECRET}\""))).unwrap();
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 1).await;
    assert_eq!(page(signed_before.clone()).await, r#"one {"user":"ann"}"#);
    let signed_after = login().await;

    // The old key dropped: what it signed is no longer adopted, what the
    // new key signed is.
    std::fs::write(&path, keyed(NEW, "")).unwrap();
    sg.signal("HUP");
    sg.wait_for("configuration reloaded", 2).await;
    assert_eq!(
        page(signed_before).await,
        "one {}",
        "the dropped key still verifies"
    );
    assert_eq!(page(signed_after).await, r#"one {"user":"ann"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_keys_of_signed_cookies() {
    a_reload_rotates_the_keys_of("reload-keys-signed", "engine = \"signed_cookies\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_keys_of_the_db_engine() {
    a_reload_rotates_the_keys_of(
        "reload-keys-db",
        "engine = \"db\"\nurl = \"sqlite://sessions.sqlite3\"",
    )
    .await;
}
