//! Locations on the command line (CLI.md): a local path, `[user@]host:path`
//! (a `:` before any `/` marks a host), `ssh://[user@]host[:port]/path`, or
//! `-` (a protocol stream on stdin/stdout).

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::session::Host;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    Remote { host: Host, path: String },
    Stdio,
}

impl Location {
    pub fn parse(arg: &OsStr) -> Result<Location> {
        let Some(s) = arg.to_str() else {
            return Ok(Location::Local(PathBuf::from(arg)));
        };
        if s == "-" {
            return Ok(Location::Stdio);
        }
        if let Some(rest) = s.strip_prefix("ssh://") {
            let (auth, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => bail!("{s}: an ssh:// location needs a path (ssh://host/path)"),
            };
            let (user, hostport) = split_user(auth);
            let (host, port) = split_port(hostport, s)?;
            return remote(s, user, host, port, path);
        }
        // scp style: a ':' before any '/' marks a host.
        if let Some(colon) = s.find(':') {
            let slash = s.find('/').unwrap_or(usize::MAX);
            // `[v6addr]:path` holds ':' inside the brackets.
            let colon = if s.starts_with('[') {
                match s.find("]:") {
                    Some(i) => i + 1,
                    None => colon,
                }
            } else {
                colon
            };
            if colon < slash {
                let (auth, path) = (&s[..colon], &s[colon + 1..]);
                let (user, host) = split_user(auth);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                return remote(s, user, host, None, path);
            }
        }
        Ok(Location::Local(PathBuf::from(OsString::from(s))))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            // One spelling in every message: `host:path`, or
            // `ssh://host:port/path` with a port (session::location_name).
            Location::Remote { host, path } => {
                write!(f, "{}", crate::session::location_name(host, path))
            }
            Location::Stdio => write!(f, "-"),
        }
    }
}

fn split_user(auth: &str) -> (Option<&str>, &str) {
    match auth.rfind('@') {
        Some(i) => (Some(&auth[..i]), &auth[i + 1..]),
        None => (None, auth),
    }
}

fn split_port<'a>(hostport: &'a str, whole: &str) -> Result<(&'a str, Option<u16>)> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => bail!("{whole}: bad host"),
            },
            None => bail!("{whole}: unclosed '['"),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| anyhow::anyhow!("{whole}: bad port {p:?}"))?,
        ),
        None => None,
    };
    Ok((host, port))
}

fn remote(
    whole: &str,
    user: Option<&str>,
    host: &str,
    port: Option<u16>,
    path: &str,
) -> Result<Location> {
    if host.is_empty() {
        bail!("{whole}: no host name");
    }
    if user == Some("") {
        bail!("{whole}: empty user name");
    }
    if path.is_empty() {
        bail!("{whole}: no remote path after the host");
    }
    if host.starts_with('-') {
        bail!("{whole}: a host name cannot start with '-'");
    }
    Ok(Location::Remote {
        host: Host {
            user: user.map(str::to_string),
            host: host.to_string(),
            port,
        },
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Location {
        Location::parse(OsStr::new(s)).unwrap()
    }

    fn r(user: Option<&str>, host: &str, port: Option<u16>, path: &str) -> Location {
        Location::Remote {
            host: Host {
                user: user.map(str::to_string),
                host: host.to_string(),
                port,
            },
            path: path.to_string(),
        }
    }

    #[test]
    fn forms() {
        assert_eq!(p("-"), Location::Stdio);
        assert_eq!(p("/a/b.img"), Location::Local("/a/b.img".into()));
        assert_eq!(p("./a:b"), Location::Local("./a:b".into()));
        assert_eq!(p("dir/a:b"), Location::Local("dir/a:b".into()));
        assert_eq!(p("host:/x"), r(None, "host", None, "/x"));
        assert_eq!(p("me@host:x.img"), r(Some("me"), "host", None, "x.img"));
        assert_eq!(p("[::1]:/x"), r(None, "::1", None, "/x"));
        assert_eq!(p("ssh://host/x"), r(None, "host", None, "/x"));
        assert_eq!(
            p("ssh://me@host:2222/var/x"),
            r(Some("me"), "host", Some(2222), "/var/x")
        );
        assert_eq!(p("ssh://[::1]:22/x"), r(None, "::1", Some(22), "/x"));
    }

    #[test]
    fn bad_forms() {
        for s in [
            "host:",
            ":/x",
            "ssh://host",
            "ssh://host:0/x",
            "ssh://host:99999/x",
            "@host:/x",
            "-oProxyCommand=x:/y",
        ] {
            assert!(Location::parse(OsStr::new(s)).is_err(), "{s}");
        }
    }
}
