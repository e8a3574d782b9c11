//! `bulwark-crds ROOT`: writes the CRDs and RBAC rules under the repository root
//! (`make crds`); `--check` only reports files that differ.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

fn main() -> anyhow::Result<ExitCode> {
    let mut check = false;
    let mut root = PathBuf::from(".");
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!("usage: bulwark-crds [--check] [REPOSITORY_ROOT]");
                return Ok(ExitCode::SUCCESS);
            }
            other => root = PathBuf::from(other),
        }
    }
    let mut stale = 0;
    for (path, text) in bulwark_control_plane::crds::files()? {
        let path = root.join(path);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == text {
            continue;
        }
        stale += 1;
        if check {
            eprintln!("{} is out of date; run `make crds`", path.display());
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(if check && stale > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
