//! The scenario's network built for real in the current namespace: veth
//! interfaces with the scenario's MACs and MTUs, forwarding per interface,
//! routes through gateways with permanent neighbour entries (or none).

use std::net::IpAddr;

use lb_common::is_v4_mapped;
use lb_model::scenario::Scenario;
use lb_model::RouteKind;
use lb_userspace::reconciler::addr_of;

fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A prefix in `ip` notation from the 16-byte form.
fn prefix_string(prefix: &[u8; 16], len: u8) -> String {
    if is_v4_mapped(prefix) {
        format!("{}/{}", addr_of(prefix), len - 96)
    } else {
        format!("{}/{}", addr_of(prefix), len)
    }
}

/// The interface's own address on a gateway's subnet: the gateway with its
/// last byte set to 1.
fn own_address(gateway: &[u8; 16]) -> String {
    let mut a = *gateway;
    a[15] = 1;
    match addr_of(&a) {
        IpAddr::V4(v4) => format!("{v4}/24"),
        IpAddr::V6(v6) => format!("{v6}/64"),
    }
}

/// Builds `sc` here and gives its interfaces their real ifindexes.
pub fn build(sc: &mut Scenario) {
    sh(
        "ip link set lo up && sysctl -qw net.ipv4.conf.all.forwarding=1 \
        net.ipv6.conf.all.forwarding=1",
    );
    for i in &sc.fib.interfaces {
        sh(&format!(
            "ip link add {n} address {mac} mtu {mtu} type veth peer name {n}p && \
             ip link set {n} up && ip link set {n}p up",
            n = i.name,
            mac = mac_string(&i.mac),
            mtu = i.mtu,
        ));
        let onoff = |on: bool| if on { 1 } else { 0 };
        sh(&format!(
            "sysctl -qw net.ipv4.conf.{n}.forwarding={} net.ipv6.conf.{n}.forwarding={}",
            onoff(i.forwarding_v4),
            onoff(i.forwarding_v6),
            n = i.name,
        ));
    }
    let mut addressed = Vec::new();
    for r in &sc.fib.routes {
        let prefix = prefix_string(&r.prefix, r.prefix_len);
        let family = if is_v4_mapped(&r.prefix) { "-4" } else { "-6" };
        match r.kind {
            RouteKind::Unreachable => {
                sh(&format!("ip {family} route add unreachable {prefix}"));
            }
            RouteKind::Unicast => {
                let dev = sc.route_dev(r).expect("route device").name.clone();
                let gw = addr_of(&r.gateway);
                let own = own_address(&r.gateway);
                if !addressed.contains(&own) {
                    let nodad = if family == "-6" { "nodad" } else { "" };
                    sh(&format!("ip {family} addr add {own} dev {dev} {nodad}"));
                    addressed.push(own);
                }
                sh(&format!(
                    "ip {family} route add {prefix} via {gw} dev {dev}"
                ));
                if let Some(mac) = r.neighbour {
                    sh(&format!(
                        "ip {family} neigh replace {gw} lladdr {} dev {dev} nud permanent",
                        mac_string(&mac)
                    ));
                }
            }
        }
    }
    sc.renumber(|name| nix::net::if_::if_nametoindex(name).expect("ifindex"));
}
