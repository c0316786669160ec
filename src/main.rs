#![forbid(unsafe_code)]

mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use sessiongate::config::{Config, Engine};
use sessiongate::server::{shutdown_signal, Affinity, Server, ServerOptions};
use sessiongate::store::{AnyStore, Store};

const DEFAULT_CONFIG: &str = "config/sessiongate.toml";

/// A TLS reverse proxy that gives legacy backends Django's sessions.
#[derive(Parser)]
#[command(name = "sessiongate", version, about)]
struct Cli {
    /// Configuration file, for `sessiongate --config FILE` (= `run`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The configuration file of a command that reads one.
#[derive(clap::Args, Clone, Default)]
struct ConfigArg {
    /// Configuration file [default: config/sessiongate.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run(ConfigArg),
    /// Validate the configuration file and print a summary.
    Check(ConfigArg),
    /// Delete expired sessions from the configured store and print how many.
    ClearExpired(ConfigArg),
    /// Make the running server (the one on this file's `[admin] listen`)
    /// re-read its configuration, as SIGHUP does, and print the outcome.
    Reload(ConfigArg),
    /// Create the `db` engine's table (Django's `django_session`) when it is missing.
    Migrate(ConfigArg),
    /// A user's sessions, through the running proxy's admin API (needs
    /// `[admin]` with a token and `[session] user_key`).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Run the bundled demo app behind the proxy with a self-signed
    /// certificate (on its own built-in configuration).
    Demo {
        /// Address of the demo's HTTPS listener (a host name resolves; port 0
        /// picks a free port).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// Print a table of the user's live sessions (id, created, last write, expires).
    List {
        /// The user: the value of `[session] user_key` in their sessions.
        #[arg(long, value_name = "V")]
        user: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// End the user's sessions (`--user`) or one session (`--id`, its
    /// X-Session-Id) and print how many ended.
    Revoke {
        #[arg(
            long,
            value_name = "V",
            required_unless_present = "id",
            conflicts_with = "id"
        )]
        user: Option<String>,
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

impl Default for Command {
    fn default() -> Command {
        Command::Run(ConfigArg::default())
    }
}

impl Command {
    /// The `--config` given to this command, if it takes one.
    fn config(&self) -> Option<&ConfigArg> {
        match self {
            Command::Run(c)
            | Command::Check(c)
            | Command::ClearExpired(c)
            | Command::Reload(c)
            | Command::Migrate(c) => Some(c),
            Command::Sessions(SessionsCommand::List { config, .. })
            | Command::Sessions(SessionsCommand::Revoke { config, .. }) => Some(config),
            Command::Demo { .. } => None,
        }
    }
}

/// `host:port` to an address, resolving a host name as the config does.
fn resolve_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("--listen {s}: the host name resolves to no address")),
        Err(e) => Err(format!(
            "--listen {s}: not an address such as 127.0.0.1:8443, or a host name that does not resolve ({e})"
        )),
    }
}

/// An environment setting: `None` when unset or blank (a `NAME=` left in a
/// unit file or compose template), an error naming the variable when its
/// value does not parse (never silently the default).
fn env_setting<T>(
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => parse(&v).map(Some).map_err(|e| format!("{name}={e}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name}: not valid UTF-8")),
    }
}

/// The workers of `run`: one per CPU the process may use
/// (`SESSIONGATE_WORKERS` overrides), pinned when
/// `SESSIONGATE_CPU_AFFINITY=auto`. `check` reports them too.
fn worker_settings() -> Result<(usize, Affinity), String> {
    let workers = env_setting("SESSIONGATE_WORKERS", |v| match v.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{v:?}: expected a whole number of at least 1")),
    })?
    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let affinity = env_setting("SESSIONGATE_CPU_AFFINITY", str::parse)?.unwrap_or_default();
    // Read again by each worker (`server::conn`); checked here so that a
    // typo stops the start instead of meaning the default.
    env_setting("SESSIONGATE_H1", |v| match v.trim() {
        "own" | "hyper" => Ok(()),
        _ => Err(format!("{v:?}: expected own or hyper")),
    })?;
    Ok((workers, affinity))
}

