//! The built-in SSH client (libssh2 through the `ssh2` crate): reads the
//! basics of `~/.ssh/config` ([`super::config`]), checks the host key
//! against `known_hosts` as OpenSSH does, authenticates (agent, identity
//! files, then password or keyboard-interactive on a terminal) and runs
//! `<remote-imgsync> serve` in an exec channel.
//!
//! The session stays blocking. Reader and writer are two handles on the
//! channel's stdout stream; libssh2 serialises them on the session lock,
//! which suits the half-duplex protocol above.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssh2::{
    Channel, CheckResult, HashType, HostKeyType, KeyboardInteractivePrompt, KnownHostFileKind,
    MethodType, Prompt, Session, Stream,
};

use super::config::{self, HostConfig, Tokens};
use super::external::{read_capped, STDERR_CAP};
use super::watch::{Dir, Watch};
use super::{Connection, Error, Exit, Host, SshOptions, Waiter};

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one libssh2 call may block during handshake and (non-
/// interactive) authentication. The data phase has no timeout: the remote
/// may think for a long time between replies.
const SETUP_TIMEOUT_MS: u32 = 60_000;

/// Ciphers in order of client CPU per GiB measured through libssh2 1.11
/// (`cipher_throughput` in the integration tests): chacha20-poly1305
/// ~3.0 s, aes-ctr + hmac-sha2-256 ~2.8 s but only with SHA-NI (without
/// it the HMAC adds about as much again), aes-gcm ~3.5 s (libssh2's GCM
/// path is slow). chacha20 is libssh2's own first choice too; the order
/// matters for servers that do not offer it.
const CIPHERS: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr,\
                       aes128-gcm@openssh.com,aes256-gcm@openssh.com";

/// MACs (used with the ctr ciphers): encrypt-then-MAC first, which libssh2
/// does not prefer by itself.
const MACS: &str = "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,\
                    hmac-sha2-256,hmac-sha2-512,hmac-sha1-etm@openssh.com,hmac-sha1";

/// The channel's receive window: enough to keep a long fat link busy
/// (libssh2's default is 2 MiB).
const WINDOW_SIZE: u32 = 16 * 1024 * 1024;

/// libssh2's largest packet (and its default).
const PACKET_SIZE: u32 = 32 * 1024;

/// Buffers around the channel streams. libssh2 sends at most one 32 KiB
/// packet per write call; the buffer just keeps small protocol writes
/// from each becoming a packet.
const STREAM_BUFFER: usize = 256 * 1024;

/// Passphrase and password attempts on a terminal.
const PROMPT_ATTEMPTS: usize = 3;

/// What the client takes from its own machine: home directory, local user
/// name, whether to ask the agent, whether it may prompt. Tests pass their
/// own so that no real `~/.ssh` or agent is used.
#[derive(Clone, Debug, Default)]
pub struct LocalEnv {
    /// `~`: default config, known_hosts and identity files live in `~/.ssh`.
    pub home: Option<PathBuf>,
    /// The default remote user.
    pub user: Option<String>,
    /// Ask the ssh-agent at `$SSH_AUTH_SOCK`.
    pub agent: bool,
    /// Prompt for passphrases and passwords on `/dev/tty`.
    pub interactive: bool,
    /// The system's ssh directory (`/etc/ssh`): `ssh_config`, read after
    /// the user's, and the global known hosts files. `None`: neither.
    pub etc: Option<PathBuf>,
}

impl LocalEnv {
    /// `$HOME`, `$USER`/`$LOGNAME` (else the passwd entry of our uid),
    /// `$SSH_AUTH_SOCK` set, stdin a terminal.
    pub fn from_process() -> LocalEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let passwd = passwd_entry();
        LocalEnv {
            home: var("HOME")
                .map(PathBuf::from)
                .or_else(|| passwd.as_ref().map(|p| PathBuf::from(&p.1))),
            user: var("USER")
                .or_else(|| var("LOGNAME"))
                .or_else(|| passwd.map(|p| p.0)),
            agent: var("SSH_AUTH_SOCK").is_some(),
            interactive: io::IsTerminal::is_terminal(&io::stdin()),
            etc: Some(PathBuf::from("/etc/ssh")),
        }
    }
}

/// (name, home) of the process's user, from /etc/passwd (the uid is the
/// owner of /proc/self, which keeps this free of unsafe code).
fn passwd_entry() -> Option<(String, String)> {
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse() == Ok(uid)).then(|| (f[0].to_string(), f[5].to_string()))
    })
}

/// Connects with the built-in client, using this process's environment.
pub fn connect(host: &Host, opts: &SshOptions) -> Result<Connection, Error> {
    connect_with(host, opts, &LocalEnv::from_process())
}

