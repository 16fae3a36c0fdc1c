//! The [`Driver`] trait: what every firewall qnet writes to does.

use std::future::Future;

use super::batch::ElementReport;
use super::element::ForwardElement;
use super::error::FirewallError;
use crate::config::NetworkConfig;

/// One firewall qnet puts its rules in (modelled on netavark's firewall
/// driver): our own table ([`super::QnetTable`]) now, integrations with other
/// firewalls next (see the module documentation of [`super`]).
pub trait Driver {
    /// For logs: what this driver changes.
    fn name(&self) -> &'static str;

    /// Makes the rules for `networks` with exactly `elements` installed,
    /// replacing what the driver installed before, as one transaction
    /// where the firewall allows. Invalid or conflicting elements
    /// ([`super::check_elements`]) are an error before anything changes.
    /// With no networks and no elements this is [`Driver::teardown`].
    fn apply_ruleset(
        &self,
        networks: &[NetworkConfig],
        elements: &[ForwardElement],
    ) -> impl Future<Output = Result<(), FirewallError>> + Send;

    /// Installs `elements` beside the installed ones, touching nothing
    /// else. An element installed already is a no-op. `Err` (and nothing
    /// changed) for invalid elements and failures that are no element's
    /// own (a missing table, no permission, no answer); otherwise each
    /// element is in the report as installed or refused with the reason.
    fn add_elements(
        &self,
        elements: &[ForwardElement],
    ) -> impl Future<Output = Result<ElementReport, FirewallError>> + Send;

    /// Removes `elements`, touching nothing else; one that is not
    /// installed is a no-op. One installed with *another* guest is not
    /// ours to remove: it is refused (`EEXIST`) and stays. Errors as for
    /// [`Driver::add_elements`].
    fn remove_elements(
        &self,
        elements: &[ForwardElement],
    ) -> impl Future<Output = Result<ElementReport, FirewallError>> + Send;

    /// Removes everything this driver installed, and nothing else.
    fn teardown(&self) -> impl Future<Output = Result<(), FirewallError>> + Send;
}
