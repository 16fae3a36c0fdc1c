//! Build steps around cargo.
//!
//! `cargo run -p xtask -- dist DIR` writes the man pages (DIR/man/manN/)
//! and the bash, zsh and fish completions (DIR/completions/SHELL/) of every
//! qnet binary, generated from the same clap definitions the binaries parse
//! with, plus the hand-written sections of `pages`. `make` runs it into
//! `target/dist`; nothing generated is committed, so nothing can go stale.

mod man;
mod pages;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// One binary: its clap command, man section and whether users type it
/// (completions only for those; QEMU and libvirt run the others).
pub struct Binary {
    pub command: clap::Command,
    pub section: &'static str,
    pub completions: bool,
}

/// Every installed binary, as the package and `make install` ship them.
pub fn binaries() -> Vec<Binary> {
    let binary = |command, section, completions| Binary {
        command,
        section,
        completions,
    };
    vec![
        binary(qnet_hookd::cli::Hookd::command(), "8", true),
        binary(qnet_hookd::cli::qnetctl::Qnetctl::command(), "1", true),
        binary(qnet_bridge_helper::cli::Cli::command(), "8", false),
        binary(qnet_macvtap_helper::cli::Cli::command(), "8", false),
        binary(qnet_libvirt_hook::cli::Cli::command(), "8", false),
    ]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, dir] if task == "dist" => match dist(Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!(
                "usage: cargo run -p xtask -- dist DIR   (man pages and completions into DIR)"
            );
            ExitCode::FAILURE
        }
    }
}

/// Writes every man page and completion file under `dir`.
fn dist(dir: &Path) -> std::io::Result<()> {
    let write = |path: PathBuf, text: &[u8]| -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        std::fs::write(&path, text)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    for binary in binaries() {
        let name = binary.command.get_name().to_string();
        let page = man::render(binary.command.clone(), binary.section)?;
        let section = binary.section;
        write(
            dir.join(format!("man/man{section}/{name}.{section}")),
            &page,
        )?;
        if binary.completions {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let mut text = Vec::new();
                clap_complete::generate(shell, &mut binary.command.clone(), &name, &mut text);
                write(dir.join(completion_path(shell, &name)), &text)?;
            }
        }
    }
    write(dir.join("man/man5/qnet-hookd.toml.5"), &man::config_page())?;
    Ok(())
}

/// Where each shell looks for a command's completions, relative to the
/// completions directory (named as the shells' vendor directories want).
fn completion_path(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Bash => format!("completions/bash/{name}"),
        Shell::Zsh => format!("completions/zsh/_{name}"),
        Shell::Fish => format!("completions/fish/{name}.fish"),
        other => format!("completions/{other}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page has the sections a man page needs and names every option
    /// and subcommand of its clap definition, so a page cannot miss a flag
    /// the binary has (the pages are generated, never edited by hand).
    #[test]
    fn every_page_is_complete() {
        for binary in binaries() {
            let name = binary.command.get_name().to_string();
            let page =
                String::from_utf8(man::render(binary.command.clone(), binary.section).unwrap())
                    .unwrap()
                    .replace("\\-", "-");
            for section in [
                "NAME",
                "SYNOPSIS",
                "DESCRIPTION",
                "OPTIONS",
                "EXAMPLES",
                "SECURITY",
            ] {
                assert!(
                    page.contains(&format!(".SH {section}"))
                        || page.contains(&format!(".SH \"{section}\"")),
                    "{name}: no {section}"
                );
            }
            assert!(page.contains("FILES\""), "{name}: no FILES section");
            let mut commands = vec![binary.command.clone()];
            while let Some(command) = commands.pop() {
                commands.extend(command.get_subcommands().cloned());
                for arg in command.get_arguments() {
                    if let Some(long) = arg.get_long() {
                        assert!(page.contains(long), "{name}: --{long} missing");
                    }
                }
                for sub in command.get_subcommands() {
                    if sub.get_name() != "help" {
                        assert!(
                            page.contains(sub.get_name()),
                            "{name}: subcommand {} missing",
                            sub.get_name()
                        );
                    }
                }
            }
        }
    }

    /// groff reads every page without a warning.
    #[test]
    fn groff_accepts_every_page() {
        let dir = std::env::temp_dir().join(format!("qnet-xtask-{}", std::process::id()));
        dist(&dir).unwrap();
        let pages: Vec<_> = ["1", "5", "8"]
            .iter()
            .flat_map(|s| std::fs::read_dir(dir.join(format!("man/man{s}"))).unwrap())
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(pages.len(), 6, "{pages:?}");
        for page in pages {
            let out = std::process::Command::new("groff")
                .args(["-k", "-man", "-ww", "-z"])
                .arg(&page)
                .output()
                .expect("groff (apt-get install groff-base)");
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{}: {}",
                page.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for file in [
            "completions/bash/qnetctl",
            "completions/zsh/_qnetctl",
            "completions/fish/qnetctl.fish",
        ] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(
                text.contains("forward"),
                "{file} lacks the forward subcommand"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
