//! Transport: a byte stream to `imgsync serve` on another host. Built-in
//! SSH (libssh2 through the `ssh2` crate, [`ssh`]) or an external program
//! (`-e/--rsh "ssh -p 2222"`, rsync's convention, [`external`]). The
//! protocol runs over the streams; this layer knows nothing of it and uses
//! nothing else in imgsync.
//!
//! The remote command is always `<remote-imgsync> serve` (the binary path
//! shell-quoted); paths and options travel in-band, never through the
//! remote shell.
#![forbid(unsafe_code)]

pub mod config;
pub mod external;
pub mod ssh;
pub mod watch;

use std::io::{Read, Write};
use std::path::PathBuf;

/// Where to connect: `[user@]host[:port]` (the path part of a location is
/// the protocol's business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl std::fmt::Display for Host {
    /// How errors name the host: `host` or `host:port` (no user).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// Options of both transports (from the command line).
#[derive(Clone, Debug, Default)]
pub struct SshOptions {
    /// `-e/--rsh CMD`: run this program instead of the built-in client.
    pub rsh: Option<String>,
    /// `--remote-imgsync PATH` (default `imgsync`).
    pub remote_imgsync: Option<String>,
    /// `--known-hosts FILE` (default `~/.ssh/known_hosts`). Built-in only.
    pub known_hosts: Option<PathBuf>,
    /// `--accept-new-host-key`: an unknown host key is added (OpenSSH's
    /// accept-new); a changed one is still an error. Built-in only.
    pub accept_new_host_key: bool,
    /// `-i FILE` identity files, tried before the defaults. Built-in only.
    pub identities: Vec<PathBuf>,
    /// `--ssh-config FILE` (default `~/.ssh/config`, then
    /// `/etc/ssh/ssh_config`); like `ssh -F`, a file given replaces both,
    /// and `none` reads nothing. Built-in only.
    pub config: Option<PathBuf>,
    /// Limits of every wait on the peer once connected: `--timeout` and
    /// the interrupt flag.
    pub watch: watch::Watch,
    /// `--connect-timeout`: longest time to connect and log in (the
    /// built-in client also reads `ConnectTimeout` from ssh_config; `-e
    /// ssh` gets `-o ConnectTimeout=`).
    pub connect_timeout: Option<std::time::Duration>,
    /// No notice on stderr (`-q`): the built-in client handing a host to
    /// OpenSSH says so otherwise.
    pub quiet: bool,
}

impl SshOptions {
    /// The remote command line: `<remote-imgsync> serve`, quoted for a
    /// POSIX shell.
    pub fn remote_command(&self) -> String {
        // The remote keeps its own default --timeout: this end sends
        // keepalives while it lives, so only a dead client or link runs it
        // out (and an older serve would refuse the option).
        let bin = self.remote_imgsync.as_deref().unwrap_or("imgsync");
        format!("{} serve", shell_quote(bin))
    }
}

/// How long a peer may stay silent by default (`--timeout`): keepalives
/// come every few seconds from a busy peer, so a minute of silence is a
/// dead peer or a dead link.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Quotes `s` for a POSIX shell (single quotes unless it is plain).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How the remote command ended.
#[derive(Clone, Debug, Default)]
pub struct Exit {
    /// Exit status, when the remote reported one.
    pub status: Option<i32>,
    /// What the remote command wrote on stderr (truncated to a few KiB).
    /// With `-e`, the local program's own messages are mixed in.
    pub stderr: String,
    /// With `-e`: the local program (`ssh`) that failed by itself (OpenSSH
    /// exits 255 for its own errors: host key, authentication, name
    /// lookup, connection), so what `stderr` holds is its word, not the
    /// remote command's.
    pub transport_failed: Option<String>,
}

/// The end of a transport that outlives the streams: closing and waiting.
pub trait Waiter: Send {
    /// Waits for the remote command to end (after the streams are dropped
    /// or at EOF) and reports its status and stderr.
    fn wait(self: Box<Self>) -> Result<Exit, Error>;

    /// Ends the connection without waiting for the remote (the peer is
    /// silent, or the user interrupted): what it would say is not worth a
    /// hang.
    fn abort(self: Box<Self>);
}

/// A running `imgsync serve` on the other host.
pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub waiter: Box<dyn Waiter>,
}

/// Opens a connection with the built-in client, or with `opts.rsh` when set.
///
/// Name lookup, TCP connect and login block in libraries; they run on a
/// thread so an interrupt (the watch's flag) ends the wait at once. A
/// thread left behind ends with the process.
pub fn connect(host: &Host, opts: &SshOptions) -> Result<Connection, Error> {
    if opts.watch.cancel.is_none() {
        return connect_now(host, opts);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (h, o) = (host.clone(), opts.clone());
    std::thread::Builder::new()
        .name("imgsync-connect".into())
        .spawn(move || {
            let _ = tx.send(connect_now(&h, &o));
        })
        .map_err(|e| Error::Connect {
            host: host.to_string(),
            what: "cannot start a thread".into(),
            source: Some(e),
        })?;
    loop {
        match rx.recv_timeout(watch::SLICE) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if opts.watch.cancelled() => {
                return Err(Error::Interrupted {
                    host: host.to_string(),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Other {
                    host: host.to_string(),
                    what: "the connecting thread ended without a result".into(),
                })
            }
        }
    }
}

fn connect_now(host: &Host, opts: &SshOptions) -> Result<Connection, Error> {
    match &opts.rsh {
        Some(rsh) => external::connect(rsh, host, opts),
        None => ssh::connect(host, opts),
    }
}

/// Transport failures. Each message is complete on its own and names the
/// host (the cli prints it after `imgsync: `).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{host}: {what}")]
    Connect {
        host: String,
        what: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("{host}: {what}")]
    HostKey { host: String, what: String },
    #[error("{host}: {what}")]
    Auth { host: String, what: String },
    #[error("{host}: {what}")]
    Other { host: String, what: String },
    #[error("{host}: interrupted while connecting")]
    Interrupted { host: String },
}
