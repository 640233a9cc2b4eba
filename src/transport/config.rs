//! OpenSSH's client configuration as the built-in client reads it: the
//! user's file (`~/.ssh/config`, or `--ssh-config FILE`, which like `ssh
//! -F` replaces both files) and then `/etc/ssh/ssh_config`; the first value
//! obtained for a keyword wins (`IdentityFile`s and `CertificateFile`s add
//! up); `Host` blocks (patterns with `*`, `?` and `!negation`, several per
//! line), `Match` blocks (`all`, `host`, `originalhost`, `user`,
//! `localuser`, negated or not) and `Include` (globs; relative names under
//! `~/.ssh` for the user's file, `/etc/ssh` for the system's), as
//! readconf.c does.
//!
//! Every keyword is sorted into one of three kinds ([`kind_of`]):
//! honoured by the built-in client; inert (it has no effect on what
//! imgsync does: forwardings, X11, `SendEnv`, log levels...); or one that
//! changes routing or security and that the built-in client cannot do
//! (`ProxyJump`, `ProxyCommand`, `HostKeyAlias`, `CertificateFile`,
//! `ControlPath`, algorithm lists, `Match exec`, a keyword this table does
//! not know...): [`HostConfig::hand_over`] names the first such setting,
//! and the caller then uses OpenSSH's `ssh` for that host. Nothing is
//! silently ignored that could change where a connection goes or what it
//! trusts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `Include`s nested deeper than this are an error (OpenSSH's limit).
const MAX_INCLUDE_DEPTH: usize = 16;

/// OpenSSH's cap on identity files.
const MAX_IDENTITY_FILES: usize = 100;

/// Where a setting was read: `FILE line N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}", self.file.display(), self.line)
    }
}

/// One keyword's first value (its arguments as written) and where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub args: Vec<String>,
    pub at: Origin,
    /// The line's place among all lines read (for "the first one").
    pub seq: usize,
}

impl Setting {
    fn first(&self) -> &str {
        self.args.first().map(String::as_str).unwrap_or("")
    }
}

/// `StrictHostKeyChecking`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strict {
    /// `yes` (and `ask`: the built-in client asks nothing, so an unknown
    /// key is refused as with `yes`).
    Yes,
    /// `accept-new`: an unknown key is added, a changed one refused.
    AcceptNew,
    /// `no`/`off`: never done by imgsync (refused with a message).
    No,
}

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
    /// The first value of every other keyword met (lower-case names).
    pub settings: BTreeMap<String, Setting>,
    /// Every `CertificateFile`.
    pub certificate_files: Vec<Setting>,
    /// A `Match` criterion that cannot be evaluated here (`exec`,
    /// `canonical`, `final`, `localnetwork`, `tagged`, ...) and that
    /// decided whether a block applies.
    pub undecidable: Option<Setting>,
    /// Lines taken so far (orders [`Setting::seq`]).
    pub lines: usize,
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

/// Who connects where, for `Match` and the `%` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The host as given on the command line (`Host` patterns and `Match
    /// originalhost` match it).
    pub host: &'a str,
    /// The user given on the command line (`user@host`), if any.
    pub user: Option<&'a str>,
    /// The local user.
    pub local_user: &'a str,
}

/// One configuration file and how relative `Include`s in it resolve.
#[derive(Clone, Debug)]
pub struct File {
    pub path: PathBuf,
    /// `~/.ssh` for the user's file, `/etc/ssh` for the system's.
    pub include_dir: PathBuf,
    /// `~`, for `Include ~/...`.
    pub home: Option<PathBuf>,
    /// A file named on the command line must exist (`ssh -F`); the
    /// default ones are read when they do.
    pub required: bool,
}

/// Reads `files` in order (a missing file is skipped) for `target`.
pub fn load_files(files: &[File], target: &Target<'_>) -> Result<HostConfig, ConfigError> {
    let mut cfg = HostConfig::default();
    for f in files {
        if !f.required && !f.path.exists() {
            continue;
        }
        load_into(&mut cfg, &f.path, target, f, 0)?;
    }
    Ok(cfg)
}

