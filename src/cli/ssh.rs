//! The options of the SSH transports, shared by every command with a
//! remote location, turned into the session's [`ConnectOptions`].

use std::path::PathBuf;
use std::time::Duration;

use super::progress::interrupt_flag;
use crate::session::ConnectOptions;

/// Options of the SSH transports, shared by the commands with remote
/// locations.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SshArgs {
    /// Use this remote shell program instead of the built-in SSH client
    /// (rsync's -e), e.g. "ssh -p 2222 -o ProxyJump=gw"; every OpenSSH
    /// option and ~/.ssh/config then apply
    #[arg(short = 'e', long = "rsh", value_name = "CMD")]
    pub rsh: Option<String>,
    /// The imgsync program on the remote host
    #[arg(long, value_name = "PATH", default_value = "imgsync")]
    pub remote_imgsync: String,
    /// Known hosts file for the built-in client (default ~/.ssh/known_hosts)
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Add an unknown host key to the known hosts file (OpenSSH's
    /// accept-new); a changed key is always refused
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// Identity (private key) file for the built-in client, tried after
    /// ssh-agent and before the default keys; may be repeated
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    pub identity: Vec<PathBuf>,
    /// SSH config file for the built-in client, as ssh -F: read instead of
    /// ~/.ssh/config and /etc/ssh/ssh_config ("none": no file)
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Give up when the peer sends nothing (and takes nothing) for this
    /// many seconds; 0: wait for ever. A busy peer sends keepalives, so
    /// only a dead peer or link runs it out (rsync's --timeout)
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = parse_timeout)]
    pub timeout: u64,
    /// Give up connecting and logging in after this many seconds (default:
    /// ConnectTimeout from ssh_config, else 20 s for TCP and 60 s per
    /// login step)
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: Option<u64>,
    /// Limit the bytes on the wire to RATE per second, each way (rsync's
    /// form: a number of KiB, or with a suffix: 500k, 20M, 1G; 0: none)
    #[arg(long, value_name = "RATE", value_parser = super::size::parse_rate)]
    pub bwlimit: Option<u64>,
}

/// `--timeout`: 0 (none), or at least 5 s (a busy peer says it is alive
/// every second; less would take a hiccup for a dead peer).
pub(super) fn parse_timeout(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n == 0 || n >= 5 => Ok(n),
        Ok(_) => Err("must be 0 (wait for ever) or at least 5 seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl SshArgs {
    pub fn options(&self) -> ConnectOptions {
        self.options_for(false)
    }

    /// The options, with `-q` (`quiet`: no notices on stderr).
    pub fn options_for(&self, quiet: bool) -> ConnectOptions {
        ConnectOptions {
            rsh: self.rsh.clone(),
            remote_imgsync: self.remote_imgsync.clone(),
            known_hosts: self.known_hosts.clone(),
            accept_new_host_key: self.accept_new_host_key,
            identities: self.identity.clone(),
            config: self.ssh_config.clone(),
            timeout: (self.timeout > 0).then(|| Duration::from_secs(self.timeout)),
            connect_timeout: self.connect_timeout.map(Duration::from_secs),
            cancel: interrupt_flag(),
            bwlimit: self.bwlimit.filter(|&r| r > 0),
            quiet,
        }
    }
}
