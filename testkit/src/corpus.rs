//! Replays a fuzz target's corpus (`fuzz/corpus/<target>/`) as an ordinary test, so that
//! every input the fuzzer once found interesting, and every crash it found, is checked by
//! `make test` without cargo-fuzz.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

/// The fewest files a corpus may hold: an empty or missing folder would make its replay
/// pass without testing anything.
const MIN_FILES: usize = 5;

/// Runs `harness` on every file of `dir`; panics naming the file when the harness panics
/// on it, or when `dir` holds fewer than a handful of files.
pub fn replay(dir: &Path, harness: impl Fn(&[u8])) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => panic!("cannot read the corpus {}: {e}", dir.display()),
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    // Sorted, so that a failure names the same file on every run.
    files.sort();
    assert!(
        files.len() >= MIN_FILES,
        "the corpus {} holds {} files; expected at least {MIN_FILES}",
        dir.display(),
        files.len()
    );
    for file in files {
        let data = match std::fs::read(&file) {
            Ok(data) => data,
            Err(e) => panic!("cannot read {}: {e}", file.display()),
        };
        if panic::catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
            panic!(
                "the harness panicked on {} (run the fuzz target on it to debug)",
                file.display()
            );
        }
    }
}
