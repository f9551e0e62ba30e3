//! The command line as a user meets it, without any SA: help on every
//! subcommand, usage errors, and checking rules files. The real-kernel part
//! is vmtest/guest/tool-suite.sh.

use std::path::PathBuf;
use std::process::{Command, Output};

const SUBCOMMANDS: [&str; 6] = ["monitor", "get", "set", "apply", "defaults", "sync"];

fn xfrmsync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xfrmsync")).args(args).output().expect("run xfrmsync")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules.example.toml")
}

#[test]
fn help_on_every_subcommand() {
    let top = xfrmsync(&["--help"]);
    assert!(top.status.success());
    for sub in SUBCOMMANDS {
        assert!(text(&top.stdout).contains(sub), "top-level help lists {sub}");
        for ask in [vec![sub, "--help"], vec!["help", sub], vec![sub, "-h"]] {
            let out = xfrmsync(&ask);
            let help = text(&out.stdout);
            assert!(out.status.success(), "{ask:?}: {}", text(&out.stderr));
            assert!(help.contains(&format!("Usage: xfrmsync {sub}")), "{ask:?}: {help}");
            assert!(help.contains("--netns <NAME|PATH>"), "{ask:?} shows --netns: {help}");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["get", "10.9.0.2"][..],
        &["get", "not-an-address", "0x1001"],
        &["get", "--mark", "7"],
        &["set", "10.9.0.2", "0x1001"],
        &["set", "10.9.0.2", "0x1001", "--replay-threshold", "-1"],
        &["set", "10.9.0.2", "0x1001", "--timer-ms", "4294967296"],
        &["monitor", "--rule", "x"],
        &["monitor", "--sa", "10.9.0.2", "zz"],
        &["apply"],
        &["apply", "--receive-buffer", "4X", "rules.toml"],
        &["monitor", "--receive-buffer", "3G"],
        &["frobnicate"],
        &["--kernel-hz", "0", "defaults"],
    ] {
        let out = xfrmsync(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn a_good_rules_file_checks_and_lists_its_rules_in_order() {
    let out = xfrmsync(&["apply", "--check", example().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let order: Vec<&str> = listing.lines().skip(1).filter_map(|l| l.trim().split(':').next()).collect();
    assert_eq!(order, ["marked-4001", "child-2", "busy-peers", "v6-outbound"], "{listing}");
}

#[test]
fn a_bad_rules_file_is_refused_with_its_line() {
    let dir = std::env::temp_dir().join(format!("xfrmsync-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[[rule]]\nname = \"a\"\ndst = \"10.9.0.0/24\"\nreplay_packets = 32\ntimer_ms = -1\n")
        .unwrap();
    let out = xfrmsync(&["apply", "--check", file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml:5: timer_ms: -1 is negative"), "{err}");
}
