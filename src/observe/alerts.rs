//! The alerts of `[alerts]`, which need no Prometheus: each is evaluated from what the relay
//! knows (flow, queue census, upstream states), starts and ends once (a documented hysteresis),
//! is logged at error level with `alert=NAME`, shows in `/metrics`, `/api/status` and the
//! status page, and is POSTed to `webhook` without ever blocking mail.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// An alert name of the contract (also the `alert` label and the webhook's `alert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertName {
    NoInbound,
    NoDelivery,
    QueueDepth,
    OldestMessage,
    UpstreamDown,
    UserSuspended,
    ClusterFallback,
}

impl AlertName {
    /// Every alert, in the contract's order.
    pub const ALL: [AlertName; 7] = [
        AlertName::NoInbound,
        AlertName::NoDelivery,
        AlertName::QueueDepth,
        AlertName::OldestMessage,
        AlertName::UpstreamDown,
        AlertName::UserSuspended,
        AlertName::ClusterFallback,
    ];

    /// The name as the contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertName::NoInbound => "no_inbound",
            AlertName::NoDelivery => "no_delivery",
            AlertName::QueueDepth => "queue_depth",
            AlertName::OldestMessage => "oldest_message",
            AlertName::UpstreamDown => "upstream_down",
            AlertName::UserSuspended => "user_suspended",
            AlertName::ClusterFallback => "cluster_fallback",
        }
    }
}

/// A firing alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlert {
    pub alert: AlertName,
    /// Unix seconds when it started.
    pub since: u64,
    /// The value that made it fire (seconds, or a message count), as text.
    pub value: String,
    /// The threshold it crossed, as written in the policy.
    pub threshold: String,
    /// One line for a person: what is wrong and where to look.
    pub text: String,
}

/// The alerts firing now (written by the alert task, read by the status).
#[derive(Debug, Default)]
pub struct AlertBoard {
    active: Mutex<Vec<ActiveAlert>>,
}

impl AlertBoard {
    /// The firing alerts, in the contract's order.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the firing alerts.
    pub fn set(&self, mut active: Vec<ActiveAlert>) {
        active.sort_by_key(|a| a.alert);
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = active;
    }
}