/// Connects with the built-in client; `env` says where `~` is and what
/// may be asked. A host whose ssh_config asks for what this client cannot
/// do and that changes routing or security (`ProxyJump`, ...) is handed to
/// OpenSSH's `ssh` instead ([`hand_over`]).
pub fn connect_with(host: &Host, opts: &SshOptions, env: &LocalEnv) -> Result<Connection, Error> {
    let name = host.to_string();
    let ssh_dir = env.home.as_ref().map(|h| h.join(".ssh"));
    let files = config_files(opts, env);
    let cfg = load_config(&name, host, env, &files)?;

    // StrictHostKeyChecking: `no` is never done; `accept-new` as the flag.
    let strict = cfg.strict();
    if let (Some((config::Strict::No, at)), false) = (strict, opts.accept_new_host_key) {
        return Err(Error::HostKey {
            host: name,
            what: format!(
                "{at}: StrictHostKeyChecking no is refused: imgsync always checks host keys (use accept-new, or --accept-new-host-key, to add unknown ones)"
            ),
        });
    }
    let accept_new =
        opts.accept_new_host_key || matches!(strict, Some((config::Strict::AcceptNew, _)));

    if let Some(why) = cfg.hand_over() {
        return hand_over(host, opts, env, &files, &cfg, &why);
    }

    let host_name = cfg.host_name.clone().unwrap_or_else(|| host.host.clone());
    let port = host.port.or(cfg.port).unwrap_or(22);
    let user = host
        .user
        .clone()
        .or_else(|| cfg.user.clone())
        .or_else(|| env.user.clone())
        .ok_or_else(|| Error::Auth {
            host: name.clone(),
            what: "cannot tell which user to log in as; give user@host".into(),
        })?;
    let tokens = Tokens {
        home: env.home.as_deref(),
        local_user: env.user.as_deref().unwrap_or(""),
        host: &host_name,
        user: &user,
        port,
    };
    let (user_files, global_files) = known_hosts_files(opts, env, &cfg, &tokens);
    let Some(known_hosts) = user_files.first().cloned() else {
        return Err(Error::HostKey {
            host: name.clone(),
            what: "no home directory for known_hosts; pass --known-hosts".into(),
        });
    };
    let _ = ssh_dir;

    // --connect-timeout, else ssh_config's ConnectTimeout, bounds the TCP
    // connect and each call of the SSH handshake and login.
    let connect_timeout = opts.connect_timeout.or(cfg.connect_timeout);
    let tcp = tcp_connect(
        &name,
        &host_name,
        port,
        connect_timeout.unwrap_or(CONNECT_TIMEOUT),
        cfg.ipv4_only(),
    )?;
    let ssh_err = |what: &str, e: ssh2::Error| Error::Connect {
        host: name.clone(),
        what: format!("{what}: {}", e.message()),
        source: None,
    };
    let mut session = Session::new().map_err(|e| ssh_err("cannot start an ssh session", e))?;
    let tcp_handle = tcp.try_clone().map_err(|e| Error::Connect {
        host: name.clone(),
        what: "cannot duplicate the socket".into(),
        source: Some(e),
    })?;
    session.set_tcp_stream(tcp);
    session.set_timeout(connect_timeout.map_or(SETUP_TIMEOUT_MS, |t| {
        t.as_millis().clamp(1, u32::MAX.into()) as u32
    }));
    // Preferences the server does not share fall back to libssh2's own.
    let _ = session.method_pref(MethodType::CryptCs, CIPHERS);
    let _ = session.method_pref(MethodType::CryptSc, CIPHERS);
    let _ = session.method_pref(MethodType::MacCs, MACS);
    let _ = session.method_pref(MethodType::MacSc, MACS);

    let target = if port == 22 {
        host_name.clone()
    } else {
        format!("[{host_name}]:{port}")
    };
    let mut known = Vec::new();
    for file in user_files.iter().chain(&global_files) {
        known.extend(
            known_keys(&session, file, &target).map_err(|e| Error::HostKey {
                host: name.clone(),
                what: format!("cannot read {}: {e}", file.display()),
            })?,
        );
    }
    if let Some(pref) = host_key_pref(&session, &known) {
        let _ = session.method_pref(MethodType::HostKey, &pref);
    }
    session
        .handshake()
        .map_err(|e| ssh_err("ssh handshake failed", e))?;
    check_host_key(&name, &session, &known_hosts, &target, &known, accept_new)?;

    let identities = identity_files(opts, &cfg, env, &host_name, &user, port);
    let auth = AuthPolicy::of(&cfg, env);
    authenticate(&name, &session, &user, &auth, &identities)?;

    session.set_timeout(0);
    let mut channel = session
        .channel_open("session", WINDOW_SIZE, PACKET_SIZE, None)
        .map_err(|e| ssh_err("cannot open a channel", e))?;
    channel
        .exec(&opts.remote_command())
        .map_err(|e| ssh_err("cannot start the remote command", e))?;

    // ServerAliveInterval: keepalive requests keep NAT and firewalls
    // from dropping a quiet connection, and the peer's silence is bounded
    // by interval × ServerAliveCountMax (or --timeout, the smaller).
    let alive = cfg.server_alive();
    if let Some((interval, count)) = alive {
        session.set_keepalive(true, interval.as_secs().clamp(1, u32::MAX.into()) as u32);
        let limit = interval.saturating_mul(count.max(1));
        let t = opts.watch.timeout().map_or(limit, |t| t.min(limit));
        opts.watch.set_timeout(Some(t));
    }

    // Blocking calls wake up every IO_POLL_MS: a write waiting for window
    // space to a remote command that has exited (sshd then stops adjusting
    // the window but does not close the channel while data keeps coming)
    // would otherwise wait forever.
    session.set_timeout(IO_POLL_MS);
    let eof_sent = Arc::new(AtomicBool::new(false));
    let pending = Arc::new(Mutex::new(Pending {
        bytes: VecDeque::new(),
        heard: Instant::now(),
    }));
    let keepalive = alive.map(|_| session.clone());
    Ok(Connection {
        reader: Box::new(BufReader::with_capacity(
            STREAM_BUFFER,
            ChannelReader {
                stream: channel.stream(0),
                pending: pending.clone(),
                watch: opts.watch.clone(),
                keepalive: keepalive.clone(),
            },
        )),
        writer: Box::new(BufWriter::with_capacity(
            STREAM_BUFFER,
            ChannelWriter {
                stream: channel.stream(0),
                channel: channel.clone(),
                eof_sent: eof_sent.clone(),
                pending,
                watch: opts.watch.clone(),
                keepalive,
            },
        )),
        waiter: Box::new(SshWaiter {
            name,
            session,
            channel,
            eof_sent,
            tcp: tcp_handle,
            watch: opts.watch.clone(),
        }),
    })
}

