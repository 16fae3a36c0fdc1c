//! The iptables peers as a [`PeerDriver`]: one per backend (nf_tables,
//! legacy) and family, each run through its own binary
//! (`iptables-nft`, `ip6tables-legacy`, …: the documented interface of
//! both, chosen explicitly rather than through update-alternatives, since
//! both backends can hold rules at once). What to change is planned in
//! [`super::iptables_plan`].

use std::process::Stdio;

use super::iptables_plan::{diff, wanted, FilterView, Op};
use super::{Applied, Family, Openings, PeerDriver, PeerError};
use crate::programs::find_program;

/// Which kernel tables an iptables binary edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `table ip filter` / `table ip6 filter` in nftables (iptables-nft).
    Nft,
    /// The x_tables `filter` table (iptables-legacy).
    Legacy,
}

/// One filter table: a backend and a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iptables {
    pub backend: Backend,
    pub family: Family,
}

impl Iptables {
    pub const fn new(backend: Backend, family: Family) -> Iptables {
        Iptables { backend, family }
    }

    pub fn program(&self) -> &'static str {
        match (self.backend, self.family) {
            (Backend::Nft, Family::V4) => "iptables-nft",
            (Backend::Nft, Family::V6) => "ip6tables-nft",
            (Backend::Legacy, Family::V4) => "iptables-legacy",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy",
        }
    }

    /// Whether this filter table exists. Checked without the iptables
    /// binary, which would create the table (and, for legacy, load the
    /// x_tables modules) just by listing it.
    pub async fn exists(&self) -> Result<bool, PeerError> {
        match self.backend {
            Backend::Nft => {
                let tables = run("nft", &["list", "tables"]).await?;
                let wanted = match self.family {
                    Family::V4 => "table ip filter",
                    Family::V6 => "table ip6 filter",
                };
                Ok(tables.lines().any(|l| l.trim() == wanted))
            }
            Backend::Legacy => {
                let names = match self.family {
                    Family::V4 => "/proc/net/ip_tables_names",
                    Family::V6 => "/proc/net/ip6_tables_names",
                };
                Ok(std::fs::read_to_string(names)
                    .map(|t| t.lines().any(|l| l == "filter"))
                    .unwrap_or(false))
            }
        }
    }

    /// The filter table as `-S` prints it (`None` if it does not exist).
    pub async fn view(&self) -> Result<Option<FilterView>, PeerError> {
        if !self.exists().await? {
            return Ok(None);
        }
        let listing = run(self.program(), &["-w", "-S"]).await?;
        Ok(Some(FilterView::parse(&listing)))
    }
}

impl PeerDriver for Iptables {
    fn name(&self) -> String {
        let table = match self.family {
            Family::V4 => "filter",
            Family::V6 => "ip6 filter",
        };
        format!("{} ({table})", self.program())
    }

    async fn apply(&self, what: &Openings) -> Result<Applied, PeerError> {
        let Some(view) = self.view().await? else {
            return Ok(Applied::default());
        };
        let changes = diff(&view, &wanted(&view, self.family, what));
        for (op, rule) in &changes {
            let args = rule.args(*op);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match run(self.program(), &args).await {
                Ok(_) => {
                    tracing::debug!(peer = %self.name(), "{op:?} -A {} {}", rule.chain, rule.spec)
                }
                // Gone already (a peer flushed its chain meanwhile).
                Err(e) if *op == Op::Delete => tracing::debug!("{e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(Applied {
            present: true,
            changes: changes.len(),
        })
    }
}

/// Runs `program args`, returning its stdout.
pub(crate) async fn run(program: &str, args: &[&str]) -> Result<String, PeerError> {
    let path = find_program(program);
    let output = tokio::process::Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| PeerError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(PeerError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
