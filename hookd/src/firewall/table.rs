//! Our own table, `table inet qnet`, as a [`Driver`]: the ruleset through
//! `nft -f` ([`super::nft`]), forward elements through nfnetlink
//! ([`super::batch`], [`super::nfnetlink`]).

use std::collections::BTreeSet;
use std::io;

use super::batch::{self, Change, ElementReport};
use super::driver::Driver;
use super::element::{check_elements, ForwardElement, Map};
use super::error::FirewallError;
use super::nfnetlink;
use super::nft;
use super::ruleset::{remove_script, script_with_forwards, TABLE_NAME};
use crate::config::NetworkConfig;

/// `table inet qnet`. Holds nothing: the kernel holds the table, and the
/// nfnetlink sockets are per network namespace (see [`super::nfnetlink`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct QnetTable;

impl Driver for QnetTable {
    fn name(&self) -> &'static str {
        "nftables table inet qnet"
    }

    async fn apply_ruleset(
        &self,
        networks: &[NetworkConfig],
        elements: &[ForwardElement],
    ) -> Result<(), FirewallError> {
        check_elements(elements)?;
        if networks.is_empty() && elements.is_empty() {
            return self.teardown().await;
        }
        let script = script_with_forwards(networks, elements);
        nft::run_script("applying table inet qnet", &script).await?;
        tracing::debug!(
            networks = networks.len(),
            forwards = elements.len(),
            "applied table inet qnet"
        );
        Ok(())
    }

    async fn add_elements(
        &self,
        elements: &[ForwardElement],
    ) -> Result<ElementReport, FirewallError> {
        change_elements(Change::Add, elements).await
    }

    async fn remove_elements(
        &self,
        elements: &[ForwardElement],
    ) -> Result<ElementReport, FirewallError> {
        change_elements(Change::Remove, elements).await
    }

    async fn teardown(&self) -> Result<(), FirewallError> {
        nft::run_script("removing table inet qnet", &remove_script()).await
    }
}

impl QnetTable {
    /// The elements of the four maps as the kernel holds them (whoever
    /// put them there: us over nfnetlink, `nft -f`, an admin by hand).
    /// Empty when the table does not exist. Elements no forward of ours
    /// encodes (another protocol, added by hand) are logged and left out.
    pub async fn installed_elements(&self) -> Result<BTreeSet<ForwardElement>, FirewallError> {
        blocking(read_maps)
            .await
            .map_err(|source| FirewallError::Kernel {
                action: "reading the port-forward maps of table inet qnet",
                source,
            })
    }

    /// The table as `nft list` prints it, normalised; empty if it does
    /// not exist.
    pub async fn listing(&self) -> Result<String, FirewallError> {
        nft::list().await
    }
}

fn read_maps() -> io::Result<BTreeSet<ForwardElement>> {
    let mut installed = BTreeSet::new();
    for map in Map::ALL {
        let elements = match nfnetlink::dump_set(TABLE_NAME, map.name()) {
            Ok(elements) => elements,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        for (key, value) in elements {
            match ForwardElement::from_bytes(map, &key, &value) {
                Some(element) => {
                    installed.insert(element);
                }
                None => tracing::warn!(
                    "map {map} of table inet qnet holds an element that is no port forward of ours \
                     (key {key:02x?}, value {value:02x?}); left alone"
                ),
            }
        }
    }
    Ok(installed)
}

/// Checks `elements`, then applies `change` to them (see [`batch`]).
async fn change_elements(
    change: Change,
    elements: &[ForwardElement],
) -> Result<ElementReport, FirewallError> {
    check_elements(elements)?;
    if elements.is_empty() {
        return Ok(ElementReport::default());
    }
    let owned = elements.to_vec();
    let report = blocking(move || batch::apply(change, &owned))
        .await
        .map_err(|source| kernel_error(change, source))?;
    tracing::debug!(
        ?change,
        changed = report.changed.len(),
        refused = report.refused.len(),
        "port forward elements"
    );
    Ok(report)
}

/// Runs blocking nfnetlink work off the async threads: it takes ~0.1 ms,
/// but waits if another process holds the nftables commit lock.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("nfnetlink task: {e}"))))
}

/// A failure of a whole change, with what it means for forwards.
fn kernel_error(change: Change, source: io::Error) -> FirewallError {
    let action = match (change, source.raw_os_error()) {
        (Change::Add, Some(libc::ENOENT)) => {
            "adding port forwards (table inet qnet or its maps are missing)"
        }
        (Change::Remove, Some(libc::ENOENT)) => {
            "removing port forwards (table inet qnet or its maps are missing)"
        }
        (Change::Add, _) => "adding port forwards",
        (Change::Remove, _) => "removing port forwards",
    };
    FirewallError::Kernel { action, source }
}
