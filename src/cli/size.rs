//! SIZE arguments: plain bytes or a suffix `k`, `M`, `G`, `T` (powers of
//! 1024; case-insensitive, an optional trailing `B`/`iB` accepted).

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some('p') => (&body[..body.len() - 1], 50),
        _ => (body, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (bytes, or a number with k, M, G, T)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// `--bwlimit RATE` in rsync's form: a number of KiB per second, or with
/// a suffix `k`, `M`, `G` (powers of 1024; `KB`, `MB`, `GB` are powers of
/// 1000, `KiB`... of 1024, `B` bytes), a fraction allowed (`1.5M`). 0 is
/// no limit; otherwise at least 512 bytes per second (rsync's floor).
/// Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("'{s}' is not a rate (KiB/s, or a number with k, M, G: 500k, 20M, 1G)");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num == "." {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let lower = unit.to_ascii_lowercase();
    let mult: f64 = match lower.as_str() {
        "" => 1024.0,
        "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        _ => return Err(bad()),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("rate '{s}' is too large"));
    }
    let bytes = bytes.round() as u64;
    if bytes != 0 && bytes < 512 {
        return Err(format!("rate '{s}' is below 512 bytes per second"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::{parse_rate, parse_size};

    #[test]
    fn rates_parse_as_rsync_does() {
        assert_eq!(parse_rate("100"), Ok(100 * 1024));
        assert_eq!(parse_rate("500k"), Ok(500 * 1024));
        assert_eq!(parse_rate("20M"), Ok(20 << 20));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("1.5m"), Ok(3 << 19));
        assert_eq!(parse_rate("1MB"), Ok(1_000_000));
        assert_eq!(parse_rate("2MiB"), Ok(2 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("4096b"), Ok(4096));
        assert!(parse_rate("100b").is_err());
        assert!(parse_rate("").is_err());
        assert!(parse_rate("M").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("1x").is_err());
        assert!(parse_rate("1e30G").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
