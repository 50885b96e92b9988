//! Stable, collision-resistant ipset names within the kernel's 31-character limit.
//!
//! `dog` + `g`/`z` + family digit + `-` + the object name sanitised to `[a-z0-9-]` and cut to
//! 16 characters + `-` + the first 8 hex digits of sha256("<kind>/<name>"). The readable part
//! helps people; the hash part keeps two long names with a common prefix apart. The compiler
//! still checks for collisions and reports them rather than emit an ambiguous set.

use dog_protocol::ruleset::{sha256_hex, Family, SET_NAME_MAX, SET_PREFIX};

/// What a set holds the addresses of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetSource {
    Group,
    Zone,
}

impl SetSource {
    fn letter(self) -> char {
        match self {
            SetSource::Group => 'g',
            SetSource::Zone => 'z',
        }
    }
    fn kind(self) -> &'static str {
        match self {
            SetSource::Group => "group",
            SetSource::Zone => "zone",
        }
    }
}

/// Length of the readable part taken from the object name.
const READABLE_MAX: usize = 16;

pub fn set_name(source: SetSource, name: &str, family: Family) -> String {
    let readable: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(READABLE_MAX)
        .collect();
    let digest = sha256_hex(format!("{}/{}", source.kind(), name).as_bytes());
    let out = format!(
        "{SET_PREFIX}{}{}-{}-{}",
        source.letter(),
        family.digit(),
        readable,
        &digest[..8]
    );
    debug_assert!(out.len() <= SET_NAME_MAX);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_short_and_distinct() {
        let a = set_name(SetSource::Zone, "office", Family::V4);
        assert!(a.starts_with("dogz4-office-"), "{a}");
        assert_eq!(a, set_name(SetSource::Zone, "office", Family::V4));
        assert_ne!(a, set_name(SetSource::Group, "office", Family::V4));
        assert_ne!(a, set_name(SetSource::Zone, "office", Family::V6));
        let long1 = set_name(
            SetSource::Group,
            "a-very-long-group-name.example.one",
            Family::V6,
        );
        let long2 = set_name(
            SetSource::Group,
            "a-very-long-group-name.example.two",
            Family::V6,
        );
        assert_eq!(long1.len(), SET_NAME_MAX);
        assert_ne!(long1, long2);
        assert!(long1
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }
}
