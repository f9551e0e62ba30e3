//! The sync link's shared key, and the file it lives in.
//!
//! The file is one line: the key's 32 bytes as 64 hex digits (written in
//! lower case), then a newline. It must be accessible by its owner alone
//! (mode 0600 or 0400): anyone who can read it can rewrite the standby's
//! kernel IPsec state through the link.
//!
//! The key never leaves this type in readable form except to the cipher:
//! no `Display`, a `Debug` that prints `Key(<redacted>)`, errors that name
//! the file and the fault but never quote what was read, and its bytes (and
//! the hex text they were read from or written as) zeroed when dropped.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::OsRng;
use zeroize::{Zeroize, Zeroizing};

use crate::parse;

pub const KEY_LEN: usize = 32;
/// The hex digits, then the newline.
const FILE_LEN: usize = 2 * KEY_LEN + 1;

/// A 32-byte key for XChaCha20-Poly1305.
///
/// Boxed so that moving a `Key` moves a pointer: the bytes stay in one
/// place, the place zeroed on drop.
#[derive(Clone)]
pub struct Key(Box<[u8; KEY_LEN]>);

impl Key {
    /// A new key from the operating system's random number generator.
    pub fn generate() -> Result<Key, String> {
        let mut key = Key(Box::new([0; KEY_LEN]));
        OsRng
            .try_fill_bytes(&mut key.0[..])
            .map_err(|e| format!("cannot draw a key from the system's random number generator: {e}"))?;
        Ok(key)
    }

