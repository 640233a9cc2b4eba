//! The `-e/--rsh CMD` transport: runs `CMD [-l USER] [-p PORT] HOST
//! '<remote-imgsync> serve'` and talks over the child's stdin and stdout.
//! `CMD` is split into words as rsync does; the child's stderr is
//! collected (not shown live) and handed back by [`Waiter::wait`].

use std::io::{self, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::watch::{FdReader, FdWriter, Watch};
use super::{Connection, Error, Exit, Host, SshOptions, Waiter};
use std::path::Path;
use std::time::{Duration, Instant};

/// How much of the child's stderr is kept for the report.
pub const STDERR_CAP: usize = 8 * 1024;

/// Writes go to the child in chunks this large (pipes take 64 KiB at a time).
const WRITE_BUFFER: usize = 256 * 1024;

/// Starts `rsh` for `host` running `opts.remote_command()`.
pub fn connect(rsh: &str, host: &Host, opts: &SshOptions) -> Result<Connection, Error> {
    let words = split_words(rsh).map_err(|what| Error::Connect {
        host: host.to_string(),
        what: format!("bad --rsh command {rsh:?}: {what}"),
        source: None,
    })?;
    connect_words(words, host, opts)
}

/// Starts the program and arguments `words` for `host` running
/// `opts.remote_command()`.
pub fn connect_words(
    words: Vec<String>,
    host: &Host,
    opts: &SshOptions,
) -> Result<Connection, Error> {
    let name = host.to_string();
    let Some((program, args)) = words.split_first() else {
        return Err(Error::Connect {
            host: name,
            what: "empty --rsh command".into(),
            source: None,
        });
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(user) = &host.user {
        cmd.arg("-l").arg(user);
    }
    if let Some(port) = host.port {
        cmd.arg("-p").arg(port.to_string());
    }
    if let Some(t) = opts.connect_timeout {
        // OpenSSH's option; other programs are left to their own.
        if Path::new(program).file_name().is_some_and(|n| n == "ssh") {
            cmd.arg("-o")
                .arg(format!("ConnectTimeout={}", t.as_secs().max(1)));
        }
    }
    cmd.arg(&host.host).arg(opts.remote_command());
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::Connect {
        host: name.clone(),
        what: format!("cannot run {program}"),
        source: Some(e),
    })?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        // Cannot happen: all three were asked for as pipes.
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Connect {
            host: name,
            what: format!("{program}: no pipes to the child"),
            source: None,
        });
    };
    let stderr = std::thread::Builder::new()
        .name("imgsync-rsh-stderr".into())
        .spawn(move || read_capped(stderr, STDERR_CAP))
        .map_err(|e| Error::Connect {
            host: name.clone(),
            what: "cannot start a thread".into(),
            source: Some(e),
        })?;
    let io_err = |e: io::Error| Error::Connect {
        host: name.clone(),
        what: "cannot set up the pipes to the --rsh command".into(),
        source: Some(e),
    };
    let stdin = FdWriter::new(stdin, opts.watch.clone())
        .and_then(|w| w.hearing(&stdout))
        .map_err(io_err)?;
    let stdout = FdReader::new(stdout, opts.watch.clone()).map_err(io_err)?;
    let stdin = Arc::new(Mutex::new(Some(stdin)));
    let stdout = Arc::new(Mutex::new(Some(stdout)));
    Ok(Connection {
        reader: Box::new(SharedStdout(stdout.clone())),
        writer: Box::new(BufWriter::with_capacity(
            WRITE_BUFFER,
            SharedStdin(stdin.clone()),
        )),
        waiter: Box::new(ChildWaiter {
            name,
            program: program.clone(),
            child,
            stdin,
            stdout,
            stderr,
            watch: opts.watch.clone(),
        }),
    })
}

/// Splits a command into words like rsync does for `-e`: at blanks, with
/// `'single'` quotes taken literally and `"double"` quotes in which a
/// backslash escapes `"`, `\`, `$` and `` ` ``; outside quotes a backslash
/// escapes any character.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    out.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => w.push(x),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('"' | '\\' | '$' | '`')) => w.push(x),
                            Some(x) => {
                                w.push('\\');
                                w.push(x);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(x) => w.push(x),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(x) => word.get_or_insert_with(String::new).push(x),
                None => return Err("trailing backslash".into()),
            },
            _ => word.get_or_insert_with(String::new).push(c),
        }
    }
    out.extend(word);
    Ok(out)
}

/// Reads `r` to its end, keeping the first `cap` bytes (lossy UTF-8).
pub(crate) fn read_capped(mut r: impl Read, cap: usize) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The child's stdout, shared with the waiter so it can drain it.
struct SharedStdout(Arc<Mutex<Option<FdReader<ChildStdout>>>>);

impl Read for SharedStdout {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match lock(&self.0).as_mut() {
            Some(out) => out.read(buf),
            None => Ok(0),
        }
    }
}

/// The child's stdin, shared with the waiter so it can close it.
struct SharedStdin(Arc<Mutex<Option<FdWriter<ChildStdin>>>>);

