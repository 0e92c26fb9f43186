//! Counts and durations as the text output writes them: `1 key`, `2 keys`; `3.2 y`, `90 d`, `1 h 5 m`.
//!
//! The one decision: **only the text forms go through here**; JSON keeps plain numbers (counts, and
//! durations in milliseconds), so tools never parse words.

/// `n` and the noun, singular for 1: `count(1, "key")` is `1 key`, `count(2, "key")` is `2 keys` (a noun
/// whose plural is not `+s` goes through [`count_of`]).
pub(crate) fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `n` and `singular` or `plural`.
pub(crate) fn count_of(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// A duration in milliseconds in readable units, the two largest that matter: `350 ms`, `4.2 s`, `5 m 3 s`,
/// `1 h 5 m`, `90 d`, `2 d 4 h`, `3.2 y` (a year is 365 days).
pub(crate) fn duration_ms(ms: u64) -> String {
    const S: u64 = 1000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;
    const Y: u64 = 365 * D;
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        let (a, b) = (ms / big, (ms % big) / small);
        if b == 0 {
            format!("{a} {big_unit}")
        } else {
            format!("{a} {big_unit} {b} {small_unit}")
        }
    };
    match ms {
        0..S => format!("{ms} ms"),
        S..M if ms.is_multiple_of(S) => format!("{} s", ms / S),
        S..M => format!("{:.1} s", ms as f64 / S as f64),
        M..H => two(M, "m", S, "s"),
        H..D => two(H, "h", M, "m"),
        D..Y => two(D, "d", H, "h"),
        _ => format!("{:.1} y", ms as f64 / Y as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_singular_for_one_only() {
        assert_eq!(count(0, "key"), "0 keys");
        assert_eq!(count(1, "key"), "1 key");
        assert_eq!(count(2, "dead letter"), "2 dead letters");
        assert_eq!(count_of(1, "entry", "entries"), "1 entry");
        assert_eq!(count_of(3, "entry", "entries"), "3 entries");
    }

    #[test]
    fn durations_read_in_their_two_largest_units() {
        assert_eq!(duration_ms(350), "350 ms");
        assert_eq!(duration_ms(4_000), "4 s");
        assert_eq!(duration_ms(4_200), "4.2 s");
        assert_eq!(duration_ms(303_000), "5 m 3 s");
        assert_eq!(duration_ms(3_900_000), "1 h 5 m");
        assert_eq!(duration_ms(3_600_000), "1 h");
        assert_eq!(duration_ms(90 * 86_400_000), "90 d");
        assert_eq!(duration_ms(2 * 86_400_000 + 4 * 3_600_000), "2 d 4 h");
        assert_eq!(duration_ms(100_915_200_000), "3.2 y");
    }
}
