//! The access log, one line per request in the Combined Log Format (what
//! Apache and HAProxy's `httplog` readers parse), with the time taken and
//! the route appended:
//!
//! `::1 - - [06/Dec/2026:07:10:00 +0000] "GET /x HTTP/1.1" 200 12 "-" "curl/8" 3ms route=SHARED`
//!
//! Lines are buffered and flushed every second and when the buffer fills,
//! so logging costs a memory copy per request, not a write.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Version;

/// What one line says.
pub struct Entry<'a> {
    pub peer: SocketAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub version: Version,
    pub status: u16,
    pub bytes: Option<u64>,
    pub referer: &'a str,
    pub user_agent: &'a str,
    pub elapsed: Duration,
    pub route: Option<&'a str>,
}

/// A buffered sink, or none (`--access-log off`).
type Sink = Option<std::io::BufWriter<Box<dyn Write + Send>>>;

/// Where lines go; cheap to clone.
#[derive(Clone)]
pub struct AccessLog(Arc<Mutex<Sink>>, bool);

const TIME: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000");

impl AccessLog {
    /// Lines to `sink`, or nowhere.
    pub fn new(sink: Option<Box<dyn Write + Send>>) -> AccessLog {
        let on = sink.is_some();
        AccessLog(
            Arc::new(Mutex::new(
                sink.map(|s| std::io::BufWriter::with_capacity(64 * 1024, s)),
            )),
            on,
        )
    }

    /// Whether lines go anywhere (so a request need not gather them).
    pub fn enabled(&self) -> bool {
        self.1
    }

    pub fn write(&self, e: Entry<'_>) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(out) = guard.as_mut() else { return };
        let when = time::OffsetDateTime::now_utc().format(TIME).unwrap_or_default();
        let bytes = e.bytes.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
        let clean = |s: &str| s.replace(['"', '\n', '\r'], "_");
        let _ = writeln!(
            out,
            "{} - - [{when}] \"{} {} {:?}\" {} {bytes} \"{}\" \"{}\" {}ms route={}",
            e.peer.ip().to_canonical(),
            e.method,
            clean(e.target),
            e.version,
            e.status,
            clean(e.referer),
            clean(e.user_agent),
            e.elapsed.as_millis(),
            e.route.unwrap_or("-"),
        );
    }

    pub fn flush(&self) {
        if let Some(out) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = out.flush();
        }
    }
}
