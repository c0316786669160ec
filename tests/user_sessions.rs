//! A user's sessions (SPEC 9, issue 18) on the engines inside the process:
//! memory, file and cached_file. The cases are in `common/user_suite.rs`,
//! which takes the engine's `[store]` lines.

mod common;
#[path = "common/user_suite.rs"]
mod user_suite;

use common::e2e::TempDir;

/// The `[store]` lines of `engine`, with a fresh directory for the file
/// engines (kept alive by the returned guard).
fn store(engine: &str) -> (String, Option<TempDir>) {
    match engine {
        "memory" => ("engine = \"memory\"".into(), None),
        _ => {
            let dir = TempDir::new(&format!("users-{engine}"));
            let path = dir.path().display().to_string().replace('\\', "\\\\");
            (
                format!("engine = \"{engine}\"\npath = \"{path}\""),
                Some(dir),
            )
        }
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (s, _dir) = super::store("memory");
                    super::user_suite::$case(&s).await;
                }
            )*
        }
        mod file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (s, _dir) = super::store("file");
                    super::user_suite::$case(&s).await;
                }
            )*
        }
        mod cached_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (s, _dir) = super::store("cached_file");
                    super::user_suite::$case(&s).await;
                }
            )*
        }
    };
}

cases!(
    logout_others,
    logout_user,
    an_empty_user_is_no_user,
    order_of_directives,
    index_follows_the_session,
    expiry_and_the_sweep,
    in_flight_write_of_a_revoked_session,
    malformed_directives,
    without_user_key,
);
