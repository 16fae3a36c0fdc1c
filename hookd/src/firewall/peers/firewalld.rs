//! firewalld as a [`PeerDriver`], over its D-Bus API on the system bus
//! (`org.fedoraproject.FirewallD1`). Permanent and runtime configuration
//! are kept the same: zones and policies are created permanently (and a
//! reload makes them live — firewalld cannot add a zone at runtime); a
//! bridge is bound to its zone in both. What to change is planned in
//! [`super::firewalld_plan`].

use std::collections::{BTreeSet, HashMap};

use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::Connection;

use super::firewalld_plan::{
    interface_changes, is_no_op, wanted_interfaces, IfChange, DESCRIPTION, POLICIES, SERVICES,
    ZONES,
};
use super::{Applied, Openings, PeerDriver, PeerError};

pub const BUS_NAME: &str = "org.fedoraproject.FirewallD1";
const PATH: &str = "/org/fedoraproject/FirewallD1";
const CONFIG_PATH: &str = "/org/fedoraproject/FirewallD1/config";
const CONFIG: &str = "org.fedoraproject.FirewallD1.config";
const CONFIG_ZONE: &str = "org.fedoraproject.FirewallD1.config.zone";
const CONFIG_POLICY: &str = "org.fedoraproject.FirewallD1.config.policy";
const ZONE: &str = "org.fedoraproject.FirewallD1.zone";

/// firewalld on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` moves it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Firewalld;

impl Firewalld {
    pub const fn system() -> Firewalld {
        Firewalld
    }

    /// A connection to the system bus with firewalld on it; `None` when
    /// there is no bus or no firewalld.
    pub async fn connect(&self) -> Option<Connection> {
        let conn = Connection::system().await.ok()?;
        let has: bool = call(
            &conn,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            &(BUS_NAME,),
        )
        .await
        .ok()?;
        has.then_some(conn)
    }

    /// The zone whose rules `interface`'s packets meet (the default zone
    /// for an interface bound to none); `None` without firewalld.
    pub async fn zone_of_interface(&self, interface: &str) -> Option<String> {
        let conn = self.connect().await?;
        let zone: String = fw(&conn, PATH, ZONE, "getZoneOfInterface", &(interface,))
            .await
            .ok()?;
        if !zone.is_empty() {
            return Some(zone);
        }
        fw(&conn, PATH, BUS_NAME, "getDefaultZone", &()).await.ok()
    }

    /// Removes qnet's zones and policies (after their interfaces), then
    /// reloads so the runtime follows: the uninstall.
    pub async fn remove_definitions(&self) -> Result<(), PeerError> {
        let Some(conn) = self.connect().await else {
            return Ok(());
        };
        let mut removed = false;
        for policy in POLICIES {
            if let Some(path) = config_object(&conn, "getPolicyByName", policy.name).await? {
                fw::<()>(&conn, &path, CONFIG_POLICY, "remove", &()).await?;
                removed = true;
            }
        }
        for zone in ZONES {
            if let Some(path) = config_object(&conn, "getZoneByName", zone.name).await? {
                fw::<()>(&conn, &path, CONFIG_ZONE, "remove", &()).await?;
                removed = true;
            }
        }
        if removed {
            fw::<()>(&conn, PATH, BUS_NAME, "reload", &()).await?;
        }
        Ok(())
    }
}

impl PeerDriver for Firewalld {
    fn name(&self) -> String {
        "firewalld".to_owned()
    }

    async fn apply(&self, what: &Openings) -> Result<Applied, PeerError> {
        let networks = &what.networks;
        let Some(conn) = self.connect().await else {
            return Ok(Applied::default());
        };
        let mut changes = 0;
        if !networks.is_empty() {
            changes += define(&conn).await?;
        }
        for (zone, want) in wanted_interfaces(networks) {
            let Some(path) = config_object(&conn, "getZoneByName", zone).await? else {
                continue;
            };
            let permanent = permanent_interfaces(&conn, &path).await?;
            for change in interface_changes(zone, &want, &permanent) {
                changes += 1;
                match change {
                    IfChange::Add { bridge, .. } => {
                        no_op_ok(fw(&conn, &path, CONFIG_ZONE, "addInterface", &(bridge,)).await)?
                    }
                    IfChange::Remove { bridge, .. } => no_op_ok(
                        fw(&conn, &path, CONFIG_ZONE, "removeInterface", &(bridge,)).await,
                    )?,
                }
            }
            let runtime = runtime_interfaces(&conn, zone).await?;
            for change in interface_changes(zone, &want, &runtime) {
                changes += 1;
                let outcome: Result<String, PeerError> = match change {
                    IfChange::Add { zone, bridge } => {
                        fw(&conn, PATH, ZONE, "changeZoneOfInterface", &(zone, bridge)).await
                    }
                    IfChange::Remove { zone, bridge } => {
                        fw(&conn, PATH, ZONE, "removeInterface", &(zone, bridge)).await
                    }
                };
                no_op_ok(outcome.map(drop))?;
            }
        }
        Ok(Applied {
            present: true,
            changes,
        })
    }
}

