//! `[cluster]`: how the nodes sharing one Redis watch each other and place new sessions
//! ([`crate::cluster`]). Without `redis_url` there is one node and none of this applies.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Section, env, err};

/// Where `POST /v1/sessions`, Pipecat's `POST /api/offer` and a WHIP publish create a session (`cluster.placement`,
/// `KOTODAMA_CLUSTER_PLACEMENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On the least-loaded live node: a node holding at least one session more than the
    /// least-loaded live node answers 307 to that node's `POST /v1/sessions` (the margin of one
    /// session keeps two nodes from sending a client back and forth).
    LeastLoaded,
    /// On the node the request reached (a load balancer in front does the placing).
    Local,
}

impl std::str::FromStr for Placement {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "least_loaded" => Ok(Placement::LeastLoaded),
            "local" => Ok(Placement::Local),
            _ => Err(()),
        }
    }
}

/// The cluster's liveness and placement settings (`[cluster]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Where new sessions go (`KOTODAMA_CLUSTER_PLACEMENT`): `least_loaded` (default) or `local`.
    pub placement: Placement,
    /// How often a node renews its heartbeat and re-asserts its sessions' registry entries, ms
    /// (`KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS`, default 5000, at least 50).
    pub heartbeat_interval_ms: u64,
    /// A node whose heartbeat is this old is dead: the others end its sessions (`node_lost`), ms
    /// (`KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS`, default 15000, at least 3 intervals). Also the
    /// lifetime of a registry entry its owner stopped renewing.
    pub heartbeat_expiry_ms: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self { placement: Placement::LeastLoaded, heartbeat_interval_ms: 5_000, heartbeat_expiry_ms: 15_000 }
    }
}

impl ClusterSettings {
    /// The heartbeat period.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }

    /// The heartbeat's (and a registry entry's) lifetime.
    pub fn heartbeat_expiry(&self) -> Duration {
        Duration::from_millis(self.heartbeat_expiry_ms.max(1))
    }
}

impl Section for ClusterSettings {
    /// `KOTODAMA_CLUSTER_PLACEMENT`, `KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS`,
    /// `KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS`.
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let key = "KOTODAMA_CLUSTER_PLACEMENT";
        if let Some(p) = env::parse(get, key, "`least_loaded` or `local`", "use least_loaded or local")? {
            self.placement = p;
        }
        let fix = "use milliseconds, e.g. 5000";
        if let Some(v) = env::parse(get, "KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS", "a number of ms", fix)? {
            self.heartbeat_interval_ms = v;
        }
        if let Some(v) = env::parse(get, "KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS", "a number of ms", fix)? {
            self.heartbeat_expiry_ms = v;
        }
        Ok(())
    }

    /// A period of at least 50 ms, renewed at least three times within the expiry.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms < 50 {
            return Err(err(
                "cluster.heartbeat_interval_ms",
                format!("{} ms is below 50 ms", self.heartbeat_interval_ms),
                "use e.g. 5000 (KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS)",
            ));
        }
        if self.heartbeat_expiry_ms < self.heartbeat_interval_ms.saturating_mul(3) {
            return Err(err(
                "cluster.heartbeat_expiry_ms",
                format!(
                    "{} ms is less than three heartbeat intervals ({} ms): one late renewal would declare a live node dead",
                    self.heartbeat_expiry_ms, self.heartbeat_interval_ms
                ),
                "use at least 3 x cluster.heartbeat_interval_ms (KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::{env, from_env};

    #[test]
    fn defaults_place_least_loaded_and_renew_well_inside_the_expiry() {
        let c = ClusterSettings::default();
        assert_eq!(c.placement, Placement::LeastLoaded);
        assert!(c.heartbeat_expiry() >= 3 * c.heartbeat_interval());
        c.validate().unwrap();
    }

    #[test]
    fn env_and_toml_set_placement_and_periods() {
        let c = from_env(&[
            ("KOTODAMA_CLUSTER_PLACEMENT", "local"),
            ("KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS", "200"),
            ("KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS", "1000"),
        ]);
        assert_eq!(c.cluster.placement, Placement::Local);
        assert_eq!(c.cluster.heartbeat_interval(), Duration::from_millis(200));
        c.validate().unwrap();
        let c = Config::from_toml("[cluster]\nplacement = \"least_loaded\"\nheartbeat_expiry_ms = 20000\n").unwrap();
        assert_eq!(c.cluster.placement, Placement::LeastLoaded);
        assert_eq!(c.cluster.heartbeat_expiry_ms, 20_000);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::default().apply_env(env(&[("KOTODAMA_CLUSTER_PLACEMENT", "random")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_CLUSTER_PLACEMENT");
        assert!(Config::from_toml("[cluster]\nplacement = \"random\"\n").is_err());
        let c = from_env(&[("KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS", "10000")]);
        assert_eq!(c.validate().unwrap_err().key, "cluster.heartbeat_expiry_ms");
        let c = from_env(&[("KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS", "10")]);
        assert_eq!(c.validate().unwrap_err().key, "cluster.heartbeat_interval_ms");
    }
}
