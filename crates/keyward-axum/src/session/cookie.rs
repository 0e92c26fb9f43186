//! The session cookie: finding it in a request's `Cookie` headers, and the `Set-Cookie` values that set or
//! clear it.
//!
//! **The one decision to know:** a request that carries the session cookie's name more than once has no
//! session. Browsers send every cookie whose domain and path match, so two values under one name mean a
//! second cookie was planted (a sibling subdomain, a wider path) or the client is confused; picking either
//! one would let the planted one win some of the time. Parsing is the `cookie` crate's (`Cookie::split_parse`):
//! pairs are split on `;`, trimmed, and a pair that does not parse is skipped, not fatal.

use std::borrow::Cow;
use std::fmt;

use cookie::Cookie;
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use keyward::policy::{SameSite, SessionClass};

/// The session cookie of a class: its name and the attributes every `Set-Cookie` carries.
#[derive(Clone)]
pub(crate) struct CookieSpec {
    name: String,
    secure: bool,
    same_site: cookie::SameSite,
    path: String,
    domain: Option<String>,
}

/// Where the session cookie is in a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found<'a> {
    /// Not sent.
    Absent,
    /// Sent once, with this value.
    Once(Cow<'a, str>),
    /// Sent more than once: the request has no session.
    Duplicated,
}

impl CookieSpec {
    /// The cookie the class declares.
    pub(crate) fn of(class: &SessionClass) -> CookieSpec {
        let same_site = match class.cookie_same_site_value() {
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::None => cookie::SameSite::None,
            SameSite::Strict => cookie::SameSite::Strict,
            // A value this crate does not know yet: the strictest is the safe reading.
            _ => cookie::SameSite::Strict,
        };
        CookieSpec {
            name: class.cookie_name_value().to_owned(),
            secure: class.is_cookie_secure(),
            same_site,
            path: class.cookie_path_value().to_owned(),
            domain: class.cookie_domain_value().map(str::to_owned),
        }
    }

    /// The cookie's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The session cookie in `headers`, over every `Cookie` field line. Bytes that are not UTF-8 are
    /// replaced before parsing, so an odd byte in another cookie does not hide this one.
    pub(crate) fn find<'h>(&self, headers: &'h HeaderMap) -> Found<'h> {
        let mut found = Found::Absent;
        for line in headers.get_all(COOKIE) {
            let text = match std::str::from_utf8(line.as_bytes()) {
                Ok(text) => Cow::Borrowed(text),
                // Rare (obs-text in some cookie): parse a lossy copy. A token is ASCII, so a value that
                // contained such bytes is malformed anyway and loads no session.
                Err(_) => Cow::Owned(String::from_utf8_lossy(line.as_bytes()).into_owned()),
            };
            for pair in Cookie::split_parse(text).flatten() {
                if pair.name() != self.name {
                    continue;
                }
                if found != Found::Absent {
                    return Found::Duplicated;
                }
                found = Found::Once(match pair.value_raw() {
                    Some(borrowed) => Cow::Borrowed(borrowed),
                    None => Cow::Owned(pair.value().to_owned()),
                });
            }
        }
        found
    }

    fn builder(&self, value: String) -> cookie::CookieBuilder<'static> {
        let mut builder = Cookie::build((self.name.clone(), value))
            .http_only(true)
            .secure(self.secure)
            .same_site(self.same_site)
            .path(self.path.clone());
        if let Some(domain) = &self.domain {
            builder = builder.domain(domain.clone());
        }
        builder
    }

    /// `Set-Cookie` for `token`: no `Max-Age` or `Expires`, so the browser forgets it when it closes; the
    /// server enforces the idle and absolute timeouts. `None` if the value is not a valid header value
    /// (it always is: the policy validates the name, path and domain, and a token is base64url).
    /// The value is marked sensitive: its `Debug` prints `Sensitive`, and HTTP/2 never indexes it.
    pub(crate) fn set(&self, token: &str) -> Option<HeaderValue> {
        let mut value =
            HeaderValue::try_from(self.builder(token.to_owned()).build().to_string()).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// `Set-Cookie` that removes the cookie: the same name and attributes (a browser only replaces a cookie
    /// with the same name, domain and path), an empty value and `Max-Age=0`.
    pub(crate) fn clear(&self) -> Option<HeaderValue> {
        let cookie = self
            .builder(String::new())
            .max_age(cookie::time::Duration::ZERO)
            .build();
        HeaderValue::try_from(cookie.to_string()).ok()
    }
}

impl fmt::Debug for CookieSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The attributes as they are written, without a value.
        let shown = self.builder(String::new()).build().to_string();
        f.write_str(&shown)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec() -> CookieSpec {
        CookieSpec::of(&SessionClass::new(
            Duration::from_secs(60),
            Duration::from_secs(600),
        ))
    }

    fn headers(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(COOKIE, HeaderValue::from_bytes(line).unwrap());
        }
        h
    }

    #[test]
    fn finds_the_cookie_among_pairs_and_lines() {
        let s = spec();
        assert_eq!(s.find(&headers(&[])), Found::Absent);
        assert_eq!(s.find(&headers(&[b"a=1; b=2"])), Found::Absent);
        assert_eq!(
            s.find(&headers(&[b"a=1;__Host-session=tok; b=2"])),
            Found::Once("tok".into())
        );
        assert_eq!(
            s.find(&headers(&[b"a=1", b"  __Host-session = tok  ;b"])),
            Found::Once("tok".into())
        );
        // Malformed pairs around it are skipped.
        assert_eq!(
            s.find(&headers(&[b"novalue; =x; ;; __Host-session=tok; junk"])),
            Found::Once("tok".into())
        );
        // Names are case-sensitive; a prefix is not the name.
        assert_eq!(
            s.find(&headers(&[b"__host-session=x; __Host-sessionX=y"])),
            Found::Absent
        );
        assert_eq!(
            s.find(&headers(&[b"__Host-session="])),
            Found::Once("".into())
        );
    }

    #[test]
    fn a_name_sent_twice_is_no_session() {
        let s = spec();
        assert_eq!(
            s.find(&headers(&[b"__Host-session=a; __Host-session=b"])),
            Found::Duplicated
        );
        assert_eq!(
            s.find(&headers(&[b"__Host-session=a", b"x=1; __Host-session=a"])),
            Found::Duplicated
        );
        // Even when one of the lines holds bytes that are not UTF-8.
        assert_eq!(
            s.find(&headers(&[
                b"__Host-session=a",
                b"x=\xff; __Host-session=b"
            ])),
            Found::Duplicated
        );
        assert_eq!(
            s.find(&headers(&[b"x=\xff; __Host-session=tok"])),
            Found::Once("tok".into())
        );
        assert_eq!(
            s.find(&headers(&[b"x=\xff; y=2"])),
            Found::Absent,
            "an odd byte elsewhere is ignored"
        );
    }

    #[test]
    fn set_and_clear_carry_the_same_attributes() {
        let s = spec();
        let set = s.set("tok").unwrap();
        assert!(set.is_sensitive());
        assert!(!format!("{set:?}").contains("tok"));
        assert_eq!(
            set.to_str().unwrap(),
            "__Host-session=tok; HttpOnly; SameSite=Lax; Secure; Path=/"
        );
        let clear = s.clear().unwrap();
        assert_eq!(
            clear.to_str().unwrap(),
            "__Host-session=; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=0"
        );
    }
}
