//! Directories a test makes for itself.

use std::path::PathBuf;

use crate::netns::unique_name;

/// Removes its directory when the test ends, whatever happens to the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory under the system's temporary directory, named
    /// for this test process and `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(tag));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
