//! Sizes as people write them (`16GiB`, `512MiB`) and as they read them:
//! shared by the Master (an offer's memory, the `min_memory` SLA key) and
//! `slapctl`, so both read a size the same way.

/// A size: `16GiB`, `512MiB`, `2TiB`, `64G`, or a bare number of GiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let bad = || format!("{text:?} is not a size (e.g. 8GiB, 512MiB, or 8 for 8 GiB)");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "G" | "GiB" | "GB" => 30,
        "M" | "MiB" | "MB" => 20,
        "T" | "TiB" | "TB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A size for people: `16 GiB`, `512 MiB`.
pub fn format_size(bytes: u64) -> String {
    if bytes >= 1 << 40 && bytes.is_multiple_of(1 << 40) {
        format!("{} TiB", bytes >> 40)
    } else if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("8"), Ok(8 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in ["", "GiB", "-1", "8 parsecs", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(16 << 30), "16 GiB");
        assert_eq!(format_size(2 << 40), "2 TiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
    }
}
