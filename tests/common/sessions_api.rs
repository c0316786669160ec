//! A browser's cookie jar, and the admin listener's sessions API (SPEC 9)
//! as a client calls it. Included with `#[path]` by the tests that use it
//! (after `mod common;`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use serde_json::Value;

use crate::common::e2e::{raw_request, RawResponse};
use crate::common::{Got, Proxy};

/// A browser: keeps the cookies the proxy sets (and drops deleted ones).
#[derive(Default)]
pub struct Browser {
    pub jar: BTreeMap<String, String>,
}

impl Browser {
    pub async fn get(&mut self, p: &Proxy, path: &str) -> Got {
        let mut b = p.req(Method::GET, path, None);
        if !self.jar.is_empty() {
            let c: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            b = b.header("cookie", c.join("; "));
        }
        let got = p.send(b.body(Full::new(Bytes::new())).unwrap()).await;
        for c in got.set_cookies() {
            let pair = c.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if c.contains("Max-Age=0") {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_string(), value.to_string());
            }
        }
        got
    }

    /// The session cookie's value.
    pub fn key(&self) -> String {
        self.jar["sessionid"].clone()
    }
}

/// One request to the admin listener, with `Authorization: Bearer TOKEN`
/// when a token is given.
pub async fn admin(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
) -> RawResponse {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    raw_request(
        addr,
        &format!("{method} {target} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n"),
    )
    .await
}

/// `GET /sessions?user=QUERY` (`QUERY` as it goes in the URL): the array.
pub async fn list(addr: SocketAddr, user_query: &str, token: &str) -> Vec<Value> {
    let r = admin(
        addr,
        "GET",
        &format!("/sessions?user={user_query}"),
        Some(token),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    match serde_json::from_slice(&r.body).expect("JSON") {
        Value::Array(a) => a,
        other => panic!("not an array: {other}"),
    }
}

/// `DELETE target`: the `N` of `{"deleted": N}`.
pub async fn deleted(addr: SocketAddr, target: &str, token: &str) -> u64 {
    let r = admin(addr, "DELETE", target, Some(token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["deleted"].as_u64().expect("{\"deleted\": N}")
}

/// The value of the unlabelled or labelled series `series` (as it starts
/// its line in `/metrics`), 0 when absent.
pub async fn metric(addr: SocketAddr, series: &str) -> u64 {
    let r = admin(addr, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}
