#![no_main]
//! Appending thresholds to a caller's NEWSA (see ../checks.rs).

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::newsa_request(data));