/// Reads `path` (and what it includes) for `host`, the name as given on
/// the command line. `ssh_dir` is where relative `Include` names are
/// looked up (`~/.ssh`, as OpenSSH does for a user configuration).
pub fn load(path: &Path, host: &str, ssh_dir: &Path) -> Result<HostConfig, ConfigError> {
    let file = File {
        path: path.to_path_buf(),
        include_dir: ssh_dir.to_path_buf(),
        home: ssh_dir.parent().map(Path::to_path_buf),
        required: true,
    };
    let target = Target {
        host,
        user: None,
        local_user: "",
    };
    let mut cfg = HostConfig::default();
    load_into(&mut cfg, path, &target, &file, 0)?;
    Ok(cfg)
}

/// Parses configuration text for `host` (no `Include`s followed).
pub fn parse(text: &str, host: &str) -> Result<HostConfig, ConfigError> {
    parse_for(
        text,
        &Target {
            host,
            user: None,
            local_user: "me",
        },
    )
}

/// Parses configuration text for `target` (no `Include`s followed).
pub fn parse_for(text: &str, target: &Target<'_>) -> Result<HostConfig, ConfigError> {
    let mut cfg = HostConfig::default();
    let mut active = true;
    parse_into(
        &mut cfg,
        text,
        Path::new("config"),
        target,
        None,
        0,
        &mut active,
    )?;
    Ok(cfg)
}

fn load_into(
    cfg: &mut HostConfig,
    path: &Path,
    target: &Target<'_>,
    file: &File,
    depth: usize,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        what: "cannot read ssh config".into(),
        source: Some(e),
    })?;
    // Each file read at the top starts active (readconf.c); an included
    // one continues in the including block's state, which is put back
    // after it.
    let mut active = true;
    parse_into(cfg, &text, path, target, Some(file), depth, &mut active)
}

fn parse_into(
    cfg: &mut HostConfig,
    text: &str,
    path: &Path,
    target: &Target<'_>,
    file: Option<&File>,
    depth: usize,
    active: &mut bool,
) -> Result<(), ConfigError> {
    let err = |line: usize, what: String| ConfigError {
        file: path.to_path_buf(),
        line: Some(line),
        what,
        source: None,
    };
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let at = || Origin {
            file: path.to_path_buf(),
            line: lineno,
        };
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
                *active = host_matches(&args, target.host);
                continue;
            }
            "match" => {
                *active = match_line(cfg, &args, target, at()).map_err(|w| err(lineno, w))?;
                continue;
            }
            _ => {}
        }
        if !*active {
            continue;
        }
        if keyword == "include" {
            let Some(file) = file else { continue };
            if depth >= MAX_INCLUDE_DEPTH {
                return Err(err(lineno, "Include nested too deeply".into()));
            }
            for pattern in &args {
                let pattern = expand_tilde(pattern, file.home.as_deref());
                let pattern = if Path::new(&pattern).is_absolute() {
                    PathBuf::from(pattern)
                } else {
                    file.include_dir.join(pattern)
                };
                for p in glob_files(&pattern) {
                    let text = std::fs::read_to_string(&p).map_err(|e| ConfigError {
                        file: p.clone(),
                        line: None,
                        what: "cannot read ssh config".into(),
                        source: Some(e),
                    })?;
                    let saved = *active;
                    parse_into(cfg, &text, &p, target, Some(file), depth + 1, active)?;
                    *active = saved;
                }
            }
            continue;
        }
        take(cfg, &keyword, args, target, at()).map_err(|w| err(lineno, w))?;
    }
    Ok(())
}

