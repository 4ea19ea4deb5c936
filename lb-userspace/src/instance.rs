//! One lbd per pin directory and per control socket. A second lbd on the
//! same pins would fight the first over every map; on the same socket it
//! would take lbctl away from it. Each is guarded by an exclusive flock,
//! which the kernel releases when the holder exits, however it exits.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Files under /run that belong to the lbd of `pin_dir` (bpffs holds no
/// plain files), named after it: `<name>.<ext>`.
pub fn run_file(pin_dir: &Path, ext: &str) -> PathBuf {
    let name = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    PathBuf::from("/run/lbd").join(format!("{name}.{ext}"))
}

/// Held for as long as this lbd runs.
pub struct Instance {
    _locks: Vec<Flock<File>>,
}

impl Instance {
    /// Claims `pin_dir` and, when given, `socket`; fails, naming the holder's
    /// resource, when another lbd holds either.
    pub fn claim(pin_dir: &Path, socket: Option<&Path>) -> Result<Instance> {
        let mut locks = vec![lock(&run_file(pin_dir, "lock"), "pin directory", pin_dir)?];
        if let Some(socket) = socket {
            let mut path = socket.as_os_str().to_owned();
            path.push(".lock");
            locks.push(lock(Path::new(&path), "control socket", socket)?);
        }
        Ok(Instance { _locks: locks })
    }
}

fn lock(path: &Path, what: &str, resource: &Path) -> Result<Flock<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => bail!(
            "another lbd is already running with the {what} {} (it holds {}); \
             stop it first, or give this one its own --pin-dir and --socket",
            resource.display(),
            path.display()
        ),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}
