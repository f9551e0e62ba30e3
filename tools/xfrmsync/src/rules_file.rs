//! The rules file: TOML, one `[[rule]]` table per rule (format in
//! tools/xfrmsync/README.md), turned into the library's [`Rule`]s.
//!
//! Every error names the line it is on, syntax and meaning alike: values
//! are read as `toml::Spanned`, so a bad address or an out-of-range
//! threshold points at its own line, not at the file. Parsing never touches
//! a registry: a file with any error yields no rules, so the caller keeps
//! the rules in force.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::{Spanned, Value};
use xfrmsync::registry::{Direction, Prefix, RuleSet};
use xfrmsync::{Mark, Rule, SaMatch, Thresholds};

use crate::parse::{self, FileErrors, LineIndex, Problem};

/// The largest timer threshold taken whatever the kernel's HZ: the kernel
/// keeps the timer in jiffies and reports `jiffies * 10` in 32 bits, so at
/// HZ 1000 this is the most it can hold and read back.
pub const MAX_TIMER_MS: u32 = u32::MAX / 10;

/// Names a rules file in `FileErrors`' Display.
const KIND: &str = "rules file";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

/// Every value is taken as it comes and checked here, so that a wrong type
/// or range gets a message that says what is expected, at its line.
/// Unknown keys are refused by serde, with their span.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<Value>>,
    src: Option<Spanned<Value>>,
    dst: Option<Spanned<Value>>,
    reqid: Option<Spanned<Value>>,
    spi: Option<Spanned<Value>>,
    proto: Option<Spanned<Value>>,
    family: Option<Spanned<Value>>,
    mark: Option<Spanned<Value>>,
    if_id: Option<Spanned<Value>>,
    direction: Option<Spanned<Value>>,
    replay_packets: Option<Spanned<Value>>,
    timer_ms: Option<Spanned<Value>>,
}

/// Reads and parses `path`; the error is the full report, file name and
/// lines included.
pub fn load(path: &Path, hz: Option<u32>) -> Result<Vec<Rule>, String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {}", parse::io_reason(&e)))?;
    parse(&text, hz).map_err(|e| e.report(&file))
}

/// Parses a rules file. `hz`, when the kernel's HZ is known, also refuses
/// timer thresholds that HZ cannot hold (see `xfrmsync::timer`).
pub fn parse(text: &str, hz: Option<u32>) -> Result<Vec<Rule>, FileErrors> {
    let lines = LineIndex::new(text);
    let raw: RawFile = toml::from_str(text).map_err(|e| FileErrors {
        kind: KIND,
        problems: vec![Problem { line: e.span().map(|s| lines.line(s.start)), reason: syntax_reason(e.message()) }],
    })?;
    let mut checker = Checker { lines: &lines, problems: Vec::new(), hz };
    let mut rules = Vec::with_capacity(raw.rule.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for raw_rule in &raw.rule {
        let at = lines.line(raw_rule.span().start);
        if let Some(rule) = checker.rule(raw_rule.get_ref(), at) {
            let line = raw_rule.get_ref().name.as_ref().map_or(at, |n| lines.line(n.span().start));
            match names.get(&rule.name) {
                Some(first) => checker.problems.push(Problem {
                    line: Some(line),
                    reason: format!("rule name '{}' is already used on line {first}; names must be unique", rule.name),
                }),
                None => {
                    names.insert(rule.name.clone(), line);
                    rules.push(rule);
                }
            }
        }
    }
    if checker.problems.is_empty() {
        Ok(rules)
    } else {
        Err(FileErrors { kind: KIND, problems: checker.problems })
    }
}

/// toml's message, with a hint where the usual mistake is known.
fn syntax_reason(message: &str) -> String {
    let message = message.trim_end();
    if message.contains("expected a sequence") {
        format!("{message} (rules are an array of tables: write [[rule]], not [rule])")
    } else {
        message.to_string()
    }
}

struct Checker<'a> {
    lines: &'a LineIndex,
    problems: Vec<Problem>,
    hz: Option<u32>,
}

