//! Who may send the admin API's POST requests: the secret of `admin.token_file`, read
//! and checked without ever showing it, and the `Authorization: Bearer` header that
//! must carry it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::header::{AUTHORIZATION, HeaderMap};

/// The longest secret lb accepts. Comparisons always run over this many bytes, so how
/// long they take says nothing about the secret, its length included.
const MAX_SECRET: usize = 1024;

/// An admin token. Its `Debug` is masked, it has no `Display`, and it is compared in
/// constant time: nothing lb prints or measures reveals it.
pub struct Secret {
    bytes: Box<[u8; MAX_SECRET]>,
    len: usize,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// A secret as written in a file or a variable, surrounding whitespace trimmed. The
    /// error says what is wrong without quoting any of it, worded to follow the name of
    /// the file (`FILE is empty; ...`).
    pub fn new(text: &[u8]) -> Result<Secret, String> {
        let text = text.trim_ascii();
        if text.is_empty() {
            return Err("is empty; it must hold the admin token".to_owned());
        }
        if text.len() > MAX_SECRET {
            return Err(format!("holds more than {MAX_SECRET} bytes"));
        }
        // What an HTTP header can carry after `Bearer `, so every client can send it.
        if !text.iter().all(u8::is_ascii_graphic) {
            return Err(
                "holds spaces or characters other than printable ASCII, which an \
                 Authorization header cannot carry (e.g. use `openssl rand -hex 32`)"
                    .to_owned(),
            );
        }
        let mut bytes = Box::new([0; MAX_SECRET]);
        bytes[..text.len()].copy_from_slice(text);
        Ok(Secret {
            bytes,
            len: text.len(),
        })
    }

    /// Reads the secret from `path`; the error, worded as for [`Secret::new`], never
    /// quotes the file's content.
    pub fn read(path: &Path) -> Result<Secret, String> {
        let text = std::fs::read(path).map_err(|err| format!("could not be read: {err}"))?;
        Secret::new(&text)
    }

    /// Whether `presented` is this secret. Every byte of both is looked at, whatever
    /// they hold and wherever they first differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        // Lengths above the maximum are known not to match; folding them keeps the
        // loop the same length.
        let mut diff = u8::from(presented.len() != self.len);
        for (i, secret) in self.bytes.iter().enumerate() {
            let given = presented.get(i).copied().unwrap_or(0);
            diff |= std::hint::black_box(secret ^ given);
        }
        std::hint::black_box(diff) == 0
    }

    /// The value of an `Authorization` header carrying this secret.
    pub fn bearer(&self) -> String {
        let token = String::from_utf8_lossy(&self.bytes[..self.len]);
        format!("Bearer {token}")
    }
}

/// The token a request carries in `Authorization: Bearer TOKEN` (the scheme is
/// case-insensitive, as for every HTTP auth scheme).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(6)?;
    let token = token.strip_prefix(b" ")?.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// Why a POST is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header (401).
    Missing,
    /// A token that is not the secret (401).
    Wrong,
    /// The token file cannot be read now (503): lb refuses rather than guess.
    Unreadable(String),
}

/// The check every POST passes: open when `admin.token_file` is not set. The file is
/// read again for each request, so a token rotated in the file (a Kubernetes Secret
/// updated in place, an edited file) applies to the next request, with no reload.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    file: Option<Arc<Path>>,
}

impl Guard {
    pub fn new(file: Option<PathBuf>) -> Guard {
        Guard {
            file: file.map(Arc::from),
        }
    }

    /// Lets the request through, or says why not. The file is read on a blocking
    /// thread: a slow disk never holds up the runtime.
    pub async fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let Some(presented) = bearer_token(headers) else {
            return Err(Refusal::Missing);
        };
        let path = Arc::clone(file);
        let secret = tokio::task::spawn_blocking(move || Secret::read(&path))
            .await
            .unwrap_or_else(|err| Err(format!("could not be read: {err}")))
            .map_err(|err| Refusal::Unreadable(format!("{} {err}", file.display())))?;
        if secret.matches(presented) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::new(text.as_bytes()).expect("a valid secret")
    }

    #[test]
    fn a_secret_matches_itself_only() {
        let s = secret("  s3cret-token\n");
        assert!(s.matches(b"s3cret-token"));
        for other in ["s3cret-toke", "s3cret-token2", "S3cret-token", "", "x"] {
            assert!(!s.matches(other.as_bytes()), "{other:?}");
        }
        // Zero padding inside the comparison does not make a NUL-extended token match.
        assert!(!s.matches(b"s3cret-token\0"));
        assert!(!s.matches(&[b'a'; 5000]));
        let longest = secret(&"a".repeat(MAX_SECRET));
        assert!(longest.matches(&[b'a'; MAX_SECRET]));
        assert!(!longest.matches(&[b'a'; MAX_SECRET + 1]));
    }

    #[test]
    fn empty_long_or_unsendable_secrets_are_refused_without_being_shown() {
        for bad in ["", " \n\t", "two words", "caf\u{e9}", "tab\there"] {
            let err = Secret::new(bad.as_bytes()).expect_err(bad);
            assert!(bad.trim().is_empty() || !err.contains(bad.trim()), "{err}");
        }
        assert!(Secret::new(&[b'a'; MAX_SECRET + 1]).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = secret("hunter2hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.bearer(), "Bearer hunter2hunter2");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored() {
        let token = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("ascii"));
            bearer_token(&headers).map(<[u8]>::to_vec)
        };
        assert_eq!(token("Bearer abc"), Some(b"abc".to_vec()));
        assert_eq!(token("bearer  abc "), Some(b"abc".to_vec()));
        assert_eq!(token("Basic abc"), None);
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearerabc"), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn the_guard_reads_the_file_for_each_request() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "first\n").expect("write token");
        let guard = Guard::new(Some(file.clone()));
        let with = |token: &str| {
            let mut headers = HeaderMap::new();
            let value = format!("Bearer {token}");
            headers.insert(AUTHORIZATION, HeaderValue::from_str(&value).expect("ascii"));
            headers
        };
        assert_eq!(guard.check(&HeaderMap::new()).await, Err(Refusal::Missing));
        assert_eq!(guard.check(&with("first")).await, Ok(()));
        std::fs::write(&file, "second").expect("rotate token");
        assert_eq!(guard.check(&with("first")).await, Err(Refusal::Wrong));
        assert_eq!(guard.check(&with("second")).await, Ok(()));
        std::fs::write(&file, "").expect("empty token");
        assert!(matches!(
            guard.check(&with("second")).await,
            Err(Refusal::Unreadable(_))
        ));
        assert_eq!(Guard::new(None).check(&HeaderMap::new()).await, Ok(()));
    }
}