fn main() -> ExitCode {
    // Before any other thread starts: their arenas take these settings.
    let allocator = allocator::tune();
    let cli = Cli::parse();
    init_logging();
    match allocator {
        Ok(allocator) => tracing::debug!(allocator, "allocator"),
        Err(error) => tracing::warn!(
            error = &error as &dyn std::error::Error,
            "allocator: keeping jemalloc's defaults"
        ),
    }
    let command = cli.command.unwrap_or_default();
    let given = command
        .config()
        .and_then(|c| c.config.clone())
        .or_else(|| cli.config.clone());
    if let (Command::Demo { .. }, Some(_)) = (&command, &cli.config) {
        eprintln!("sessiongate: demo takes no --config: it runs on its own built-in configuration");
        return ExitCode::from(2);
    }
    let config_path = given
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    if command.config().is_some() && given.is_none() && !config_path.exists() {
        eprintln!(
            "sessiongate: no configuration file at {DEFAULT_CONFIG} (the default path); pass --config FILE, or try `sessiongate demo` to see it work"
        );
        return ExitCode::from(2);
    }

    if let Command::Check(_) = command {
        let loaded = Config::load(&config_path).and_then(|c| {
            sessiongate::reload::check_files(&c)?;
            Ok(c)
        });
        return match loaded {
            Ok(c) => match worker_settings() {
                Ok((workers, affinity)) => {
                    for w in c.warnings() {
                        eprintln!("{}: warning: {w}", config_path.display());
                    }
                    if let Some(w) = sessiongate::ops::admin_exposure_warning(&c) {
                        eprintln!("{}: warning: {w}", c.source.display());
                    }
                    println!("{}", summary(&c));
                    println!("workers {workers}, CPU affinity {affinity} (environment)");
                    ExitCode::SUCCESS
                }
                Err(msg) => {
                    eprintln!("sessiongate: {msg}");
                    ExitCode::from(2)
                }
            },
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }

    if let Command::Run(_) = command {
        let config = match load_or_exit(&config_path) {
            Ok(c) => c,
            Err(code) => return code,
        };
        for w in config.warnings() {
            tracing::warn!(config = %config_path.display(), "{w}");
        }
        let (workers, affinity) = match worker_settings() {
            Ok(w) => w,
            Err(msg) => {
                eprintln!("sessiongate: {msg}");
                return ExitCode::from(2);
            }
        };
        raise_open_files_limit();
        return match serve(config, workers, affinity) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sessiongate: {}", describe(&e));
                ExitCode::FAILURE
            }
        };
    }

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessiongate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match command {
            Command::Run(_) => unreachable!("served above"),
            Command::ClearExpired(_) => clear_expired(&config_path).await,
            Command::Reload(_) => reload(&config_path).await,
            Command::Migrate(_) => migrate(&config_path).await,
            Command::Sessions(c) => sessions(&config_path, c).await,
            Command::Demo { listen } => match resolve_listen(&listen) {
                Ok(addr) => Ok(sessiongate::demo::run(addr).await?),
                Err(msg) => {
                    eprintln!("sessiongate: {msg}");
                    Ok(ExitCode::from(2))
                }
            },
            Command::Check(_) => unreachable!(),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sessiongate: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// `run`: a small control runtime keeps the store's background work, the
/// signals and the expiry sweep; the workers are the server's threads.
fn serve(config: Config, workers: usize, affinity: Affinity) -> anyhow::Result<()> {
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sessiongate-control")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    control.block_on(async move {
        // Before binding, so a signal during start-up still shuts down cleanly.
        let signals = shutdown_signal().context("cannot install the signal handlers")?;
        let options = ServerOptions {
            workers,
            affinity,
            ..ServerOptions::default()
        };
        let server = Server::bind(config, options).await?;
        server.run(signals).await?;
        Ok(())
    })
}

/// Raises the soft limit on open files to the hard one: every client and
/// upstream connection is a descriptor, and the usual soft limit (1,024)
/// is a few hundred clients.
fn raise_open_files_limit() {
    let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => tracing::info!(open_files = now, before, "open files limit"),
        Err(e) => tracing::warn!(error = %e, before, "cannot raise the open files limit"),
    }
}

/// The error and its causes on one line, each cause only once: most of
/// this crate's errors already name their source in their own message.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn load_or_exit(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

