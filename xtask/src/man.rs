//! Man pages and shell completions for lbd, lbctl and lbrouter, generated from their
//! clap definitions (lb-api::cli), so they cannot drift from the binaries.

use std::path::Path;

use anyhow::{Context as _, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// Every program is for the administrator: section 8.
const SECTION: &str = "8";

pub fn commands() -> [clap::Command; 3] {
    [
        lb_api::cli::lbd::Args::command(),
        lb_api::cli::lbctl::Args::command(),
        lb_api::cli::lbrouter::Args::command(),
    ]
}

/// Writes `<name>.8` for each program and `<name>-<subcommand>.8` for each
/// of its subcommands (nested ones too) into `dir`; returns the files.
pub fn write_pages(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    fn write(cmd: clap::Command, dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            write(sub, dir, out)?;
        }
        let path = clap_mangen::Man::new(cmd)
            .section(SECTION)
            .manual("lb")
            .generate_to(dir)
            .with_context(|| format!("writing a man page into {}", dir.display()))?;
        out.push(path);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for cmd in commands() {
        // Built so that subcommands carry their full names (lbctl-status);
        // `help` is clap's own and needs no page.
        let mut cmd = cmd.disable_help_subcommand(true);
        cmd.build();
        write(cmd, dir, &mut out)?;
    }
    Ok(out)
}

/// Writes bash, zsh and fish completions for every program into `dir`.
pub fn write_completions(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for mut cmd in commands() {
        let name = cmd.get_name().to_string();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            out.push(
                clap_complete::generate_to(shell, &mut cmd, &name, dir)
                    .with_context(|| format!("writing {shell} completions for {name}"))?,
            );
        }
    }
    Ok(out)
}

/// Man pages into `<release>/man`, completions into `<release>/completions`.
pub fn run(release: &Path) -> Result<()> {
    let pages = write_pages(&release.join("man"))?;
    let completions = write_completions(&release.join("completions"))?;
    println!(
        "{} man pages in {}, {} completion files in {}",
        pages.len(),
        release.join("man").display(),
        completions.len(),
        release.join("completions").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, nested ones too, as a path: ["conntrack", "list"].
    fn subcommands(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            subcommands(sub, p.clone(), out);
            out.push(p);
        }
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-xtask-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn man_pages_mention_every_subcommand_and_option() {
        let dir = scratch("man");
        write_pages(&dir).unwrap();
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(format!("{name}.8")))
                .unwrap_or_else(|e| panic!("{name}.8: {e}"))
        };
        for cmd in commands() {
            let name = cmd.get_name().to_string();
            let mut subs = Vec::new();
            subcommands(&cmd, Vec::new(), &mut subs);
            for sub in &subs {
                // Listed on its parent's page, and with a page of its own.
                let parent = std::iter::once(name.clone())
                    .chain(sub[..sub.len() - 1].iter().cloned())
                    .collect::<Vec<_>>()
                    .join("-");
                let leaf = sub.last().unwrap();
                assert!(
                    read(&parent).contains(&format!("{name}\\-{}", sub.join("\\-"))),
                    "{parent}.8 does not list {leaf}"
                );
                read(&format!("{name}-{}", sub.join("-")));
            }
            // Every option of the program itself, with roff's escaped dashes.
            let page = read(&name);
            let shown = cmd.get_arguments().filter(|a| !a.is_hide_set());
            for arg in shown.filter_map(|a| a.get_long()) {
                let long = format!("\\-\\-{}", arg.replace('-', "\\-"));
                assert!(page.contains(&long), "{name}.8 lacks --{arg}");
            }
            assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        }
        // What the test walks is what lbctl has.
        let mut lbctl = Vec::new();
        subcommands(&commands()[1], Vec::new(), &mut lbctl);
        for expected in [
            "status",
            "drain",
            "weight",
            "conntrack",
            "reload",
            "version",
        ] {
            assert!(lbctl.iter().any(|p| p == &[expected]), "{lbctl:?}");
        }
        assert!(lbctl.iter().any(|p| p == &["conntrack", "flush"]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_know_the_subcommands() {
        let dir = scratch("completions");
        let files = write_completions(&dir).unwrap();
        // Three shells for each of lbd, lbctl and lbrouter.
        assert_eq!(files.len(), 9);
        let bash = std::fs::read_to_string(dir.join("lbctl.bash")).unwrap();
        for word in ["conntrack", "weight", "reload", "flush", "--limit"] {
            assert!(bash.contains(word), "lbctl.bash lacks {word}");
        }
        let fish = std::fs::read_to_string(dir.join("lbd.fish")).unwrap();
        assert!(fish.contains("max-flows"), "{fish}");
        let zsh = std::fs::read_to_string(dir.join("_lbrouter")).unwrap();
        assert!(zsh.contains("--header-read-timeout-ms"), "{zsh}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
