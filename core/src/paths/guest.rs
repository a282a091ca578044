//! [`GuestPath`]: a path as the guest names it, normalised lexically (`..` above the root is
//! an escape).
//!
//! A module of its own, below both the [spec](crate::spec) (mount points are guest paths) and
//! the [files view](super::SandboxFs) that resolves them.

use crate::error::{Error, Result};

/// A normalised absolute guest path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GuestPath {
    norm: String,
}

impl GuestPath {
    /// Parses and normalises `path`. `..` that would climb above `/` is a
    /// [`Error::PathEscape`].
    pub fn parse(path: &str) -> Result<GuestPath> {
        if path.is_empty() {
            return Err(Error::InvalidPath {
                path: path.into(),
                reason: "empty path",
            });
        }
        if path.contains('\0') {
            return Err(Error::InvalidPath {
                path: path.into(),
                reason: "contains a NUL byte",
            });
        }
        let mut parts: Vec<&str> = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(Error::PathEscape { path: path.into() });
                    }
                }
                c => parts.push(c),
            }
        }
        Ok(GuestPath {
            norm: format!("/{}", parts.join("/")),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.norm
    }

    pub fn is_root(&self) -> bool {
        self.norm == "/"
    }

    /// The path relative to `prefix` if it is at or below it.
    pub(super) fn strip(&self, prefix: &GuestPath) -> Option<&str> {
        if prefix.is_root() {
            return Some(&self.norm[1..]);
        }
        let rest = self.norm.strip_prefix(prefix.as_str())?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix('/')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        assert_eq!(
            GuestPath::parse("a/./b//c/../d").unwrap().as_str(),
            "/a/b/d"
        );
        assert_eq!(GuestPath::parse("/").unwrap().as_str(), "/");
        assert!(matches!(
            GuestPath::parse("../x"),
            Err(Error::PathEscape { .. })
        ));
        assert!(matches!(
            GuestPath::parse("/a/../../etc"),
            Err(Error::PathEscape { .. })
        ));
    }
}
