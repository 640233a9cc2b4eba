//! Sizes in messages: human and exact, `553 MiB (579608843 bytes)`.

use std::fmt;

/// A size the way qemu-img prints it: `1 GiB`, `324 KiB`, `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // Three significant digits, trailing zeros dropped.
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[unit])
}

/// A size for a message: `553 MiB (579608843 bytes)`, or `512 bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 1024 {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{} ({} bytes)", human_size(self.0), self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu_img() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(331776), "324 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn sizes_in_messages_are_human_and_exact() {
        assert_eq!(Bytes(579608843).to_string(), "553 MiB (579608843 bytes)");
        assert_eq!(Bytes(512).to_string(), "512 bytes");
    }
}