/// The configuration files, in the order they are read: `--ssh-config
/// FILE` alone (as `ssh -F`; `none` reads nothing), else `~/.ssh/config`
/// and the system's `ssh_config`.
fn config_files(opts: &SshOptions, env: &LocalEnv) -> Vec<config::File> {
    let ssh_dir = env.home.as_ref().map(|h| h.join(".ssh"));
    let user_file = |path: PathBuf, required: bool| config::File {
        include_dir: ssh_dir
            .clone()
            .or_else(|| path.parent().map(Path::to_path_buf))
            .unwrap_or_default(),
        home: env.home.clone(),
        path,
        required,
    };
    match &opts.config {
        Some(p) if p.as_os_str() == "none" => Vec::new(),
        Some(p) => vec![user_file(p.clone(), true)],
        None => {
            let mut v = Vec::new();
            if let Some(d) = &ssh_dir {
                v.push(user_file(d.join("config"), false));
            }
            if let Some(etc) = &env.etc {
                v.push(config::File {
                    path: etc.join("ssh_config"),
                    include_dir: etc.clone(),
                    home: env.home.clone(),
                    required: false,
                });
            }
            v
        }
    }
}

fn load_config(
    name: &str,
    host: &Host,
    env: &LocalEnv,
    files: &[config::File],
) -> Result<HostConfig, Error> {
    // An explicit --ssh-config that does not exist is an error (as `ssh
    // -F`); the default files are optional.
    let target = config::Target {
        host: &host.host,
        user: host.user.as_deref(),
        local_user: env.user.as_deref().unwrap_or(""),
    };
    config::load_files(files, &target).map_err(|e| Error::Connect {
        host: name.to_string(),
        what: format!(
            "{}{}: {}",
            e.file.display(),
            e.line.map(|l| format!(" line {l}")).unwrap_or_default(),
            e.what
        ),
        source: e.source,
    })
}

/// The known hosts files: the user's (`--known-hosts`, else
/// `UserKnownHostsFile`, else `~/.ssh/known_hosts` and `known_hosts2`;
/// a new key goes to the first) and the global ones
/// (`GlobalKnownHostsFile`, else `/etc/ssh/ssh_known_hosts` and
/// `ssh_known_hosts2`), all consulted.
fn known_hosts_files(
    opts: &SshOptions,
    env: &LocalEnv,
    cfg: &HostConfig,
    tokens: &Tokens<'_>,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let expand = |v: Vec<String>| -> Vec<PathBuf> {
        v.iter().map(|s| config::expand_path(s, tokens)).collect()
    };
    let user = match (&opts.known_hosts, cfg.files("userknownhostsfile")) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(v)) => expand(v),
        (None, None) => env
            .home
            .iter()
            .flat_map(|h| {
                ["known_hosts", "known_hosts2"]
                    .into_iter()
                    .map(move |n| h.join(".ssh").join(n))
            })
            .collect(),
    };
    let global = match cfg.files("globalknownhostsfile") {
        Some(v) => expand(v),
        None => env
            .etc
            .iter()
            .flat_map(|e| {
                ["ssh_known_hosts", "ssh_known_hosts2"]
                    .into_iter()
                    .map(move |n| e.join(n))
            })
            .collect(),
    };
    (user, global)
}

