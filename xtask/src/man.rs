//! Man pages: clap_mangen renders the parts clap knows (title, name,
//! synopsis, options, version; COMMANDS lists every subcommand); the man-style sections of the
//! binaries' long help (`NAME`, `DESCRIPTION`, `ACL FILES`, ...) and the
//! hand-written ones of [`crate::pages`] are converted to roff here.

use std::io::Write;

use crate::pages;

/// The man page of one binary.
pub fn render(command: clap::Command, section: &str) -> std::io::Result<Vec<u8>> {
    let name = command.get_name().to_string();
    let long_about = command.get_long_about().map(|s| s.to_string());
    let after = command.get_after_long_help().map(|s| s.to_string());
    let man = clap_mangen::Man::new(command.clone())
        .section(section)
        .manual("qnet");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;

    let mut found = long_about.as_deref().map(sections).unwrap_or_default();
    found.retain(|(title, _)| title != "NAME" && title != "SYNOPSIS");
    match found.iter().position(|(title, _)| title == "DESCRIPTION") {
        Some(at) => write_section(&mut out, &found.remove(at))?,
        None => man.render_description_section(&mut out)?,
    }
    if command.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if command.has_subcommands() {
        write_commands(&mut out, command)?;
    }
    found.extend(after.as_deref().map(sections).unwrap_or_default());
    for extra in sections(pages::extra(&name)) {
        if !found.iter().any(|(title, _)| *title == extra.0) {
            found.push(extra);
        }
    }
    for section in &found {
        write_section(&mut out, section)?;
    }
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// COMMANDS: the full usage of every leaf subcommand (`qnetctl forward
/// add ...`), which clap_mangen's SUBCOMMANDS leaves out, then its help.
fn write_commands(out: &mut Vec<u8>, mut command: clap::Command) -> std::io::Result<()> {
    command.build();
    writeln!(out, ".SH COMMANDS")?;
    let reversed = |c: &clap::Command| -> Vec<clap::Command> {
        let mut subs: Vec<_> = c.get_subcommands().cloned().collect();
        subs.reverse();
        subs
    };
    let mut stack = reversed(&command);
    while let Some(mut sub) = stack.pop() {
        if sub.get_name() == "help" {
            continue;
        }
        if sub.has_subcommands() {
            stack.extend(reversed(&sub));
            continue;
        }
        let usage = sub.render_usage().to_string();
        let usage = usage.trim_start_matches("Usage: ");
        writeln!(out, ".TP\n\\fB{}\\fR", escape(usage))?;
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(out, "{}", escape(&about.to_string()))?;
        }
        // Global options are in OPTIONS already.
        for arg in sub
            .get_arguments()
            .filter(|a| !a.is_global_set() && a.get_id() != "help")
        {
            if let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) {
                writeln!(out, ".br\n\\-\\-{long}: {}", escape(&help.to_string()))?;
            }
        }
    }
    Ok(())
}

/// qnet-hookd.toml(5), all hand-written.
pub fn config_page() -> Vec<u8> {
    let mut out = Vec::new();
    let _ = writeln!(
        out,
        ".TH qnet-hookd.toml 5 \"\" \"qnet {}\" qnet",
        env!("CARGO_PKG_VERSION")
    );
    for section in sections(pages::CONFIG_PAGE) {
        let _ = write_section(&mut out, &section);
    }
    out
}

/// Splits man-style text into (TITLE, body) sections: a title is a line
/// in capitals at column 0, its body the indented lines after it. Text
/// without titles is one DESCRIPTION.
pub fn sections(text: &str) -> Vec<(String, String)> {
    let is_title = |line: &str| {
        !line.is_empty()
            && !line.starts_with(' ')
            && line.chars().all(|c| c.is_ascii_uppercase() || c == ' ')
    };
    if !text.lines().next().is_some_and(is_title) {
        return vec![("DESCRIPTION".into(), text.to_string())];
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        match out.last_mut() {
            Some(last) if !is_title(line) => {
                last.1.push_str(line);
                last.1.push('\n');
            }
            _ => out.push((line.to_string(), String::new())),
        }
    }
    out
}

/// One section in roff: a paragraph of plain lines is filled; one with
/// deeper-indented lines or aligned columns (examples, tables) keeps its
/// layout.
fn write_section(out: &mut Vec<u8>, (title, body): &(String, String)) -> std::io::Result<()> {
    writeln!(out, ".SH \"{title}\"")?;
    let indent = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    for (n, paragraph) in body
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .enumerate()
    {
        if n > 0 {
            writeln!(out, ".PP")?;
        }
        let lines: Vec<&str> = paragraph.lines().filter(|l| !l.trim().is_empty()).collect();
        let keep_layout = lines.iter().any(|l| {
            let text = l.trim_start();
            l.len() - text.len() > indent || text.contains("  ")
        });
        if keep_layout {
            writeln!(out, ".nf")?;
        }
        for line in lines {
            let line = if keep_layout {
                line.get(indent..).unwrap_or(line.trim_start())
            } else {
                line.trim_start()
            };
            writeln!(out, "{}", escape(line))?;
        }
        if keep_layout {
            writeln!(out, ".fi")?;
        }
    }
    Ok(())
}

/// Text as roff input: backslashes escaped, no line read as a request.
fn escape(line: &str) -> String {
    let line = line.replace('\\', "\\e");
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line
    }
}
