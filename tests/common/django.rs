//! The Django installed in `tests/django/.venv` (from
//! `tests/django/requirements.txt`; `.ci/run` makes it).
//!
//! When it is missing, the test fails under `CI` (set and not
//! `false`/`0`), and otherwise is skipped with a loud message on stderr:
//! [`python`] returns `None` and the test returns early.
//!
//! Self-contained so that test files can include it with `#[path]`.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

/// `tests/django`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/django")
}

/// The virtualenv's Python, when Django imports in it.
pub fn python() -> Option<PathBuf> {
    let py = dir().join(".venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import django"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if ok {
        return Some(py);
    }
    let why = format!(
        "no Django in {} (python3 -m venv tests/django/.venv && tests/django/.venv/bin/pip install -r tests/django/requirements.txt)",
        py.display()
    );
    if in_ci() {
        panic!("Django is not installed (CI must not skip): {why}");
    }
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why} ***\n");
    None
}

/// Runs `tests/django/project/SCRIPT ARGS` (`manage.py`, `session_tool.py`)
/// on database `db` under `secret`; returns its output (panics on failure).
pub fn run_project(
    py: &std::path::Path,
    script: &str,
    db: impl AsRef<std::ffi::OsStr>,
    secret: &str,
    args: &[&str],
) -> std::process::Output {
    let out = Command::new(py)
        .arg(dir().join("project").join(script))
        .args(args)
        .env("SG_DATABASE", db)
        .env("SG_SECRET_KEY", secret)
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `tests/django/SCRIPT ARGS` with `stdin`, returns stdout (panics on failure).
pub fn run_script(py: &PathBuf, script: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(py)
        .arg(dir().join(script))
        .args(args)
        .current_dir(dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
