//! A private OpenSSH server for tests that go over SSH: its own host key,
//! client keys and known_hosts files in a temp dir, listening on a free
//! port of 127.0.0.1, stopped when dropped. Each test starts its own.
//!
//! Without /usr/sbin/sshd, [`Sshd::start`] prints SKIP and returns `None`,
//! unless IMGSYNC_REQUIRE_SSHD=1 (then it panics).
//!
//! Whatever a test runs against it must not touch the real `~/.ssh` or
//! agent: imgsync gets [`Sshd::env`] (HOME pointed at an empty dir, no
//! SSH_AUTH_SOCK), the library gets [`Sshd::local_env`], and
//! [`Sshd::ssh_command`] names every file OpenSSH would otherwise look up.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgsync::transport::ssh::LocalEnv;
use imgsync::transport::{shell_quote, Host, SshOptions};
use tempfile::TempDir;

const SSHD: &str = "/usr/sbin/sshd";

/// How long sshd gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Attempts at a free port (another process may take the one we found
/// between our probe and sshd's bind).
const PORT_ATTEMPTS: usize = 5;

pub struct Sshd {
    dir: TempDir,
    child: Child,
    port: u16,
    user: String,
}

impl Sshd {
    /// Starts a server, or returns `None` (after a visible SKIP line) when
    /// sshd is not installed, unless `IMGSYNC_REQUIRE_SSHD=1`.
    pub fn start() -> Option<Sshd> {
        Sshd::start_with("")
    }

    /// [`Sshd::start`] with `extra` sshd_config lines first (sshd takes
    /// the first value of a keyword: `LogLevel VERBOSE` wins).
    pub fn start_with(extra: &str) -> Option<Sshd> {
        let test = std::thread::current().name().unwrap_or("test").to_string();
        let have_keygen = Command::new("ssh-keygen")
            .arg("-?")
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !Path::new(SSHD).exists() || !have_keygen {
            if std::env::var("IMGSYNC_REQUIRE_SSHD").as_deref() == Ok("1") {
                panic!("{test}: {SSHD} or ssh-keygen not found and IMGSYNC_REQUIRE_SSHD=1");
            }
            eprintln!(
                "SKIP {test}: {SSHD} or ssh-keygen not found (set IMGSYNC_REQUIRE_SSHD=1 to fail instead)"
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("imgsync-sshd-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        for key in ["host_key", "other_host_key", "client_key", "wrong_key"] {
            keygen(&d.join(key));
        }
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("authorized_keys");
        fs::create_dir(d.join("home")).expect("empty home");
        fs::write(d.join("empty_config"), "").expect("empty ssh config");
        // Privilege separation wants this directory; it stays (others may
        // be using it).
        let _ = fs::create_dir_all("/run/sshd");
        let user = current_user();

        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let config = d.join("sshd_config");
            fs::write(
                &config,
                format!(
                    "{extra}ListenAddress 127.0.0.1\n\
                     Port {port}\n\
                     HostKey {d}/host_key\n\
                     AuthorizedKeysFile {d}/authorized_keys\n\
                     PidFile {d}/sshd.pid\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PermitRootLogin yes\n\
                     AllowUsers {user}\n\
                     LogLevel ERROR\n",
                    d = d.display()
                ),
            )
            .expect("sshd_config");
            let log = fs::File::create(d.join("sshd.log")).expect("sshd.log");
            let mut child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("{test}: cannot run {SSHD}: {e}"));
            let started = Instant::now();
            let up = loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                if child.try_wait().ok().flatten().is_some() || started.elapsed() > START_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                let sshd = Sshd {
                    dir,
                    child,
                    port,
                    user,
                };
                sshd.write_known_hosts();
                return Some(sshd);
            }
            last_log = fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
        }
        panic!("{test}: sshd did not start: {last_log}");
    }

    fn write_known_hosts(&self) {
        let line = |key: &str| {
            let public = fs::read_to_string(self.path(&format!("{key}.pub"))).expect("host key");
            let mut f = public.split_whitespace();
            let (kind, blob) = (f.next().expect("key type"), f.next().expect("key"));
            format!("[127.0.0.1]:{} {kind} {blob}\n", self.port)
        };
        fs::write(self.known_hosts(), line("host_key")).expect("known_hosts");
        fs::write(self.bad_known_hosts(), line("other_host_key")).expect("bad known_hosts");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The temp dir (tests may put their own files there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user sshd lets in: whoever runs the tests.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `127.0.0.1:PORT`, no user (the default user is the current one).
    pub fn host(&self) -> Host {
        Host {
            user: None,
            host: "127.0.0.1".into(),
            port: Some(self.port),
        }
    }

    /// The key in authorized_keys.
    pub fn client_key(&self) -> PathBuf {
        self.path("client_key")
    }

    /// A key the server does not accept.
    pub fn wrong_key(&self) -> PathBuf {
        self.path("wrong_key")
    }

    /// The server's host key, public part.
    pub fn host_key_pub(&self) -> PathBuf {
        self.path("host_key.pub")
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 …` with the server's key.
    pub fn known_hosts(&self) -> PathBuf {
        self.path("known_hosts")
    }

    /// The same host with a different key (as if the server were replaced).
    pub fn bad_known_hosts(&self) -> PathBuf {
        self.path("bad_known_hosts")
    }

    /// An empty dir to use as HOME.
    pub fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// An `-e/--rsh` command that logs in with the client key and checks
    /// the host key strictly; no port (imgsync adds `-p` from the
    /// location) and no file of the real `~/.ssh` is read.
    pub fn ssh_command(&self) -> String {
        let q = |p: PathBuf| shell_quote(&p.display().to_string());
        format!(
            "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} \
             -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes",
            q(self.client_key()),
            q(self.known_hosts()),
        )
    }

    /// Options for the built-in client: the good known_hosts and client
    /// key, an empty config.
    pub fn options(&self) -> SshOptions {
        SshOptions {
            known_hosts: Some(self.known_hosts()),
            identities: vec![self.client_key()],
            config: Some(self.path("empty_config")),
            ..Default::default()
        }
    }

    /// The built-in client's view of this machine: the empty home, no
    /// agent, no prompts.
    pub fn local_env(&self) -> LocalEnv {
        LocalEnv {
            home: Some(self.home()),
            user: Some(self.user.clone()),
            agent: false,
            interactive: false,
            etc: None,
        }
    }

    /// Makes sshd run `command` whatever the client asks, as an
    /// authorized_keys line `command="...",restrict KEY` does on a backup
    /// host (sshd reads the file at each login).
    pub fn force_command(&self, command: &str) {
        let key = fs::read_to_string(self.path("client_key.pub")).expect("client key");
        let quoted = command.replace('\\', "\\\\").replace('"', "\\\"");
        fs::write(
            self.path("authorized_keys"),
            format!("command=\"{quoted}\",restrict {key}"),
        )
        .expect("authorized_keys");
    }

    /// `[127.0.0.1]:PORT KEYTYPE KEY`, the known_hosts line of this server.
    pub fn known_hosts_line(&self) -> String {
        fs::read_to_string(self.known_hosts()).expect("known_hosts")
    }

    /// Makes `cmd` (imgsync, ssh) blind to the real `~/.ssh` and agent.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("HOME", self.home()).env_remove("SSH_AUTH_SOCK")
    }

    /// Writes an executable shell script into the temp dir (for
    /// `--remote-imgsync`); returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod script");
        p
    }

    /// What sshd logged so far (LogLevel ERROR).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.path("sshd.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "imgsync-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout)
        .expect("user name")
        .trim()
        .to_string()
}
