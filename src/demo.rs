//! `sessiongate demo`: the proxy, on the memory engine with a freshly
//! generated self-signed certificate, in front of a small bundled app that
//! knows nothing of cookies or stores and uses only the header protocol:
//! a visit counter, login (Cycle-Key + Update), logout (Flush), a cart, and
//! a page behind `login_required`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::server::ServerOptions;
use crate::store::{AnyStore, MemoryStore};
use crate::Server;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo app: {0}")]
    App(std::io::Error),
    #[error("demo certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0} (another program may use the port: try `sessiongate demo --listen 127.0.0.1:0`)")]
    Server(#[from] crate::server::ServerError),
}

/// Starts the demo app and the proxy; serves until SIGINT/SIGTERM.
pub async fn run(listen: SocketAddr) -> Result<ExitCode, DemoError> {
    let app = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::App)?;
    let app_addr = app.local_addr().map_err(DemoError::App)?;
    tokio::spawn(serve_app(app));

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let tls = crate::server::tls_config(
        cert.cert.pem().as_bytes(),
        cert.signing_key.serialize_pem().as_bytes(),
    )?;
    let secret = crate::session::SessionKey::generate();
    let config = Config::parse(
        &demo_config(listen, app_addr, secret.as_str()),
        std::path::Path::new("demo.toml"),
    )?;
    let store = Arc::new(AnyStore::Memory(MemoryStore::new()));
    let signals = crate::server::shutdown_signal().map_err(DemoError::App)?;
    let server = Server::bind(
        config,
        ServerOptions {
            workers: 1,
            store: Some(store),
            tls: Some(tls),
            ..ServerOptions::default()
        },
    )
    .await?;
    let addr = server.local_addr();
    let host = if addr.ip().is_loopback() {
        "localhost".to_string()
    } else {
        addr.ip().to_string()
    };
    // One write, errors ignored: a closed stdout must not stop the demo.
    let banner = format!(
        "\n  sessiongate demo is running: open https://{host}:{port}/\n  (a self-signed certificate: accept the browser's warning once)\n  reload to see the visit count rise; log in, fill the cart, log out.\n  Ctrl-C stops it.\n\n",
        port = addr.port()
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    }
    server.run(signals).await?;
    Ok(ExitCode::SUCCESS)
}

fn demo_config(listen: SocketAddr, app: SocketAddr, secret: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
tls = true
cert = "in-memory"
key = "in-memory"
shutdown_grace = "2s"

[session]
secret_key = "{secret}"
cookie_age = "1d"

[store]
engine = "memory"
clear_expired_interval = "1m"

[[route]]
name = "demo"
path = "/"
upstream = "http://{app}"
forward = {{ "X-Demo-User" = "user" }}

[[route]]
name = "account"
path = "/account"
upstream = "http://{app}"
login_required = ["user"]
login_url = "/"
forward = {{ "X-Demo-User" = "user" }}

[[route]]
name = "static"
path = "/static"
upstream = "http://{app}"
session = false
"#
    )
}

async fn serve_app(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(app))
                .await;
        });
    }
}

fn session_of(req: &Request<Incoming>) -> Map<String, Value> {
    req.headers()
        .get("x-session")
        .and_then(|v| serde_json::from_slice::<Value>(v.as_bytes()).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default()
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .trim()
                .chars()
                .take(40)
                .collect()
        })
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn see_other(to: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(to).expect("ascii"));
    r
}

