//! The transports against a private sshd: bytes round-trip through the
//! built-in client and `-e ssh`, host keys are checked as OpenSSH does,
//! failed logins and remote exit statuses are reported. The remote
//! "imgsync" is a shell script that echoes its input (`exec cat`).

use std::io::{Read, Write};
use std::process::Command;

use imgsync::transport::{external, ssh, Connection, Error, Exit, SshOptions};

use crate::common::{random_bytes, MIB};
use crate::sshd::Sshd;

macro_rules! sshd {
    () => {
        match Sshd::start() {
            Some(s) => s,
            None => return,
        }
    };
}

/// Options that run `body` as the remote command.
fn with_script(sshd: &Sshd, body: &str) -> SshOptions {
    let script = sshd.script("remote-imgsync", body);
    SshOptions {
        remote_imgsync: Some(script.display().to_string()),
        ..sshd.options()
    }
}

fn builtin(sshd: &Sshd, opts: &SshOptions) -> Result<Connection, Error> {
    ssh::connect_with(&sshd.host(), opts, &sshd.local_env())
}

/// Writes `data` from another thread and closes the writer, reads
/// everything back, then waits.
///
/// The built-in client is used half-duplex, as the protocol uses it: the
/// write ends before the read starts (a blocking libssh2 read holds the
/// session, so a concurrent writer would stall), which works while the
/// echo fits in the channel's receive window. Through `-e ssh` the pipes
/// hold only 64 KiB, so there the read runs while the writer thread writes.
fn echo(conn: Connection, data: &[u8], concurrent: bool) -> (Vec<u8>, Exit) {
    let Connection {
        mut reader,
        mut writer,
        waiter,
    } = conn;
    let data = data.to_vec();
    let w = std::thread::spawn(move || {
        writer.write_all(&data).expect("write");
        writer.flush().expect("flush");
    });
    let w = if concurrent {
        Some(w)
    } else {
        w.join().expect("writer thread");
        None
    };
    let mut back = Vec::new();
    reader.read_to_end(&mut back).expect("read");
    drop(reader);
    if let Some(w) = w {
        w.join().expect("writer thread");
    }
    (back, waiter.wait().expect("wait"))
}

/// The server's host key fingerprint as OpenSSH prints it.
fn fingerprint(sshd: &Sshd) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(sshd.host_key_pub())
        .output()
        .expect("ssh-keygen -l");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

#[test]
fn builtin_round_trip() {
    let sshd = sshd!();
    let opts = with_script(&sshd, "exec cat");
    let data = random_bytes(8 * MIB as usize, 1, false);
    let (back, exit) = echo(builtin(&sshd, &opts).expect("connect"), &data, false);
    assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    assert_eq!(exit.status, Some(0), "stderr: {}", exit.stderr);
    assert_eq!(exit.stderr, "");
}

#[test]
fn small_writes_are_flushed() {
    // A request/reply exchange: each flush must reach the remote.
    let sshd = sshd!();
    let opts = with_script(&sshd, "exec cat");
    let Connection {
        mut reader,
        mut writer,
        waiter,
    } = builtin(&sshd, &opts).expect("connect");
    for i in 0..20u8 {
        let msg = [i; 7];
        writer.write_all(&msg).expect("write");
        writer.flush().expect("flush");
        let mut got = [0u8; 7];
        reader.read_exact(&mut got).expect("read reply");
        assert_eq!(got, msg);
    }
    drop(writer);
    let exit = waiter.wait().expect("wait");
    assert_eq!(exit.status, Some(0));
}

#[test]
fn external_round_trip() {
    let sshd = sshd!();
    let opts = with_script(&sshd, "exec cat");
    let data = random_bytes(8 * MIB as usize, 2, false);
    let conn = external::connect(&sshd.ssh_command(), &sshd.host(), &opts).expect("connect");
    let (back, exit) = echo(conn, &data, true);
    assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    assert_eq!(exit.status, Some(0), "stderr: {}", exit.stderr);
}

