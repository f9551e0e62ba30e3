//! Generates the C header from src/ffi/ into OUT_DIR. The checked-in copy
//! in include/ is compared with it by tests/header.rs, so a stale header fails
//! the test suite instead of reaching users.

use std::env;
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");

    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let version = |name: &str| env::var(name).expect("cargo sets the version parts");
    config.after_includes = Some(format!(
        "\n#define XFRMSYNC_VERSION_MAJOR {major}\n#define XFRMSYNC_VERSION_MINOR {minor}\n\
         #define XFRMSYNC_VERSION_PATCH {patch}\n#define XFRMSYNC_VERSION_STRING \"{major}.{minor}.{patch}\"\n\
         /* One number that orders versions: 0xMMmmpp. */\n\
         #define XFRMSYNC_VERSION_NUMBER ((XFRMSYNC_VERSION_MAJOR << 16) | (XFRMSYNC_VERSION_MINOR << 8) | XFRMSYNC_VERSION_PATCH)\n",
        major = version("CARGO_PKG_VERSION_MAJOR"),
        minor = version("CARGO_PKG_VERSION_MINOR"),
        patch = version("CARGO_PKG_VERSION_PATCH"),
    ));
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write_to_file(out_dir.join("xfrmsync.h"));
}