/// Records one active line: the first value of a keyword wins.
fn take(
    cfg: &mut HostConfig,
    keyword: &str,
    args: Vec<String>,
    target: &Target<'_>,
    at: Origin,
) -> Result<(), String> {
    let first = args.first().cloned();
    let missing = || format!("{keyword} without a value");
    cfg.lines += 1;
    let seq = cfg.lines;
    match keyword {
        "hostname" => {
            let v = first.ok_or_else(missing)?;
            if cfg.host_name.is_none() {
                cfg.host_name = Some(expand_host_name(&v, target.host));
            }
        }
        "user" => {
            let v = first.ok_or_else(missing)?;
            cfg.user.get_or_insert(v);
        }
        "port" => {
            let v = first.ok_or_else(missing)?;
            let port = v
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("bad port {v:?}"))?;
            cfg.port.get_or_insert(port);
        }
        "connecttimeout" => {
            let v = first.ok_or_else(missing)?;
            let secs = if v.eq_ignore_ascii_case("none") {
                0
            } else {
                parse_time(&v).ok_or_else(|| format!("bad ConnectTimeout {v:?}"))?
            };
            // OpenSSH: the first value wins; 0 or "none" means no limit
            // beyond the system's.
            if !cfg.settings.contains_key(keyword) && secs > 0 {
                cfg.connect_timeout = Some(std::time::Duration::from_secs(secs));
            }
            cfg.settings
                .entry(keyword.to_string())
                .or_insert(Setting { args, at, seq });
        }
        "identityfile" | "identityfile2" => {
            let v = first.ok_or_else(missing)?;
            if !cfg.identity_files.contains(&v) && cfg.identity_files.len() < MAX_IDENTITY_FILES {
                cfg.identity_files.push(v);
            }
        }
        "certificatefile" => {
            if first.is_none() {
                return Err(missing());
            }
            cfg.certificate_files.push(Setting { args, at, seq });
        }
        "serveraliveinterval" => {
            let v = first.ok_or_else(missing)?;
            parse_time(&v).ok_or_else(|| format!("bad ServerAliveInterval {v:?}"))?;
            cfg.settings
                .entry(keyword.to_string())
                .or_insert(Setting { args, at, seq });
        }
        "serveralivecountmax" => {
            let v = first.ok_or_else(missing)?;
            v.parse::<u32>()
                .map_err(|_| format!("bad ServerAliveCountMax {v:?}"))?;
            cfg.settings
                .entry(keyword.to_string())
                .or_insert(Setting { args, at, seq });
        }
        "stricthostkeychecking" => {
            let v = first.ok_or_else(missing)?;
            strict_of(&v).ok_or_else(|| format!("bad StrictHostKeyChecking {v:?}"))?;
            cfg.settings
                .entry(keyword.to_string())
                .or_insert(Setting { args, at, seq });
        }
        _ => {
            // Aliases OpenSSH keeps, under one name.
            let keyword = match keyword {
                "challengeresponseauthentication" => "kbdinteractiveauthentication",
                "pubkeyacceptedkeytypes" => "pubkeyacceptedalgorithms",
                "userknownhostsfile2" => "userknownhostsfile",
                "globalknownhostsfile2" => "globalknownhostsfile",
                k => k,
            };
            cfg.settings
                .entry(keyword.to_string())
                .or_insert(Setting { args, at, seq });
        }
    }
    Ok(())
}

/// `HostName`'s only tokens: `%h` (the host as given) and `%%`.
fn expand_host_name(v: &str, host: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('%') => out.push('%'),
            Some(x) => {
                out.push('%');
                out.push(x);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A time as OpenSSH writes it: seconds, or with units (`1m30s`, `2h`).
fn parse_time(v: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 604_800,
            _ => return None,
        };
        let n: u64 = num.parse().ok()?;
        total = total.checked_add(n.checked_mul(mult)?)?;
        num.clear();
    }
    if !num.is_empty() {
        total = total.checked_add(num.parse().ok()?)?;
    } else if v.is_empty() {
        return None;
    }
    Some(total)
}

fn strict_of(v: &str) -> Option<Strict> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "ask" => Some(Strict::Yes),
        "accept-new" => Some(Strict::AcceptNew),
        "no" | "off" | "false" => Some(Strict::No),
        _ => None,
    }
}

