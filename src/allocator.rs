//! The binary's allocator: jemalloc (cargo feature `jemalloc`, on by default),
//! set at start-up to give freed memory back to the system within about a second.
//!
//! glibc's allocator keeps the memory of a burst of connections resident after
//! they close (about 300 MB after 10,000, BENCHMARKS.md "Idle connections"):
//! the freed chunks lie inside its heaps, and only `malloc_trim` returns them.
//! jemalloc's background threads purge unused pages after `dirty_decay_ms`.
//!
//! The settings go through jemalloc's `mallctl` interface, so no `malloc_conf`
//! symbol (an unsafe `#[no_mangle]` static) is needed. A `MALLOC_CONF` in the
//! environment, which jemalloc reads when it starts, wins: then nothing is set here.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long freed ("dirty") pages stay before background threads give them back.
#[cfg(feature = "jemalloc")]
const DIRTY_DECAY_MS: isize = 1000;

/// A `mallctl` call that failed.
#[derive(Debug, thiserror::Error)]
#[error("jemalloc setting {key} could not be applied")]
pub struct TuneError {
    key: &'static str,
    #[cfg(feature = "jemalloc")]
    #[source]
    source: tikv_jemalloc_ctl::Error,
}

/// Names the allocator in use, for the start-up log, after turning on
/// jemalloc's background purging: background threads, freed pages
/// returned after [`DIRTY_DECAY_MS`], none kept as "muzzy" (lazily freed).
/// Call first thing in `main`, before other threads start, so that the arenas
/// they get are created with these settings; the arenas already there (the
/// main thread's) are set one by one.
#[cfg(feature = "jemalloc")]
pub fn tune() -> Result<&'static str, TuneError> {
    use tikv_jemalloc_ctl::{Access, AsName};

    if std::env::var_os("MALLOC_CONF").is_some() {
        return Ok("jemalloc, configured by MALLOC_CONF");
    }
    let set = |key: &'static str, value: isize| {
        // `key` comes from this file: a literal ending in NUL, as `name()` asserts.
        key.as_bytes()
            .name()
            .write(value)
            .map_err(|source| TuneError { key, source })
    };
    // Defaults for the arenas created from now on.
    set("arenas.dirty_decay_ms\0", DIRTY_DECAY_MS)?;
    set("arenas.muzzy_decay_ms\0", 0)?;
    // The arenas already initialised; the others come later with the defaults above.
    let narenas = tikv_jemalloc_ctl::arenas::narenas::read().map_err(|source| TuneError {
        key: "arenas.narenas",
        source,
    })?;
    for i in 0..narenas {
        let dirty = format!("arena.{i}.dirty_decay_ms\0");
        let muzzy = format!("arena.{i}.muzzy_decay_ms\0");
        // An arena not yet initialised answers EFAULT: it will take the defaults.
        if dirty.as_bytes().name().write(DIRTY_DECAY_MS).is_ok() {
            let _ = muzzy.as_bytes().name().write(0isize);
        }
    }
    tikv_jemalloc_ctl::background_thread::write(true).map_err(|source| TuneError {
        key: "background_thread",
        source,
    })?;
    Ok("jemalloc, background purging")
}

/// Built without jemalloc: nothing to set.
#[cfg(not(feature = "jemalloc"))]
pub fn tune() -> Result<&'static str, TuneError> {
    Ok("system")
}
