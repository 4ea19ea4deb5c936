//! Frontend addresses made local to the node. The datapath translates a
//! frontend's packets before the kernel routes them, so this does not
//! change the balanced path; it makes the kernel itself answer what the
//! datapath hands back to it: a TCP reset, or an ICMP port unreachable for
//! UDP, when a service has no backend that can take a new flow, instead of
//! the packet being routed onwards or black-holed.
//!
//! Each frontend gets a route of type `local` in the `local` table (what
//! `ip route add local X/32 dev lo table local` makes), not an address on
//! `lo`: local delivery is the same, but the kernel adds a route in about a
//! tenth of the time of an address, and an address costs more the more
//! addresses there are (10,000 frontends took over a minute as addresses).
//! The requests are sent without awaiting each answer, so that a start
//! with thousands of frontends pays one round trip per batch, not per
//! frontend. The routes carry protocol [`PROTO`], so an operator can list
//! them (`ip route show table local proto 76`) and so that a removal never
//! matches a local route of someone else's.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;

use crate::sources::label_frontends::AddedVips;

/// The routing protocol number of lbd's routes (`proto 76` in `ip route`).
pub const PROTO: u8 = 76;
const RT_TABLE_LOCAL: u8 = 255;
/// Requests in flight at once on the netlink socket: enough to hide the
/// round trip, few enough that the kernel never drops an answer for want
/// of socket buffer.
const IN_FLIGHT: usize = 256;