impl Checker<'_> {
    fn at(&self, span: Range<usize>) -> Option<usize> {
        Some(self.lines.line(span.start))
    }

    fn problem(&mut self, span: Range<usize>, reason: String) {
        let line = self.at(span);
        self.problems.push(Problem { line, reason });
    }

    /// Checks one value with `convert`; a problem is recorded at the
    /// value's line and `None` returned.
    fn value<T>(
        &mut self,
        key: &str,
        v: &Option<Spanned<Value>>,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<Option<T>> {
        let Some(v) = v else { return Some(None) };
        match convert(v.get_ref()) {
            Ok(t) => Some(Some(t)),
            Err(why) => {
                self.problem(v.span(), format!("{key}: {why}"));
                None
            }
        }
    }

    /// A rule, or `None` with its problems recorded. `at` is the line of
    /// the rule's table, for what is missing from it.
    fn rule(&mut self, raw: &RawRule, at: usize) -> Option<Rule> {
        let before = self.problems.len();
        let name = self.value("name", &raw.name, |v| match v {
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            Value::String(_) => Err("a rule name cannot be empty".into()),
            other => Err(format!("expected a string, found {}", type_name(other))),
        });
        let src = self.value("src", &raw.src, prefix);
        let dst = self.value("dst", &raw.dst, prefix);
        let reqid = self.value("reqid", &raw.reqid, |v| id_number(v, u64::from(u32::MAX)));
        let spi = self.value("spi", &raw.spi, |v| id_number(v, u64::from(u32::MAX)));
        let if_id = self.value("if_id", &raw.if_id, |v| id_number(v, u64::from(u32::MAX)));
        let proto = self.value("proto", &raw.proto, |v| match v {
            Value::String(s) => parse::proto(s),
            Value::Integer(_) => id_number(v, 255).map(|n| n as u8),
            other => Err(format!("expected \"esp\", \"ah\", \"comp\" or a number, found {}", type_name(other))),
        });
        let family = self.value("family", &raw.family, |v| string(v).and_then(parse::family));
        let mark = self.value("mark", &raw.mark, |v| match v {
            Value::String(s) => parse::mark(s),
            Value::Integer(_) => id_number(v, u64::from(u32::MAX)).map(|value| Mark { value, mask: u32::MAX }),
            other => Err(format!("expected \"VALUE/MASK\" or a number, found {}", type_name(other))),
        });
        let direction = self.value("direction", &raw.direction, |v| {
            string(v).and_then(|s| s.parse::<Direction>().map_err(|e| parse::reason(&e)))
        });
        let replay_packets =
            self.value("replay_packets", &raw.replay_packets, |v| threshold(v, u64::from(u32::MAX), "packets"));
        let hz = self.hz;
        let timer_ms = self.value("timer_ms", &raw.timer_ms, |v| timer_ms(v, hz));

        let missing: Vec<&str> = [
            ("name", raw.name.is_none()),
            ("replay_packets", raw.replay_packets.is_none()),
            ("timer_ms", raw.timer_ms.is_none()),
        ]
        .into_iter()
        .filter_map(|(key, absent)| absent.then_some(key))
        .collect();
        if !missing.is_empty() {
            self.problems.push(Problem { line: Some(at), reason: format!("this rule lacks {}", missing.join(", ")) });
        }
        // Families must agree, or the rule could never match.
        if let (Some(Some(s)), Some(Some(d)), Some(v)) = (src, dst, &raw.src) {
            if s.0.is_ipv4() != d.0.is_ipv4() {
                self.problem(v.span(), format!("src: {} is not of the family of dst {}", s.1, d.1));
            }
        }
        if let Some(Some(f)) = family {
            for (key, p, raw_v) in [("src", src, &raw.src), ("dst", dst, &raw.dst)] {
                if let (Some(Some((addr, prefix))), Some(v)) = (p, raw_v) {
                    if xfrmsync::sa::SaId::esp(addr, 0).family() != f {
                        self.problem(
                            v.span(),
                            format!("{key}: {prefix} is not an {} address, as family says", parse::family_name(f)),
                        );
                    }
                }
            }
        }
        if self.problems.len() != before {
            return None;
        }
        Some(Rule {
            name: name??,
            matches: SaMatch {
                reqid: reqid?,
                src: src?.map(|p| p.1),
                dst: dst?.map(|p| p.1),
                spi: spi?,
                proto: proto?,
                family: family?,
                mark: mark?,
                if_id: if_id?,
                direction: direction?,
            },
            thresholds: Thresholds { replay_packets: replay_packets??, timer_ms: timer_ms?? },
        })
    }
}