#[test]
fn unknown_host_key_is_refused() {
    let sshd = sshd!();
    let known = sshd.path("empty_known_hosts");
    let opts = SshOptions {
        known_hosts: Some(known.clone()),
        ..with_script(&sshd, "exec cat")
    };
    let err = builtin(&sshd, &opts).err().expect("unknown key refused");
    assert!(matches!(err, Error::HostKey { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "127.0.0.1:{}: host key not known (ED25519 {}); add it to {} or pass --accept-new-host-key",
            sshd.port(),
            fingerprint(&sshd),
            known.display()
        )
    );
    assert!(
        !known.exists(),
        "nothing written without --accept-new-host-key"
    );
}

#[test]
fn accept_new_host_key_adds_it() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = sshd!();
    let known = sshd.path("new/.ssh/known_hosts");
    let opts = SshOptions {
        known_hosts: Some(known.clone()),
        accept_new_host_key: true,
        ..with_script(&sshd, "exec cat")
    };
    let (back, exit) = echo(builtin(&sshd, &opts).expect("connect"), b"hello", false);
    assert_eq!((back.as_slice(), exit.status), (&b"hello"[..], Some(0)));
    let added = std::fs::read_to_string(&known).expect("known_hosts written");
    let expected = std::fs::read_to_string(sshd.known_hosts()).expect("fixture known_hosts");
    assert_eq!(added, expected);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&known), 0o600);
    assert_eq!(mode(known.parent().unwrap()), 0o700);

    // Known now: no flag needed, nothing appended.
    let opts = SshOptions {
        accept_new_host_key: false,
        ..opts
    };
    let (_, exit) = echo(builtin(&sshd, &opts).expect("second connect"), b"x", false);
    assert_eq!(exit.status, Some(0));
    assert_eq!(std::fs::read_to_string(&known).unwrap(), expected);

    // OpenSSH agrees with what was written.
    let out = sshd
        .env(&mut Command::new("ssh"))
        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o"])
        .arg("StrictHostKeyChecking=yes")
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-o")
        .arg("IdentitiesOnly=yes")
        .arg("-i")
        .arg(sshd.client_key())
        .args(["-p", &sshd.port().to_string(), "127.0.0.1", "true"])
        .output()
        .expect("ssh");
    assert!(
        out.status.success(),
        "ssh with the written known_hosts: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn changed_host_key_is_refused_even_with_accept_new() {
    let sshd = sshd!();
    let bad = sshd.bad_known_hosts();
    let before = std::fs::read_to_string(&bad).unwrap();
    let opts = SshOptions {
        known_hosts: Some(bad.clone()),
        accept_new_host_key: true,
        ..with_script(&sshd, "exec cat")
    };
    let err = builtin(&sshd, &opts).err().expect("changed key refused");
    assert!(matches!(err, Error::HostKey { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("127.0.0.1:{}: host key has CHANGED", sshd.port()))
            && msg.contains("attack")
            && msg.contains(&format!("{} line 1", bad.display()))
            && msg.contains(&fingerprint(&sshd)),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&bad).unwrap(), before);
}

#[test]
fn hashed_known_hosts_entry_is_accepted() {
    let sshd = sshd!();
    let hashed = sshd.path("hashed_known_hosts");
    std::fs::copy(sshd.known_hosts(), &hashed).unwrap();
    let st = Command::new("ssh-keygen")
        .arg("-q")
        .arg("-H")
        .arg("-f")
        .arg(&hashed)
        .output()
        .expect("ssh-keygen -H");
    assert!(st.status.success());
    assert!(std::fs::read_to_string(&hashed).unwrap().starts_with("|1|"));
    let opts = SshOptions {
        known_hosts: Some(hashed),
        ..with_script(&sshd, "exec cat")
    };
    let (back, _) = echo(builtin(&sshd, &opts).expect("connect"), b"hashed", false);
    assert_eq!(back, b"hashed");
}

#[test]
fn wrong_client_key_fails_auth() {
    let sshd = sshd!();
    let opts = SshOptions {
        identities: vec![sshd.wrong_key(), sshd.path("no_such_key")],
        ..with_script(&sshd, "exec cat")
    };
    let err = builtin(&sshd, &opts).err().expect("wrong key refused");
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "127.0.0.1:{}: authentication failed for user {} (tried: {}, {} (not found))",
            sshd.port(),
            sshd.user(),
            sshd.wrong_key().display(),
            sshd.path("no_such_key").display()
        )
    );
}

#[test]
fn ssh_config_names_host_port_and_key() {
    let sshd = sshd!();
    let config = sshd.path("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host other\n  Port 1\n\nHost test-alias\n  HostName 127.0.0.1\n  Port {}\n  IdentityFile {}\n",
            sshd.port(),
            sshd.client_key().display()
        ),
    )
    .unwrap();
    let opts = SshOptions {
        config: Some(config),
        identities: Vec::new(),
        ..with_script(&sshd, "exec cat")
    };
    let host = imgsync::transport::Host {
        user: None,
        host: "test-alias".into(),
        port: None,
    };
    let conn = ssh::connect_with(&host, &opts, &sshd.local_env()).expect("connect");
    let (back, _) = echo(conn, b"via config", false);
    assert_eq!(back, b"via config");
}