/// Evaluates a `Match` line (readconf.c `match_cfg_line`): criteria are
/// and-ed left to right, each may be negated with `!`; once the result is
/// false the rest is not evaluated (as OpenSSH skips `exec` then). A
/// criterion this client cannot evaluate while the result still stands
/// is recorded in `cfg.undecidable` and the block is treated as not
/// applying (the caller hands the host over to OpenSSH anyway).
fn match_line(
    cfg: &mut HostConfig,
    args: &[String],
    target: &Target<'_>,
    at: Origin,
) -> Result<bool, String> {
    if args.is_empty() {
        return Err("Match without a criterion".into());
    }
    cfg.lines += 1;
    let seq = cfg.lines;
    let mut result = true;
    let mut i = 0;
    while i < args.len() {
        let word = &args[i];
        i += 1;
        let (negate, word) = match word.strip_prefix('!') {
            Some(w) => (true, w),
            None => (false, word.as_str()),
        };
        // `host=pattern` is OpenSSH 9.x's other spelling.
        let (crit, inline) = match word.split_once('=') {
            Some((c, v)) => (c.to_ascii_lowercase(), Some(v.to_string())),
            None => (word.to_ascii_lowercase(), None),
        };
        if crit == "all" {
            continue;
        }
        if crit == "canonical" || crit == "final" {
            if result {
                cfg.undecidable.get_or_insert(Setting {
                    args: vec![crit.clone()],
                    at: at.clone(),
                    seq,
                });
                result = false;
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let v = args
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format!("Match {crit} without an argument"))?;
                i += 1;
                v
            }
        };
        if !result {
            continue;
        }
        let patterns: Vec<String> = value.split(',').map(str::to_string).collect();
        let hit = match crit.as_str() {
            "host" => {
                let name = cfg.host_name.as_deref().unwrap_or(target.host);
                host_matches(&patterns, name)
            }
            "originalhost" => host_matches(&patterns, target.host),
            "user" => {
                let user = target
                    .user
                    .or(cfg.user.as_deref())
                    .unwrap_or(target.local_user);
                list_matches(&patterns, user)
            }
            "localuser" => list_matches(&patterns, target.local_user),
            _ => {
                cfg.undecidable.get_or_insert(Setting {
                    args: vec![crit.clone(), value.clone()],
                    at: at.clone(),
                    seq,
                });
                result = false;
                continue;
            }
        };
        if hit == negate {
            result = false;
        }
    }
    Ok(result)
}

