//! Promises: the health checks an instance declares, so the agent can tell
//! whether a deployment actually works. Three kinds: a command (exit 0 is
//! success; run as the partition's user), a TCP connect, an HTTP GET
//! (any 2xx or 3xx). Each check is bounded by its timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Mode, PartitionResource};

/// A promise with its templates rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Command(Vec<String>),
    Tcp(String),
    Http(String),
}

/// A named check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promise {
    pub name: String,
    pub check: Check,
    pub timeout: Duration,
}

impl Promise {
    /// Runs the check once; Err holds what failed, for the Master's status.
    pub async fn run(&self, r: &PartitionResource) -> Result<(), String> {
        let outcome = tokio::time::timeout(self.timeout, self.check(r)).await;
        match outcome {
            Ok(result) => result.map_err(|e| format!("promise {} failed: {e}", self.name)),
            Err(_) => Err(format!("promise {} timed out after {:?}", self.name, self.timeout)),
        }
    }

    async fn check(&self, r: &PartitionResource) -> Result<(), String> {
        match &self.check {
            Check::Tcp(addr) => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("cannot connect to {addr}: {e}")),
            Check::Http(url) => http_get(url).await,
            Check::Command(argv) => {
                let (program, args) = argv.split_first().ok_or("empty command")?;
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args)
                    .current_dir(&r.dir)
                    .env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                    .env("HOME", &r.dir)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                if r.mode == Mode::Privileged {
                    cmd.uid(r.uid).gid(r.gid);
                }
                let out = cmd.output().await.map_err(|e| format!("cannot run {program}: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    let mut msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    let err = String::from_utf8_lossy(&out.stderr);
                    if !err.trim().is_empty() {
                        msg = format!("{msg} {}", err.trim());
                    }
                    Err(format!("{} ({})", msg.trim(), out.status))
                }
            }
        }
    }
}

/// A minimal HTTP/1.0 GET: enough to tell whether a service answers, with
/// no client state to keep between checks.
async fn http_get(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// promises are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.starts_with('[')
        || authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: nodeagent-promise\r\n\r\n");
    stream.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {url} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource() -> PartitionResource {
        PartitionResource {
            id: "slappart0".into(),
            index: 0,
            dir: std::env::temp_dir(),
            user: None,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            tap: None,
            ipv4: "127.0.0.1".into(),
            ipv6: None,
            port: 0,
            mode: Mode::Unprivileged,
        }
    }

    fn promise(check: Check) -> Promise {
        Promise {
            name: "p".into(),
            check,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn kinds_pass_and_fail() {
        let r = resource();
        assert!(promise(Check::Command(vec!["true".into()])).run(&r).await.is_ok());
        let err = promise(Check::Command(vec![
            "sh".into(),
            "-c".into(),
            "echo broken; exit 3".into(),
        ]))
        .run(&r)
        .await
        .unwrap_err();
        assert!(err.contains("broken"), "{err}");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(promise(Check::Tcp(tcp.local_addr().unwrap().to_string()))
            .run(&r)
            .await
            .is_ok());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/health");
        assert!(promise(Check::Http(url.clone())).run(&r).await.is_ok());
        assert!(promise(Check::Http(url)).run(&r).await.unwrap_err().contains("500"));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(promise(Check::Tcp(closed.to_string())).run(&r).await.is_err());
    }
}
