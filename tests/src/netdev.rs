//! Device settings that tests change inside their namespaces: checksum
//! offloads (what `ethtool -K DEV tx off rx off` does, through the same
//! ioctl, so no ethtool binary is needed), MTUs and ICMP counters.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::Netns;

const ETHTOOL_GRXCSUM: u32 = 0x14;
const ETHTOOL_SRXCSUM: u32 = 0x15;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One `SIOCETHTOOL` get or set of a `struct ethtool_value`, in the
/// calling thread's namespace.
fn ethtool_value(dev: &str, cmd: u32, data: u32) -> Result<u32> {
    ensure!(
        dev.len() < libc::IFNAMSIZ,
        "interface name {dev:?} is too long"
    );
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCETHTOOL");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: ifr and the value it points to outlive the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("SIOCETHTOOL {cmd:#x} on {dev}"));
    }
    Ok(value.data)
}

/// Whether a device checksums in "hardware": (tx, rx, tso).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    pub tx_csum: bool,
    pub rx_csum: bool,
    pub tso: bool,
}

/// The checksum offloads of `dev` in `ns`.
pub fn offloads(ns: &Netns, dev: &str) -> Result<Offloads> {
    ns.run(|| {
        Ok(Offloads {
            tx_csum: ethtool_value(dev, ETHTOOL_GTXCSUM, 0)? != 0,
            rx_csum: ethtool_value(dev, ETHTOOL_GRXCSUM, 0)? != 0,
            tso: ethtool_value(dev, ETHTOOL_GTSO, 0)? != 0,
        })
    })
}

/// `ethtool -K DEV tx off rx off` in `ns` (or `on`), checked by reading the
/// settings back. Turning tx checksumming off also turns TSO off (the
/// kernel drops features that depend on it), so every packet then carries a
/// checksum computed in software and is verified by its receiver.
pub fn set_checksum_offload(ns: &Netns, dev: &str, on: bool) -> Result<()> {
    ns.run(|| -> Result<()> {
        ethtool_value(dev, ETHTOOL_STXCSUM, u32::from(on))?;
        ethtool_value(dev, ETHTOOL_SRXCSUM, u32::from(on))?;
        Ok(())
    })?;
    let now = offloads(ns, dev)?;
    if now.tx_csum != on || now.rx_csum != on || (!on && now.tso) {
        bail!(
            "checksum offloads of {dev} in {} are {now:?} after setting them {}",
            ns.name(),
            if on { "on" } else { "off" }
        );
    }
    Ok(())
}

/// `ethtool -K DEV gro on` in `ns` (or `off`), checked by reading it back.
/// On a veth, GRO also gives the device its own NAPI poller, without which
/// it refuses frames an XDP program redirects to its peer.
pub fn set_gro(ns: &Netns, dev: &str, on: bool) -> Result<()> {
    let now = ns.run(|| -> Result<u32> {
        ethtool_value(dev, ETHTOOL_SGRO, u32::from(on))?;
        ethtool_value(dev, ETHTOOL_GGRO, 0)
    })?;
    ensure!(
        (now != 0) == on,
        "GRO of {dev} in {} is {now} after setting it {on}",
        ns.name()
    );
    Ok(())
}

/// Sets the MTU of `dev` in `ns`.
pub fn set_mtu(ns: &Netns, dev: &str, mtu: u32) -> Result<()> {
    ns.ip(&["link", "set", "dev", dev, "mtu", &mtu.to_string()])
}

/// The packets `dev` in `ns` has received and transmitted, as the device
/// counts them (`/proc/net/dev`).
pub fn packet_counts(ns: &Netns, dev: &str) -> Result<(u64, u64)> {
    let dev = dev.to_owned();
    ns.run(move || {
        // thread-self: the thread that joined the namespace.
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
        let fields: Vec<u64> = text
            .lines()
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == dev).then(|| {
                    rest.split_whitespace()
                        .filter_map(|f| f.parse().ok())
                        .collect()
                })
            })
            .with_context(|| format!("{dev} not in /proc/net/dev"))?;
        // Receive: bytes, packets, ...; transmit starts at the ninth field.
        ensure!(fields.len() >= 16, "{dev}: short line in /proc/net/dev");
        Ok((fields[1], fields[9]))
    })
}

/// A counter of `/proc/net/snmp` (IPv4: `Icmp`, `InDestUnreachs`) or
/// `/proc/net/snmp6` (`Icmp6InDestUnreachs`) as seen inside `ns`.
pub fn snmp_counter(ns: &Netns, group: &str, name: &str) -> Result<u64> {
    let (v6, group, name) = (group.ends_with('6'), group.to_owned(), name.to_owned());
    ns.run(move || {
        // thread-self: the thread that joined the namespace, not the
        // process's main thread.
        let file = if v6 { "snmp6" } else { "snmp" };
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))?;
        if v6 {
            let key = format!("{group}{name}");
            return text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(char::is_whitespace)?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
                .with_context(|| format!("{key} not in snmp6"));
        }
        // Two lines per group: the names, then the values.
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no {group} in snmp");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .with_context(|| format!("{group} {name} not in snmp"))
    })
}
