//! Builds c/libnl_shim.c against Debian's libnl-xfrm-3 (pkg-config).
use std::process::Command;

fn pkg(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .args(["libnl-3.0", "libnl-xfrm-3.0"])
        .output()
        .expect("pkg-config runs (scripts/bench installs libnl-xfrm-3-dev)");
    assert!(out.status.success(), "pkg-config libnl-xfrm-3.0: install libnl-xfrm-3-dev (scripts/bench does)");
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(str::to_owned).collect()
}

fn main() {
    println!("cargo:rerun-if-changed=c/libnl_shim.c");
    let mut build = cc::Build::new();
    build.file("c/libnl_shim.c").opt_level(2).warnings(true);
    for flag in pkg(&["--cflags"]) {
        if let Some(dir) = flag.strip_prefix("-I") {
            build.include(dir);
        }
    }
    build.compile("libnl_shim");
    for flag in pkg(&["--libs"]) {
        if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo:rustc-link-lib={lib}");
        } else if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo:rustc-link-search={dir}");
        }
    }
}
