//! Nothing here: this package exists for its integration tests (`tests/*.rs`), which use the harness in
//! `testkit/` (package `capture-testkit`, imported as `testkit`).