/// A user pattern list (case-sensitive, as user names are).
fn list_matches(patterns: &[String], s: &str) -> bool {
    let mut matched = false;
    for p in patterns {
        if let Some(neg) = p.strip_prefix('!') {
            if wildcard_match(neg.as_bytes(), s.as_bytes()) {
                return false;
            }
        } else if wildcard_match(p.as_bytes(), s.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// What the built-in client does with a keyword.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read and acted on (see the README's table).
    Honoured,
    /// Without effect on what imgsync does (forwardings, X11, terminal,
    /// environment, logging, authentication methods libssh2 lacks, which
    /// can only make a login fail).
    Inert,
    /// Changes routing or security in a way the built-in client cannot
    /// do: the host goes to OpenSSH, unless the value is the one that
    /// asks for nothing (`ProxyJump none`, `ControlMaster no`...).
    HandOver,
}

/// Keywords the built-in client acts on.
const HONOURED: &[&str] = &[
    "host",
    "match",
    "include",
    "hostname",
    "user",
    "port",
    "identityfile",
    "identityfile2",
    "identitiesonly",
    "userknownhostsfile",
    "globalknownhostsfile",
    "stricthostkeychecking",
    "connecttimeout",
    "serveraliveinterval",
    "serveralivecountmax",
    "batchmode",
    "pubkeyauthentication",
    "passwordauthentication",
    "kbdinteractiveauthentication",
    "preferredauthentications",
    "addressfamily",
    "ignoreunknown",
];

/// Keywords without effect on an imgsync connection.
const INERT: &[&str] = &[
    "addkeystoagent",
    "canonicaldomains",
    "canonicalizefallbacklocal",
    "canonicalizemaxdots",
    "canonicalizepermittedcnames",
    "channeltimeout",
    "clearallforwardings",
    "compression",
    "compressionlevel",
    "connectionattempts",
    "controlpersist",
    "dynamicforward",
    "enableescapecommandline",
    "enablesshkeysign",
    "escapechar",
    "exitonforwardfailure",
    "fingerprinthash",
    "forkafterauthentication",
    "forwardagent",
    "forwardx11",
    "forwardx11timeout",
    "forwardx11trusted",
    "gatewayports",
    "gssapiauthentication",
    "gssapiclientidentity",
    "gssapidelegatecredentials",
    "gssapikeyexchange",
    "gssapikexalgorithms",
    "gssapirenewalforcesrekey",
    "gssapiserveridentity",
    "gssapitrustdns",
    "hashknownhosts",
    "hostbasedacceptedalgorithms",
    "hostbasedauthentication",
    "hostbasedkeytypes",
    "ipqos",
    "kbdinteractivedevices",
    "localcommand",
    "localforward",
    "loglevel",
    "logverbose",
    "nohostauthenticationforlocalhost",
    "numberofpasswordprompts",
    "obscurekeystroketiming",
    "permitlocalcommand",
    "permitremoteopen",
    "protocol",
    "proxyusefdpass",
    "rekeylimit",
    "remotecommand",
    "remoteforward",
    "requesttty",
    "sendenv",
    "sessiontype",
    "setenv",
    "stdinnull",
    "streamlocalbindmask",
    "streamlocalbindunlink",
    "syslogfacility",
    "tag",
    "tcpkeepalive",
    "tunnel",
    "tunneldevice",
    "updatehostkeys",
    "useprivilegedport",
    "visualhostkey",
    "warnweakcrypto",
    "xauthlocation",
];

/// Keywords that change routing or security, which the built-in client
/// cannot do; their "do nothing" values are in [`harmless_value`].
const HAND_OVER: &[&str] = &[
    "proxyjump",
    "proxycommand",
    "hostkeyalias",
    "certificatefile",
    "controlmaster",
    "controlpath",
    "bindaddress",
    "bindinterface",
    "canonicalizehostname",
    "checkhostip",
    "verifyhostkeydns",
    "ciphers",
    "macs",
    "kexalgorithms",
    "hostkeyalgorithms",
    "pubkeyacceptedalgorithms",
    "casignaturealgorithms",
    "requiredrsasize",
    "revokedhostkeys",
    "knownhostscommand",
    "pkcs11provider",
    "securitykeyprovider",
    "smartcarddevice",
    "identityagent",
    "refuseconnection",
];

/// How the built-in client treats `keyword` (lower-case). A keyword in
/// none of the tables (a newer OpenSSH's, a typo) is handed over: OpenSSH
/// then applies or refuses it.
pub fn kind_of(keyword: &str) -> Kind {
    if HONOURED.contains(&keyword) {
        Kind::Honoured
    } else if INERT.contains(&keyword) {
        Kind::Inert
    } else {
        Kind::HandOver
    }
}

/// Values of hand-over keywords that ask for nothing the built-in client
/// does not already do.
fn harmless_value(keyword: &str, v: &str) -> bool {
    let v = v.to_ascii_lowercase();
    match keyword {
        "proxyjump" | "proxycommand" | "controlpath" | "hostkeyalias" | "revokedhostkeys"
        | "knownhostscommand" | "pkcs11provider" | "smartcarddevice" | "bindaddress"
        | "bindinterface" => v == "none",
        "controlmaster" | "checkhostip" | "verifyhostkeydns" | "refuseconnection" => {
            v == "no" || v == "false"
        }
        "canonicalizehostname" => v == "no" || v == "false" || v == "none",
        "identityagent" => v == "none" || v == "ssh_auth_sock" || v == "$ssh_auth_sock",
        "securitykeyprovider" => v == "internal",
        _ => false,
    }
}

/// A setting the built-in client cannot honour and that changes routing
/// or security: the keyword as OpenSSH spells it, its value and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandOver {
    pub keyword: String,
    pub value: String,
    pub at: Origin,
}

impl std::fmt::Display for HandOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({})",
            spelling(&self.keyword),
            self.value,
            self.at
        )
    }
}

/// OpenSSH's spelling of a keyword, for messages.
pub fn spelling(keyword: &str) -> String {
    const NAMES: &[&str] = &[
        "ProxyJump",
        "ProxyCommand",
        "HostKeyAlias",
        "CertificateFile",
        "ControlMaster",
        "ControlPath",
        "BindAddress",
        "BindInterface",
        "CanonicalizeHostname",
        "CheckHostIP",
        "VerifyHostKeyDNS",
        "Ciphers",
        "MACs",
        "KexAlgorithms",
        "HostKeyAlgorithms",
        "PubkeyAcceptedAlgorithms",
        "CASignatureAlgorithms",
        "RequiredRSASize",
        "RevokedHostKeys",
        "KnownHostsCommand",
        "PKCS11Provider",
        "SecurityKeyProvider",
        "SmartcardDevice",
        "IdentityAgent",
        "RefuseConnection",
        "StrictHostKeyChecking",
        "Match",
    ];
    NAMES
        .iter()
        .find(|n| n.eq_ignore_ascii_case(keyword))
        .map(|n| n.to_string())
        .unwrap_or_else(|| keyword.to_string())
}

