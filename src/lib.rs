//! sessiongate: a TLS-terminating reverse proxy that gives unmodified
//! backends Django's session framework through `X-Session*` headers.
//!
//! The data flow, module by module: [`server`] accepts TCP and TLS,
//! [`proxy`] routes and forwards, [`session`] reads the cookie, builds the
//! request headers and turns the upstream's directives into a patch, and
//! [`store`] keeps the records. [`config`] is the TOML contract.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod config;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod session;
pub mod store;
pub mod timer;

pub use config::Config;
pub use server::Server;
