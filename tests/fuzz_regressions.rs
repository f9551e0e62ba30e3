//! Every input a fuzz target ever crashed on (tests/fuzz-regressions/,
//! named TARGET-what.bin), replayed through the target's own checks
//! (fuzz/checks.rs), so each crash stays fixed. scripts/fuzz also seeds the
//! fuzzers with them.

#[path = "../fuzz/checks.rs"]
mod checks;

#[test]
fn every_crash_found_by_fuzzing_stays_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        match name.split('-').next() {
            Some("netlink_decode") => checks::netlink_decode(&data),
            Some("newsa_request") => checks::newsa_request(&data),
            Some("sync_record") => checks::sync_record(&data),
            // The tool's parser: replayed by tools/xfrmsync/tests/fuzz_regressions.rs.
            Some("rules_file") => continue,
            _ => panic!("{name}: no fuzz target of that name"),
        }
        replayed += 1;
    }
    assert!(replayed > 0);
}

/// The first crash, by hand: thresholds appended to a message shorter than
/// an `xfrm_usersa_info` landed inside it, and a second append was taken.
#[test]
fn thresholds_are_not_appended_to_a_message_that_is_not_a_whole_newsa() {
    let mut short = vec![0u8; 64];
    short[..4].copy_from_slice(&26u32.to_ne_bytes());
    short[4..6].copy_from_slice(&xfrmsync::wire::XFRM_MSG_NEWSA.to_ne_bytes());
    assert!(xfrmsync::wire::append_thresholds(&mut short, 7, 250).is_err());
    short[4..6].copy_from_slice(&xfrmsync::wire::XFRM_MSG_NEWAE.to_ne_bytes());
    assert!(xfrmsync::wire::append_thresholds(&mut short, 7, 250).is_err());
}
