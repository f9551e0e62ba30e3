//! Watches every SA's aevents and prints each on one line.
//!
//!     watch [--json] [--netns /run/netns/NAME] [--seconds N]
//!
//! Human-readable by default, JSON lines with --json. Stops after N seconds
//! when given, else runs until killed.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use xfrmsync::{Error, Handle};

fn main() {
    let mut json = false;
    let mut netns = None;
    let mut seconds = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--netns" => netns = args.next(),
            "--seconds" => seconds = args.next().and_then(|s| s.parse::<u64>().ok()),
            _ => {
                eprintln!("usage: watch [--json] [--netns PATH] [--seconds N]");
                std::process::exit(2);
            }
        }
    }
    let mut builder = Handle::builder();
    if let Some(path) = &netns {
        builder = builder.netns_path(path);
    }
    let handle = match builder.open() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("watch: {e}");
            std::process::exit(1);
        }
    };
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut poll = libc::pollfd { fd: handle.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        let wait_ms = match deadline {
            Some(d) if Instant::now() >= d => break,
            Some(d) => d.saturating_duration_since(Instant::now()).as_millis().min(1000) as i32,
            None => -1,
        };
        // SAFETY: one valid pollfd, alive for the call.
        if unsafe { libc::poll(&mut poll, 1, wait_ms) } <= 0 {
            continue;
        }
        for event in handle.events() {
            match event {
                Ok(ev) if json => println!("{}", ev.json()),
                Ok(ev) => println!("{ev}"),
                Err(Error::EventsLost) => eprintln!("watch: {}", Error::EventsLost),
                Err(e) => eprintln!("watch: {e}"),
            }
        }
    }
}