    /// Reads the key file at `path`, refusing one that group or others may
    /// access, or that is not exactly 64 hex digits and a newline (the
    /// newline may be missing).
    pub fn load(path: &Path) -> Result<Key, String> {
        let file_name = path.display();
        let file = File::open(path).map_err(|e| format!("{file_name}: cannot open: {}", parse::io_reason(&e)))?;
        // The opened file's own metadata, not the path's: a file swapped in
        // after the check cannot be the one read.
        let meta = file.metadata().map_err(|e| format!("{file_name}: cannot stat: {}", parse::io_reason(&e)))?;
        if !meta.is_file() {
            return Err(format!("{file_name}: not a regular file"));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{file_name}: group or others may access the key (mode {mode:04o}); run chmod 600 on it, \
                 and make a new key if someone else may have read it"
            ));
        }
        // One byte more than a key file holds, to tell a longer file.
        let mut text = Zeroizing::new(Vec::with_capacity(FILE_LEN + 1));
        file.take(FILE_LEN as u64 + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("{file_name}: cannot read: {}", parse::io_reason(&e)))?;
        Key::from_file_text(&text).map_err(|why| format!("{file_name}: not a key file: {why}"))
    }

    /// Writes the key to a new file at `path`, mode 0600. An existing file
    /// is an error unless `force`; then it is replaced whole (a new file
    /// renamed over it), so a reader never sees half a key nor the old
    /// file's permissions.
    pub fn write_new(&self, path: &Path, force: bool) -> Result<(), String> {
        let file_name = path.display();
        if !force {
            return write_exclusive(path, &self.file_text()).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    format!("{file_name}: already exists; remove it, or force the overwrite, to replace the key")
                }
                _ => format!("{file_name}: cannot write: {}", parse::io_reason(&e)),
            });
        }
        let temporary = temporary_path(path);
        // Left by an earlier process of the same id that died writing it.
        let _ = fs::remove_file(&temporary);
        let written = write_exclusive(&temporary, &self.file_text()).and_then(|()| fs::rename(&temporary, path));
        written.map_err(|e| {
            let _ = fs::remove_file(&temporary);
            format!("{file_name}: cannot write: {}", parse::io_reason(&e))
        })
    }

    /// The bytes, for the cipher only.
    pub(super) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn file_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(FILE_LEN));
        for byte in self.0.iter() {
            text.push(hex_digit(byte >> 4));
            text.push(hex_digit(byte & 0xf));
        }
        text.push('\n');
        text
    }

    /// The key in `text`, the file's contents. The reason never quotes the
    /// text: a file one digit short is still most of a key.
    fn from_file_text(text: &[u8]) -> Result<Key, String> {
        let digits = text.strip_suffix(b"\n").unwrap_or(text);
        if digits.len() != 2 * KEY_LEN {
            let found = if text.len() > FILE_LEN { format!("more than {FILE_LEN}") } else { text.len().to_string() };
            return Err(format!("expected {} hex digits and a newline, found {found} bytes", 2 * KEY_LEN));
        }
        let mut key = Key(Box::new([0; KEY_LEN]));
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            match (hex_value(pair[0]), hex_value(pair[1])) {
                (Some(high), Some(low)) => key.0[i] = high << 4 | low,
                _ => {
                    return Err(format!(
                        "expected only hex digits, found another character in bytes {}-{}",
                        2 * i + 1,
                        2 * i + 2
                    ))
                }
            }
        }
        Ok(key)
    }

    #[cfg(test)]
    pub(super) fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(Box::new(bytes))
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Creates `path` (O_EXCL, mode 0600), writes `text` and syncs it; a file
/// left half written is removed.
fn write_exclusive(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

/// A name beside `path`, in the same directory so that the rename is
/// atomic, and of this process so that two writers do not collide.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble)])
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A directory of its own for each test, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("xfrmsync-key-{test}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn written_key_loads_back_and_is_mode_0600() {
        let dir = TempDir::new("roundtrip");
        let path = dir.0.join("sync.key");
        let key = Key::generate().unwrap();
        key.write_new(&path, false).unwrap();
        assert_eq!(mode(&path), 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), FILE_LEN);
        assert!(text.ends_with('\n'));
        assert!(text[..2 * KEY_LEN].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(Key::load(&path).unwrap().bytes(), key.bytes());
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(Key::generate().unwrap().bytes(), Key::generate().unwrap().bytes());
    }

    #[test]
    fn existing_file_kept_unless_forced() {
        let dir = TempDir::new("exclusive");
        let path = dir.0.join("sync.key");
        let first = Key::generate().unwrap();
        first.write_new(&path, false).unwrap();
        let second = Key::generate().unwrap();
        let refused = second.write_new(&path, false).unwrap_err();
        assert!(refused.contains("already exists") && refused.contains("sync.key"), "{refused}");
        assert_eq!(Key::load(&path).unwrap().bytes(), first.bytes());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        second.write_new(&path, true).unwrap();
        assert_eq!(mode(&path), 0o600, "forcing must not keep the old file's mode");
        assert_eq!(Key::load(&path).unwrap().bytes(), second.bytes());
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn group_or_world_access_refused() {
        let dir = TempDir::new("mode");
        let path = dir.0.join("sync.key");
        Key::generate().unwrap().write_new(&path, false).unwrap();
        for open in [0o644, 0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(open)).unwrap();
            let refused = Key::load(&path).unwrap_err();
            assert!(refused.contains(&path.display().to_string()), "{refused}");
            assert!(refused.contains(&format!("mode {open:04o}")), "{refused}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Key::load(&path).is_ok());
    }

    #[test]
    fn wrong_contents_refused_without_quoting_them() {
        let dir = TempDir::new("contents");
        let path = dir.0.join("sync.key");
        let digits = "0123456789abcdef".repeat(4);
        let cases = [
            (digits[..63].to_string() + "\n", "found 64 bytes"),
            (digits.clone() + "0\n", "found more than 65"),
            (digits.clone() + "\n\n", "found more than 65"),
            (digits.clone() + "\nextra", "found more than 65"),
            ("g".to_string() + &digits[1..] + "\n", "another character in bytes 1-2"),
            (digits[..62].to_string() + " f\n", "another character in bytes 63-64"),
            (String::new(), "found 0 bytes"),
        ];
        for (text, why) in cases {
            fs::write(&path, &text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let refused = Key::load(&path).unwrap_err();
            assert!(refused.starts_with(&format!("{}: not a key file: ", path.display())), "{refused}");
            assert!(refused.contains(why), "{text:?}: {refused}");
            assert!(!refused.contains("0123456789"), "the error quotes the file: {refused}");
        }
        fs::write(&path, &digits).unwrap();
        assert_eq!(Key::load(&path).unwrap().bytes()[..2], [0x01, 0x23], "a missing final newline is taken");
        fs::write(&path, digits.to_uppercase() + "\n").unwrap();
        assert_eq!(Key::load(&path).unwrap().bytes()[..2], [0x01, 0x23]);
    }

    #[test]
    fn missing_file_named() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("nowhere.key");
        let refused = Key::load(&path).unwrap_err();
        assert_eq!(refused, format!("{}: cannot open: No such file or directory", path.display()));
    }

    #[test]
    fn key_never_printed() {
        let key = Key::from_bytes([0xab; KEY_LEN]);
        let printed = format!("{key:?} {key:#?}");
        assert_eq!(printed, "Key(<redacted>) Key(<redacted>)");
        assert!(!printed.to_lowercase().contains("abab"));
    }
}
