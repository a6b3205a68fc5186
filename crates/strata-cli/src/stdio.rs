//! `-` for a file, as Docker takes it: a Dockerfile (`-f -`), a build
//! context (`strata build -`) or an archive (`strata load`) on standard
//! input. The client spools it to a file the daemon can read (in the
//! state directory, which only its owner reaches) and removes it after.

use std::io::IsTerminal as _;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// What standard input was spooled to; removed when dropped.
pub enum Spooled {
    /// A file (a Dockerfile, an archive).
    File(tempfile::NamedTempFile),
    /// A directory (an unpacked build context).
    Dir(tempfile::TempDir),
}

impl Spooled {
    /// Where it is.
    pub fn path(&self) -> &Path {
        match self {
            Spooled::File(f) => f.path(),
            Spooled::Dir(d) => d.path(),
        }
    }
}

/// Standard input, spooled to a file in `home/tmp`; removed when dropped.
pub fn spool(home: &Path, what: &str) -> Result<tempfile::NamedTempFile> {
    if std::io::stdin().is_terminal() {
        bail!("{what} from standard input was asked for, but standard input is a terminal");
    }
    let tmp = home.join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot make {}", tmp.display()))?;
    let mut file = tempfile::Builder::new()
        .prefix("stdin-")
        .tempfile_in(&tmp)
        .with_context(|| format!("cannot make a file in {}", tmp.display()))?;
    let copied = std::io::copy(&mut std::io::stdin().lock(), file.as_file_mut())
        .with_context(|| format!("cannot read {what} from standard input"))?;
    if copied == 0 {
        bail!("{what} from standard input was asked for, but standard input is empty");
    }
    Ok(file)
}

/// A build context given on standard input (`strata build -`), as a
/// directory: a tar archive (plain or compressed) unpacked, or anything
/// else taken as a Dockerfile with an empty context, as Docker does.
pub fn context(home: &Path) -> Result<tempfile::TempDir> {
    let spooled = spool(home, "the build context")?;
    let dir = tempfile::Builder::new()
        .prefix("stdin-context-")
        .tempdir_in(home.join("tmp"))
        .context("cannot make a directory for the build context")?;
    if strata_worker::is_archive(spooled.path()) {
        let f = std::fs::File::open(spooled.path())?;
        // Unpacked as `ADD` unpacks an archive: nothing leaves the
        // directory, whatever its names and links say.
        strata_snapshot::apply_tar_with(
            dir.path(),
            strata_oci::decompressing(f)?,
            strata_snapshot::TarKind::Archive,
        )
        .context("cannot unpack the build context from standard input")?;
    } else {
        std::fs::copy(spooled.path(), dir.path().join("Dockerfile"))
            .context("cannot write the Dockerfile read from standard input")?;
    }
    Ok(dir)
}

/// Sends what `make` writes to a file to the client's standard output.
/// It is made whole in a scratch file first, then sent: the client gets a
/// complete archive or nothing.
pub fn send_made(
    cx: &crate::cx::Cx,
    what: &str,
    make: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("stdout-")
        .tempdir_in(cx.node.home().join("tmp"))
        .context("cannot make a scratch directory")?;
    let file = tmp.path().join("out.tar");
    make(&file).with_context(|| format!("cannot write {what}"))?;
    let mut reader =
        std::fs::File::open(&file).with_context(|| format!("cannot read {}", file.display()))?;
    std::io::copy(&mut reader, &mut cx.out()).with_context(|| format!("cannot send {what}"))?;
    Ok(())
}