fn type_name(v: &Value) -> &'static str {
    v.type_str()
}

fn string(v: &Value) -> Result<&str, String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(format!("expected a string, found {}", type_name(other))),
    }
}

/// A prefix, and its address for the family checks.
fn prefix(v: &Value) -> Result<(IpAddr, Prefix), String> {
    let s = string(v)?;
    let p: Prefix = s.parse().map_err(|e| parse::reason(&e))?;
    let addr = s.split('/').next().unwrap_or(s).parse().map_err(|_| format!("'{s}' is not an address"))?;
    Ok((addr, p))
}

/// An identifier (SPI, reqid, if_id, mark, protocol): an integer, or a
/// string in decimal or `0x` hex, as `ip xfrm state` prints them.
fn id_number(v: &Value, max: u64) -> Result<u32, String> {
    let n = match v {
        Value::Integer(i) if *i < 0 => return Err(format!("{i} is negative")),
        Value::Integer(i) => *i as u64,
        Value::String(s) => parse::number(s, max)?,
        other => return Err(format!("expected a number or a \"0x...\" string, found {}", type_name(other))),
    };
    if n > max {
        return Err(format!("{n} is larger than {max}"));
    }
    Ok(n as u32)
}

fn threshold(v: &Value, max: u64, unit: &str) -> Result<u32, String> {
    match v {
        Value::Integer(i) if *i < 0 => Err(format!("{i} is negative; a threshold is a count of {unit}, 0 or more")),
        Value::Integer(i) if *i as u64 > max => {
            Err(format!("{i} {unit} is beyond what the kernel can hold (at most {max})"))
        }
        Value::Integer(i) => Ok(*i as u32),
        other => Err(format!("expected a whole number of {unit}, found {}", type_name(other))),
    }
}

fn timer_ms(v: &Value, hz: Option<u32>) -> Result<u32, String> {
    let ms = threshold(v, u64::from(MAX_TIMER_MS), "milliseconds")?;
    if let Some(hz) = hz {
        xfrmsync::timer::ms_to_jiffies(ms, hz).map_err(|e| parse::reason(&e))?;
    }
    Ok(ms)
}

/// What a rule matches, in the words of the file.
pub fn describe(m: &SaMatch) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &m.src {
        parts.push(format!("src {p}"));
    }
    if let Some(p) = &m.dst {
        parts.push(format!("dst {p}"));
    }
    if let Some(n) = m.reqid {
        parts.push(format!("reqid {n}"));
    }
    if let Some(n) = m.spi {
        parts.push(format!("spi 0x{n:08x}"));
    }
    if let Some(p) = m.proto {
        match p {
            xfrmsync::sa::IPPROTO_ESP => parts.push("proto esp".into()),
            xfrmsync::sa::IPPROTO_AH => parts.push("proto ah".into()),
            xfrmsync::sa::IPPROTO_COMP => parts.push("proto comp".into()),
            other => parts.push(format!("proto {other}")),
        }
    }
    if let Some(f) = m.family {
        parts.push(format!("family {}", parse::family_name(f)));
    }
    if let Some(mark) = m.mark {
        parts.push(format!("mark 0x{:x}/0x{:x}", mark.value, mark.mask));
    }
    if let Some(n) = m.if_id {
        parts.push(format!("if_id {n}"));
    }
    if let Some(d) = m.direction {
        parts.push(format!("direction {}", d.name()));
    }
    if parts.is_empty() {
        "every SA".into()
    } else {
        parts.join(" ")
    }
}

