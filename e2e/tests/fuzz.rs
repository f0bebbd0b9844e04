//! CI's bounded fuzzing run (fuzz/README.md): every cargo-fuzz target is built and run for
//! a bounded time (`MORTAR_FUZZ_SECS` each, default 30) from the checked-in corpus, and any
//! crash, hang or OOM fails the test. `fuzz/ci.sh` does the work and prints what it ran.

use std::path::Path;
use std::process::Command;

#[test]
fn fuzz_targets_survive_a_bounded_run() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/ci.sh");
    let status = Command::new(&script)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "fuzz/ci.sh: {status} (see its output above)"
    );
}