/// Adds one `X-Session-*` directive; JSON values are sent ASCII-escaped.
fn directive(r: &mut Response<Full<Bytes>>, name: &'static str, value: &Value) {
    let text = match value {
        Value::String(s) => s.clone().into_bytes(),
        other => crate::session::json::to_ascii_vec(other),
    };
    if let Ok(hv) = HeaderValue::from_bytes(&text) {
        r.headers_mut().append(name, hv);
    }
}

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = session_of(&req);
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let is_new = req
        .headers()
        .get("x-session-new")
        .is_some_and(|v| v == "true");
    let expiry = req
        .headers()
        .get("x-session-expiry-date")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let user = req
        .headers()
        .get("x-demo-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = if method == Method::POST {
        req.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    } else {
        Bytes::new()
    };

    let resp = match (method, path.as_str()) {
        (Method::GET, "/") => {
            let visits = session.get("visits").and_then(Value::as_u64).unwrap_or(0) + 1;
            let mut shown = session.clone();
            shown.insert("visits".into(), json!(visits));
            let mut r = page(&shown, user.as_deref(), visits, is_new, &expiry);
            directive(&mut r, "x-session-update", &json!({ "visits": visits }));
            r
        }
        (Method::GET, "/account") => {
            let mut r = Response::new(Full::new(Bytes::from(format!(
                "<!doctype html><meta charset=utf-8><title>Account</title><body style=\"font-family:sans-serif;max-width:40em;margin:2em auto\"><h1>Account of {}</h1><p>This page is behind <code>login_required = [\"user\"]</code>: the proxy sent you to the login form when you were logged out.</p><p><a href=\"/\">back</a></p>",
                escape(user.as_deref().unwrap_or("?"))
            ))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (Method::POST, "/login") => {
            let name = form_field(&body, "username").filter(|n| !n.is_empty());
            let mut r = see_other("/");
            if let Some(name) = name {
                // At login: a new key (fixation protection), then the user.
                directive(&mut r, "x-session-cycle-key", &json!("1"));
                directive(&mut r, "x-session-update", &json!({ "user": name }));
            }
            r
        }
        (Method::POST, "/logout") => {
            let mut r = see_other("/");
            directive(&mut r, "x-session-flush", &json!("1"));
            r
        }
        (Method::POST, "/cart") => {
            let mut r = see_other("/");
            if let Some(item) = form_field(&body, "item").filter(|i| !i.is_empty()) {
                let mut cart: Vec<Value> = session
                    .get("cart")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                cart.push(json!(item));
                directive(&mut r, "x-session-update", &json!({ "cart": cart }));
            }
            r
        }
        (Method::POST, "/cart/clear") => {
            let mut r = see_other("/");
            directive(&mut r, "x-session-delete", &json!("cart"));
            r
        }
        (_, "/static/style.css") => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"body{background:#fafafa}")));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css"));
            r
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

fn page(
    session: &Map<String, Value>,
    user: Option<&str>,
    visits: u64,
    is_new: bool,
    expiry: &str,
) -> Response<Full<Bytes>> {
    let cart: Vec<String> = session
        .get("cart")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(escape).collect())
        .unwrap_or_default();
    let who = match user {
        Some(u) => format!(
            "<p>Logged in as <b>{}</b>. <form method=post action=/logout style=display:inline><button>Log out</button></form> <a href=/account>Account page</a></p>",
            escape(u)
        ),
        None => "<form method=post action=/login><input name=username placeholder=\"your name\" required> <button>Log in</button></form><p><a href=/account>Account page</a> (needs a login)</p>".to_string(),
    };
    let cart_html = if cart.is_empty() {
        "<p>Your cart is empty.</p>".to_string()
    } else {
        format!(
            "<ul>{}</ul><form method=post action=/cart/clear><button>Empty the cart</button></form>",
            cart.iter().map(|i| format!("<li>{i}</li>")).collect::<String>()
        )
    };
    let shown = serde_json::to_string_pretty(&Value::Object(session.clone())).unwrap_or_default();
    let html = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>sessiongate demo</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body style="font-family:sans-serif;max-width:40em;margin:2em auto">
<h1>sessiongate demo</h1>
<p style="font-size:1.5em">You have visited this page <b id="visits">{visits}</b> time{s}.</p>
<p>{new}</p>
<h2>Login</h2>{who}
<h2>Cart</h2>{cart_html}
<form method=post action=/cart><input name=item placeholder="an item" required> <button>Add to cart</button></form>
<h2>The session, as the app sees it</h2>
<pre style="background:#eee;padding:1em">{shown}</pre>
<p>Session expires {expiry}. The app behind the proxy has no cookie or session code: it reads <code>X-Session</code> and answers with <code>X-Session-*</code> headers.</p>
</body></html>"#,
        s = if visits == 1 { "" } else { "s" },
        new = if is_new {
            "You are a new visitor: no session cookie yet (it is set with this response)."
        } else {
            "Welcome back: your browser sent a valid session cookie."
        },
        shown = escape(&shown),
        expiry = escape(expiry),
    );
    let mut r = Response::new(Full::new(Bytes::from(html)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}
