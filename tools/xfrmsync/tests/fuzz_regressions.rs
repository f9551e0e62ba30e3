//! Every input the rules_file fuzz target crashed on
//! (tests/fuzz-regressions/rules_file-*.bin at the top of the repository),
//! replayed through the target's checks (fuzz/rules_checks.rs) against this
//! tool's parser, so each crash stays fixed. None so far: the test then
//! checks the example rules file.
#![allow(dead_code)]

#[path = "../src/parse.rs"]
mod parse;
#[path = "../../../fuzz/rules_checks.rs"]
mod rules_checks;
#[path = "../src/rules_file.rs"]
mod rules_file;

#[test]
fn every_rules_file_crash_found_by_fuzzing_stays_fixed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut inputs = vec![std::fs::read(root.join("tools/xfrmsync/rules.example.toml")).unwrap()];
    for entry in std::fs::read_dir(root.join("tests/fuzz-regressions")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("rules_file-") {
            inputs.push(std::fs::read(&path).unwrap());
        }
    }
    for input in &inputs {
        rules_checks::rules_file(input);
    }
}
