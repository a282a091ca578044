//! Where dormant keeps its files when the caller names no directory: the snapshot store
//! ([`store_root`]) and the cache of compiled modules and guest images ([`cache_dir`]). Each is
//! an environment variable when it is set and not empty, else a directory under the user's own
//! (XDG) data or cache directory.

use std::path::PathBuf;

/// Environment variable naming the default store directory.
pub const STORE_ENV: &str = "DORMANT_STORE";

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "DORMANT_CACHE";

/// `$DORMANT_STORE`, else `<user data dir>/dormant/store` (`~/.local/share/dormant/store`;
/// `<tmp>/dormant-data/dormant/store` when the user has no data directory). A
/// `$DORMANT_STORE` that is an object-store URL (`s3://…`, see `dormant::Store`) names no
/// directory: the local store is then the default one (that store's cache).
pub fn store_root() -> PathBuf {
    from_env(STORE_ENV)
        .filter(|p| !p.to_string_lossy().starts_with("s3://"))
        .unwrap_or_else(|| {
            dirs::data_dir()
                .unwrap_or_else(|| std::env::temp_dir().join("dormant-data"))
                .join("dormant")
                .join("store")
        })
}

/// `$DORMANT_CACHE`, else `<user cache dir>/dormant` (`~/.cache/dormant`;
/// `<tmp>/dormant-cache/dormant` when the user has no cache directory).
pub fn cache_dir() -> PathBuf {
    from_env(CACHE_ENV).unwrap_or_else(|| {
        dirs::cache_dir()
            .unwrap_or_else(|| std::env::temp_dir().join("dormant-cache"))
            .join("dormant")
    })
}

/// The directory an environment variable names, unless it is unset or empty.
fn from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}
