//! Running the `nft` program: replacing, removing and listing our table.
//! Only ever our table: `table inet qnet`, in text syntax (see the
//! module documentation of [`super`] for why not JSON).

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::error::FirewallError;
use super::ruleset::{TABLE_FAMILY, TABLE_NAME};
use crate::programs::find_program;

/// Runs `script` as one nft transaction (`nft -f -`): all of it or nothing.
/// Runs `script` with `nft -f -` (one transaction); `action` names it in
/// the error.
pub async fn run_script(action: &'static str, script: &str) -> Result<(), FirewallError> {
    run_nft(action, &["-f", "-"], Some(script)).await?;
    Ok(())
}

/// Our table as nft lists it, normalised for comparison (trailing
/// whitespace and blank lines removed); empty if the table does not exist.
pub(super) async fn list() -> Result<String, FirewallError> {
    match run_nft(
        "listing table inet qnet",
        &["list", "table", TABLE_FAMILY, TABLE_NAME],
        None,
    )
    .await
    {
        Ok(stdout) => Ok(normalize(&stdout)),
        Err(FirewallError::Failed { stderr, .. })
            if stderr.contains("No such file or directory") =>
        {
            Ok(String::new())
        }
        Err(e) => Err(e),
    }
}

/// Trailing whitespace and blank lines removed, one `\n` after each line.
pub fn normalize(listing: &str) -> String {
    listing
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs nft with `args` (and `stdin`), returning its stdout; its failure
/// is a [`FirewallError::Failed`] with the relevant line of its stderr.
async fn run_nft(
    action: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, FirewallError> {
    let program = find_program("nft");
    let spawn_err = |source| FirewallError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes()).await.map_err(spawn_err)?;
        drop(pipe);
    }
    let output = child.wait_with_output().await.map_err(spawn_err)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(FirewallError::Failed {
            action,
            status: output.status,
            message: relevant_error(&stderr),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// nft prints `FILE:LINE:COLS: Error: WHAT` followed by the offending line
/// and a line of carets; we keep the error and the offending line.
pub fn relevant_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let Some(i) = lines.iter().position(|l| l.contains("Error")) else {
        return lines
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty())
            .unwrap_or("(no error message)")
            .to_owned();
    };
    let error = lines[i].trim();
    match lines.get(i + 1).map(|l| l.trim()) {
        Some(src) if !src.is_empty() && !src.chars().all(|c| c == '^' || c == '~') => {
            format!("{error}: `{src}`")
        }
        _ => error.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relevant_error_keeps_the_error_and_the_offending_line() {
        let stderr = "/dev/stdin:6:20-25: Error: Could not process rule: No such file or directory\n  iifname \"x\" jump nosuch\n                   ^^^^^^\n";
        assert_eq!(
            relevant_error(stderr),
            "/dev/stdin:6:20-25: Error: Could not process rule: No such file or directory: `iifname \"x\" jump nosuch`"
        );
        assert_eq!(relevant_error("\nsomething odd\n"), "something odd");
        assert_eq!(relevant_error(""), "(no error message)");
    }

    #[test]
    fn normalize_drops_blank_lines_and_trailing_space() {
        assert_eq!(normalize("a  \n\n\tb\n"), "a\n\tb\n");
    }
}
