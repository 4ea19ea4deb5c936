//! Which interfaces the datapath attaches to, and which lead into a local
//! container, following rtnetlink link events so that interfaces created
//! later (veths of new containers, bridges) are covered as they appear.

use std::collections::BTreeMap;

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage};
use netlink_sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;

/// The node's interfaces, as one dump saw them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Links {
    /// Those the datapath attaches to: name by index.
    pub eligible: BTreeMap<u32, String>,
    /// Veths whose peer is in another namespace (a local container's): the
    /// veth's MAC by index. The datapath hands packets routed out of one
    /// straight to the peer (PEER_PORTS).
    pub peer_ports: BTreeMap<u32, [u8; 6]>,
}

/// Sends the full set of eligible interfaces now and after every link change.
pub async fn watch(only: Vec<String>, tx: mpsc::Sender<Links>) -> Result<()> {
    let (mut conn, handle, mut events) = rtnetlink::new_connection()?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))?;
    tokio::spawn(conn);
    loop {
        let mut links = Links::default();
        let mut dump = handle.link().get().execute();
        while let Some(msg) = dump.try_next().await? {
            if let Some(name) = eligible(&msg, &only) {
                links.eligible.insert(msg.header.index, name);
            }
            if let Some(mac) = peer_port(&msg) {
                links.peer_ports.insert(msg.header.index, mac);
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

/// The MAC of a veth whose peer is in another namespace: the kernel
/// reports the peer's namespace (IFLA_LINK_NETNSID) only then. The kernel
/// refuses `bpf_redirect_peer` into a peer in the same namespace.
fn peer_port(msg: &LinkMessage) -> Option<[u8; 6]> {
    let mut veth = false;
    let mut elsewhere = false;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
            }
            LinkAttribute::NetnsId(_) => elsewhere = true,
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    mac.filter(|_| veth && elsewhere)
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

    #[test]
    fn only_veths_with_a_peer_elsewhere_are_peer_ports() {
        let mac = [2, 0, 0, 0, 0, 1];
        let veth = |elsewhere: bool| {
            let mut msg = link("veth1", LinkLayerType::Ether);
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
            msg.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Veth,
                )]));
            if elsewhere {
                msg.attributes.push(LinkAttribute::NetnsId(3));
            }
            msg
        };
        assert_eq!(peer_port(&veth(true)), Some(mac));
        assert_eq!(peer_port(&veth(false)), None);
        // A VXLAN device also reports a link namespace, but has no peer.
        let mut vxlan = link("vx0", LinkLayerType::Ether);
        vxlan.attributes.push(LinkAttribute::Address(mac.to_vec()));
        vxlan
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Vxlan,
            )]));
        vxlan.attributes.push(LinkAttribute::NetnsId(3));
        assert_eq!(peer_port(&vxlan), None);
    }
}
