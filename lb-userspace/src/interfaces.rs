//! Which interfaces the datapath attaches to, following rtnetlink link
//! events so that interfaces created later (veths of new containers,
//! bridges) are covered as they appear.

use std::collections::BTreeMap;

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;

/// Interface name by index.
pub type Links = BTreeMap<u32, String>;

/// Sends the full set of eligible interfaces now and after every link change.
pub async fn watch(only: Vec<String>, tx: mpsc::Sender<Links>) -> Result<()> {
    let (mut conn, handle, mut events) = rtnetlink::new_connection()?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))?;
    tokio::spawn(conn);
    loop {
        let mut links = Links::new();
        let mut dump = handle.link().get().execute();
        while let Some(msg) = dump.try_next().await? {
            if let Some(name) = eligible(&msg, &only) {
                links.insert(msg.header.index, name);
            }
        }
        if tx.send(links).await.is_err() {
            return Ok(());
        }
        // Any link event triggers a fresh dump: simpler than applying
        // deltas, and link changes are rare.
        if events.next().await.is_none() {
            anyhow::bail!("the netlink link events ended");
        }
        while let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), events.next()).await
        {
        }
    }
}

fn eligible(msg: &LinkMessage, only: &[String]) -> Option<String> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    if !only.is_empty() && !only.contains(&name) {
        return None;
    }
    // The datapath parses Ethernet frames; on an interface without an
    // Ethernet header (loopback, WireGuard, tun, ipip) it would misread
    // every packet, so it is not attached there.
    if msg.header.link_layer_type != LinkLayerType::Ether {
        if !only.is_empty() {
            log::warn!("{name} has no Ethernet header; the datapath is not attached to it");
        }
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, kind: LinkLayerType) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.link_layer_type = kind;
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg
    }

    #[test]
    fn only_ethernet_interfaces_are_eligible() {
        assert_eq!(
            eligible(&link("eth0", LinkLayerType::Ether), &[]),
            Some("eth0".into())
        );
        for (name, kind) in [
            ("lo", LinkLayerType::Loopback),
            ("wg0", LinkLayerType::None),
            ("tun0", LinkLayerType::None),
            ("ipip0", LinkLayerType::Tunnel),
            ("sit0", LinkLayerType::Sit),
        ] {
            assert_eq!(eligible(&link(name, kind), &[]), None, "{name}");
            // Not even when asked for by name.
            assert_eq!(eligible(&link(name, kind), &[name.into()]), None, "{name}");
        }
        assert_eq!(
            eligible(&link("eth1", LinkLayerType::Ether), &["eth0".into()]),
            None
        );
    }
}
