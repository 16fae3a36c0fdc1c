//! Networks users own: the bridge helper's ACL files for them, and
//! owners who left group qnet.

use qnet_api::NetName;

use super::Reconciler;
use crate::config::Config;
use crate::useracl;

impl Reconciler {
    /// Writes the bridge helper's ACL files of users' networks (see
    /// [`useracl`]). Failures are logged: the networks work, only their
    /// users' QEMUs cannot attach until root allows the bridge.
    pub(super) fn sync_user_acls(&mut self) {
        let bridges: Vec<(u32, String)> = self
            .networks
            .values()
            .filter_map(|n| Some((n.config.owner?, n.config.bridge.to_string())))
            .collect();
        let dir = self.paths.run_dir.join(crate::config::RUN_USERS_DIR);
        match useracl::write(&dir, &useracl::render(&dir, &bridges)) {
            Ok(refused) => {
                for (uid, why) in &refused {
                    if self.acl_refused.get(uid) != Some(why) {
                        tracing::warn!(uid, "no bridge ACL file for this user: {why}");
                    }
                }
                self.acl_refused = refused.into_iter().collect();
            }
            Err(e) => tracing::error!(
                "writing the users' bridge ACL files in {}: {e}",
                dir.display()
            ),
        }
    }

    /// What a user who created a network needs to know to attach to it.
    pub(super) fn user_acl_note(&self, uid: u32, bridge: &str) -> String {
        let top = self
            .paths
            .run_dir
            .join(crate::config::RUN_USERS_DIR)
            .join(useracl::TOP_FILE);
        match self.acl_refused.get(&uid) {
            None => format!(
                "; your QEMU may attach to it with qnet-bridge-helper (--br={bridge}) where /etc/qemu/bridge.conf has `include {}`",
                top.display()
            ),
            Some(why) => format!(
                "; but {why}, so qnet cannot allow the bridge for you alone: ask root to add `allow {bridge}` for you to /etc/qemu/bridge.conf"
            ),
        }
    }

    /// How many networks user `uid` owns.
    pub(super) fn owned_by(&self, uid: u32) -> usize {
        self.networks
            .values()
            .filter(|n| n.config.owner == Some(uid))
            .count()
    }
}

/// The run-time networks whose owner is no longer a member of group
/// qnet (or no longer exists): they go on reload. If the group itself is
/// missing, nobody's membership can be told and nothing goes.
pub(super) fn departed_owners(config: &Config) -> Vec<(NetName, std::path::PathBuf)> {
    let group = crate::ctl::CTL_GROUP;
    config
        .networks
        .iter()
        .filter_map(|net| {
            let origin = config.origins.get(&net.name)?;
            let owner = net.owner?;
            let member = useracl::is_member(owner, group);
            if member.is_none() {
                tracing::warn!(network = %net.name, "group `{group}` does not exist: cannot tell whether owner uid {owner} is still a member; keeping the network");
            }
            (origin.runtime && member == Some(false)).then(|| (net.name.clone(), origin.file.clone()))
        })
        .collect()
}
