#![no_main]
//! The xfrmsync tool's rules-file parser (tools/xfrmsync/src/rules_file.rs,
//! TOML) on arbitrary text (see ../rules_checks.rs).
#![allow(dead_code)]

#[path = "../../tools/xfrmsync/src/parse.rs"]
mod parse;
#[path = "../rules_checks.rs"]
mod rules_checks;
#[path = "../../tools/xfrmsync/src/rules_file.rs"]
mod rules_file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| rules_checks::rules_file(data));