impl HostConfig {
    fn get(&self, keyword: &str) -> Option<&Setting> {
        self.settings.get(keyword)
    }

    /// The first setting (in file order) that the built-in client cannot
    /// honour and that changes routing or security, if any.
    pub fn hand_over(&self) -> Option<HandOver> {
        let ignored = self
            .get("ignoreunknown")
            .map(|s| s.args.join(","))
            .unwrap_or_default();
        let ignored: Vec<String> = ignored.split(',').map(str::to_string).collect();
        let mut found: Vec<(usize, HandOver)> = Vec::new();
        for (k, s) in &self.settings {
            if kind_of(k) != Kind::HandOver || harmless_value(k, s.first()) {
                continue;
            }
            let known = HAND_OVER.contains(&k.as_str());
            if !known && host_matches(&ignored, k) {
                continue;
            }
            found.push((
                s.seq,
                HandOver {
                    keyword: k.clone(),
                    value: s.args.join(" "),
                    at: s.at.clone(),
                },
            ));
        }
        for s in &self.certificate_files {
            found.push((
                s.seq,
                HandOver {
                    keyword: "certificatefile".into(),
                    value: s.args.join(" "),
                    at: s.at.clone(),
                },
            ));
        }
        if let Some(s) = &self.undecidable {
            found.push((
                s.seq,
                HandOver {
                    keyword: "Match".into(),
                    value: s.args.join(" "),
                    at: s.at.clone(),
                },
            ));
        }
        // The earliest in the files as read.
        found
            .into_iter()
            .min_by_key(|(seq, _)| *seq)
            .map(|(_, h)| h)
    }

    /// `StrictHostKeyChecking` and where it was set.
    pub fn strict(&self) -> Option<(Strict, &Origin)> {
        let s = self.get("stricthostkeychecking")?;
        Some((strict_of(s.first())?, &s.at))
    }

    /// A yes/no keyword (`yes`/`true` or `no`/`false`).
    pub fn flag(&self, keyword: &str) -> Option<bool> {
        match self.get(keyword)?.first().to_ascii_lowercase().as_str() {
            "yes" | "true" => Some(true),
            "no" | "false" => Some(false),
            // `PubkeyAuthentication unbound|host-bound` are yes.
            "unbound" | "host-bound" => Some(true),
            _ => None,
        }
    }

    /// `UserKnownHostsFile` or `GlobalKnownHostsFile` values as written
    /// (several files on one line), `None` when not set.
    pub fn files(&self, keyword: &str) -> Option<Vec<String>> {
        let s = self.get(keyword)?;
        Some(
            s.args
                .iter()
                .filter(|a| !a.eq_ignore_ascii_case("none"))
                .cloned()
                .collect(),
        )
    }

    /// `ServerAliveInterval` × `ServerAliveCountMax` (3 by default): how
    /// long the server may stay silent; `None` when not set or 0.
    pub fn server_alive(&self) -> Option<(std::time::Duration, u32)> {
        let interval = parse_time(self.get("serveraliveinterval")?.first())?;
        if interval == 0 {
            return None;
        }
        let count = self
            .get("serveralivecountmax")
            .and_then(|s| s.first().parse::<u32>().ok())
            .unwrap_or(3);
        Some((std::time::Duration::from_secs(interval), count))
    }

    /// `PreferredAuthentications`, lower-case, when set.
    pub fn preferred_authentications(&self) -> Option<Vec<String>> {
        let s = self.get("preferredauthentications")?;
        Some(
            s.args
                .join(",")
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_ascii_lowercase)
                .collect(),
        )
    }

    /// `AddressFamily`: `Some(true)` IPv4 only, `Some(false)` IPv6 only.
    pub fn ipv4_only(&self) -> Option<bool> {
        match self
            .get("addressfamily")?
            .first()
            .to_ascii_lowercase()
            .as_str()
        {
            "inet" => Some(true),
            "inet6" => Some(false),
            _ => None,
        }
    }

    /// `IdentityAgent none`: the agent is not asked.
    pub fn agent_disabled(&self) -> bool {
        self.get("identityagent")
            .is_some_and(|s| s.first().eq_ignore_ascii_case("none"))
    }
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

