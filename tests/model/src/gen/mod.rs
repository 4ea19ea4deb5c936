//! A seeded packet generator. Tuples come from small pools, so flows are
//! reused, reopened after FIN/RST, expire and collide; replies and ICMP
//! errors are built from the connections the model tracks, so every state
//! of the contract is reached in both directions. A share of the packets is
//! broken on purpose (section 1).

pub mod build;
mod malform;

use lb_common::{
    is_v4_mapped, Backend, FlowKey, ServiceKey, ServiceValue, CT_SNAT, PROTO_TCP, PROTO_UDP,
};

use crate::conntrack;
use crate::packet::{
    EXT_AH, EXT_DEST_OPTS, EXT_HOP_BY_HOP, EXT_ROUTING, PROTO_ICMP, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN,
};
use crate::rng::Rng;
use crate::state::{Ingress, ModelState};
use build::{IpFields, L4};

/// An interface packets come in on, and how often.
#[derive(Clone, Debug)]
pub struct IngressPort {
    pub ingress: Ingress,
    /// The interface's MAC: the destination MAC of what arrives there.
    pub mac: [u8; 6],
    pub weight: u32,
}

/// Where addresses and ports are drawn from. Services and backends come
/// from the model's maps (see `Generator::sync`).
#[derive(Clone, Debug)]
pub struct Pools {
    pub clients_v4: Vec<[u8; 16]>,
    pub clients_v6: Vec<[u8; 16]>,
    pub client_ports: Vec<u16>,
    /// Addresses that are no frontend.
    pub strangers_v4: Vec<[u8; 16]>,
    pub strangers_v6: Vec<[u8; 16]>,
    /// Routers on the way, as sources of ICMP errors.
    pub routers_v4: Vec<[u8; 16]>,
    pub routers_v6: Vec<[u8; 16]>,
    pub ingress: Vec<IngressPort>,
    /// Source MACs of arriving frames.
    pub peer_macs: Vec<[u8; 6]>,
}

/// What kind of packet the generator meant to make (for statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ToService,
    ForwardKnown,
    ReplyKnown,
    BackendStray,
    Stranger,
    IcmpAboutFlow,
    IcmpOther,
    Malformed,
    Fragment,
    NotIp,
}

pub struct Generated {
    pub frame: Vec<u8>,
    pub ingress: Ingress,
    pub kind: Kind,
}

pub struct Generator {
    rng: Rng,
    pools: Pools,
    services: Vec<(ServiceKey, ServiceValue)>,
    backends: Vec<(u32, Backend)>,
    /// Forward tuples sent lately, to aim replies and ICMP errors at.
    recent: Vec<FlowKey>,
    recent_next: usize,
}

const RECENT: usize = 96;

fn family_of(addr: &[u8; 16]) -> bool {
    !is_v4_mapped(addr)
}

impl Generator {
    pub fn new(seed: u64, pools: Pools) -> Generator {
        Generator {
            rng: Rng::new(seed),
            pools,
            services: Vec::new(),
            backends: Vec::new(),
            recent: Vec::new(),
            recent_next: 0,
        }
    }