/// Hands the connection to OpenSSH's `ssh`, as if `-e ssh` was given: it
/// reads the same configuration files (through a private `-F` file that
/// includes them in order) and gets the command line's `-i`,
/// `--known-hosts` and `--accept-new-host-key`. Says so in one line on
/// stderr unless quiet; refused, naming the setting, when no `ssh` is
/// installed.
fn hand_over(
    host: &Host,
    opts: &SshOptions,
    env: &LocalEnv,
    files: &[config::File],
    cfg: &HostConfig,
    why: &config::HandOver,
) -> Result<Connection, Error> {
    let name = host.to_string();
    let Some(program) = find_program("ssh") else {
        return Err(Error::Connect {
            host: name,
            what: format!(
                "{}: {} {} needs OpenSSH's ssh, which is not installed (no ssh on PATH); install it (openssh-client) or remove the setting",
                why.at,
                config::spelling(&why.keyword),
                why.value
            ),
            source: None,
        });
    };
    if !opts.quiet {
        let _ = writeln!(
            io::stderr(),
            "imgsync: {name}: {} {} ({}) is not something the built-in ssh client does; connecting through OpenSSH's ssh",
            config::spelling(&why.keyword),
            why.value,
            why.at
        );
    }
    let temp = write_include_file(files).map_err(|e| Error::Connect {
        host: name.clone(),
        what: "cannot write a config file for ssh".into(),
        source: Some(e),
    })?;
    let mut words = vec![
        program.display().to_string(),
        "-F".into(),
        temp.display().to_string(),
    ];
    for i in &opts.identities {
        words.push("-i".into());
        words.push(i.display().to_string());
    }
    // The user's known hosts as the built-in client would take them
    // (OpenSSH's own default is under the passwd entry's home, not $HOME).
    let host_name = cfg.host_name.clone().unwrap_or_else(|| host.host.clone());
    let user = host
        .user
        .clone()
        .or_else(|| cfg.user.clone())
        .or_else(|| env.user.clone())
        .unwrap_or_default();
    let tokens = Tokens {
        home: env.home.as_deref(),
        local_user: env.user.as_deref().unwrap_or(""),
        host: &host_name,
        user: &user,
        port: host.port.or(cfg.port).unwrap_or(22),
    };
    let (user_files, _) = known_hosts_files(opts, env, cfg, &tokens);
    if !user_files.is_empty() {
        let list: Vec<String> = user_files
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        words.push("-o".into());
        words.push(format!("UserKnownHostsFile={}", list.join(" ")));
    }
    if opts.accept_new_host_key {
        words.push("-o".into());
        words.push("StrictHostKeyChecking=accept-new".into());
    }
    if !env.interactive {
        // As the built-in client: no prompt without a terminal.
        words.push("-o".into());
        words.push("BatchMode=yes".into());
    }
    match super::external::connect_words(words, host, opts) {
        Ok(mut conn) => {
            conn.waiter = Box::new(RemoveAfter {
                inner: Some(conn.waiter),
                path: temp,
            });
            Ok(conn)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// `program` on `$PATH`, if it is there and executable.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// A private config file for `ssh -F` that includes `files` in order, so
/// OpenSSH reads exactly what the built-in client read.
fn write_include_file(files: &[config::File]) -> io::Result<PathBuf> {
    let mut text = String::from("# imgsync: the ssh_config files it read, in order\n");
    for f in files.iter().filter(|f| f.path.exists()) {
        let p = std::path::absolute(&f.path)?;
        text.push_str(&format!("Include \"{}\"\n", p.display()));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = std::env::temp_dir().join(format!(
        "imgsync-ssh_config.{}.{nanos:08x}",
        std::process::id()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(text.as_bytes())?;
    Ok(path)
}

/// A waiter that removes a file once the connection is over.
struct RemoveAfter {
    inner: Option<Box<dyn Waiter>>,
    path: PathBuf,
}

impl Waiter for RemoveAfter {
    fn wait(mut self: Box<Self>) -> Result<Exit, Error> {
        match self.inner.take() {
            Some(w) => w.wait(),
            None => Ok(Exit::default()),
        }
    }

    fn abort(mut self: Box<Self>) {
        if let Some(w) = self.inner.take() {
            w.abort();
        }
    }
}

impl Drop for RemoveAfter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn tcp_connect(
    name: &str,
    host_name: &str,
    port: u16,
    timeout: Duration,
    ipv4_only: Option<bool>,
) -> Result<TcpStream, Error> {
    let addrs = (host_name, port)
        .to_socket_addrs()
        .map_err(|e| Error::Connect {
            host: name.to_string(),
            what: format!("cannot resolve {host_name}"),
            source: Some(e),
        })?;
    let mut last = None;
    // AddressFamily inet / inet6.
    for addr in addrs.filter(|a| match ipv4_only {
        Some(v4) => a.is_ipv4() == v4,
        None => true,
    }) {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Connect {
        host: name.to_string(),
        what: format!("cannot connect to {host_name} port {port}"),
        source: last.or_else(|| Some(io::ErrorKind::NotFound.into())),
    })
}

/// A known_hosts line that names the host.
#[derive(Debug)]
struct KnownKey {
    /// The known_hosts file it is in.
    file: PathBuf,
    /// `@revoked` or `@cert-authority`.
    marker: Option<String>,
    key_type: String,
    /// Base64 of the key blob.
    key: String,
    line: usize,
}

/// The lines of `file` whose host field matches `target` (`host` or
/// `[host]:port`). Plain names are matched here (comma lists, wildcards,
/// negation); hashed names (`|1|salt|hash`) by libssh2, which knows
/// HMAC-SHA1. Lines that cannot be read are skipped.
fn known_keys(session: &Session, file: &Path, target: &str) -> io::Result<Vec<KnownKey>> {
    let text = match std::fs::read(file) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let mut first = fields.next();
        let marker = match first {
            Some(m) if m.starts_with('@') => {
                first = fields.next();
                Some(m.to_string())
            }
            _ => None,
        };
        let (Some(hosts), Some(key_type), Some(key)) = (first, fields.next(), fields.next()) else {
            continue;
        };
        if hosts.starts_with('#') {
            continue;
        }
        let matches = if hosts.starts_with('|') {
            hashed_host_matches(session, hosts, target)
        } else {
            let patterns: Vec<String> = hosts.split(',').map(str::to_string).collect();
            config::host_matches(&patterns, target)
        };
        if matches {
            out.push(KnownKey {
                file: file.to_path_buf(),
                marker,
                key_type: key_type.to_string(),
                key: key.to_string(),
                line: i + 1,
            });
        }
    }
    Ok(out)
}

/// Whether a hashed host field names `target`: libssh2 is given the field
/// with a stand-in key, so a host match shows as a key mismatch.
fn hashed_host_matches(session: &Session, hosts: &str, target: &str) -> bool {
    let Ok(mut kh) = session.known_hosts() else {
        return false;
    };
    let stand_in = base64(
        b"\0\0\0\x0bssh-ed25519\0\0\0\x20imgsync stand-in key 32 bytes..",
        true,
    );
    if kh
        .read_str(
            &format!("{hosts} ssh-ed25519 {stand_in}"),
            KnownHostFileKind::OpenSSH,
        )
        .is_err()
    {
        return false;
    }
    // `check` (not `check_port`): the target already has OpenSSH's
    // `[host]:port` form, and libssh2's port fallback to the bare name
    // is not what OpenSSH does.
    matches!(
        kh.check(target, b"imgsync-probe"),
        CheckResult::Mismatch | CheckResult::Match
    )
}

/// Host key algorithms with the types already known for this host first,
/// as OpenSSH orders them, so a host known by its ECDSA key is not asked
/// for its Ed25519 one.
fn host_key_pref(session: &Session, known: &[KnownKey]) -> Option<String> {
    let supported = session.supported_algs(MethodType::HostKey).ok()?;
    let mut pref: Vec<&str> = Vec::new();
    for k in known.iter().filter(|k| k.marker.is_none()) {
        let key_type = [k.key_type.as_str()];
        let algs: &[&str] = match k.key_type.as_str() {
            "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
            _ => &key_type,
        };
        for a in algs {
            if let Some(s) = supported.iter().find(|s| *s == a) {
                if !pref.contains(s) {
                    pref.push(s);
                }
            }
        }
    }
    if pref.is_empty() {
        return None;
    }
    for s in &supported {
        if !pref.contains(s) {
            pref.push(s);
        }
    }
    Some(pref.join(","))
}

/// Checks the server's key against every known hosts file's lines for
/// the host; an unknown key is added to `file` (the first user file) only
/// with `accept_new`.
fn check_host_key(
    name: &str,
    session: &Session,
    file: &Path,
    target: &str,
    known: &[KnownKey],
    accept_new: bool,
) -> Result<(), Error> {
    let err = |what: String| Error::HostKey {
        host: name.to_string(),
        what,
    };
    let (blob, kind) = session
        .host_key()
        .ok_or_else(|| err("the server sent no host key".into()))?;
    let key = base64(blob, true);
    let key_type = blob_key_type(blob).unwrap_or("unknown");
    let fp = format!(
        "{} SHA256:{}",
        key_type_label(kind),
        session
            .host_key_hash(HashType::Sha256)
            .map(|h| base64(h, false))
            .unwrap_or_default()
    );
    let f = file.display();
    if let Some(k) = known
        .iter()
        .find(|k| k.marker.as_deref() == Some("@revoked") && k.key == key)
    {
        return Err(err(format!(
            "host key ({fp}) is marked revoked in {} line {}",
            k.file.display(),
            k.line
        )));
    }
    let plain = || known.iter().filter(|k| k.marker.is_none());
    if plain().any(|k| k.key == key) {
        return Ok(());
    }
    if let Some(old) = plain().find(|k| k.key_type == key_type) {
        return Err(err(format!(
            "host key has CHANGED ({fp}), which may be an attack (someone intercepting the \
             connection); if the host was reinstalled, remove the old key from {} line {}",
            old.file.display(),
            old.line
        )));
    }
    if !accept_new {
        return Err(err(format!(
            "host key not known ({fp}); add it to {f} or pass --accept-new-host-key"
        )));
    }
    append_known_host(file, &format!("{target} {key_type} {key}\n"))
        .map_err(|e| err(format!("cannot add the host key to {f}: {e}")))?;
    // Never panics on a closed stderr (as eprintln! would).
    let _ = writeln!(
        io::stderr(),
        "imgsync: warning: added host key for {target} ({fp}) to {f}"
    );
    Ok(())
}

/// Appends `line` to known_hosts, creating it (0600) and its directory
/// (0700) when missing.
fn append_known_host(file: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)?;
    // Keep the new entry on a line of its own.
    let len = f.metadata()?.len();
    let mut text = String::new();
    if len > 0 {
        let mut last = [0u8];
        io::Seek::seek(&mut f, io::SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            text.push('\n');
        }
    }
    text.push_str(line);
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The algorithm name at the start of an SSH key blob.
fn blob_key_type(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4usize.checked_add(len)?)?).ok()
}

/// OpenSSH's name for a key type in fingerprints.
fn key_type_label(kind: HostKeyType) -> &'static str {
    match kind {
        HostKeyType::Rsa => "RSA",
        HostKeyType::Dss => "DSA",
        HostKeyType::Ecdsa256 | HostKeyType::Ecdsa384 | HostKeyType::Ecdsa521 => "ECDSA",
        HostKeyType::Ed25519 => "ED25519",
        _ => "unknown",
    }
}

/// Standard base64, with or without `=` padding.
fn base64(data: &[u8], pad: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Identity files in the order they are tried: `-i`, the config's
/// `IdentityFile`s, then `~/.ssh/id_{ed25519,ecdsa,rsa}`; duplicates once.
fn identity_files(
    opts: &SshOptions,
    cfg: &HostConfig,
    env: &LocalEnv,
    host_name: &str,
    user: &str,
    port: u16,
) -> Vec<(PathBuf, bool)> {
    let tokens = Tokens {
        home: env.home.as_deref(),
        local_user: env.user.as_deref().unwrap_or(""),
        host: host_name,
        user,
        port,
    };
    let mut out: Vec<(PathBuf, bool)> = Vec::new();
    let explicit = opts.identities.iter().map(|p| (p.clone(), true));
    let configured = cfg
        .identity_files
        .iter()
        .map(|s| (config::expand_path(s, &tokens), false));
    // IdentitiesOnly with identities named: only those (OpenSSH adds its
    // defaults only when none is named at all).
    let named = !opts.identities.is_empty() || !cfg.identity_files.is_empty();
    let only = named && cfg.flag("identitiesonly") == Some(true);
    let defaults = env.home.iter().filter(|_| !only).flat_map(|h| {
        ["id_ed25519", "id_ecdsa", "id_rsa"]
            .into_iter()
            .map(move |n| (h.join(".ssh").join(n), false))
    });
    for (p, explicit) in explicit.chain(configured).chain(defaults) {
        if !out.iter().any(|(q, _)| *q == p) {
            out.push((p, explicit));
        }
    }
    out
}

/// What ssh_config lets the login try, on top of what the machine
/// offers (an agent, a terminal).
struct AuthPolicy {
    agent: bool,
    /// Prompts on the terminal (`BatchMode yes` forbids them).
    interactive: bool,
    pubkey: bool,
    password: bool,
    kbd_interactive: bool,
    /// `IdentitiesOnly yes`: agent keys only when they are one of the
    /// identity files.
    identities_only: bool,
    /// `PreferredAuthentications`: only these methods.
    preferred: Option<Vec<String>>,
}

impl AuthPolicy {
    fn of(cfg: &HostConfig, env: &LocalEnv) -> AuthPolicy {
        let batch = cfg.flag("batchmode") == Some(true);
        AuthPolicy {
            agent: env.agent && !cfg.agent_disabled(),
            interactive: env.interactive && !batch,
            pubkey: cfg.flag("pubkeyauthentication") != Some(false),
            password: cfg.flag("passwordauthentication") != Some(false),
            kbd_interactive: cfg.flag("kbdinteractiveauthentication") != Some(false),
            identities_only: cfg.flag("identitiesonly") == Some(true),
            preferred: cfg.preferred_authentications(),
        }
    }

    fn allows(&self, method: &str) -> bool {
        let on = match method {
            "publickey" => self.pubkey,
            "password" => self.password,
            "keyboard-interactive" => self.kbd_interactive,
            _ => true,
        };
        on && self.preferred.as_ref().is_none_or_contains(method)
    }
}

trait PreferredList {
    fn is_none_or_contains(&self, m: &str) -> bool;
}

impl PreferredList for Option<&Vec<String>> {
    fn is_none_or_contains(&self, m: &str) -> bool {
        match self {
            Some(v) => v.iter().any(|x| x == m),
            None => true,
        }
    }
}

fn authenticate(
    name: &str,
    session: &Session,
    user: &str,
    auth: &AuthPolicy,
    identities: &[(PathBuf, bool)],
) -> Result<(), Error> {
    let fail = |what: String| Error::Auth {
        host: name.to_string(),
        what,
    };
    let offered = match session.auth_methods(user) {
        Ok(m) => m.to_string(),
        // The server let us in with "none".
        Err(_) if session.authenticated() => return Ok(()),
        Err(e) => {
            return Err(fail(format!(
                "cannot list authentication methods: {}",
                e.message()
            )))
        }
    };
    let offers = |m: &str| offered.split(',').any(|o| o == m) && auth.allows(m);
    let mut tried: Vec<String> = Vec::new();

    if offers("publickey") {
        let only = auth.identities_only.then(|| public_blobs(identities));
        if auth.agent && try_agent(session, user, only.as_deref()) {
            return Ok(());
        }
        if auth.agent {
            tried.push("agent".into());
        }
        for (path, explicit) in identities {
            if try_key_file(session, user, auth.interactive, path, *explicit, &mut tried) {
                return Ok(());
            }
        }
    }
    if auth.interactive && offers("keyboard-interactive") {
        session.set_timeout(0);
        for _ in 0..PROMPT_ATTEMPTS {
            let mut p = TtyPrompter { gave_up: false };
            if session.userauth_keyboard_interactive(user, &mut p).is_ok()
                && session.authenticated()
            {
                return Ok(());
            }
            if p.gave_up {
                break;
            }
        }
        tried.push("keyboard-interactive".into());
    } else if auth.interactive && offers("password") {
        session.set_timeout(0);
        for _ in 0..PROMPT_ATTEMPTS {
            let Some(pw) = prompt_tty(&format!("{user}@{name}'s password: "), false) else {
                break;
            };
            if session.userauth_password(user, &pw).is_ok() {
                return Ok(());
            }
        }
        tried.push("password".into());
    }
    if tried.is_empty() {
        let why = if auth.interactive {
            ""
        } else {
            "; not on a terminal, so no password prompt"
        };
        return Err(fail(format!(
            "authentication failed for user {user} (nothing to try: the server offers {offered}{why})"
        )));
    }
    Err(fail(format!(
        "authentication failed for user {user} (tried: {})",
        tried.join(", ")
    )))
}

/// The base64 key blobs of the identity files' `.pub` files.
fn public_blobs(identities: &[(PathBuf, bool)]) -> Vec<String> {
    identities
        .iter()
        .filter_map(|(p, _)| {
            let mut pub_path = p.as_os_str().to_owned();
            pub_path.push(".pub");
            let text = std::fs::read_to_string(PathBuf::from(pub_path)).ok()?;
            text.split_whitespace().nth(1).map(str::to_string)
        })
        .collect()
}

/// Each identity the agent holds, in turn (only those in `only`, when
/// given: `IdentitiesOnly`).
fn try_agent(session: &Session, user: &str, only: Option<&[String]>) -> bool {
    let Ok(mut agent) = session.agent() else {
        return false;
    };
    if agent.connect().is_err() || agent.list_identities().is_err() {
        return false;
    }
    let ok = agent
        .identities()
        .unwrap_or_default()
        .iter()
        .filter(|id| only.is_none_or_in(&base64(id.blob(), true)))
        .any(|id| agent.userauth(user, id).is_ok());
    let _ = agent.disconnect();
    ok
}

trait OnlyList {
    fn is_none_or_in(&self, blob: &str) -> bool;
}

impl OnlyList for Option<&[String]> {
    fn is_none_or_in(&self, blob: &str) -> bool {
        match self {
            Some(v) => v.iter().any(|x| x == blob),
            None => true,
        }
    }
}

/// One identity file; records what was tried. A key with a passphrase is
/// asked for on the terminal, else skipped.
fn try_key_file(
    session: &Session,
    user: &str,
    interactive: bool,
    path: &Path,
    explicit: bool,
    tried: &mut Vec<String>,
) -> bool {
    let shown = path.display();
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if explicit {
                tried.push(format!("{shown} (not found)"));
            }
            return false;
        }
        Err(_) => {
            tried.push(format!("{shown} (unreadable)"));
            return false;
        }
    };
    let public = {
        let mut p = path.as_os_str().to_owned();
        p.push(".pub");
        Some(PathBuf::from(p)).filter(|p| p.is_file())
    };
    if !key_is_encrypted(&String::from_utf8_lossy(&text)) {
        tried.push(shown.to_string());
        return session
            .userauth_pubkey_file(user, public.as_deref(), path, None)
            .is_ok();
    }
    if !interactive {
        tried.push(format!("{shown} (needs a passphrase)"));
        return false;
    }
    session.set_timeout(0);
    tried.push(shown.to_string());
    for _ in 0..PROMPT_ATTEMPTS {
        let Some(pass) = prompt_tty(&format!("Enter passphrase for key '{shown}': "), false) else {
            break;
        };
        if pass.is_empty() {
            break;
        }
        if session
            .userauth_pubkey_file(user, public.as_deref(), path, Some(&pass))
            .is_ok()
        {
            return true;
        }
    }
    false
}

/// Whether a private key file needs a passphrase: an OpenSSH-format key
/// whose cipher is not "none", or a PEM key marked ENCRYPTED.
fn key_is_encrypted(text: &str) -> bool {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    match text.find(BEGIN) {
        Some(at) => {
            let body: String = text[at + BEGIN.len()..]
                .lines()
                .take_while(|l| !l.starts_with("-----END"))
                .flat_map(|l| l.trim().chars())
                .collect();
            // "openssh-key-v1\0", then the cipher name as an SSH string;
            // the first 21 bytes are 28 base64 characters.
            let clear = base64(b"openssh-key-v1\0\0\0\0\x04none", true);
            !body.starts_with(&clear[..28])
        }
        None => text.contains("ENCRYPTED"),
    }
}

/// Asks on /dev/tty; without echo unless `echo`. `None` without a terminal,
/// when echo cannot be turned off, or at end of input.
fn prompt_tty(prompt: &str, echo: bool) -> Option<String> {
    let mut tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()?;
    if !echo && !stty(&tty, "-echo") {
        return None;
    }
    let _ = write!(tty, "{prompt}");
    let _ = tty.flush();
    let mut line = String::new();
    let read = tty
        .try_clone()
        .map(|t| BufReader::new(t).read_line(&mut line));
    if !echo {
        stty(&tty, "echo");
        let _ = writeln!(tty);
    }
    match read {
        Ok(Ok(n)) if n > 0 => Some(line.trim_end_matches(['\r', '\n']).to_string()),
        _ => None,
    }
}

/// Runs `stty ARG` on the terminal (no termios bindings needed).
fn stty(tty: &File, arg: &str) -> bool {
    let Ok(input) = tty.try_clone() else {
        return false;
    };
    Command::new("stty")
        .arg(arg)
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct TtyPrompter {
    gave_up: bool,
}

impl KeyboardInteractivePrompt for TtyPrompter {
    fn prompt<'a>(
        &mut self,
        _user: &str,
        instructions: &str,
        prompts: &[Prompt<'a>],
    ) -> Vec<String> {
        if !instructions.is_empty() {
            if let Ok(mut tty) = OpenOptions::new().write(true).open("/dev/tty") {
                let _ = writeln!(tty, "{instructions}");
            }
        }
        prompts
            .iter()
            .map(|p| match prompt_tty(&p.text, p.echo) {
                Some(answer) => answer,
                None => {
                    self.gave_up = true;
                    String::new()
                }
            })
            .collect()
    }
}

/// The writing end. Its `flush` does nothing on purpose: libssh2's
/// `channel_flush` *discards unread incoming data* rather than pushing
/// outgoing data, and a blocking write has already sent its packet.
/// Dropping it sends EOF, as closing a pipe would.
struct ChannelWriter {
    stream: Stream,
    channel: Channel,
    eof_sent: Arc<AtomicBool>,
    pending: Arc<Mutex<Pending>>,
    watch: Watch,
    keepalive: Option<Session>,
}

/// What the writer took off the channel while it waited for window space
/// (a keepalive, an ERROR before the remote exited), for the reader; and
/// when the peer was last heard from.
struct Pending {
    bytes: VecDeque<u8>,
    heard: Instant,
}

/// The most the writer sets aside for the reader while it waits: a peer
/// that sends more than this while not reading is simply waited for.
const PENDING_CAP: usize = 4 << 20;

/// How often blocking channel calls wake up (see [`connect_with`]), to
/// check the interrupt flag and the timeout.
const IO_POLL_MS: u32 = 200;

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn lock_pending(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reading end: waits for data up to the timeout (each libssh2 call
/// wakes up every IO_POLL_MS), taking first what the writer set aside.
struct ChannelReader {
    stream: Stream,
    pending: Arc<Mutex<Pending>>,
    watch: Watch,
    /// With ServerAliveInterval: the session, to send keepalives while
    /// waiting.
    keepalive: Option<Session>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            {
                // Held across the channel read, so bytes set aside by the
                // writer are never overtaken by later ones.
                let mut p = lock_pending(&self.pending);
                if !p.bytes.is_empty() {
                    let n = buf.len().min(p.bytes.len());
                    for (d, s) in buf.iter_mut().zip(p.bytes.drain(..n)) {
                        *d = s;
                    }
                    return Ok(n);
                }
                match self.stream.read(buf) {
                    Err(e) if timed_out(&e) => {}
                    Ok(n) => {
                        p.heard = Instant::now();
                        return Ok(n);
                    }
                    r => return r,
                }
            }
            if let Some(s) = &self.keepalive {
                // Sends one only when the interval has passed.
                let _ = s.keepalive_send();
            }
            self.watch.check(since, Dir::Read)?;
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.eof_sent.load(Ordering::Acquire) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let since = Instant::now();
        loop {
            match self.stream.write(buf) {
                // No window space yet: fine while the remote command runs
                // and reads (or is busy and says so with keepalives). What
                // it sent meanwhile is set aside for the reader, so an
                // EOF behind it (the remote exited, after an ERROR) shows.
                Err(e) if timed_out(&e) => {
                    let heard = {
                        let mut p = lock_pending(&self.pending);
                        if self.channel.read_window().available > 0 && p.bytes.len() < PENDING_CAP {
                            let mut tmp = [0u8; 32 << 10];
                            if let Ok(n) = self.stream.read(&mut tmp) {
                                if n > 0 {
                                    p.bytes.extend(&tmp[..n]);
                                    p.heard = Instant::now();
                                }
                            }
                        }
                        p.heard
                    };
                    // The remote exited (its exit status or signal came;
                    // libssh2 reports EOF only once its stderr is read
                    // too, which the waiter does).
                    let exited = self.channel.exit_status().is_ok_and(|st| st != 0)
                        || self
                            .channel
                            .exit_signal()
                            .is_ok_and(|s| s.exit_signal.is_some());
                    if exited || self.channel.eof() {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the remote command closed the connection",
                        ));
                    }
                    if let Some(s) = &self.keepalive {
                        let _ = s.keepalive_send();
                    }
                    self.watch.check(since.max(heard), Dir::Write)?;
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        if !self.eof_sent.swap(true, Ordering::AcqRel) {
            let _ = self.channel.send_eof();
        }
    }
}

struct SshWaiter {
    name: String,
    session: Session,
    channel: Channel,
    eof_sent: Arc<AtomicBool>,
    tcp: TcpStream,
    watch: Watch,
}

impl Waiter for SshWaiter {
    fn wait(mut self: Box<Self>) -> Result<Exit, Error> {
        // The remote command has its EOF: it ends, and these calls return
        // (within the timeout: a dead link must not hang the end).
        let limit = self.watch.timeout().unwrap_or(super::DEFAULT_TIMEOUT);
        self.session
            .set_timeout(limit.as_millis().clamp(1, u32::MAX.into()) as u32);
        if !self.eof_sent.swap(true, Ordering::AcqRel) {
            let _ = self.channel.send_eof();
        }
        // Whatever the remote still sends is dropped (it must not block on
        // a full window), then its stderr is kept up to the cap.
        let _ = io::copy(&mut self.channel.stream(0), &mut io::sink());
        let mut stderr = read_capped(self.channel.stderr(), STDERR_CAP);
        let closed = self.channel.wait_close();
        let status = match self.channel.exit_signal() {
            Ok(ssh2::ExitSignal {
                exit_signal: Some(sig),
                ..
            }) => {
                if !stderr.is_empty() && !stderr.ends_with('\n') {
                    stderr.push('\n');
                }
                stderr.push_str(&format!("remote command killed by signal {sig}\n"));
                None
            }
            _ => self.channel.exit_status().ok(),
        };
        let _ = self.session.disconnect(None, "done", None);
        let _ = self.tcp.shutdown(Shutdown::Both);
        closed.map_err(|e| Error::Other {
            host: self.name.clone(),
            what: format!("connection lost at the end: {}", e.message()),
        })?;
        Ok(Exit {
            status,
            stderr,
            transport_failed: None,
        })
    }

    fn abort(self: Box<Self>) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (raw, padded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes(), true), padded);
            assert_eq!(base64(raw.as_bytes(), false), padded.trim_end_matches('='));
        }
    }

    #[test]
    fn key_type_from_blob() {
        assert_eq!(
            blob_key_type(b"\0\0\0\x0bssh-ed25519\0\0\0\x20..."),
            Some("ssh-ed25519")
        );
        assert_eq!(blob_key_type(b"\0\0\0\x30short"), None);
        assert_eq!(blob_key_type(b"\0\0"), None);
        assert_eq!(blob_key_type(b"\xff\xff\xff\xffx"), None);
    }

    #[test]
    fn encrypted_keys_are_recognised() {
        let clear = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
            -----END OPENSSH PRIVATE KEY-----\n";
        let locked = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABD4tSRpYn\n\
            -----END OPENSSH PRIVATE KEY-----\n";
        assert!(!key_is_encrypted(clear));
        assert!(key_is_encrypted(locked));
        assert!(key_is_encrypted(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
        ));
        assert!(!key_is_encrypted("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n"));
    }

    #[test]
    fn known_hosts_lines_match_like_openssh() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(
            &file,
            "# comment\n\
             example.com,10.0.0.1 ssh-ed25519 AAAA1\n\
             [example.com]:2222 ssh-rsa AAAA2\n\
             *.corp,!bad.corp ecdsa-sha2-nistp256 AAAA3\n\
             @revoked * ssh-ed25519 AAAA4\n\
             garbage\n",
        )
        .unwrap();
        let session = Session::new().unwrap();
        let keys = |t: &str| -> Vec<String> {
            known_keys(&session, &file, t)
                .unwrap()
                .into_iter()
                .map(|k| k.key)
                .collect()
        };
        assert_eq!(keys("example.com"), ["AAAA1", "AAAA4"]);
        assert_eq!(keys("10.0.0.1"), ["AAAA1", "AAAA4"]);
        assert_eq!(keys("[example.com]:2222"), ["AAAA2", "AAAA4"]);
        assert_eq!(keys("a.corp"), ["AAAA3", "AAAA4"]);
        assert_eq!(keys("bad.corp"), ["AAAA4"]);
        assert!(known_keys(&session, &dir.path().join("missing"), "x")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn hashed_known_hosts_entries_match() {
        // `ssh-keygen -H` hashes the name (salt, HMAC-SHA1); libssh2 matches it.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(&file, "127.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n").unwrap();
        let st = Command::new("ssh-keygen")
            .args(["-q", "-H", "-f"])
            .arg(&file)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("SKIP hashed_known_hosts_entries_match: ssh-keygen -H failed");
            return;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("|1|"), "{text}");
        let session = Session::new().unwrap();
        let n = |t: &str| known_keys(&session, &file, t).unwrap().len();
        assert_eq!(n("127.0.0.1"), 1);
        assert_eq!(n("127.0.0.2"), 0);
        assert_eq!(n("[127.0.0.1]:2222"), 0);
    }

    #[test]
    fn appending_keeps_lines_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new/.ssh/known_hosts");
        append_known_host(&file, "a k 1\n").unwrap();
        std::fs::write(&file, "a k 1").unwrap();
        append_known_host(&file, "b k 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a k 1\nb k 2\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn identity_order_and_dedup() {
        let env = LocalEnv {
            home: Some("/h".into()),
            user: Some("me".into()),
            ..Default::default()
        };
        let opts = SshOptions {
            identities: vec!["/k/one".into(), "/h/.ssh/id_rsa".into()],
            ..Default::default()
        };
        let cfg = HostConfig {
            identity_files: vec!["~/.ssh/id_%r_%h".into(), "/k/one".into()],
            ..Default::default()
        };
        let got: Vec<_> = identity_files(&opts, &cfg, &env, "srv", "root", 22)
            .into_iter()
            .map(|(p, e)| (p.display().to_string(), e))
            .collect();
        let want = [
            ("/k/one", true),
            ("/h/.ssh/id_rsa", true),
            ("/h/.ssh/id_root_srv", false),
            ("/h/.ssh/id_ed25519", false),
            ("/h/.ssh/id_ecdsa", false),
        ];
        let want: Vec<_> = want.iter().map(|(p, e)| (p.to_string(), *e)).collect();
        assert_eq!(got, want);
    }
}
