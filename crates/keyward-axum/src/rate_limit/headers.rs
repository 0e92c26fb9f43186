//! The `RateLimit-Policy` and `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers (-09 to -11), and
//! `Retry-After`.
//!
//! Both fields are Structured Field Lists (RFC 9651, formerly 8941) of Strings naming a policy, with
//! Integer parameters:
//!
//! ```text
//! RateLimit-Policy: "per_second";q=10;w=1, "per_day";q=1000;w=86400
//! RateLimit: "per_second";r=9;t=1, "per_day";r=997;t=86400
//! ```
//!
//! - `q`: the class's `limit`; `w`: its `window` in seconds (rounded up, at least 1: the draft allows no
//!   sub-second windows).
//! - `r`: units remaining; `t`: seconds, rounded up, until the limit is fully replenished — except for a
//!   limit that refused this request, where it is the seconds until a retry can succeed (its
//!   `retry_after`): `r=0` holds exactly that long, and `Retry-After` is then never earlier than the end
//!   of a refusing limit's effective window, as the draft's §6 asks.
//! - One member per enforced limit, named after its class; shadow classes never appear. No `pk`
//!   (partition key) parameter: it would disclose the identity keyward counts by (an IP address, an API
//!   key) for no gain to the client.
//!
//! Values are serialized here by hand (a String with `\` and `"` escaped, Integers up to 15 digits); the
//! tests parse them back with the `sfv` crate.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use keyward::{Decision, RateLimiter};

/// `RateLimit-Policy`: the quota policies (`"name";q=…;w=…`), the same on every response of a layer.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// `RateLimit`: the current service limit of each policy (`"name";r=…;t=…`).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Largest Structured Field Integer (15 decimal digits).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Seconds in `d`, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Appends `s` as a Structured Field String: printable ASCII only, `\` and `"` escaped. Class names
/// (`[a-z][a-z0-9_]*`) never need either; other characters would be replaced by `?`.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

fn push_param(out: &mut String, key: &str, value: u64) {
    let _ = write!(out, ";{key}={}", value.min(SF_INTEGER_MAX));
}

/// The `RateLimit-Policy` value for `limiter`: one member per enforced class; `None` when every class is
/// in shadow mode (the field must not be empty).
pub(crate) fn policy_value(limiter: &RateLimiter) -> Option<HeaderValue> {
    let mut out = String::new();
    for (class, config) in limiter.configs().filter(|(_, c)| !c.is_shadow()) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        push_sf_string(&mut out, class);
        push_param(&mut out, "q", config.limit_value());
        push_param(&mut out, "w", ceil_secs(config.window_value()).max(1));
    }
    to_value(out)
}

/// The `RateLimit` value for `decision`: one member per enforced limit; `None` when there is none.
pub(crate) fn ratelimit_value(decision: &Decision) -> Option<HeaderValue> {
    let mut out = String::new();
    for limit in decision.limits().iter().filter(|l| !l.is_shadow()) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let t = if limit.is_allowed() {
            limit.reset_after()
        } else {
            limit.retry_after().unwrap_or(limit.reset_after())
        };
        push_sf_string(&mut out, limit.class());
        push_param(&mut out, "r", limit.remaining());
        push_param(&mut out, "t", ceil_secs(t));
    }
    to_value(out)
}

/// `Retry-After` in whole seconds: `retry_after` rounded up, at least 1 (a client told `0` would retry
/// at once and be refused again).
pub(crate) fn retry_after_secs(retry_after: Option<Duration>) -> u64 {
    retry_after.map_or(1, ceil_secs).max(1)
}

fn to_value(out: String) -> Option<HeaderValue> {
    if out.is_empty() {
        return None;
    }
    // Only printable ASCII was written.
    HeaderValue::from_str(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(12)), 12);
        assert_eq!(ceil_secs(Duration::from_millis(12_001)), 13);
        assert_eq!(retry_after_secs(None), 1);
        assert_eq!(retry_after_secs(Some(Duration::ZERO)), 1);
        assert_eq!(retry_after_secs(Some(Duration::from_micros(1))), 1);
        assert_eq!(retry_after_secs(Some(Duration::from_millis(19_999))), 20);
    }

    #[test]
    fn sf_strings_escape_and_parse_back() {
        for name in ["per_ip", "a\"b", "back\\slash", "sp ace", "é"] {
            let mut out = String::new();
            push_sf_string(&mut out, name);
            push_param(&mut out, "q", 5);
            push_param(&mut out, "w", u64::MAX);
            let list: sfv::List = sfv::Parser::new(&out).parse_list().expect(&out);
            let sfv::ListEntry::Item(item) = &list[0] else {
                panic!("not an item: {out}")
            };
            let want = name.replace('é', "?");
            assert_eq!(
                item.bare_item.as_string().map(|s| s.as_str()),
                Some(want.as_str()),
                "{out}"
            );
            let w = item
                .params
                .iter()
                .find(|(k, _)| k.as_str() == "w")
                .and_then(|(_, v)| v.as_integer())
                .map(i64::from);
            assert_eq!(w, Some(999_999_999_999_999), "{out}");
        }
    }
}