    /// Takes the services and backends from the model (after the control
    /// plane changed them), in a fixed order so runs are reproducible.
    pub fn sync(&mut self, state: &ModelState) {
        self.services = state.services.iter().map(|(k, v)| (*k, *v)).collect();
        self.services
            .sort_by_key(|(k, _)| (k.addr, k.port, k.proto));
        self.backends = state.backends.iter().map(|(k, v)| (*k, *v)).collect();
        self.backends.sort_by_key(|(id, _)| *id);
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// How far the datapath clock moves before the next packet: mostly
    /// not at all or by milliseconds, sometimes across the one-second peer
    /// refresh, rarely past every timeout. Whole milliseconds, so entries
    /// land exactly on their timeouts now and then.
    pub fn clock_step(&mut self) -> u64 {
        const MS: u64 = 1_000_000;
        let r = &mut self.rng;
        match r.weighted(&[500, 380, 100, 15, 4, 1]) {
            0 => 0,
            1 => r.range(1, 10) * MS,
            2 => r.range(1, 10) * 10 * MS,
            3 => r.range(1, 8) * 250 * MS,
            4 => r.range(1, 8) * 1000 * MS,
            _ => r.range(10, 90) * 1000 * MS,
        }
    }

    pub fn next(&mut self, state: &ModelState) -> Generated {
        let kind = match self.rng.weighted(&[28, 12, 16, 4, 5, 9, 3, 10, 4, 3]) {
            0 => Kind::ToService,
            1 => Kind::ForwardKnown,
            2 => Kind::ReplyKnown,
            3 => Kind::BackendStray,
            4 => Kind::Stranger,
            5 => Kind::IcmpAboutFlow,
            6 => Kind::IcmpOther,
            7 => Kind::Malformed,
            8 => Kind::Fragment,
            _ => Kind::NotIp,
        };
        let port = self.rng.weighted(
            &self
                .pools
                .ingress
                .iter()
                .map(|p| p.weight)
                .collect::<Vec<_>>(),
        );
        let port = self.pools.ingress[port].clone();
        let peer = *self.rng.pick(&self.pools.peer_macs);
        let (kind, ip_packet) = self.body(kind, state);
        let mut frame = match ip_packet {
            Body::Ip(p) => build::frame(port.mac, peer, &p),
            Body::Frame(ethertype, p) => build::frame_with_type(port.mac, peer, ethertype, &p),
        };
        // Ethernet pads short frames to 60 bytes; the padding is no part
        // of the IP packet. (Not after a cut: padding would complete the
        // cut packet with bytes its checksum never covered.)
        if frame.len() < 60 && kind != Kind::Malformed && self.rng.chance(50) {
            let fill = if self.rng.chance(20) { 0x5a } else { 0 };
            frame.resize(60, fill);
        } else if kind != Kind::Malformed && self.rng.chance(3) {
            // Trailing bytes after any packet (a tunnel's or a driver's).
            let n = self.rng.range(1, 16) as usize;
            frame.extend(self.rng.bytes(n));
        }
        Generated {
            frame,
            ingress: port.ingress,
            kind,
        }
    }

    fn body(&mut self, kind: Kind, state: &ModelState) -> (Kind, Body) {
        if self.services.is_empty() && matches!(kind, Kind::ToService | Kind::Malformed) {
            return (Kind::Stranger, Body::Ip(self.stranger()));
        }
        match kind {
            Kind::ToService => (kind, Body::Ip(self.service_packet())),
            Kind::ForwardKnown => match self.recent_key() {
                Some(k) => (kind, Body::Ip(self.on_tuple(&k))),
                None => (Kind::Stranger, Body::Ip(self.stranger())),
            },
            Kind::ReplyKnown => match self.recent_entry(state) {
                Some(e) => (kind, Body::Ip(self.on_tuple(&conntrack::reply_key(&e)))),
                None => (Kind::BackendStray, Body::Ip(self.backend_stray())),
            },
            Kind::BackendStray => (kind, Body::Ip(self.backend_stray())),
            Kind::Stranger => (kind, Body::Ip(self.stranger())),
            Kind::IcmpAboutFlow => match self.recent_entry(state) {
                Some(e) => (kind, Body::Ip(self.icmp_about(&e))),
                None => (Kind::IcmpOther, Body::Ip(self.icmp_other())),
            },
            Kind::IcmpOther => (kind, Body::Ip(self.icmp_other())),
            Kind::Malformed => {
                let p = if self.rng.chance(70) {
                    self.service_packet()
                } else {
                    self.stranger()
                };
                (kind, malform::malform(&mut self.rng, p))
            }
            Kind::Fragment => {
                let p = self.service_or_stranger();
                (kind, Body::Ip(malform::fragment(&mut self.rng, p)))
            }
            Kind::NotIp => {
                let p = self.service_or_stranger();
                (kind, malform::not_ip(&mut self.rng, p))
            }
        }
    }

    fn service_or_stranger(&mut self) -> Vec<u8> {
        if self.services.is_empty() {
            self.stranger()
        } else {
            self.service_packet()
        }
    }

    fn remember(&mut self, key: FlowKey) {
        if self.recent.len() < RECENT {
            self.recent.push(key);
        } else {
            self.recent[self.recent_next] = key;
            self.recent_next = (self.recent_next + 1) % RECENT;
        }
    }

    fn recent_key(&mut self) -> Option<FlowKey> {
        (!self.recent.is_empty()).then(|| *self.rng.pick(&self.recent))
    }

    /// The entry of a recent tuple, dead or alive, in either table.
    fn recent_entry(&mut self, state: &ModelState) -> Option<lb_common::CtEntry> {
        let k = self.recent_key()?;
        state
            .conntrack
            .get(&k)
            .or_else(|| state.ct_pending.get(&k))
            .copied()
    }

    fn client_for(&mut self, v6: bool) -> [u8; 16] {
        if v6 {
            *self.rng.pick(&self.pools.clients_v6)
        } else {
            *self.rng.pick(&self.pools.clients_v4)
        }
    }

    /// A client's packet to a frontend; now and then the client is one of
    /// the service's own backends (a hairpin flow).
    fn service_packet(&mut self) -> Vec<u8> {
        let (k, v) = *self.rng.pick(&self.services);
        let v6 = family_of(&k.addr);
        let own: Vec<[u8; 16]> = self
            .backends
            .iter()
            .filter(|(_, b)| b.service_slot == v.slot && family_of(&b.addr) == v6)
            .map(|(_, b)| b.addr)
            .collect();
        let client = if !own.is_empty() && self.rng.chance(10) {
            *self.rng.pick(&own)
        } else {
            self.client_for(v6)
        };
        let sport = *self.rng.pick(&self.pools.client_ports);
        let key = conntrack::flow_key(client, k.addr, sport, u16::from_be(k.port), k.proto);
        self.remember(key);
        self.on_tuple(&key)
    }

    /// A backend's packet that belongs to no connection (or to one by chance).
    fn backend_stray(&mut self) -> Vec<u8> {
        if self.backends.is_empty() {
            return self.stranger();
        }
        let (_, b) = *self.rng.pick(&self.backends);
        let v6 = family_of(&b.addr);
        let dst = self.client_for(v6);
        let dport = *self.rng.pick(&self.pools.client_ports);
        let proto = if self.rng.chance(50) {
            PROTO_TCP
        } else {
            PROTO_UDP
        };
        let key = conntrack::flow_key(b.addr, dst, u16::from_be(b.port), dport, proto);
        self.on_tuple(&key)
    }

    /// A packet to no frontend: another address, another port, another
    /// protocol.
    fn stranger(&mut self) -> Vec<u8> {
        let v6 = self.rng.chance(30);
        let src = self.client_for(v6);
        let (dst, dport, proto) = match (self.services.is_empty(), self.rng.below(3)) {
            (false, 0) => {
                let (k, _) = *self.rng.pick(&self.services);
                (k.addr, u16::from_be(k.port).wrapping_add(1), k.proto)
            }
            (false, 1) => {
                let (k, _) = *self.rng.pick(&self.services);
                let other = if k.proto == PROTO_TCP {
                    PROTO_UDP
                } else {
                    PROTO_TCP
                };
                (k.addr, u16::from_be(k.port), other)
            }
            _ => {
                let pool = if v6 {
                    &self.pools.strangers_v6
                } else {
                    &self.pools.strangers_v4
                };
                let dst = *self.rng.pick(pool);
                let proto = if self.rng.chance(50) {
                    PROTO_TCP
                } else {
                    PROTO_UDP
                };
                (dst, *self.rng.pick(&[80u16, 53, 443, 8080]), proto)
            }
        };
        let src = if family_of(&dst) == family_of(&src) {
            src
        } else {
            self.client_for(family_of(&dst))
        };
        let sport = *self.rng.pick(&self.pools.client_ports);
        self.on_tuple(&conntrack::flow_key(src, dst, sport, dport, proto))
    }

    fn tcp_flags(&mut self) -> u8 {
        let choices = [
            TCP_SYN,
            TCP_ACK,
            TCP_ACK | 0x08,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
            TCP_SYN | TCP_ACK,
            TCP_FIN,
            0,
        ];
        match self.rng.weighted(&[25, 25, 15, 10, 5, 5, 5, 3, 2, 5]) {
            9 => self.rng.next_u32() as u8,
            i => choices[i],
        }
    }

    /// The IP header fields of a packet: mostly plain, sometimes with
    /// options or extension headers, a low TTL, no DF.
    fn ip_fields(&mut self, src: [u8; 16], dst: [u8; 16]) -> IpFields {
        let r = &mut self.rng;
        let mut ip = IpFields::new(src, dst);
        ip.ttl = match r.weighted(&[85, 4, 2, 4, 5]) {
            0 => 64,
            1 => 1,
            2 => 0,
            3 => 2,
            _ => r.range(3, 255) as u8,
        };
        ip.df = r.chance(70);
        if r.chance(10) {
            ip.tos = r.next_u32() as u8;
        }
        ip.id = r.next_u32() as u16;
        ip.flow_label = if r.chance(20) {
            r.next_u32() & 0xf_ffff
        } else {
            0
        };
        if !ip.v6() && r.chance(10) {
            // The datapath skips options without reading them.
            let n = r.range(1, 40) as usize;
            ip.options = if r.chance(50) { vec![1; n] } else { r.bytes(n) };
        }
        if ip.v6() && r.chance(15) {
            let n = if r.chance(5) {
                7
            } else {
                r.range(1, 6) as usize
            };
            ip.ext = (0..n).map(|_| random_ext(r)).collect();
            // Hop-by-hop options may only come first (RFC 8200).
            for e in ip.ext.iter_mut().skip(1) {
                if e.0 == EXT_HOP_BY_HOP {
                    e.0 = EXT_DEST_OPTS;
                }
            }
        }
        ip
    }

    /// Payload size: mostly small, sometimes around the egress MTUs.
    fn payload_len(&mut self, headers: usize) -> usize {
        let r = &mut self.rng;
        let frame = match r.weighted(&[60, 22, 6, 6, 6]) {
            0 => return r.range(0, 64) as usize,
            1 => return r.range(64, 600) as usize,
            2 => r.range(600, 1380),
            3 => r.range(1395, 1440),
            _ => r.range(1490, 1540),
        } as usize;
        frame.saturating_sub(14 + headers)
    }

    /// A well-formed TCP or UDP packet on a tuple.
    fn on_tuple(&mut self, key: &FlowKey) -> Vec<u8> {
        let ip = self.ip_fields(key.src, key.dst);
        let (sport, dport) = (u16::from_be(key.sport), u16::from_be(key.dport));
        let l4 = if key.proto == PROTO_TCP {
            let options = if self.rng.chance(15) {
                vec![1u8; self.rng.range(1, 40) as usize]
            } else {
                Vec::new()
            };
            L4::Tcp {
                sport,
                dport,
                flags: self.tcp_flags(),
                seq: self.rng.next_u32(),
                ack: self.rng.next_u32(),
                window: self.rng.next_u32() as u16,
                options,
            }
        } else {
            L4::Udp {
                sport,
                dport,
                no_checksum: self.rng.chance(10),
            }
        };
        let headers = if ip.v6() { 40 } else { 20 + ip.options.len() }
            + ip.ext.iter().map(|(_, l)| l).sum::<usize>()
            + 60;
        let n = self.payload_len(headers);
        let payload = self.rng.bytes(n);
        build::ip_packet(&ip, &l4, &payload)
    }

    /// An ICMP error about a tracked connection, as a router (or the peer
    /// itself) would send it: about a packet sent to the backend, or about
    /// a reply sent to the client.
    fn icmp_about(&mut self, e: &lb_common::CtEntry) -> Vec<u8> {
        let snat = e.flags & CT_SNAT != 0;
        let (qsrc, qsport, qdst, qdport, peer) = if self.rng.chance(50) {
            let (src, port) = if snat {
                (e.nat_addr, e.nat_port)
            } else {
                (e.client, e.client_port)
            };
            (src, port, e.backend, e.backend_port, e.backend)
        } else {
            (
                e.frontend,
                e.frontend_port,
                e.client,
                e.client_port,
                e.client,
            )
        };
        let v6 = family_of(&qsrc);
        let routers = if v6 {
            &self.pools.routers_v6
        } else {
            &self.pools.routers_v4
        };
        let outer_src = if self.rng.chance(30) {
            peer
        } else {
            *self.rng.pick(routers)
        };
        let outer_dst = if self.rng.chance(8) {
            self.client_for(v6)
        } else {
            qsrc
        };
        let key = FlowKey {
            src: qsrc,
            dst: qdst,
            sport: qsport,
            dport: qdport,
            proto: e.proto,
            _pad: [0; 3],
        };
        self.icmp_error(outer_src, outer_dst, &key)
    }

    /// ICMP that is not about a tracked connection: echo, errors about
    /// unknown flows, messages too short to be anything.
    fn icmp_other(&mut self) -> Vec<u8> {
        let v6 = self.rng.chance(35);
        let a = self.client_for(v6);
        let b = if !self.services.is_empty() && self.rng.chance(50) {
            let (k, _) = *self.rng.pick(&self.services);
            k.addr
        } else {
            self.client_for(v6)
        };
        let b = if family_of(&b) == v6 {
            b
        } else {
            self.client_for(v6)
        };
        match self.rng.below(3) {
            0 => {
                let ip = self.ip_fields(a, b);
                let l4 = L4::Icmp {
                    icmp_type: if v6 { 128 } else { 8 },
                    code: 0,
                    rest: [0, 1, 0, 7],
                };
                let payload = self.rng.bytes(32);
                build::ip_packet(&ip, &l4, &payload)
            }
            1 => {
                let proto = if self.rng.chance(50) {
                    PROTO_TCP
                } else {
                    PROTO_UDP
                };
                let key = conntrack::flow_key(
                    b,
                    a,
                    *self.rng.pick(&[80u16, 53, 8080]),
                    *self.rng.pick(&self.pools.client_ports),
                    proto,
                );
                self.icmp_error(a, b, &key)
            }
            _ => {
                let ip = self.ip_fields(a, b);
                let n = self.rng.below(8) as usize;
                let proto = if v6 { 58 } else { PROTO_ICMP };
                let body = self.rng.bytes(n);
                build::ip_packet(&ip, &L4::Raw { proto }, &body)
            }
        }
    }

    /// An ICMP error from `src` to `dst` quoting a packet of `quoted`.
    fn icmp_error(&mut self, src: [u8; 16], dst: [u8; 16], quoted: &FlowKey) -> Vec<u8> {
        let v6 = family_of(&src);
        // The quoted packet as it was sent (checksums valid over all of it).
        let mut qip = self.ip_fields(quoted.src, quoted.dst);
        if !self.rng.chance(3) {
            qip.ext.clear();
        }
        let (qs, qd) = (u16::from_be(quoted.sport), u16::from_be(quoted.dport));
        let ql4 = if quoted.proto == PROTO_TCP {
            L4::Tcp {
                sport: qs,
                dport: qd,
                flags: self.tcp_flags(),
                seq: self.rng.next_u32(),
                ack: self.rng.next_u32(),
                window: 1000,
                options: if self.rng.chance(20) {
                    vec![1; 8]
                } else {
                    Vec::new()
                },
            }
        } else {
            L4::Udp {
                sport: qs,
                dport: qd,
                no_checksum: self.rng.chance(10),
            }
        };
        let qlen = if self.rng.chance(5) {
            self.rng.range(600, 1450) as usize
        } else {
            self.rng.range(0, 120) as usize
        };
        let qpayload = self.rng.bytes(qlen);
        let inner = build::ip_packet(&qip, &ql4, &qpayload);
        let hdr = if v6 {
            40 + qip.ext.iter().map(|(_, l)| l).sum::<usize>()
        } else {
            usize::from(inner[0] & 0x0f) * 4
        };
        let cut = match self.rng.weighted(&[30, 20, 30, 10, 10]) {
            0 => hdr + 8,
            1 => hdr + 20,
            2 => inner.len(),
            3 => hdr + self.rng.below(8) as usize,
            _ => self.rng.range(hdr as u64, inner.len() as u64) as usize,
        }
        .min(inner.len());
        let (icmp_type, code, rest) = if v6 {
            match self.rng.below(4) {
                0 => (1u8, self.rng.below(7) as u8, 0u32),
                1 => (2, 0, self.rng.range(1280, 1500) as u32),
                2 => (3, self.rng.below(2) as u8, 0),
                _ => (4, self.rng.below(3) as u8, self.rng.below(60) as u32),
            }
        } else {
            match self.rng.below(3) {
                0 => {
                    let code = self.rng.below(6) as u8;
                    let mtu = if code == 4 {
                        self.rng.range(576, 1500) as u32
                    } else {
                        0
                    };
                    (3u8, code, mtu)
                }
                1 => (11, self.rng.below(2) as u8, 0),
                _ => (12, 0, (self.rng.below(20) as u32) << 24),
            }
        };
        let ip = self.ip_fields(src, dst);
        let l4 = L4::Icmp {
            icmp_type,
            code,
            rest: rest.to_be_bytes(),
        };
        build::ip_packet(&ip, &l4, &inner[..cut])
    }
}

/// What `Generator::body` produced.
enum Body {
    /// An IP packet (the ethertype follows its version).
    Ip(Vec<u8>),
    /// A body with an explicit ethertype.
    Frame(u16, Vec<u8>),
}

fn random_ext(r: &mut Rng) -> (u8, usize) {
    match r.below(4) {
        0 => (EXT_HOP_BY_HOP, 8 * r.range(1, 2) as usize),
        1 => (EXT_DEST_OPTS, 8 * r.range(1, 3) as usize),
        2 => (EXT_ROUTING, 8 * r.range(1, 3) as usize),
        _ => (EXT_AH, 8 * r.range(2, 3) as usize),
    }
}
