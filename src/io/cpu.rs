//! How busy this machine's CPUs are, from /proc/stat: the compression
//! level tuner raises zstd's level only while CPU time is left over.

/// Cumulative (idle, total) CPU ticks over all CPUs, or None when
/// /proc/stat cannot be read (not Linux, no /proc).
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle is
/// idle + iowait (time a CPU could have spent compressing).
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let idle = v[3] + v[4];
    Some((idle, v.iter().sum()))
}

/// The idle fraction between two readings of [`cpu_ticks`].
pub fn idle_between(a: (u64, u64), b: (u64, u64)) -> Option<f64> {
    let total = b.1.checked_sub(a.1)?;
    let idle = b.0.checked_sub(a.0)?;
    (total > 0).then(|| idle as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary_line() {
        assert_eq!(
            parse_cpu_line("cpu  100 5 50 800 20 1 2 3 0 0"),
            Some((820, 981))
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5"), None);
        assert_eq!(parse_cpu_line("cpu 1 2"), None);
        assert!(cpu_ticks().is_some_and(|(i, t)| i <= t));
        assert_eq!(idle_between((10, 100), (60, 200)), Some(0.5));
        assert_eq!(idle_between((10, 100), (10, 100)), None);
    }
}
