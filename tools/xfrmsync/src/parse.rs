//! Words the command line and the files share: numbers in decimal or
//! `0x` hex (as `ip xfrm state` prints SPIs and marks), protocols, marks,
//! families. Each returns a message fit to follow "what: ". And how the
//! files (rules, sync config) report their problems: by line.

use std::fmt;

use xfrmsync::sa::{IPPROTO_AH, IPPROTO_COMP, IPPROTO_ESP};
use xfrmsync::Mark;

/// A non-negative number in decimal or `0x` hex, at most `max`.
pub fn number(s: &str, max: u64) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    match parsed {
        Ok(n) if n <= max => Ok(n),
        Ok(n) => Err(format!("{n} is larger than {max}")),
        Err(_) if t.starts_with('-') => Err(format!("'{s}' is negative")),
        Err(_) => Err(format!("'{s}' is not a number (decimal, or hex with 0x)")),
    }
}

pub fn u32_any(s: &str) -> Result<u32, String> {
    number(s, u64::from(u32::MAX)).map(|n| n as u32)
}

/// A size in bytes: decimal, with an optional K, M or G suffix (powers of
/// 1024, as `ss` and the kernel's sysctls count socket buffers).
pub fn bytes(s: &str) -> Result<usize, String> {
    const LIMIT: u64 = i32::MAX as u64; // setsockopt takes an int
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let unit: u64 = match t[digits_end..].to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("'{s}' is not a size in bytes (a decimal number, with an optional K, M or G)")),
    };
    let value = number(&t[..digits_end], LIMIT / unit).map_err(|e| format!("{e} (at most {LIMIT} bytes)"))?;
    Ok((value * unit) as usize)
}

pub fn u64_any(s: &str) -> Result<u64, String> {
    number(s, u64::MAX)
}

/// `esp`, `ah`, `comp` or a protocol number.
pub fn proto(s: &str) -> Result<u8, String> {
    match s {
        "esp" => Ok(IPPROTO_ESP),
        "ah" => Ok(IPPROTO_AH),
        "comp" => Ok(IPPROTO_COMP),
        other => number(other, 255)
            .map(|n| n as u8)
            .map_err(|_| format!("'{s}' is not esp, ah, comp or a protocol number up to 255")),
    }
}

/// `VALUE/MASK`, or `VALUE` alone for an exact mark (mask 0xffffffff), as
/// `ip xfrm state ... mark VALUE mask MASK` takes them.
pub fn mark(s: &str) -> Result<Mark, String> {
    let (value, mask) = match s.split_once('/') {
        Some((v, m)) => (v, Some(m)),
        None => (s, None),
    };
    let value = u32_any(value).map_err(|e| format!("mark value: {e}"))?;
    let mask = match mask {
        Some(m) => u32_any(m).map_err(|e| format!("mark mask: {e}"))?,
        None => u32::MAX,
    };
    Ok(Mark { value, mask })
}

/// `inet` or `inet6`, as `ip` names them, to `AF_INET`/`AF_INET6`.
pub fn family(s: &str) -> Result<u16, String> {
    match s {
        "inet" => Ok(libc::AF_INET as u16),
        "inet6" => Ok(libc::AF_INET6 as u16),
        _ => Err(format!("'{s}' is neither 'inet' nor 'inet6'")),
    }
}

pub fn family_name(family: u16) -> &'static str {
    if family == libc::AF_INET6 as u16 {
        "inet6"
    } else {
        "inet"
    }
}

/// The library's own message, without its "invalid argument: " prefix,
/// which reads oddly after a file name and line.
pub fn reason(e: &xfrmsync::Error) -> String {
    match e {
        xfrmsync::Error::InvalidArgument(why) => why.clone(),
        other => other.to_string(),
    }
}

/// An I/O error without std's " (os error N)" suffix.
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

/// One problem in a file, at a line (1-based) when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub reason: String,
}

/// Everything wrong with a file (the rules file, the sync config file);
/// never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileErrors {
    /// What the file is ("rules file"), which names it in `Display`.
    pub kind: &'static str,
    pub problems: Vec<Problem>,
}

impl FileErrors {
    /// The report on a file named `file`: one `FILE:LINE: reason` per
    /// problem, the way compilers name places.
    pub fn report(&self, file: &str) -> String {
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|p| match p.line {
                Some(line) => format!("{file}:{line}: {}", p.reason),
                None => format!("{file}: {}", p.reason),
            })
            .collect();
        lines.join("\n")
    }
}

impl fmt::Display for FileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report(self.kind))
    }
}

/// Turns toml's byte offsets into line numbers.
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        LineIndex { starts }
    }

    /// The 1-based line holding byte `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|start| *start <= offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_decimal_and_hex() {
        assert_eq!(u32_any("0x1001"), Ok(0x1001));
        assert_eq!(u32_any("4097"), Ok(4097));
        assert!(u32_any("0x100000000").unwrap_err().contains("larger than"));
        assert!(u32_any("-1").unwrap_err().contains("negative"));
        assert!(u32_any("ten").unwrap_err().contains("not a number"));
    }

    #[test]
    fn marks_protos_families() {
        assert_eq!(mark("0x7/0xff"), Ok(Mark { value: 7, mask: 0xff }));
        assert_eq!(mark("7"), Ok(Mark { value: 7, mask: u32::MAX }));
        assert!(mark("7/x").is_err());
        assert_eq!(proto("esp"), Ok(50));
        assert_eq!(proto("51"), Ok(51));
        assert!(proto("gre").is_err());
        assert!(proto("300").is_err());
        assert_eq!(family("inet6"), Ok(libc::AF_INET6 as u16));
        assert!(family("ipv4").is_err());
    }

    #[test]
    fn sizes_in_bytes() {
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("64K"), Ok(64 << 10));
        assert_eq!(bytes("8MiB"), Ok(8 << 20));
        assert_eq!(bytes("1g"), Ok(1 << 30));
        assert!(bytes("2G").unwrap_err().contains("at most 2147483647"));
        assert!(bytes("-1").is_err());
        assert!(bytes("0x1000").is_err());
        assert!(bytes("8Q").is_err());
    }
}
