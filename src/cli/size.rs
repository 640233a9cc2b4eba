//! SIZE arguments: plain bytes or a suffix `k`, `M`, `G`, `T`, `P` (powers
//! of 1024; case-insensitive, an optional trailing `B`/`iB` accepted), with
//! a decimal fraction when it makes whole bytes (`1.5M`, as qemu-img takes
//! it).

/// What every size error says after the value.
const HOW: &str = "(use bytes or k, M, G, T: 4k, 1.5M)";

pub fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size '{s}' {HOW}");
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (number, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some('p') => (&body[..body.len() - 1], 50),
        _ => (body, 0),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || fraction.len() > 18 {
        return Err(invalid());
    }
    let too_large = || format!("size '{s}' is too large");
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = fraction.parse().map_err(|_| invalid())?;
    // (whole + fraction / scale) << shift, exactly.
    let scaled = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(fraction))
        .and_then(|n| n.checked_mul(1u128 << shift))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("size '{s}' is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
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
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size(".5k").is_err());
        assert!(parse_size("1.k").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("+1").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(
            parse_size("1.1"),
            Err("size '1.1' is not a whole number of bytes".into())
        );
        assert_eq!(
            parse_size("4x"),
            Err("invalid size '4x' (use bytes or k, M, G, T: 4k, 1.5M)".into())
        );
    }
}
