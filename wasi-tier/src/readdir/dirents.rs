//! A directory listing as wasmtime-wasi writes it at cookie 0: preview-1 dirents back to back,
//! indexed so that any cookie is served without reading the directory again.

use wasmtime_wasi::p1::types::Errno;

/// Size of a preview-1 `dirent` header: `d_next` u64, `d_ino` u64, `d_namlen` u32, `d_type`
/// u8, three bytes of padding.
pub(super) const DIRENT_HEADER: usize = 24;

/// One directory listing as wasmtime-wasi wrote it at cookie 0: preview-1 dirents back to back.
#[derive(Debug)]
pub(super) struct Listing {
    pub(super) bytes: Vec<u8>,
    /// Offset in `bytes` of entry i, which cookie i resumes at (entry i's `d_next` is i + 1).
    starts: Vec<u32>,
}

impl Listing {
    /// Indexes the dirents in `bytes`; `None` when they do not parse (a header or a name cut
    /// short, which a complete listing never has).
    pub(super) fn parse(bytes: Vec<u8>) -> Option<Listing> {
        let mut starts = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let header = bytes.get(at..at.checked_add(DIRENT_HEADER)?)?;
            let namlen = u32::from_le_bytes(header[16..20].try_into().ok()?) as usize;
            let next = at.checked_add(DIRENT_HEADER)?.checked_add(namlen)?;
            if next > bytes.len() {
                return None;
            }
            starts.push(u32::try_from(at).ok()?);
            at = next;
        }
        Some(Listing { bytes, starts })
    }

    /// The dirents from cookie `cookie` on (empty past the end), as wasmtime-wasi would write
    /// them before cutting them to the guest's buffer.
    pub(super) fn after_cookie(&self, cookie: u64) -> Result<&[u8], Errno> {
        let i = usize::try_from(cookie).map_err(|_| Errno::Overflow)?;
        let start = self.starts.get(i).map_or(self.bytes.len(), |&s| s as usize);
        Ok(&self.bytes[start..])
    }

    pub(super) fn size(&self) -> usize {
        self.bytes.len() + self.starts.len() * size_of::<u32>()
    }
}
