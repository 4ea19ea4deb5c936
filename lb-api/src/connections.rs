//! The datapath's connections as `lbctl conntrack list` shows them.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One connection: its two conntrack halves, told once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    pub service: String,
    /// `ip:port/proto`.
    pub frontend: String,
    pub client: String,
    pub backend: String,
    /// With full NAT (or a hairpin): the source the backend sees.
    pub nat: Option<String>,
    /// "new" (no answer yet), "answered" (not confirmed yet),
    /// "established", "closing" or "reset".
    pub state: String,
    /// Whether lbd's datapath has confirmed it (CONNTRACK) or not yet
    /// (CT_PENDING).
    pub confirmed: bool,
    /// Seconds since its latest packet, and until it expires without one.
    pub idle_secs: f64,
    pub expires_in_secs: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionList {
    /// At most the limit asked for.
    pub connections: Vec<Connection>,
    /// All the connections that matched, shown or not.
    pub total: u64,
}

/// The table `lbctl conntrack list` prints.
pub fn render_table(list: &ConnectionList) -> String {
    let mut rows = vec![[
        "SERVICE", "FRONTEND", "CLIENT", "NAT", "BACKEND", "STATE", "IDLE", "EXPIRES",
    ]
    .map(String::from)];
    for c in &list.connections {
        rows.push([
            c.service.clone(),
            c.frontend.clone(),
            c.client.clone(),
            c.nat.clone().unwrap_or_else(|| "-".into()),
            c.backend.clone(),
            c.state.clone(),
            format!("{:.0}s", c.idle_secs),
            format!("{:.0}s", c.expires_in_secs),
        ]);
    }
    let mut out = String::new();
    crate::status::write_columns(&mut out, &rows);
    let shown = list.connections.len() as u64;
    if list.total > shown {
        let _ = writeln!(out, "... {} more (raise --limit)", list.total - shown);
    }
    if list.total == 0 {
        let _ = writeln!(out, "(no connections)");
    }
    out
}