/// Creates the zones and policies missing from the permanent
/// configuration and, if any was, reloads so they are live. Returns how
/// many were created.
async fn define(conn: &Connection) -> Result<usize, PeerError> {
    let mut created = 0;
    for zone in ZONES {
        let mut settings: HashMap<&str, Value> = HashMap::new();
        settings.insert("short", Value::from(zone.short));
        settings.insert("description", Value::from(DESCRIPTION));
        settings.insert("target", Value::from("default"));
        settings.insert("services", Value::from(SERVICES.to_vec()));
        settings.insert("forward", Value::from(true));
        created += usize::from(
            add_missing(conn, ("getZoneByName", "addZone2"), zone.name, settings).await?,
        );
    }
    for policy in POLICIES {
        let mut settings: HashMap<&str, Value> = HashMap::new();
        settings.insert("description", Value::from(DESCRIPTION));
        settings.insert("target", Value::from("ACCEPT"));
        settings.insert("ingress_zones", Value::from(vec![policy.ingress]));
        settings.insert("egress_zones", Value::from(vec![policy.egress]));
        created += usize::from(
            add_missing(
                conn,
                ("getPolicyByName", "addPolicy"),
                policy.name,
                settings,
            )
            .await?,
        );
    }
    if created > 0 {
        tracing::info!(
            created,
            "firewalld: created qnet's zones and policies; reloading"
        );
        fw::<()>(conn, PATH, BUS_NAME, "reload", &()).await?;
    }
    Ok(created)
}

/// Adds the permanent zone or policy `name` with `settings` (through the
/// `(getter, adder)` pair of the config interface) unless it exists;
/// whether it was added.
async fn add_missing(
    conn: &Connection,
    (getter, adder): (&str, &str),
    name: &str,
    settings: HashMap<&str, Value<'_>>,
) -> Result<bool, PeerError> {
    if config_object(conn, getter, name).await?.is_some() {
        return Ok(false);
    }
    let _: OwnedObjectPath = fw(conn, CONFIG_PATH, CONFIG, adder, &(name, settings)).await?;
    Ok(true)
}

/// The object of a permanent zone or policy, if it exists.
async fn config_object(
    conn: &Connection,
    getter: &str,
    name: &str,
) -> Result<Option<String>, PeerError> {
    match fw::<OwnedObjectPath>(conn, CONFIG_PATH, CONFIG, getter, &(name,)).await {
        Ok(path) => Ok(Some(path.as_str().to_owned())),
        Err(PeerError::Bus(e)) if e.contains("INVALID_ZONE") || e.contains("INVALID_POLICY") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn permanent_interfaces(
    conn: &Connection,
    path: &str,
) -> Result<BTreeSet<String>, PeerError> {
    let settings: HashMap<String, OwnedValue> =
        fw(conn, path, CONFIG_ZONE, "getSettings2", &()).await?;
    Ok(settings
        .get("interfaces")
        .and_then(|v| Vec::<String>::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_default()
        .into_iter()
        .collect())
}

async fn runtime_interfaces(conn: &Connection, zone: &str) -> Result<BTreeSet<String>, PeerError> {
    match fw::<Vec<String>>(conn, PATH, ZONE, "getInterfaces", &(zone,)).await {
        Ok(list) => Ok(list.into_iter().collect()),
        // Defined permanently but not live yet (no reload since).
        Err(PeerError::Bus(e)) if e.contains("INVALID_ZONE") => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

fn no_op_ok(outcome: Result<(), PeerError>) -> Result<(), PeerError> {
    match outcome {
        Err(PeerError::Bus(e)) if is_no_op(&e) => Ok(()),
        other => other,
    }
}

/// What a D-Bus method takes: its arguments, as one value.
trait Body: serde::Serialize + zbus::zvariant::DynamicType {}
impl<T: serde::Serialize + zbus::zvariant::DynamicType> Body for T {}

/// What a D-Bus method returns.
trait Returns: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type {}
impl<T: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type> Returns for T {}

/// Calls a firewalld method.
async fn fw<R: Returns>(
    conn: &Connection,
    path: &str,
    interface: &str,
    method: &str,
    body: &impl Body,
) -> Result<R, PeerError> {
    call(conn, BUS_NAME, path, interface, method, body).await
}

async fn call<R: Returns>(
    conn: &Connection,
    destination: &str,
    path: &str,
    interface: &str,
    method: &str,
    body: &impl Body,
) -> Result<R, PeerError> {
    let bus = |e: zbus::Error| PeerError::Bus(format!("{interface}.{method}: {e}"));
    let reply = conn
        .call_method(Some(destination), path, Some(interface), method, body)
        .await
        .map_err(bus)?;
    reply.body().deserialize::<R>().map_err(bus)
}
