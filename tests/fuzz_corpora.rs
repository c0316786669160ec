//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same property checks the cargo-fuzz targets run (`sessiongate::fuzzing`),
//! so an ordinary `cargo test` on stable catches a regression on any input
//! the fuzzers found interesting. A failing input is named in the panic.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{target}: only {} inputs", files.len());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            eprintln!("{target}: the input {} fails", f.display());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn response_head() {
    replay("response_head", sessiongate::fuzzing::response_head);
}

#[test]
fn chunked() {
    replay("chunked", sessiongate::fuzzing::chunked);
}

#[test]
fn path() {
    replay("path", sessiongate::fuzzing::path);
}

#[test]
fn directives() {
    replay("directives", sessiongate::fuzzing::directives);
}

#[test]
fn cookie() {
    replay("cookie", sessiongate::fuzzing::cookie);
}

#[test]
fn signed_cookie() {
    replay("signed_cookie", sessiongate::fuzzing::signed_cookie);
}

#[test]
fn config() {
    replay("config", sessiongate::fuzzing::config);
}

#[test]
fn request_head() {
    replay("request_head", sessiongate::fuzzing::request_head);
}
