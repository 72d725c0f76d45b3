//! Sizes as users write them: `512M`, `2G`, `256MiB`, `1048576K`; a bare number is MiB.

/// Parses a size into bytes.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("'{text}' is not a size (try 512M or 2G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{text}': unknown unit '{unit}' (use K, M, G or T)")),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units() {
        assert_eq!(parse("512M"), Ok(512 << 20));
        assert_eq!(parse("2G"), Ok(2 << 30));
        assert_eq!(parse("256MiB"), Ok(256 << 20));
        assert_eq!(parse("1024k"), Ok(1 << 20));
        assert_eq!(parse("128"), Ok(128 << 20));
    }

    #[test]
    fn bad_input_is_explained() {
        assert!(parse("lots").unwrap_err().contains("not a size"));
        assert!(parse("5X").unwrap_err().contains("unknown unit"));
        assert!(parse("99999999999T").unwrap_err().contains("too large"));
    }
}
