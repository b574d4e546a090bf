//! Man pages and shell completions, generated from the flag definitions themselves.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::args::Cli;

/// Writes `cloud-dump.1` and one page per visible subcommand (`cloud-dump-backup.1`,
/// `cloud-dump-sqlite-replicate.1`, …) into `dir`.
pub fn man_pages(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write_page(dir, "cloud-dump", cmd.clone(), &mut written)?;
    walk(dir, "cloud-dump", &cmd, &mut written)?;
    Ok(written)
}

fn walk(dir: &Path, prefix: &str, cmd: &clap::Command, written: &mut Vec<String>) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("{prefix}-{}", sub.get_name());
        write_page(dir, &name, sub.clone().name(name.clone()), written)?;
        walk(dir, &name, sub, written)?;
    }
    Ok(())
}

fn write_page(dir: &Path, name: &str, cmd: clap::Command, written: &mut Vec<String>) -> Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(name.to_owned());
    Ok(())
}

/// The completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "cloud-dump", &mut std::io::stdout());
}
