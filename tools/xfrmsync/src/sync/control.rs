//! The daemon's control socket: how `xfrmsync sync role|commit|resync|status`
//! reach a running daemon. A Unix stream socket, mode 0600 (a command can
//! make the node take over SAs): the client writes one line, the daemon
//! answers with text and a last line `status: N`, N the exit status the
//! client ends with, then closes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// A command as the client sends it, one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Role(super::config::Role),
    Commit,
    Resync,
    Status { json: bool },
}

impl Request {
    pub fn line(&self) -> &'static str {
        match self {
            Request::Role(super::config::Role::Active) => "role active",
            Request::Role(super::config::Role::Standby) => "role standby",
            Request::Commit => "commit",
            Request::Resync => "resync",
            Request::Status { json: false } => "status",
            Request::Status { json: true } => "status json",
        }
    }

    pub fn parse(line: &str) -> Option<Request> {
        use super::config::Role;
        Some(match line.trim() {
            "role active" => Request::Role(Role::Active),
            "role standby" => Request::Role(Role::Standby),
            "commit" => Request::Commit,
            "resync" => Request::Resync,
            "status" => Request::Status { json: false },
            "status json" => Request::Status { json: true },
            _ => return None,
        })
    }
}

/// The daemon's answer: text, and the client's exit status.
pub struct Reply {
    pub text: String,
    pub status: u8,
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply { text: text.into(), status: 0 }
    }

    pub fn failed(text: impl Into<String>) -> Reply {
        Reply { text: text.into(), status: 1 }
    }
}

/// Binds the control socket at `path`, replacing a stale one (a daemon
/// that died leaves its socket file behind), but never one a running
/// daemon answers on.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another xfrmsync sync daemon answers there", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Reads one request from a client that connected; a client that says
/// nothing within a second is dropped, so it cannot stall the daemon.
pub fn read_request(stream: &UnixStream) -> io::Result<Option<Request>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(stream.take(256)).read_line(&mut line)?;
    Ok(Request::parse(&line))
}

pub fn write_reply(mut stream: &UnixStream, reply: &Reply) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut text = reply.text.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("status: {}\n", reply.status));
    stream.write_all(text.as_bytes())
}

/// The client's side: sends `request` to the daemon at `path`, returns its
/// text and exit status.
pub fn ask(path: &Path, request: &Request, timeout: Duration) -> io::Result<Reply> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("{}\n", request.line()).as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (text, status) = match answer.trim_end().rsplit_once('\n') {
        Some((text, last)) => (text.to_string(), last),
        None => (String::new(), answer.trim_end()),
    };
    let status = status
        .strip_prefix("status: ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the daemon's answer has no status line"))?;
    Ok(Reply { text, status })
}
