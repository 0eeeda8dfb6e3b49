//! The signing secret generated on first start and kept next to the
//! database file (`<database>.jwt-secret`, mode 0600), so tokens survive
//! restarts without any configuration.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngExt;
use secrecy::SecretString;

use crate::config::MIN_SECRET_BYTES;

/// `<database file>.jwt-secret`.
pub fn secret_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".jwt-secret");
    PathBuf::from(name)
}

/// Reads the secret kept at `path`, or generates and stores one.
pub(super) fn load_or_create(path: &Path) -> std::io::Result<SecretString> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= MIN_SECRET_BYTES => {
            return Ok(SecretString::from(s.trim().to_string()));
        }
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} holds a secret shorter than {MIN_SECRET_BYTES} bytes; delete it to have a new one generated",
                path.display(),
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 48];
    rand::rng().fill(&mut bytes[..]);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    write_private(path, &secret)?;
    Ok(SecretString::from(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}
