//! Trusted public keys: the only parties whose signed patches the engine accepts.

use std::path::{Path, PathBuf};

use patch_format::{KeyFileError, PublicKey};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("trusted key {}: not a public key file; pass the .pub file `vmm patch keygen` wrote", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: KeyFileError,
    },
    #[error("cannot read trusted key {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads `--trusted-key` files, in order.
pub fn read_keys(paths: &[impl AsRef<Path>]) -> Result<Vec<PublicKey>, KeyError> {
    paths
        .iter()
        .map(|p| {
            let path = p.as_ref().to_path_buf();
            let text = std::fs::read_to_string(&path).map_err(|source| KeyError::Io {
                path: path.clone(),
                source,
            })?;
            PublicKey::from_file_text(&text).map_err(|source| KeyError::Parse { path, source })
        })
        .collect()
}