/// The local route that makes `addr` local, as lbd adds and removes it.
fn local_route(addr: IpAddr, lo: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let (family, len, dst) = match addr {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = len;
    msg.header.table = RT_TABLE_LOCAL;
    msg.header.protocol = RouteProtocol::Other(PROTO);
    msg.header.scope = RouteScope::Host;
    msg.header.kind = RouteType::Local;
    msg.attributes.push(RouteAttribute::Destination(dst));
    msg.attributes.push(RouteAttribute::Oif(lo));
    msg
}

/// The errno of a netlink error, positive.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

pub struct Vips {
    handle: rtnetlink::Handle,
    lo: u32,
    /// Frontends lbd made local (and so removes), kept in `record` so that
    /// an lbd started after a crash knows them too. Recorded before the
    /// routes are asked for, so a crash in between leaves no route unknown.
    ours: BTreeSet<IpAddr>,
    /// `ours`, for the Docker source (see label_frontends.rs).
    added: AddedVips,
    record: std::path::PathBuf,
    /// What the last successful `sync` was given: the loop calls `sync`
    /// after every event, and most events change no frontend.
    synced: BTreeSet<IpAddr>,
}

impl Vips {
    pub async fn new(record: std::path::PathBuf) -> Result<Vips> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let lo = handle
            .link()
            .get()
            .match_name("lo".into())
            .execute()
            .try_next()
            .await?
            .context("no lo interface")?
            .header
            .index;
        let ours: BTreeSet<IpAddr> = std::fs::read_to_string(&record)
            .map(|text| text.lines().filter_map(|l| l.parse().ok()).collect())
            .unwrap_or_default();
        let added = AddedVips::default();
        for addr in &ours {
            added.insert(*addr);
        }
        Ok(Vips {
            handle,
            lo,
            ours,
            added,
            record,
            synced: BTreeSet::new(),
        })
    }

    /// The addresses this lbd made local, kept up to date as it adds and
    /// removes.
    pub fn added(&self) -> AddedVips {
        self.added.clone()
    }

    fn save(&self) {
        if let Some(dir) = self.record.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text: String = self.ours.iter().map(|a| format!("{a}\n")).collect();
        if let Err(e) = std::fs::write(&self.record, text) {
            log::warn!("writing {}: {e}", self.record.display());
        }
    }

    /// The addresses of every interface: the node's own, never made local
    /// by lbd.
    async fn node_addresses(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        let mut dump = self.handle.address().get().execute();
        while let Some(msg) = dump.try_next().await? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(a) | AddressAttribute::Local(a) = attr {
                    out.insert(a);
                }
            }
        }
        Ok(out)
    }

    /// The destinations of the local routes of lbd's protocol on `lo`.
    async fn routes(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let mut dump = self.handle.route().get(version).execute();
            while let Some(msg) = dump.try_next().await? {
                let h = &msg.header;
                if h.kind != RouteType::Local || h.protocol != RouteProtocol::Other(PROTO) {
                    continue;
                }
                let on_lo = msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == self.lo));
                for attr in &msg.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) if on_lo => {
                            out.insert(IpAddr::V4(*a));
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) if on_lo => {
                            out.insert(IpAddr::V6(*a));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// Makes every address of `wanted` local, and removes what this lbd
    /// added that is no longer wanted.
    pub async fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<()> {
        if *wanted == self.synced {
            return Ok(());
        }
        let node = self.node_addresses().await?;
        let present = self.routes().await?;
        let new: Vec<IpAddr> = wanted
            .iter()
            // Neither the node's own nor already ours and in place.
            .filter(|a| !(node.contains(a) || (self.ours.contains(a) && present.contains(a))))
            .copied()
            .collect();
        let stale: Vec<IpAddr> = self.ours.difference(wanted).copied().collect();
        if new.is_empty() && stale.is_empty() {
            self.synced = wanted.clone();
            return Ok(());
        }
        for addr in &new {
            // Known as ours before the route exists, so that a label resync
            // in between does not take it for the node's.
            self.added.insert(*addr);
            self.ours.insert(*addr);
        }
        self.save();
        let handle = &self.handle;
        let lo = self.lo;
        let results: Vec<(IpAddr, Result<(), rtnetlink::Error>)> =
            futures::stream::iter(new.iter().copied())
                .map(|addr| async move {
                    let mut req = handle.route().add();
                    *req.message_mut() = local_route(addr, lo);
                    (addr, req.execute().await)
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
        let mut failed = None;
        for (addr, result) in results {
            let Err(e) = result else { continue };
            // Someone else's route for the same destination: not ours to
            // add or remove.
            if errno(&e) != Some(libc::EEXIST) {
                failed.get_or_insert_with(|| format!("making {addr} local: {e}"));
            }
            self.ours.remove(&addr);
            self.added.remove(addr);
        }
        self.remove_all(&stale).await?;
        if let Some(e) = failed {
            anyhow::bail!(e);
        }
        self.synced = wanted.clone();
        Ok(())
    }

    /// Removes every route this lbd added.
    pub async fn clear(&mut self) -> Result<()> {
        let ours: Vec<IpAddr> = self.ours.iter().copied().collect();
        self.remove_all(&ours).await?;
        self.synced.clear();
        Ok(())
    }

    /// Removes the routes to `addrs`, pipelined, and records what is left.
    async fn remove_all(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let handle = &self.handle;
        let lo = self.lo;
        let results: Vec<(IpAddr, Result<()>)> = futures::stream::iter(addrs.iter().copied())
            .map(|addr| async move { (addr, remove(handle, lo, addr).await) })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut failed = None;
        for (addr, result) in results {
            match result {
                Ok(()) => {
                    self.ours.remove(&addr);
                    self.added.remove(addr);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        self.save();
        failed.map_or(Ok(()), Err)
    }
}

/// Removes lbd's local route to `addr`; if there is none, the address on
/// `lo` an lbd of before local routes added for it.
async fn remove(handle: &rtnetlink::Handle, lo: u32, addr: IpAddr) -> Result<()> {
    match handle.route().del(local_route(addr, lo)).execute().await {
        Ok(()) => return Ok(()),
        Err(e) if errno(&e) == Some(libc::ESRCH) => {}
        Err(e) => return Err(e).with_context(|| format!("removing the route to {addr}")),
    }
    let mut dump = handle
        .address()
        .get()
        .set_link_index_filter(lo)
        .set_address_filter(addr)
        .execute();
    while let Some(msg) = dump.try_next().await? {
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing {addr} from lo"))?;
    }
    Ok(())
}