async fn clear_expired(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if config.store.engine == Engine::Memory {
        println!(
            "0 expired sessions deleted: the memory engine keeps sessions inside the running proxy, which sweeps them every clear_expired_interval"
        );
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(config.store.engine, Engine::Redis | Engine::CachedRedis) {
        println!("0 expired sessions deleted: Redis expires each session by itself (every write sets the key's TTL), so there is nothing to sweep");
        return Ok(ExitCode::SUCCESS);
    }
    if config.store.engine == Engine::SignedCookies {
        println!("0 expired sessions deleted: with signed_cookies every session lives in its browser's cookie and its expiry is checked on each request");
        return Ok(ExitCode::SUCCESS);
    }
    let store = AnyStore::open(&config).await.context("open the store")?;
    let now = sessiongate::session::Clock::default().now_ms();
    let n = store
        .clear_expired(now)
        .await
        .context("clear expired sessions")?;
    store.flush().await.context("flush the store")?;
    println!("{n} expired sessions deleted");
    Ok(ExitCode::SUCCESS)
}

/// `sessiongate reload`: `POST /reload` on the admin listener the file
/// names (with its token), printing the server's answer.
async fn reload(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(admin) = &config.admin else {
        eprintln!(
            "{}: reload needs an [admin] listen to reach the running server (or send it SIGHUP)",
            path.display()
        );
        return Ok(ExitCode::from(2));
    };
    let mut auth = String::new();
    if let Some(t) = &admin.token {
        auth = format!("Authorization: Bearer {}\r\n", String::from_utf8_lossy(t));
    }
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(admin.listen),
    )
    .await
    .context("the admin listener did not answer")?
    .with_context(|| format!("cannot reach the admin listener at {}", admin.listen))?;
    s.write_all(
        format!(
            "POST /reload HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
            admin.listen
        )
        .as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.read_to_end(&mut answer),
    )
    .await
    .context("the reload did not finish in time")??;
    let answer = String::from_utf8_lossy(&answer);
    let ok = answer.starts_with("HTTP/1.1 200");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if ok {
        println!("{body}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("sessiongate: {body}");
        Ok(ExitCode::FAILURE)
    }
}

/// `sessiongate sessions list|revoke`: the admin API of the proxy that the
/// file describes. Every failure is one line on stderr and exit 1.
async fn sessions(path: &std::path::Path, command: SessionsCommand) -> anyhow::Result<ExitCode> {
    use sessiongate::admin::client::{table, SessionsClient, Target};
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let client = match SessionsClient::new(&config, &path.display().to_string()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sessiongate: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let outcome = match command {
        SessionsCommand::List { user, .. } => client.list(&user).await.map(|list| {
            if list.is_empty() {
                println!("no live sessions for user {user:?}");
            } else {
                print!("{}", table(&list));
                println!(
                    "{} session{} of user {user:?}",
                    list.len(),
                    if list.len() == 1 { "" } else { "s" }
                );
            }
        }),
        SessionsCommand::Revoke { user, id, .. } => {
            let target = match (user, id) {
                (Some(u), _) => Target::User(u),
                (None, Some(i)) => Target::Id(i),
                (None, None) => unreachable!("clap requires --user or --id"),
            };
            client.revoke(&target).await.map(|n| {
                println!("{n} session{} revoked", if n == 1 { "" } else { "s" });
            })
        }
    };
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("sessiongate: {}", describe(&anyhow::Error::new(e)));
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn migrate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(url) = config.store.db.as_ref() else {
        eprintln!(
            "{}: migrate applies to engine \"db\"; [store] engine is {:?}, which needs no table",
            path.display(),
            config.store.engine.name()
        );
        return Ok(ExitCode::from(2));
    };
    let table = &config.store.table;
    let done = sessiongate::store::DbStore::migrate(url, table, config.store.timeout)
        .await
        .context("migrate")?;
    match done {
        sessiongate::store::db::Migrated::Created => {
            println!("created table {table:?} and its expire_date index in {url:?}")
        }
        sessiongate::store::db::Migrated::AlreadyThere => {
            println!("table {table:?} already exists in {url:?}: nothing to do")
        }
    }
    if config.session.user_key.is_some() {
        sessiongate::store::DbStore::migrate_user_index(url, table, config.store.timeout)
            .await
            .context("migrate the user index")?;
        println!(
            "user index table {:?} is in place ([session] user_key)",
            sessiongate::store::db::index::table_name(table)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(c: &Config) -> String {
    let s = &c.server;
    let mut out = format!(
        "{}: OK\nlisten {} ({}){}\nstore {}; cookie {:?}, age {}s\n{} route(s):",
        c.source.display(),
        s.listen,
        if s.tls.is_some() { "https" } else { "http" },
        s.redirect_http
            .map(|a| format!(", redirect from http://{a}"))
            .unwrap_or_default(),
        c.store.engine.name(),
        c.session.cookie_name,
        c.session.cookie_age.as_secs(),
        c.routes.len()
    );
    for r in &c.routes {
        let ups: Vec<&str> = r.upstreams.iter().map(|u| u.base.as_str()).collect();
        out.push_str(&format!(
            "\n  {:?}: {}{} -> {}{}",
            r.name,
            r.host.as_deref().unwrap_or("*"),
            r.path,
            ups.join(", "),
            if r.session { "" } else { " (no session)" }
        ));
    }
    if let Some(a) = &c.admin {
        out.push_str(&format!(
            "\nadmin http://{} (/healthz /readyz /metrics /sessions)",
            a.listen
        ));
    }
    out.push_str(&format!(
        "\naccess log {}",
        match (&s.access_log, s.access_log_format) {
            (sessiongate::config::AccessLogTarget::Off, _) => "off".to_string(),
            (t, f) => format!(
                "{} ({})",
                match t {
                    sessiongate::config::AccessLogTarget::File(p) => p.display().to_string(),
                    _ => "stderr".into(),
                },
                match f {
                    sessiongate::config::AccessLogFormat::Combined => "combined",
                    sessiongate::config::AccessLogFormat::Json => "json",
                }
            ),
        }
    ));
    out
}
