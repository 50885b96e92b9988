//! Durations in flags and environment variables, one format for every flag of both binaries:
//! plain seconds (`30`, `0.2`) or a human form (`30s`, `500ms`, `5m`, `1h 30m`, `7d`).

use std::time::Duration;

/// Parses `text` and checks it lies in `min..=max`.
pub fn parse(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let t = text.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::try_from_secs_f64(secs)
            .map_err(|e| format!("`{t}` is not a duration: {e}"))?,
        Ok(_) => return Err(format!("`{t}` is not a duration: negative or not finite")),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("`{t}` is not a duration (seconds, or e.g. 30s, 5m, 1h): {e}"))?,
    };
    if d < min || d > max {
        return Err(format!(
            "`{t}` is out of range ({} .. {})",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_human_forms_mean_the_same() {
        let (min, max) = (Duration::ZERO, Duration::from_secs(365 * 86400));
        for (a, b) in [
            ("30", "30s"),
            ("0.2", "200ms"),
            ("600", "10m"),
            ("604800", "7d"),
            ("5400", "1h 30m"),
        ] {
            assert_eq!(parse(a, min, max), parse(b, min, max), "{a} vs {b}");
        }
        assert_eq!(parse("90", min, max), Ok(Duration::from_secs(90)));
        assert!(parse("-1", min, max).unwrap_err().contains("negative"));
        assert!(parse("soon", min, max).unwrap_err().contains("e.g. 30s"));
        assert!(parse("2y", min, Duration::from_secs(86400))
            .unwrap_err()
            .contains("out of range"));
    }
}
