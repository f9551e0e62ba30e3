//! What the rules_file fuzz target asserts about one input, shared with
//! tools/xfrmsync/tests/fuzz_regressions.rs. Both include the tool's
//! `parse` and `rules_file` modules beside this one, as `crate::rules_file`.

/// The tool's rules-file parser on arbitrary text: it must never panic;
/// what it accepts must hold up (unique names, rules the library's RuleSet
/// takes), and what it refuses must say why, at a line of the file.
pub fn rules_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count().max(1) + 1;
    for hz in [None, Some(100), Some(250), Some(1000)] {
        match crate::rules_file::parse(text, hz) {
            Ok(rules) => {
                let mut names = std::collections::HashSet::new();
                let mut set = xfrmsync::registry::RuleSet::default();
                for rule in &rules {
                    assert!(names.insert(rule.name.clone()), "duplicate rule name {:?} accepted", rule.name);
                    set.add(rule.clone());
                }
                assert_eq!(set.rules().len(), rules.len());
            }
            Err(e) => {
                assert!(!e.problems.is_empty(), "an error without a problem");
                for p in &e.problems {
                    assert!(!p.reason.is_empty());
                    if let Some(line) = p.line {
                        assert!(line >= 1 && line <= lines, "line {line} of a {lines}-line file: {}", p.reason);
                    }
                }
                let _ = e.report("rules.toml");
            }
        }
    }
}
