//! The few `~/.ssh/config` keys the built-in client honours: `Host`
//! blocks (patterns with `*`, `?` and `!negation`, several per line),
//! `HostName`, `User`, `Port`, `IdentityFile` and `Include`. The first
//! value obtained for a key wins, as in OpenSSH (`IdentityFile`s add up).
//! `Match` blocks are not understood: their lines are skipped, except under
//! `Match all`. Everything else is ignored; the `-e ssh` transport is the
//! way to get the whole of OpenSSH's configuration.

use std::path::{Path, PathBuf};

/// `Include`s nested deeper than this are an error (OpenSSH's limit).
const MAX_INCLUDE_DEPTH: usize = 16;

/// What the configuration says about one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub host_name: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// `IdentityFile` values as written: expand them with [`expand_path`]
    /// once user, host and port are known.
    pub identity_files: Vec<String>,
    /// `ConnectTimeout` (seconds).
    pub connect_timeout: Option<std::time::Duration>,
}

/// A configuration file that cannot be used: `<file> line <n>: <what>`.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {what}", file.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub what: String,
    #[source]
    pub source: Option<std::io::Error>,
}

/// Reads `path` (and what it includes) for `host`, the name as given on
/// the command line. `ssh_dir` is where relative `Include` names are
/// looked up (`~/.ssh`, as OpenSSH does for a user configuration).
pub fn load(path: &Path, host: &str, ssh_dir: &Path) -> Result<HostConfig, ConfigError> {
    let mut cfg = HostConfig::default();
    load_into(&mut cfg, path, host, ssh_dir, 0)?;
    Ok(cfg)
}

/// Parses configuration text for `host` (no `Include`s followed).
pub fn parse(text: &str, host: &str) -> Result<HostConfig, ConfigError> {
    let mut cfg = HostConfig::default();
    parse_into(&mut cfg, text, Path::new("config"), host, None, 0)?;
    Ok(cfg)
}

fn load_into(
    cfg: &mut HostConfig,
    path: &Path,
    host: &str,
    ssh_dir: &Path,
    depth: usize,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        what: "cannot read ssh config".into(),
        source: Some(e),
    })?;
    parse_into(cfg, &text, path, host, Some(ssh_dir), depth)
}