#[test]
fn missing_remote_command_exits_127() {
    let sshd = sshd!();
    let opts = SshOptions {
        remote_imgsync: Some("/nonexistent/imgsync".into()),
        ..sshd.options()
    };
    let conns = [
        ("built-in", builtin(&sshd, &opts).expect("connect")),
        (
            "external",
            external::connect(&sshd.ssh_command(), &sshd.host(), &opts).expect("connect"),
        ),
    ];
    for (which, conn) in conns {
        let (back, exit) = echo(conn, b"", which == "external");
        assert!(back.is_empty());
        assert_eq!(exit.status, Some(127), "{which}: {exit:?}");
        assert!(
            exit.stderr.contains("/nonexistent/imgsync"),
            "{which}: {exit:?}"
        );
    }
}

#[test]
fn remote_status_and_stderr_are_reported() {
    let sshd = sshd!();
    let opts = with_script(
        &sshd,
        "echo \"oops: $1\" >&2; head -c 100000 /dev/zero; exit 3",
    );
    let conns = [
        ("built-in", builtin(&sshd, &opts).expect("connect")),
        (
            "external",
            external::connect(&sshd.ssh_command(), &sshd.host(), &opts).expect("connect"),
        ),
    ];
    for (which, conn) in conns {
        // The caller reads nothing: wait drains what the remote still sends.
        let exit = conn.waiter.wait().expect("wait");
        assert_eq!(exit.status, Some(3), "{which}: {exit:?}");
        assert_eq!(exit.stderr, "oops: serve\n", "{which}");
    }
}

/// CPU seconds of this process and its reaped children so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime is field 14.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    f.get(11..15).map_or(0.0, |t| t.iter().sum::<f64>()) / 100.0
}

/// Pushes 1 GiB into `cat > /dev/null` with each cipher, then through
/// both transports as they are. Figures go to stdout.
#[test]
#[ignore = "benchmark: cargo test --release --test integration cipher_throughput -- --ignored --nocapture"]
fn cipher_throughput() {
    use std::time::Instant;
    const TOTAL: usize = 1 << 30;
    let sshd = sshd!();
    let chunk = random_bytes(MIB as usize, 7, false);
    let report = |what: &str, t: Instant, cpu: f64| {
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{what:40} {:6.0} MB/s  {:.2} client CPU-s/GiB",
            TOTAL as f64 / secs / 1e6,
            cpu_seconds() - cpu
        );
    };
    for cipher in [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
        "aes256-ctr",
    ] {
        let tcp = std::net::TcpStream::connect(("127.0.0.1", sshd.port())).unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut s = ssh2::Session::new().unwrap();
        s.set_tcp_stream(tcp);
        s.method_pref(ssh2::MethodType::CryptCs, cipher).unwrap();
        s.method_pref(ssh2::MethodType::CryptSc, cipher).unwrap();
        let macs = "hmac-sha2-256-etm@openssh.com";
        s.method_pref(ssh2::MethodType::MacCs, macs).unwrap();
        s.method_pref(ssh2::MethodType::MacSc, macs).unwrap();
        s.handshake().unwrap();
        s.userauth_pubkey_file(sshd.user(), None, &sshd.client_key(), None)
            .unwrap();
        let mut ch = s.channel_session().unwrap();
        ch.exec("cat > /dev/null").unwrap();
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let mut w = ch.stream(0);
        for _ in 0..TOTAL / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
        ch.send_eof().unwrap();
        ch.wait_eof().unwrap();
        ch.wait_close().unwrap();
        let mac = s
            .methods(ssh2::MethodType::MacCs)
            .unwrap_or("?")
            .to_string();
        report(&format!("libssh2 {cipher} ({mac})"), t, cpu);
    }
    let opts = with_script(&sshd, "exec cat > /dev/null");
    for which in ["built-in transport", "-e ssh -c aes128-gcm transport"] {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let conn = if which.starts_with("built-in") {
            builtin(&sshd, &opts).unwrap()
        } else {
            let rsh = format!("{} -c aes128-gcm@openssh.com", sshd.ssh_command());
            external::connect(&rsh, &sshd.host(), &opts).unwrap()
        };
        let Connection {
            mut writer, waiter, ..
        } = conn;
        for _ in 0..TOTAL / chunk.len() {
            writer.write_all(&chunk).unwrap();
        }
        drop(writer);
        assert_eq!(waiter.wait().unwrap().status, Some(0));
        report(which, t, cpu);
    }
}

