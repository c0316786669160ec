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

fn header_text(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// One field of a form or query string, percent-decoded, at most 40 chars.
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

/// A `next` target that stays on this site: a path, not `//host` or `/\host`.
fn local_path(next: &str) -> Option<&str> {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && next.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(next)
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
/// Returns the header line as sent, for the page's "what the app sent".
fn directive(r: &mut Response<Full<Bytes>>, name: &'static str, value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone().into_bytes(),
        other => crate::session::json::to_ascii_vec(other),
    };
    let shown = format!("{}: {}", title_case(name), String::from_utf8_lossy(&text));
    if let Ok(hv) = HeaderValue::from_bytes(&text) {
        r.headers_mut().append(name, hv);
    }
    shown
}

/// `x-session-cycle-key` as `X-Session-Cycle-Key`.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn with_type(body: impl Into<Bytes>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:44em;margin:2em auto;padding:0 1em;background:#fafafa;color:#222;line-height:1.45}\
h1{margin-bottom:.2em}h2{margin-top:1.4em;font-size:1.15em}\
.note{background:#fff7d6;border:1px solid #e6d28a;padding:.6em .9em;border-radius:6px}\
.done{background:#e8f4ea;border:1px solid #9ccaa5;padding:.6em .9em;border-radius:6px}\
pre,code{font-family:ui-monospace,monospace;font-size:.92em}\
pre{background:#eee;padding:.8em;overflow-x:auto;border-radius:6px}\
table{border-collapse:collapse}td{padding:.15em .8em .15em 0;vertical-align:top}\
button{cursor:pointer}";

const FAVICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#2a6\"/><path d=\"M4 8h8M8 4v8\" stroke=\"#fff\" stroke-width=\"2\"/></svg>";

/// What the demo page shows besides the session.
struct Shown<'a> {
    user: Option<&'a str>,
    visits: u64,
    is_new: bool,
    id: &'a str,
    expiry: &'a str,
    expiry_age: &'a str,
    browser_close: bool,
    /// `?next=` from the proxy's login redirect.
    next: Option<&'a str>,
    /// `?done=` from the last form: what its response asked the proxy.
    done: Option<&'a str>,
    /// The directives this response sends.
    sent: Vec<String>,
}

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = session_of(&req);
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let is_new = header_text(&req, "x-session-new") == "true";
    let id = header_text(&req, "x-session-id");
    let expiry = header_text(&req, "x-session-expiry-date");
    let expiry_age = header_text(&req, "x-session-expiry-age");
    let browser_close = header_text(&req, "x-session-expire-at-browser-close") == "true";
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
            let next = form_field(query.as_bytes(), "next");
            let done = form_field(query.as_bytes(), "done");
            let mut r = Response::new(Full::new(Bytes::new()));
            let sent = vec![directive(
                &mut r,
                "x-session-update",
                &json!({ "visits": visits }),
            )];
            let page = page(
                &shown,
                &Shown {
                    user: user.as_deref(),
                    visits,
                    is_new,
                    id: &id,
                    expiry: &expiry,
                    expiry_age: &expiry_age,
                    browser_close,
                    next: next.as_deref().and_then(local_path),
                    done: done.as_deref(),
                    sent,
                },
            );
            *r.body_mut() = Full::new(Bytes::from(page));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (Method::GET, "/account") => with_type(
            format!(
                "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width, initial-scale=1\"><title>Account</title>{HEAD_LINKS}</head><body><h1>Account of {}</h1><p>This page is behind <code>login_required = [\"user\"]</code>: the proxy itself sends logged-out visitors to the login form (<code>302</code> to <code>/?next=/account</code>) without calling the app.</p><p>Your session id: <code id=session-id>{}</code></p><p><a href=\"/\">back</a></p></body></html>",
                escape(user.as_deref().unwrap_or("?")),
                escape(&id),
            ),
            "text/html; charset=utf-8",
        ),
        (Method::POST, "/login") => {
            let name = form_field(&body, "username").filter(|n| !n.is_empty());
            let next = form_field(&body, "next");
            let to = next.as_deref().and_then(local_path).unwrap_or("/?done=login");
            let mut r = see_other(to);
            if let Some(name) = name {
                // At login: a new key (fixation protection), then the user.
                directive(&mut r, "x-session-cycle-key", &json!("1"));
                directive(&mut r, "x-session-update", &json!({ "user": name }));
            }
            r
        }
        (Method::POST, "/logout") => {
            let mut r = see_other("/?done=logout");
            directive(&mut r, "x-session-flush", &json!("1"));
            r
        }
        (Method::POST, "/cart") => {
            let mut r = see_other("/?done=cart");
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
            let mut r = see_other("/?done=cart-clear");
            directive(&mut r, "x-session-delete", &json!("cart"));
            r
        }
        (_, "/static/style.css") => with_type(STYLE, "text/css; charset=utf-8"),
        (_, "/static/favicon.svg" | "/favicon.ico") => with_type(FAVICON, "image/svg+xml"),
        _ => {
            let mut r = with_type("not found\n", "text/plain; charset=utf-8");
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

const HEAD_LINKS: &str = "<link rel=stylesheet href=\"/static/style.css\"><link rel=icon type=\"image/svg+xml\" href=\"/static/favicon.svg\">";

/// What the last form's response asked of the proxy, and what the proxy did.
fn done_note(done: &str) -> String {
    let (what, did) = match done {
        "login" => (
            "<code>X-Session-Cycle-Key: 1</code> and <code>X-Session-Update: {\"user\": ...}</code>",
            "the proxy moved the session to a new key (the session id below changed: an attacker who knew the old cookie has nothing) and stored the user",
        ),
        "logout" => (
            "<code>X-Session-Flush: 1</code>",
            "the proxy deleted the session record and the cookie (<code>Max-Age=0</code>); this visit starts a new session, whose key is new",
        ),
        "cart" => (
            "<code>X-Session-Update: {\"cart\": [...]}</code>",
            "the proxy merged that key into the stored session",
        ),
        "cart-clear" => (
            "<code>X-Session-Delete: cart</code>",
            "the proxy removed that key from the stored session",
        ),
        _ => return String::new(),
    };
    format!(
        "<p class=done id=done>You {}: the app answered with {what}, and {did}.</p>",
        match done {
            "login" => "logged in",
            "logout" => "logged out",
            "cart" => "added to the cart",
            _ => "emptied the cart",
        }
    )
}

fn page(session: &Map<String, Value>, s: &Shown<'_>) -> String {
    let cart: Vec<String> = session
        .get("cart")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(escape).collect())
        .unwrap_or_default();
    let next_field = s
        .next
        .map(|n| format!("<input type=hidden name=next value=\"{}\">", escape(n)))
        .unwrap_or_default();
    let who = match s.user {
        Some(u) => format!(
            "<p>Logged in as <b>{}</b>. <form method=post action=/logout style=display:inline><button>Log out</button></form> <a href=/account>Account page</a></p>",
            escape(u)
        ),
        None => format!(
            "<form method=post action=/login><input name=username placeholder=\"your name\" required> {next_field}<button>Log in</button></form><p><a href=/account>Account page</a> (needs a login)</p>"
        ),
    };
    let login_note = match (s.next, s.user) {
        (Some(n), None) => format!(
            "<p class=note id=login-note>Log in to see {}: the proxy sent you here because that page needs a login (<code>login_required</code>), and will take you there after.</p>",
            if n.starts_with("/account") { "your account".to_string() } else { format!("<code>{}</code>", escape(n)) }
        ),
        _ => String::new(),
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
    let id = if s.id.is_empty() {
        "(none yet: this session has no key until this response stores data)".to_string()
    } else {
        escape(s.id)
    };
    let cookie = if s.browser_close {
        "sessionid=&lt;key&gt;; Path=/; Secure; HttpOnly; SameSite=Lax (no Max-Age: a browser-close cookie)".to_string()
    } else {
        format!(
            "sessionid=&lt;key&gt;; Max-Age={}; Expires=...; Path=/; Secure; HttpOnly; SameSite=Lax",
            escape(s.expiry_age)
        )
    };
    let sent: String = s
        .sent
        .iter()
        .map(|d| format!("<code>{}</code><br>", escape(d)))
        .collect();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sessiongate demo</title>
{HEAD_LINKS}</head>
<body>
<h1>sessiongate demo</h1>
{done}{login_note}
<p style="font-size:1.5em">You have visited this page <b id="visits">{visits}</b> time{plural}.</p>
<p id="visitor">{new}</p>
<h2>Login</h2>{who}
<h2>Cart</h2>{cart_html}
<form method=post action=/cart><input name=item placeholder="an item" required> <button>Add to cart</button></form>
<h2>The session, as the app sees it (<code>X-Session</code>)</h2>
<pre id="session">{shown}</pre>
<h2>What the proxy did</h2>
<table>
<tr><td>Session id (<code>X-Session-Id</code>, not the cookie)</td><td><code id="session-id">{id}</code></td></tr>
<tr><td>Expires (<code>X-Session-Expiry-Date</code>)</td><td>{expiry}</td></tr>
<tr><td>The cookie it sets when the session changes</td><td><code>{cookie}</code></td></tr>
<tr><td>What this response asks of it</td><td id="sent">{sent}</td></tr>
</table>
<p>The app behind the proxy has no cookie or session code: it reads <code>X-Session</code> and answers with <code>X-Session-*</code> headers. The cookie holds only a random key; the data stays in the proxy's store.</p>
</body></html>"#,
        done = s.done.map(done_note).unwrap_or_default(),
        visits = s.visits,
        plural = if s.visits == 1 { "" } else { "s" },
        new = if s.is_new {
            "You are a new visitor: your browser sent no valid session cookie (one is set with this response)."
        } else {
            "Welcome back: your browser sent a valid session cookie."
        },
        shown = escape(&shown),
        expiry = escape(s.expiry),
    )
}