fn parse_into(
    cfg: &mut HostConfig,
    text: &str,
    file: &Path,
    host: &str,
    ssh_dir: Option<&Path>,
    depth: usize,
) -> Result<(), ConfigError> {
    let err = |line: usize, what: String| ConfigError {
        file: file.to_path_buf(),
        line: Some(line),
        what,
        source: None,
    };
    // Lines before the first Host/Match apply to every host.
    let mut active = true;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let (keyword, rest) = split_keyword(raw);
        if keyword.is_empty() || keyword.starts_with('#') {
            continue;
        }
        let args = split_args(rest).map_err(|what| err(lineno, what))?;
        let keyword = keyword.to_ascii_lowercase();
        match keyword.as_str() {
            "host" => {
                if args.is_empty() {
                    return Err(err(lineno, "Host without a pattern".into()));
                }
                active = host_matches(&args, host);
                continue;
            }
            "match" => {
                active = args.len() == 1 && args[0].eq_ignore_ascii_case("all");
                continue;
            }
            _ => {}
        }
        if !active {
            continue;
        }
        let first = args.first().cloned();
        match keyword.as_str() {
            "hostname" => {
                if let (None, Some(v)) = (&cfg.host_name, first) {
                    cfg.host_name = Some(v.replace("%h", host));
                }
            }
            "user" => {
                if let (None, Some(v)) = (&cfg.user, first) {
                    cfg.user = Some(v);
                }
            }
            "port" => {
                let v = first.ok_or_else(|| err(lineno, "Port without a value".into()))?;
                let port = v
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| err(lineno, format!("bad port {v:?}")))?;
                cfg.port.get_or_insert(port);
            }
            "connecttimeout" => {
                let v =
                    first.ok_or_else(|| err(lineno, "ConnectTimeout without a value".into()))?;
                let secs = v
                    .parse::<u64>()
                    .ok()
                    .ok_or_else(|| err(lineno, format!("bad ConnectTimeout {v:?}")))?;
                // OpenSSH: the first value wins; 0 or "none" means no limit
                // beyond the system's.
                if cfg.connect_timeout.is_none() && secs > 0 {
                    cfg.connect_timeout = Some(std::time::Duration::from_secs(secs));
                }
            }
            "identityfile" => {
                if let Some(v) = first {
                    if !v.eq_ignore_ascii_case("none") && !cfg.identity_files.contains(&v) {
                        cfg.identity_files.push(v);
                    }
                }
            }
            "include" => {
                let Some(ssh_dir) = ssh_dir else { continue };
                if depth >= MAX_INCLUDE_DEPTH {
                    return Err(err(lineno, "Include nested too deeply".into()));
                }
                for pattern in &args {
                    let pattern = expand_tilde(pattern, ssh_dir.parent());
                    let pattern = if Path::new(&pattern).is_absolute() {
                        PathBuf::from(pattern)
                    } else {
                        ssh_dir.join(pattern)
                    };
                    for path in glob_files(&pattern) {
                        load_into(cfg, &path, host, ssh_dir, depth + 1)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Splits a line into its keyword and the rest (`Key value`, `Key=value`,
/// `Key = value`).
fn split_keyword(line: &str) -> (&str, &str) {
    let line = line.trim_start();
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (keyword, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    (keyword, rest)
}

/// Splits arguments at whitespace, honouring double and single quotes; an
/// unquoted `#` at the start of a word ends the line.
fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return Ok(out),
            _ => {}
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            if c == '"' || c == '\'' {
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some(x) => word.push(x),
                        None => return Err("unterminated quote".into()),
                    }
                }
            } else {
                word.push(c);
            }
        }
        out.push(word);
    }
}

/// OpenSSH's `Host` rule: a negated pattern that matches rules the block
/// out; otherwise any positive pattern must match. Case-insensitive.
pub fn host_matches(patterns: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let mut matched = false;
    for p in patterns {
        let p = p.to_ascii_lowercase();
        if let Some(neg) = p.strip_prefix('!') {
            if wildcard_match(neg.as_bytes(), host.as_bytes()) {
                return false;
            }
        } else if wildcard_match(p.as_bytes(), host.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// `*` (any run) and `?` (one byte) matching, iterative with one
/// backtrack point, so it is linear-ish and never recurses.
pub fn wildcard_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, i));
                p += 1;
            }
            Some(&c) if c == b'?' || c == s[i] => {
                p += 1;
                i += 1;
            }
            _ => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Files matching `pattern` (wildcards only in the last component), sorted;
/// a plain name that does not exist yields nothing, as in OpenSSH.
fn glob_files(pattern: &Path) -> Vec<PathBuf> {
    let Some(name) = pattern.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return if pattern.is_file() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let dir = pattern.parent().unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| wildcard_match(name.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// `~` or `~/…` → the home directory (`~user` is left alone).
pub fn expand_tilde(s: &str, home: Option<&Path>) -> String {
    match home {
        Some(home) if s == "~" => home.display().to_string(),
        Some(home) if s.starts_with("~/") => format!("{}{}", home.display(), &s[1..]),
        _ => s.to_string(),
    }
}

/// Values for `%` tokens in `IdentityFile`.
pub struct Tokens<'a> {
    /// `%d`, and `~`.
    pub home: Option<&'a Path>,
    /// `%u`: the local user.
    pub local_user: &'a str,
    /// `%h`: the host name connected to.
    pub host: &'a str,
    /// `%r`: the remote user.
    pub user: &'a str,
    /// `%p`.
    pub port: u16,
}

/// Expands `~` and the `%d %u %h %r %p %%` tokens of a path (unknown tokens
/// are kept as written).
pub fn expand_path(s: &str, t: &Tokens<'_>) -> PathBuf {
    let s = expand_tilde(s, t.home);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('d') => match t.home {
                Some(h) => out.push_str(&h.display().to_string()),
                None => out.push_str("%d"),
            },
            Some('u') => out.push_str(t.local_user),
            Some('h') => out.push_str(t.host),
            Some('r') => out.push_str(t.user),
            Some('p') => out.push_str(&t.port.to_string()),
            Some(x) => {
                out.push('%');
                out.push(x);
            }
            None => out.push('%'),
        }
    }
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# global
IdentityFile ~/.ssh/global_key

Host web-? !web-9
    HostName %h.example.com
    User deploy
    Port 2222

Host web-*
    User other
    IdentityFile ~/.ssh/web_key

Host=db db.example.com
    HostName = 10.0.0.5
    Port=2200   # trailing comment
    IdentityFile \"~/keys/with space\"

Match host x
    User matched

Host *
    User fallback
    Port 22
";

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*", b""));
        assert!(wildcard_match(b"*", b"abc"));
        assert!(wildcard_match(b"a*c", b"abbbc"));
        assert!(wildcard_match(b"a?c", b"abc"));
        assert!(!wildcard_match(b"a?c", b"ac"));
        assert!(wildcard_match(b"*.example.com", b"x.example.com"));
        assert!(!wildcard_match(b"*.example.com", b"example.com"));
        assert!(wildcard_match(b"*a*b", b"xxaxxab"));
        assert!(!wildcard_match(b"abc", b"abcd"));
    }

    #[test]
    fn negation_rules_a_host_out() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(host_matches(&p(&["web-?", "!web-9"]), "web-1"));
        assert!(!host_matches(&p(&["web-?", "!web-9"]), "web-9"));
        // A negation alone matches nothing.
        assert!(!host_matches(&p(&["!web-9"]), "web-1"));
        assert!(host_matches(&p(&["DB", "x"]), "db"));
    }

    #[test]
    fn first_value_wins() {
        let c = parse(SAMPLE, "web-1").unwrap();
        assert_eq!(c.host_name.as_deref(), Some("web-1.example.com"));
        assert_eq!(c.user.as_deref(), Some("deploy"));
        assert_eq!(c.port, Some(2222));
        assert_eq!(c.identity_files, ["~/.ssh/global_key", "~/.ssh/web_key"]);
    }

    #[test]
    fn negated_host_falls_through() {
        let c = parse(SAMPLE, "web-9").unwrap();
        assert_eq!(c.host_name, None);
        assert_eq!(c.user.as_deref(), Some("other"));
        assert_eq!(c.port, Some(22));
    }

    #[test]
    fn equals_signs_quotes_and_comments() {
        let c = parse(SAMPLE, "db.example.com").unwrap();
        assert_eq!(c.host_name.as_deref(), Some("10.0.0.5"));
        assert_eq!(c.port, Some(2200));
        assert_eq!(c.user.as_deref(), Some("fallback"));
        assert_eq!(c.identity_files[1], "~/keys/with space");
    }

    #[test]
    fn match_blocks_are_skipped() {
        let c = parse(SAMPLE, "x").unwrap();
        assert_eq!(c.user.as_deref(), Some("fallback"));
        let c = parse("Match all\nUser u\n", "x").unwrap();
        assert_eq!(c.user.as_deref(), Some("u"));
    }

    #[test]
    fn bad_port_is_an_error() {
        let e = parse("Host *\n  Port http\n", "x").unwrap_err();
        assert_eq!(e.to_string(), "config line 2: bad port \"http\"");
        assert!(parse("Port 0\n", "x").is_err());
        assert!(parse("Port 65536\n", "x").is_err());
        assert!(parse("User \"unterminated\n", "x").is_err());
    }

    #[test]
    fn tilde_and_tokens() {
        let home = Path::new("/home/me");
        let t = Tokens {
            home: Some(home),
            local_user: "me",
            host: "h.example",
            user: "root",
            port: 2222,
        };
        assert_eq!(
            expand_path("~/.ssh/id_%r@%h:%p", &t),
            Path::new("/home/me/.ssh/id_root@h.example:2222")
        );
        assert_eq!(expand_path("%d/k%%%u%x", &t), Path::new("/home/me/k%me%x"));
        assert_eq!(expand_path("~", &t), Path::new("/home/me"));
        assert_eq!(expand_path("~other/k", &t), Path::new("~other/k"));
        assert_eq!(expand_tilde("~/x", None), "~/x");
    }

    #[test]
    fn include_follows_globs_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join(".ssh");
        std::fs::create_dir_all(ssh.join("config.d")).unwrap();
        std::fs::write(ssh.join("config.d/b.conf"), "User from-b\nPort 2\n").unwrap();
        std::fs::write(ssh.join("config.d/a.conf"), "Host h\n  Port 1\n").unwrap();
        std::fs::write(
            ssh.join("config"),
            "Include config.d/*.conf missing.conf\nHost *\n  User late\n",
        )
        .unwrap();
        let c = load(&ssh.join("config"), "h", &ssh).unwrap();
        assert_eq!(c.port, Some(1));
        assert_eq!(c.user.as_deref(), Some("from-b"));
        // An Include that includes itself stops at the depth limit.
        std::fs::write(ssh.join("loop"), "Include loop\n").unwrap();
        assert!(load(&ssh.join("loop"), "h", &ssh).is_err());
    }
}
