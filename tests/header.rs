//! The checked-in header must be exactly what cbindgen makes of the current
//! source, and its version macros must be Cargo.toml's version.
//! `XFRMSYNC_UPDATE_HEADER=1 cargo test --test header` rewrites it.

use std::path::Path;

// Links the library, whose C symbols the test calls.
use xfrmsync as _;

const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/xfrmsync.h"));

#[test]
fn checked_in_header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/xfrmsync.h");
    if std::env::var_os("XFRMSYNC_UPDATE_HEADER").is_some() {
        std::fs::write(&path, GENERATED).expect("write include/xfrmsync.h");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(checked_in == GENERATED, "include/xfrmsync.h is stale: run `scripts/update-header` and commit it");
}

#[test]
fn version_macros_match_cargo_toml() {
    // The generated text; the other test holds the checked-in copy equal to it.
    let header = GENERATED;
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("Cargo.toml has a version line");
    let parts: Vec<&str> = version.split('.').collect();
    for (name, value) in ["MAJOR", "MINOR", "PATCH"].iter().zip(&parts) {
        let line = format!("#define XFRMSYNC_VERSION_{name} {value}\n");
        assert!(header.contains(&line), "header lacks {line:?}");
    }
    assert!(header.contains(&format!("#define XFRMSYNC_VERSION_STRING \"{version}\"")));
    let from_library = unsafe { std::ffi::CStr::from_ptr(xfrmsync_version()) };
    assert_eq!(from_library.to_str().unwrap(), version);
}

extern "C" {
    fn xfrmsync_version() -> *const std::ffi::c_char;
}
