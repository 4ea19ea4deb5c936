//! Frontend addresses as local addresses of the node (on `lo`). The
//! datapath translates a frontend's packets before the kernel routes them,
//! so this does not change the balanced path; it makes the kernel itself
//! answer what the datapath hands back to it: a TCP reset, or an ICMP port
//! unreachable for UDP, when a service has no backend that can take a new
//! flow, instead of the packet being routed onwards or black-holed.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;

use crate::sources::label_frontends::AddedVips;

pub struct Vips {
    handle: rtnetlink::Handle,
    lo: u32,
    /// Addresses lbd added (and so removes), kept in `record` so that an lbd
    /// started after a crash knows them too.
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

    /// The addresses this lbd added, kept up to date as it adds and removes.
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

    async fn local(&self) -> Result<BTreeSet<IpAddr>> {
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

    /// Makes every address of `wanted` local, and removes the ones this lbd
    /// added that are no longer wanted.
    pub async fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<()> {
        if *wanted == self.synced {
            return Ok(());
        }
        let local = self.local().await?;
        let mut added = false;
        for addr in wanted {
            if !local.contains(addr) {
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                // Known as ours before it shows on lo, so that a label
                // resync in between does not take it for the node's.
                self.added.insert(*addr);
                let result = self
                    .handle
                    .address()
                    .add(self.lo, *addr, prefix)
                    .execute()
                    .await
                    .with_context(|| format!("adding {addr} to lo"));
                if let Err(e) = result {
                    self.added.remove(*addr);
                    return Err(e);
                }
                self.ours.insert(*addr);
                added = true;
            }
        }
        let stale: Vec<IpAddr> = self.ours.difference(wanted).copied().collect();
        if added || !stale.is_empty() {
            for addr in stale {
                self.remove(addr).await?;
            }
            self.save();
        }
        self.synced = wanted.clone();
        Ok(())
    }

    /// Removes every address this lbd added.
    pub async fn clear(&mut self) -> Result<()> {
        let ours: Vec<IpAddr> = self.ours.iter().copied().collect();
        for addr in ours {
            self.remove(addr).await?;
        }
        self.save();
        self.synced.clear();
        Ok(())
    }

    async fn remove(&mut self, addr: IpAddr) -> Result<()> {
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.lo)
            .set_address_filter(addr)
            .execute();
        while let Some(msg) = dump.try_next().await? {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("removing {addr} from lo"))?;
        }
        self.ours.remove(&addr);
        self.added.remove(addr);
        Ok(())
    }
}