/// Writes `text` to `path`, making its directory.
fn write(path: &std::path::Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn user_config_then_system_config_and_global_known_hosts() {
    let sshd = sshd!();
    let etc = sshd.path("etc");
    // The user's file names the host; the system's the port and key (the
    // user's HostName came first and wins); the host key is only in the
    // global known hosts file.
    write(
        &sshd.home().join(".ssh/config"),
        "Host alias\n  HostName 127.0.0.1\n",
    );
    write(
        &etc.join("ssh_config"),
        &format!(
            "Host *\n  HostName wrong.invalid\n  Port {}\n  IdentityFile {}\n",
            sshd.port(),
            sshd.client_key().display()
        ),
    );
    write(&etc.join("ssh_known_hosts"), &sshd.known_hosts_line());
    let empty = sshd.path("empty_known_hosts");
    write(&empty, "");
    let opts = SshOptions {
        config: None,
        identities: Vec::new(),
        known_hosts: Some(empty),
        ..with_script(&sshd, "exec cat")
    };
    let env = ssh::LocalEnv {
        etc: Some(etc),
        ..sshd.local_env()
    };
    let host = imgsync::transport::Host {
        user: None,
        host: "alias".into(),
        port: None,
    };
    let conn = ssh::connect_with(&host, &opts, &env).expect("connect through both files");
    let (back, _) = echo(conn, b"both files", false);
    assert_eq!(back, b"both files");

    // --ssh-config FILE is read instead of both, as `ssh -F`: no port, no
    // key from the system file now.
    let opts = SshOptions {
        config: Some(sshd.home().join(".ssh/config")),
        connect_timeout: Some(std::time::Duration::from_secs(5)),
        ..opts
    };
    assert!(ssh::connect_with(&host, &opts, &env).is_err());
}

#[test]
fn strict_host_key_checking_no_is_refused() {
    let sshd = sshd!();
    let config = sshd.path("no_check_config");
    write(&config, "Host *\n  StrictHostKeyChecking no\n");
    let empty = sshd.path("empty_known_hosts");
    write(&empty, "");
    let opts = SshOptions {
        config: Some(config.clone()),
        known_hosts: Some(empty.clone()),
        ..with_script(&sshd, "exec cat")
    };
    let err = builtin(&sshd, &opts).err().expect("refused");
    assert!(matches!(err, Error::HostKey { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "127.0.0.1:{}: {} line 2: StrictHostKeyChecking no is refused: imgsync always checks host keys (use accept-new, or --accept-new-host-key, to add unknown ones)",
            sshd.port(),
            config.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&empty).unwrap(), "");
    // The command line comes first, as in OpenSSH: --accept-new-host-key
    // checks (and adds) the key.
    let opts = SshOptions {
        accept_new_host_key: true,
        ..opts
    };
    let (back, _) = echo(builtin(&sshd, &opts).expect("accept-new"), b"x", false);
    assert_eq!(back, b"x");
    assert_eq!(
        std::fs::read_to_string(&empty).unwrap(),
        sshd.known_hosts_line()
    );
}

#[test]
fn accept_new_and_a_hashed_user_known_hosts_file_from_the_config() {
    let sshd = sshd!();
    let hashed = sshd.path("hashed_known_hosts");
    std::fs::copy(sshd.known_hosts(), &hashed).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&hashed)
        .output()
        .expect("ssh-keygen -H");
    assert!(st.status.success());
    assert!(std::fs::read_to_string(&hashed).unwrap().starts_with("|1|"));
    let config = sshd.path("kh_config");
    write(
        &config,
        &format!(
            "Host *\n  UserKnownHostsFile {} {}\n  StrictHostKeyChecking yes\n",
            sshd.path("missing_known_hosts").display(),
            hashed.display()
        ),
    );
    let opts = SshOptions {
        config: Some(config),
        known_hosts: None,
        ..with_script(&sshd, "exec cat")
    };
    let (back, _) = echo(builtin(&sshd, &opts).expect("hashed entry"), b"h", false);
    assert_eq!(back, b"h");

    // accept-new from the config adds an unknown key to the first file.
    let fresh = sshd.path("fresh/known_hosts");
    let config = sshd.path("new_config");
    write(
        &config,
        &format!(
            "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking accept-new\n",
            fresh.display()
        ),
    );
    let opts = SshOptions {
        config: Some(config),
        ..opts
    };
    let (back, _) = echo(builtin(&sshd, &opts).expect("accept-new"), b"n", false);
    assert_eq!(back, b"n");
    assert_eq!(
        std::fs::read_to_string(&fresh).unwrap(),
        sshd.known_hosts_line()
    );
}