/// The rules in the order the library tries them (most specific first).
pub fn in_order(rules: &[Rule]) -> Vec<Rule> {
    let mut set = RuleSet::new();
    set.replace_rules(rules.to_vec());
    set.rules().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# Peers on the busy link report often.
[[rule]]
name = "busy-peers"
dst = "10.9.0.0/24"
replay_packets = 32
timer_ms = 2000

[[rule]]
name = "one-sa"
dst = "10.9.0.2"
spi = "0x1001"
proto = "esp"
mark = "0x7/0xff"
replay_packets = 4
timer_ms = 500

[[rule]]
name = "v6-out"
src = "fd00:9::/64"
family = "inet6"
direction = "out"
reqid = 3
if_id = 0x10
replay_packets = 0
timer_ms = 0
"#;

    /// The single problem of `text`: its line and reason.
    fn refused(text: &str) -> (Option<usize>, String) {
        let err = parse(text, None).expect_err("the file must be refused");
        assert_eq!(err.problems.len(), 1, "{err}");
        (err.problems[0].line, err.problems[0].reason.clone())
    }

    fn with(key_line: &str) -> String {
        format!("[[rule]]\nname = \"r\"\nreplay_packets = 1\ntimer_ms = 100\n{key_line}\n")
    }

    #[test]
    fn a_good_file() {
        let rules = parse(GOOD, None).unwrap();
        assert_eq!(rules.len(), 3);
        let busy = &rules[0];
        assert_eq!(busy.name, "busy-peers");
        assert_eq!(busy.matches.dst, Some("10.9.0.0/24".parse().unwrap()));
        assert_eq!(busy.thresholds, Thresholds { replay_packets: 32, timer_ms: 2000 });
        let one = &rules[1].matches;
        assert_eq!(one.spi, Some(0x1001));
        assert_eq!(one.proto, Some(50));
        assert_eq!(one.mark, Some(Mark { value: 7, mask: 0xff }));
        let v6 = &rules[2];
        assert_eq!(v6.matches.family, Some(libc::AF_INET6 as u16));
        assert_eq!(v6.matches.direction, Some(Direction::Out));
        assert_eq!((v6.matches.reqid, v6.matches.if_id), (Some(3), Some(0x10)));
        assert_eq!(v6.thresholds, Thresholds { replay_packets: 0, timer_ms: 0 });
        // The library's order: the SPI rule is the most specific.
        let names: Vec<_> = in_order(&rules).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["one-sa", "v6-out", "busy-peers"]);
    }

    #[test]
    fn an_empty_file_has_no_rules() {
        assert_eq!(parse("# nothing yet\n", None).unwrap(), Vec::new());
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let (line, reason) = refused("[[rule]]\nname = \"r\"\nreplay_packets = 1\ntimer_ms = = 100\n");
        assert_eq!(line, Some(4), "{reason}");
    }

    #[test]
    fn an_unterminated_string_names_its_line() {
        let (line, reason) = refused("[[rule]]\nname = \"r\nreplay_packets = 1\ntimer_ms = 100\n");
        assert_eq!(line, Some(2), "{reason}");
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_key() {
        let (line, reason) = refused(&with("replay_treshold = 5"));
        assert_eq!(line, Some(5));
        assert!(reason.contains("replay_treshold"), "{reason}");
    }

    #[test]
    fn an_unknown_top_level_key_or_table_is_refused() {
        let (line, reason) = refused("version = 2\n");
        assert_eq!(line, Some(1));
        assert!(reason.contains("version"), "{reason}");
        let (line, reason) = refused("\n[rules]\nname = \"r\"\n");
        assert_eq!(line, Some(2), "{reason}");
    }

    #[test]
    fn a_single_table_instead_of_an_array_gets_a_hint() {
        let (line, reason) = refused("[rule]\nname = \"r\"\nreplay_packets = 1\ntimer_ms = 100\n");
        assert_eq!(line, Some(1), "{reason}");
        assert!(reason.contains("[[rule]]"), "{reason}");
    }

    #[test]
    fn an_address_that_does_not_parse() {
        let (line, reason) = refused(&with("dst = \"10.9.0.x/24\""));
        assert_eq!(line, Some(5));
        assert!(reason.starts_with("dst: ") && reason.contains("10.9.0.x"), "{reason}");
        let (line, reason) = refused(&with("src = \"10.9.0.0/33\""));
        assert_eq!(line, Some(5));
        assert!(reason.contains("33"), "{reason}");
        let (line, _) = refused(&with("dst = 10"));
        assert_eq!(line, Some(5));
    }

    #[test]
    fn negative_thresholds() {
        let text = "[[rule]]\nname = \"r\"\nreplay_packets = -1\ntimer_ms = 100\n";
        let (line, reason) = refused(text);
        assert_eq!(line, Some(3));
        assert!(reason.contains("negative"), "{reason}");
        let text = "[[rule]]\nname = \"r\"\nreplay_packets = 1\ntimer_ms = -100\n";
        let (line, reason) = refused(text);
        assert_eq!(line, Some(4));
        assert!(reason.contains("negative"), "{reason}");
    }

    #[test]
    fn thresholds_beyond_what_the_kernel_holds() {
        let text = "[[rule]]\nname = \"r\"\nreplay_packets = 4294967296\ntimer_ms = 100\n";
        let (line, reason) = refused(text);
        assert_eq!(line, Some(3));
        assert!(reason.contains("beyond what the kernel can hold"), "{reason}");
        let text = format!("[[rule]]\nname = \"r\"\nreplay_packets = 1\ntimer_ms = {}\n", MAX_TIMER_MS as u64 + 1);
        let (line, reason) = refused(&text);
        assert_eq!(line, Some(4));
        assert!(reason.contains("beyond what the kernel can hold"), "{reason}");
        // The largest is taken; at a known HZ above 1000 it is too large.
        let text = format!("[[rule]]\nname = \"r\"\nreplay_packets = 1\ntimer_ms = {MAX_TIMER_MS}\n");
        assert!(parse(&text, None).is_ok());
        assert!(parse(&text, Some(1000)).is_ok());
        let err = parse(&text, Some(1200)).unwrap_err();
        assert_eq!(err.problems[0].line, Some(4));
        assert!(err.problems[0].reason.contains("HZ 1200"), "{err}");
    }

    #[test]
    fn wrong_types_say_what_is_expected() {
        let text = "[[rule]]\nname = \"r\"\nreplay_packets = \"32\"\ntimer_ms = 1.5\n";
        let err = parse(text, None).unwrap_err();
        let got: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(got, [Some(3), Some(4)], "{err}");
        assert!(err.problems[0].reason.contains("whole number"), "{err}");
    }

    #[test]
    fn missing_keys_name_the_rule_line() {
        let text =
            "[[rule]]\nname = \"a\"\nreplay_packets = 1\ntimer_ms = 100\n\n[[rule]]\nname = \"b\"\ntimer_ms = 100\n";
        let (line, reason) = refused(text);
        assert_eq!(line, Some(6), "{reason}");
        assert!(reason.contains("replay_packets"), "{reason}");
    }

    #[test]
    fn duplicate_names() {
        let text = "[[rule]]\nname = \"a\"\nreplay_packets = 1\ntimer_ms = 100\n\n[[rule]]\nname = \"a\"\nreplay_packets = 2\ntimer_ms = 100\n";
        let (line, reason) = refused(text);
        assert_eq!(line, Some(7));
        assert!(reason.contains("line 2"), "{reason}");
    }

    #[test]
    fn other_bad_values() {
        for (key_line, word) in [
            ("spi = \"0xzz\"", "spi"),
            ("spi = -5", "negative"),
            ("proto = \"gre\"", "proto"),
            ("proto = 256", "255"),
            ("family = \"ipv4\"", "inet"),
            ("mark = \"0x7/0xfff00000000\"", "mark"),
            ("direction = \"both\"", "direction"),
            ("reqid = 4294967296", "larger"),
            ("name = \"\"", "empty"),
        ] {
            let text = format!(
                "[[rule]]\nreplay_packets = 1\ntimer_ms = 100\n{key_line}\n{}",
                if key_line.starts_with("name") { "" } else { "name = \"r\"\n" }
            );
            let (line, reason) = refused(&text);
            assert_eq!(line, Some(4), "{key_line}: {reason}");
            assert!(reason.contains(word), "{key_line}: {reason}");
        }
    }

    #[test]
    fn families_must_agree() {
        let (line, reason) = refused(&with("dst = \"10.9.0.0/24\"\nfamily = \"inet6\""));
        assert_eq!(line, Some(5), "{reason}");
        let (line, reason) = refused(&with("dst = \"10.9.0.0/24\"\nsrc = \"fd00::/8\""));
        assert_eq!(line, Some(6), "{reason}");
    }

    #[test]
    fn every_problem_is_reported_each_at_its_line() {
        let text = "[[rule]]\nname = \"a\"\ndst = \"nope\"\nreplay_packets = -1\ntimer_ms = 100\n";
        let err = parse(text, None).unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(3), Some(4)]);
        assert_eq!(
            err.report("/etc/xfrmsync/rules.toml").lines().next().unwrap(),
            "/etc/xfrmsync/rules.toml:3: dst: 'nope' is not an IPv4 or IPv6 address"
        );
    }
}