/// Values for `%` tokens in `IdentityFile` and `UserKnownHostsFile`.
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

/// Expands `~`, `${VAR}` and the `%d %u %h %r %p %%` tokens of a path
/// (unknown tokens are kept as written).
pub fn expand_path(s: &str, t: &Tokens<'_>) -> PathBuf {
    let s = expand_tilde(s, t.home);
    let s = expand_env(&s);
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
            Some('h') | Some('k') | Some('n') => out.push_str(t.host),
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

/// `${VAR}` → the environment variable (left as written when unset).
fn expand_env(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                match std::env::var(name) {
                    Ok(v) => out.push_str(&v),
                    Err(_) => out.push_str(&rest[at..at + 3 + end]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[at..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
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
    fn match_host_user_and_negation() {
        let c = parse(SAMPLE, "x").unwrap();
        assert_eq!(c.user.as_deref(), Some("matched"));
        let c = parse("Match all\nUser u\n", "x").unwrap();
        assert_eq!(c.user.as_deref(), Some("u"));
        // `host` sees HostName's value, `originalhost` the name given.
        let text = "Host a\n HostName real.example\nMatch host real.*\n Port 2\nMatch originalhost real.*\n Port 3\nMatch originalhost a !user root\n User x\n";
        let c = parse(text, "a").unwrap();
        assert_eq!((c.port, c.user.as_deref()), (Some(2), Some("x")));
        let t = Target {
            host: "a",
            user: Some("root"),
            local_user: "me",
        };
        let c = parse_for(text, &t).unwrap();
        assert_eq!(c.user, None, "!user root rules the block out");
        let c = parse_for("Match localuser me,other host=a\n Port 7\n", &t).unwrap();
        assert_eq!(c.port, Some(7));
        assert!(c.hand_over().is_none());
    }

    #[test]
    fn match_exec_hands_over_only_where_it_decides() {
        let c = parse("Match host other exec \"false\"\n User u\n", "x").unwrap();
        assert_eq!(c.hand_over(), None, "exec is never reached for x");
        let c = parse(
            "\n\nMatch host x exec \"test -f /tmp/flag\"\n User u\n",
            "x",
        )
        .unwrap();
        let h = c.hand_over().expect("exec decides for x");
        assert_eq!(h.keyword, "Match");
        assert_eq!(h.at.line, 3);
        assert_eq!(c.user, None);
        assert!(parse("Match final\n", "x").unwrap().hand_over().is_some());
    }

    #[test]
    fn routing_and_security_keywords_hand_over() {
        let c = parse(
            "Host gw\n ProxyJump none\nHost *\n Compression yes\n ForwardAgent yes\n SendEnv LANG\n GSSAPIAuthentication yes\n HashKnownHosts yes\n ProxyJump gw\n",
            "x",
        )
        .unwrap();
        let h = c.hand_over().expect("ProxyJump");
        assert_eq!(h.to_string(), "ProxyJump gw (config line 9)");
        // The first value wins: `none` earlier asks for nothing.
        assert!(
            parse("Host gw\n ProxyJump none\nHost *\n ProxyJump gw\n", "gw")
                .unwrap()
                .hand_over()
                .is_none()
        );
        for line in [
            "ProxyCommand nc %h %p",
            "HostKeyAlias other",
            "CertificateFile ~/.ssh/id-cert.pub",
            "ControlMaster auto",
            "ControlPath ~/.ssh/cm-%C",
            "Ciphers aes128-ctr",
            "CheckHostIP yes",
            "IdentityAgent /run/agent.sock",
            "NoSuchKeyword 1",
        ] {
            let c = parse(&format!("Host *\n {line}\n"), "x").unwrap();
            assert!(c.hand_over().is_some(), "{line}");
        }
        for line in [
            "ControlMaster no",
            "ControlPath none",
            "CanonicalizeHostname no",
            "IdentityAgent none",
            "Tag x",
        ] {
            let c = parse(&format!("Host *\n {line}\n"), "x").unwrap();
            assert!(c.hand_over().is_none(), "{line}");
        }
        let c = parse(
            "IgnoreUnknown UseKeychain,Foo*\nUseKeychain yes\nFooBar 1\n",
            "x",
        )
        .unwrap();
        assert!(c.hand_over().is_none());
    }

    #[test]
    fn honoured_values() {
        let c = parse(
            "Host x\n StrictHostKeyChecking accept-new\n UserKnownHostsFile ~/a \"/b c\"\n GlobalKnownHostsFile none\n ServerAliveInterval 1m\n IdentitiesOnly yes\n ConnectTimeout 5\nHost *\n StrictHostKeyChecking no\n ServerAliveCountMax 2\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.strict().map(|s| s.0), Some(Strict::AcceptNew));
        assert_eq!(
            c.files("userknownhostsfile").unwrap(),
            ["~/a".to_string(), "/b c".to_string()]
        );
        assert!(c.files("globalknownhostsfile").unwrap().is_empty());
        assert_eq!(
            c.server_alive(),
            Some((std::time::Duration::from_secs(60), 2))
        );
        assert_eq!(c.flag("identitiesonly"), Some(true));
        assert_eq!(c.connect_timeout, Some(std::time::Duration::from_secs(5)));
        let c = parse("StrictHostKeyChecking off\n", "x").unwrap();
        assert_eq!(c.strict().map(|s| s.0), Some(Strict::No));
        assert!(parse("StrictHostKeyChecking maybe\n", "x").is_err());
        assert_eq!(parse_time("1m30s"), Some(90));
        assert_eq!(parse_time("x"), None);
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
        assert_eq!(
            expand_path("${IMGSYNC_SURELY_UNSET_VAR}/k", &t),
            Path::new("${IMGSYNC_SURELY_UNSET_VAR}/k")
        );
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

    #[test]
    fn user_file_then_system_file_and_include_state() {
        let dir = tempfile::tempdir().unwrap();
        let (ssh, etc) = (dir.path().join(".ssh"), dir.path().join("etc"));
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::create_dir_all(etc.join("ssh_config.d")).unwrap();
        // An Include inside a Host block applies only to that host; the
        // block state after it is the including file's again.
        std::fs::write(ssh.join("inc"), "Port 5\nHost *\nUser inc\n").unwrap();
        std::fs::write(
            ssh.join("config"),
            "Host other\n Include inc\n HostName o\nHost h\n Include inc\n HostName from-user\n",
        )
        .unwrap();
        std::fs::write(etc.join("ssh_config.d/z.conf"), "ProxyJump gw\n").unwrap();
        std::fs::write(
            etc.join("ssh_config"),
            "Include ssh_config.d/*.conf\nHost *\n HostName from-system\n Port 22\n User sys\n",
        )
        .unwrap();
        let files = [
            File {
                path: ssh.join("config"),
                include_dir: ssh.clone(),
                home: Some(dir.path().to_path_buf()),
                required: false,
            },
            File {
                path: etc.join("ssh_config"),
                include_dir: etc.clone(),
                home: Some(dir.path().to_path_buf()),
                required: false,
            },
        ];
        let t = Target {
            host: "h",
            user: None,
            local_user: "me",
        };
        let c = load_files(&files, &t).unwrap();
        assert_eq!(c.host_name.as_deref(), Some("from-user"));
        assert_eq!(c.port, Some(5));
        assert_eq!(c.user.as_deref(), Some("inc"));
        let h = c.hand_over().expect("the system file's ProxyJump");
        assert_eq!(h.at.file, etc.join("ssh_config.d/z.conf"));
        // A file named on the command line must exist, as with `ssh -F`.
        let named = [File {
            path: dir.path().join("missing"),
            required: true,
            ..files[0].clone()
        }];
        assert!(load_files(&named, &t).is_err());
        let t = Target { host: "q", ..t };
        let c = load_files(&files, &t).unwrap();
        assert_eq!(
            (c.host_name.as_deref(), c.port, c.user.as_deref()),
            (Some("from-system"), Some(22), Some("sys"))
        );
    }
}
