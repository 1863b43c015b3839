//! Atomic file writes: write to a temporary name in the target directory, then rename.
//!
//! A rename within one directory is atomic on POSIX filesystems, so readers see either the old
//! file or the complete new one, never a half-written file.

use crate::DataError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temp files made by several writers in one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written under a temporary name; removed on drop unless committed.
pub(crate) struct TempFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl TempFile {
    /// Creates `.<name>.tmp-<pid>-<n>` next to `dest`.
    pub(crate) fn create(dest: &Path) -> Result<TempFile, DataError> {
        let name = dest
            .file_name()
            .ok_or_else(|| DataError::InvalidArgument(format!("{} is not a file path", dest.display())))?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_name = format!(".{}.tmp-{}-{}", name.to_string_lossy(), std::process::id(), n);
        let tmp = dest.with_file_name(tmp_name);
        let file = File::create(&tmp).map_err(|e| DataError::io("creating", &tmp, e))?;
        Ok(TempFile { file: Some(file), tmp, dest: dest.to_path_buf() })
    }

    pub(crate) fn file(&mut self) -> &mut File {
        // Only `commit` takes the file, and it consumes self.
        self.file.as_mut().expect("TempFile used after commit")
    }

    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes to disk and renames into place.
    pub(crate) fn commit(mut self) -> Result<(), DataError> {
        if let Some(file) = self.file.take() {
            // Sync before rename so a crash cannot leave a complete-looking empty file.
            file.sync_all().map_err(|e| DataError::io("syncing", &self.tmp, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| DataError::io("renaming into place", &self.dest, e))?;
        // Renamed: nothing left for Drop to remove.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `dest` atomically.
pub(crate) fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let mut tmp = TempFile::create(dest)?;
    let path = tmp.tmp_path().to_path_buf();
    tmp.file().write_all(bytes).map_err(|e| DataError::io("writing", path, e))?;
    tmp.commit()
}