impl Write for SharedStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match lock(&self.0).as_mut() {
            Some(inp) => inp.write(buf),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match lock(&self.0).as_mut() {
            Some(inp) => inp.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for SharedStdin {
    /// Closing the writer closes the pipe: EOF to the remote.
    fn drop(&mut self) {
        drop(lock(&self.0).take());
    }
}

struct ChildWaiter {
    name: String,
    /// The program's name as the user gave it (`ssh`).
    program: String,
    child: Child,
    stdin: Arc<Mutex<Option<FdWriter<ChildStdin>>>>,
    stdout: Arc<Mutex<Option<FdReader<ChildStdout>>>>,
    stderr: JoinHandle<String>,
    watch: Watch,
}

impl Waiter for ChildWaiter {
    fn wait(mut self: Box<Self>) -> Result<Exit, Error> {
        // EOF to the remote, then whatever it still sends is dropped so it
        // cannot block on a full pipe (the drain has the connection's
        // --timeout, and Ctrl-C ends it).
        drop(lock(&self.stdin).take());
        if let Some(out) = lock(&self.stdout).take() {
            let _ = io::copy(&mut { out }, &mut io::sink());
        }
        // The program ends once its streams are closed; one that does not
        // (a hung ssh on a dead link) is given the timeout, then killed.
        let limit = self.watch.timeout().unwrap_or(super::DEFAULT_TIMEOUT);
        let started = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if started.elapsed() < limit && !self.watch.cancelled() => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(Error::Other {
                        host: self.name.clone(),
                        what:
                            "the --rsh command did not end after its streams were closed; killed it"
                                .into(),
                    });
                }
                Err(e) => {
                    return Err(Error::Connect {
                        host: self.name.clone(),
                        what: "cannot wait for the --rsh command".into(),
                        source: Some(e),
                    })
                }
            }
        };
        let stderr = self.stderr.join().unwrap_or_default();
        Ok(Exit {
            status: status.code(),
            stderr,
            // OpenSSH's own failures exit 255 (ssh(1), EXIT STATUS); the
            // remote imgsync never exits 255.
            transport_failed: (status.code() == Some(255)).then(|| self.program.clone()),
        })
    }

    fn abort(mut self: Box<Self>) {
        drop(lock(&self.stdin).take());
        drop(lock(&self.stdout).take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::super::shell_quote;
    use super::*;

    fn w(s: &str) -> Vec<String> {
        split_words(s).unwrap()
    }

    #[test]
    fn words_split_at_blanks() {
        assert_eq!(w("ssh"), ["ssh"]);
        assert_eq!(w("  ssh   -p 2222\t-x "), ["ssh", "-p", "2222", "-x"]);
        assert!(w("").is_empty());
        assert!(w("   ").is_empty());
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(
            w(r#"ssh -o 'ProxyCommand nc %h %p' -i "my key""#),
            ["ssh", "-o", "ProxyCommand nc %h %p", "-i", "my key"]
        );
        assert_eq!(w(r#"a"b c"d e''f"#), ["ab cd", "ef"]);
        assert_eq!(w(r"a\ b \'c"), ["a b", "'c"]);
        assert_eq!(w(r#""a\"b\\c\n""#), [r#"a"b\c\n"#]);
        assert_eq!(w("'' \"\""), ["", ""]);
        assert_eq!(w(r"'a\b'"), [r"a\b"]);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        assert!(split_words("ssh 'x").is_err());
        assert!(split_words("ssh \"x").is_err());
        assert!(split_words("ssh x\\").is_err());
    }

    #[test]
    fn shell_quote_round_trips() {
        for s in [
            "imgsync",
            "/usr/local/bin/imgsync",
            "",
            "a b",
            "it's",
            "$(rm -rf /)",
            "a\"b\\c",
            "*?[x]",
            "tab\there",
        ] {
            let q = shell_quote(s);
            assert_eq!(split_words(&q).unwrap(), [s], "{q}");
            // And a real shell reads it back the same.
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {q}"))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s, "{q}");
        }
        assert_eq!(shell_quote("plain-name_1.2"), "plain-name_1.2");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn remote_command_is_quoted() {
        let opts = SshOptions {
            remote_imgsync: Some("/opt/my tools/imgsync".into()),
            ..Default::default()
        };
        assert_eq!(opts.remote_command(), "'/opt/my tools/imgsync' serve");
        assert_eq!(SshOptions::default().remote_command(), "imgsync serve");
    }

    #[test]
    fn stderr_is_capped() {
        let data = vec![b'x'; 3 * STDERR_CAP];
        assert_eq!(read_capped(&data[..], STDERR_CAP).len(), STDERR_CAP);
    }

    #[test]
    fn missing_program_names_it() {
        let host = Host {
            user: None,
            host: "h".into(),
            port: None,
        };
        let e = connect("/nonexistent/ssh -x", &host, &SshOptions::default())
            .err()
            .unwrap();
        assert!(matches!(e, Error::Connect { .. }));
        assert_eq!(e.to_string(), "h: cannot run /nonexistent/ssh");
    }
}
