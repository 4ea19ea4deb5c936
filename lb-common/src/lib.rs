//! Types shared by the eBPF datapath and userspace.
//!
//! Every struct here is a map key or value: `#[repr(C)]`, sizes that are a
//! multiple of their alignment and explicit `_pad` fields, so that no byte
//! of a key is left to chance (a garbage padding byte makes a lookup miss).
//! Addresses are always 16 bytes; IPv4 uses the IPv4-mapped form
//! `::ffff:a.b.c.d`, so one map serves both families.
#![no_std]

/// Default size of a Maglev lookup table. A prime; a service with up to ~40
/// backends stays within about 1 % of a perfect balance.
pub const MAGLEV_M: u32 = 4093;
/// Bounds of a configured table size (which must be a prime): below the
/// minimum a table has too few entries to balance even a few backends;
/// Katran's largest table is the maximum.
pub const MAGLEV_M_MIN: u32 = 31;
pub const MAGLEV_M_MAX: u32 = 65537;
/// Backend ids per RINGS element: the kernel spaces array elements 8 bytes
/// apart, so a 4-byte id per element would leave half the map unused.
pub const RING_IDS_PER_ENTRY: u32 = 2;
/// Two ring generations per service slot: the reconciler writes the idle one
/// and then flips the service entry, so a lookup never sees a half-built ring.
pub const RINGS_PER_SERVICE: u32 = 2;
/// Default number of service slots (maps are sized at load time).
pub const DEFAULT_MAX_SERVICES: u32 = 1024;
/// Default number of backends over all services.
pub const DEFAULT_MAX_BACKENDS: u32 = 65536;
/// Default connection-tracking capacity: established connections. CONNTRACK
/// holds two entries per connection (one per direction) and CT_PENDING, for
/// connections not yet confirmed, as many entries as there are connections.
pub const DEFAULT_MAX_FLOWS: u32 = 262144;
/// Capacity of SOCK_MEMBERS: (network namespace, network) pairs, about one
/// per container per network it is attached to.
pub const MAX_MEMBERS: u32 = 65536;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names, shared so userspace finds what the datapath declares.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CT_PENDING: &str = "CT_PENDING";
    pub const CONFIG: &str = "CONFIG";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOCK_MEMBERS: &str = "SOCK_MEMBERS";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const PREFILTER: &str = "PREFILTER";
    pub const XDP_PORTS: &str = "XDP_PORTS";
    pub const XDP_STATS: &str = "XDP_STATS";
    pub const PEER_PORTS: &str = "PEER_PORTS";
    /// The layout record of a pin directory (see [`super::Layout`]). Made
    /// and read by lbd only; the datapath never looks at it.
    pub const LAYOUT: &str = "LAYOUT";
}

/// The version of the pinned maps' layout: what the bytes of every key and
/// value mean. Bump it whenever a map key or value type in this file (or a
/// map's type or flags in lb-ebpf) changes, even if its size stays the same:
/// an lbd then refuses pins made under another version instead of reading
/// them wrongly. Map sizes are checked separately, map by map.
pub const LAYOUT_VERSION: u32 = 4;

/// LAYOUT's only value: under which layout and limits the maps of a pin
/// directory were made.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Layout {
    pub version: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_flows: u32,
}

/// Program names (the function names in lb-ebpf).
pub mod progs {
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    /// A program that only passes, for measuring the cost of running any program.
    pub const TC_PASS: &str = "lb_tc_pass";
    /// The XDP fast path, for interfaces whose frames carry complete checksums.
    pub const XDP_INGRESS: &str = "lb_xdp_ingress";
    /// An XDP program that only passes (the XDP floor).
    pub const XDP_PASS: &str = "lb_xdp_pass";
    /// The socket programs (cgroup hooks) of network-scoped services.
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
    pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "lb_sock_getpeername6";
}

/// SERVICES key: a frontend. `port` is in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// ServiceValue::flags and RevNatEntry::flags: the source is translated too
/// (to `snat_addr` and a port the datapath picks), so that backends anywhere
/// reply to this node whatever their route to the client.
pub const FLAG_FULLNAT: u32 = 1;
/// ServiceValue::flags: the frontend address is local to the node, so a
/// packet that finds no backend is handed to the kernel, which answers it
/// (TCP reset, ICMP port unreachable) instead of it being dropped.
pub const FLAG_LOCAL_VIP: u32 = 2;
/// ServiceValue::flags: a virtual address of one network (a Swarm service
/// VIP), balanced when a socket connects or sends, and only for sockets of
/// network namespaces that are members of `ServiceValue::network` (see
/// SOCK_MEMBERS). The key's port is 0: every port of the address; a
/// backend's port 0 keeps the port asked for. The packet datapath ignores
/// these services.
pub const FLAG_SOCKET: u32 = 4;

/// SERVICES value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Service slot: index into SERVICE_STATS.
    pub slot: u32,
    /// Where the live Maglev table starts: the index of its first backend
    /// id in RINGS, counting ids (RING_IDS_PER_ENTRY per element). The
    /// table of generation g of a slot starts at (slot * RINGS_PER_SERVICE
    /// + g) * the maps' table stride.
    pub ring: u32,
    /// Number of backends that may take new flows; 0 means none.
    pub backend_count: u32,
    pub flags: u32,
    /// With FLAG_FULLNAT: the source address towards backends.
    pub snat_addr: [u8; 16],
    /// Session affinity: a client's new flows go to the backend of its
    /// previous flow if that began less than this long ago. 0: off.
    pub affinity_ns: u64,
    /// With FLAG_SOCKET: the network whose members may use the address.
    pub network: u32,
    /// Entries of the live Maglev table (a prime, at most the stride).
    pub ring_size: u32,
}

/// SOCK_MEMBERS key: a network namespace (its cookie) attached to a network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MemberKey {
    pub netns_cookie: u64,
    pub network: u32,
    pub _pad: u32,
}

/// SOCK_REVNAT key: a socket (its cookie) and the backend it was sent to.
/// Addresses and ports as the socket programs see them (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    pub socket_cookie: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// SOCK_REVNAT value: the virtual address and port the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevValue {
    pub vip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// AFFINITY key: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub service_slot: u32,
    pub client: [u8; 16],
}

/// AFFINITY value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns of the client's latest new flow.
    pub last_ns: u64,
}

/// Backend states (Backend::state).
pub const BACKEND_ACTIVE: u8 = 0;
/// Takes no new flows; its established flows continue.
pub const BACKEND_DRAINING: u8 = 1;
/// Failed and set to reset: takes no new flows, and its conntrack entries no
/// longer count, so its flows move elsewhere at their next packet.
pub const BACKEND_DOWN: u8 = 2;

/// BACKENDS value, keyed by a backend id (u32) that is never reused while
/// the maps live, so a stale conntrack entry can never reach a new backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub state: u8,
    pub _pad: u8,
    /// The slot of the service this backend belongs to.
    pub service_slot: u32,
}

/// A flow as seen on the wire. Ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// CONNTRACK and CT_PENDING value. A connection has two entries, one per
/// direction, and both carry the whole connection, so either can restore
/// the other:
/// - the forward half is keyed by the client's flow as it arrives
///   (client:client_port -> frontend:frontend_port);
/// - the reply half (`CT_REPLY`) by the backend's answer as it arrives
///   (backend:backend_port -> client:client_port, or with a translated
///   source `CT_SNAT`, -> nat_addr:nat_port).
///
/// State changes (reply seen, FIN, RST) are rare and written to both halves;
/// `last_seen_ns` is per half, and a packet on one half refreshes the other
/// once per second of the datapath clock, so a flow whose packets all go
/// one way keeps both halves alive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub client: [u8; 16],
    pub frontend: [u8; 16],
    pub backend: [u8; 16],
    /// With `CT_SNAT`: the source the backend sees. Zero otherwise.
    pub nat_addr: [u8; 16],
    /// Network byte order, all four.
    pub client_port: u16,
    pub frontend_port: u16,
    pub backend_port: u16,
    pub nat_port: u16,
    pub backend_id: u32,
    pub service_slot: u32,
    /// The datapath's clock (see `Config`) at this half's latest packet.
    pub last_seen_ns: u64,
    pub proto: u8,
    /// `CT_REPLY`, `CT_SNAT`.
    pub flags: u8,
    /// `ST_*` bits.
    pub state: u8,
    pub _pad: u8,
    /// The second of the datapath clock (`now / 10^9`) in which this half
    /// last refreshed the other one.
    pub peer_refresh_s: u32,
    /// Where this half's translated packets went last: the FIB's answer,
    /// cached for the rest of that second (docs/datapath.md, section 6).
    /// Never copied to the other half, whose packets go elsewhere.
    pub hop: NextHop,
    pub _pad2: u32,
}

/// A half's next hop as `bpf_fib_lookup` gave it. The datapath asks the FIB
/// again when the packet arrives on another device or the datapath clock
/// has moved to another second, so a route, neighbour or MTU change reaches
/// an established flow within a second.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The egress device; 0 when nothing is cached.
    pub ifindex: u32,
    /// The device the packet that asked arrived on.
    pub in_ifindex: u32,
    /// The egress device's MTU.
    pub mtu: u32,
    /// The second of the datapath clock in which the FIB was asked.
    pub second: u32,
}

/// CtEntry::flags: this half is keyed by the backend's reply.
pub const CT_REPLY: u8 = 1;
/// CtEntry::flags: the source is translated too (full NAT, or a hairpin
/// connection from a backend to its own service).
pub const CT_SNAT: u8 = 2;

/// CtEntry::state: the backend has answered.
pub const ST_SEEN_REPLY: u8 = 1;
/// CtEntry::state: confirmed (TCP: the client acknowledged after the backend
/// answered; UDP: the backend answered). Confirmed connections live in
/// CONNTRACK, the others in CT_PENDING.
pub const ST_CONFIRMED: u8 = 2;
pub const ST_FIN_CLIENT: u8 = 4;
pub const ST_FIN_BACKEND: u8 = 8;
pub const ST_RST: u8 = 16;
/// Any of these: the connection is closing, and a new SYN on its tuple
/// starts a new connection.
pub const ST_CLOSING: u8 = ST_FIN_CLIENT | ST_FIN_BACKEND | ST_RST;

/// The single CONFIG entry, written by lbd: conntrack timeouts, the full
/// NAT source port range and the datapath's clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// TCP connections not confirmed yet (SYN sent, handshake incomplete).
    pub timeout_syn_ns: u64,
    /// Confirmed TCP connections.
    pub timeout_tcp_ns: u64,
    /// TCP connections after a FIN or an RST.
    pub timeout_closing_ns: u64,
    /// UDP flows.
    pub timeout_udp_ns: u64,
    /// Added to bpf_ktime_get_ns (CLOCK_MONOTONIC): tests move time forward.
    pub clock_offset_ns: u64,
    /// When non-zero the datapath's clock reads this value and nothing else
    /// (reproducible tests).
    pub clock_frozen_ns: u64,
    /// Full NAT source ports, inclusive, host byte order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The prefilter has 2^prefilter_bits bits (see [`prefilter_bit`]); 0
    /// until the reconciler has written it, and every packet is looked up.
    pub prefilter_bits: u32,
}

/// Bounds of `Config::prefilter_bits`.
pub const PREFILTER_MIN_BITS: u32 = 12;
pub const PREFILTER_MAX_BITS: u32 = 26;

/// The prefilter's bit for an address (16-byte form) and a port (as stored
/// on the wire, i.e. the `u16` read natively from network-order bytes),
/// with `bits` in PREFILTER_MIN_BITS..=PREFILTER_MAX_BITS. PREFILTER has this
/// bit set for every frontend and every backend, so a packet whose
/// destination is no frontend and whose source is no backend can be neither
/// a new flow nor part of a known one (docs/datapath.md, section 2).
#[inline(always)]
pub fn prefilter_bit(addr: &[u8; 16], port: u16, bits: u32) -> u32 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let mut h = (w(0) ^ w(4) ^ w(8)).wrapping_mul(0x9e37_79b1) ^ w(12);
    h = h.wrapping_mul(0x85eb_ca6b) ^ port as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h.wrapping_shr(32 - bits)
}

pub const DEFAULT_TIMEOUT_SYN_SECS: u64 = 60;
/// Six hours: an idle established connection keeps working (Docker's IPVS
/// mesh cuts them after 900 s).
pub const DEFAULT_TIMEOUT_TCP_SECS: u64 = 6 * 3600;
pub const DEFAULT_TIMEOUT_CLOSING_SECS: u64 = 30;
pub const DEFAULT_TIMEOUT_UDP_SECS: u64 = 120;

impl Default for Config {
    fn default() -> Self {
        const S: u64 = 1_000_000_000;
        Config {
            timeout_syn_ns: DEFAULT_TIMEOUT_SYN_SECS * S,
            timeout_tcp_ns: DEFAULT_TIMEOUT_TCP_SECS * S,
            timeout_closing_ns: DEFAULT_TIMEOUT_CLOSING_SECS * S,
            timeout_udp_ns: DEFAULT_TIMEOUT_UDP_SECS * S,
            clock_offset_ns: 0,
            clock_frozen_ns: 0,
            snat_port_min: 1024,
            snat_port_max: 32767,
            prefilter_bits: 0,
        }
    }
}

impl Config {
    /// How long an entry in `state` lives without a packet.
    #[inline(always)]
    pub fn timeout_ns(&self, proto: u8, state: u8) -> u64 {
        if proto != PROTO_TCP {
            self.timeout_udp_ns
        } else if state & ST_CLOSING != 0 {
            self.timeout_closing_ns
        } else if state & ST_CONFIRMED != 0 {
            self.timeout_tcp_ns
        } else {
            self.timeout_syn_ns
        }
    }
}

/// Per-CPU counters for a service or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficStats {
    /// Client -> frontend packets translated to a backend.
    pub packets: u64,
    pub bytes: u64,
    /// Flows that picked a backend (conntrack misses).
    pub new_flows: u64,
    /// Backend -> client packets translated back.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Packets for the frontend that found no backend.
    pub no_backend: u64,
}

/// How many interfaces the XDP program may redirect to (XDP_PORTS).
pub const MAX_XDP_PORTS: u32 = 1024;

/// How many veths PEER_PORTS can list: one per local container.
pub const MAX_PEER_PORTS: u32 = 16384;

/// Indexes of XDP_STATS, the XDP program's own counters.
pub mod xdp_stat {
    /// Packets translated and redirected by the XDP program.
    pub const TRANSLATED: u32 = 0;
    /// Packets handed to the TC program unchanged.
    pub const PASSED: u32 = 1;
    pub const COUNT: u32 = 2;
    /// As reported beside the `global` counters.
    pub const NAMES: [&str; COUNT as usize] = ["xdp_translated", "xdp_passed"];
}

/// Indexes into GLOBAL_STATS (a per-CPU array of u64).
pub mod global {
    /// Packets seen by the program.
    pub const SEEN: u32 = 0;
    /// Packets for a frontend or a reply that were translated.
    pub const TRANSLATED: u32 = 1;
    /// Translated and redirected by the datapath itself.
    pub const REDIRECTED: u32 = 2;
    /// For a service or a reply, but the FIB could not forward it (no
    /// route, forwarding off): passed on untranslated.
    pub const NOT_FORWARDED: u32 = 3;
    /// IP fragments: never translated (a non-first fragment has no ports).
    pub const FRAGMENTS: u32 = 4;
    /// Headers that were truncated or malformed.
    pub const MALFORMED: u32 = 5;
    /// A helper failed while rewriting; the packet was dropped.
    pub const REWRITE_ERRORS: u32 = 6;
    /// Conntrack entries whose backend was gone or down, so the flow re-picked.
    pub const CT_STALE: u32 = 7;
    /// Full NAT found no free source port for a new flow (it was dropped).
    pub const SNAT_EXHAUSTED: u32 = 8;
    /// ICMP errors about a balanced flow, translated back.
    pub const ICMP_TRANSLATED: u32 = 9;
    /// ICMP errors the datapath sent itself (fragmentation needed / packet
    /// too big, time exceeded), quoting the packet as its sender sent it.
    pub const ICMP_SENT: u32 = 10;
    /// Too big for the egress link and not allowed to be fragmented by the
    /// datapath (IPv4 without DF): dropped.
    pub const TOO_BIG_DROPPED: u32 = 11;
    /// A new connection whose reply tuple belongs to another live
    /// connection (the backend could not tell them apart): dropped.
    pub const CT_COLLISIONS: u32 = 12;
    /// A SYN on a closing connection, or on one whose backend takes no new
    /// flows: a new connection, balanced afresh.
    pub const CT_REOPENED: u32 = 13;
    /// Connections confirmed (moved from CT_PENDING to CONNTRACK).
    pub const CT_CONFIRMED: u32 = 14;
    /// Entries found past their timeout and ignored.
    pub const CT_EXPIRED: u32 = 15;
    /// Half of a connection recreated from the other after an eviction.
    pub const CT_RESTORED: u32 = 16;
    /// Inserting a conntrack entry failed (the packet was dropped).
    pub const CT_INSERT_FAILED: u32 = 17;
    /// A socket's connect or send to a socket-balanced address was sent to
    /// a backend instead.
    pub const SOCK_TRANSLATED: u32 = 18;
    /// ... or refused, the address having no backend that takes new flows.
    pub const SOCK_REFUSED: u32 = 19;
    /// TCP and UDP packets the prefilter passed on without a lookup: for no
    /// frontend, from no backend.
    pub const PREFILTERED: u32 = 20;
    pub const COUNT: u32 = 21;
    pub const NAMES: [&str; COUNT as usize] = [
        "seen",
        "translated",
        "redirected",
        "not_forwarded",
        "fragments",
        "malformed",
        "rewrite_errors",
        "ct_stale",
        "snat_exhausted",
        "icmp_translated",
        "icmp_sent",
        "too_big_dropped",
        "ct_collisions",
        "ct_reopened",
        "ct_confirmed",
        "ct_expired",
        "ct_restored",
        "ct_insert_failed",
        "sock_translated",
        "sock_refused",
        "prefiltered",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding
    // (checked by the size assertions below).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for Layout {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
}

// No implicit padding anywhere: each size is the sum of its fields.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 48);
const _: () = assert!(core::mem::size_of::<MemberKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 20);
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);
const _: () = assert!(core::mem::size_of::<Backend>() == 24);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<NextHop>() == 28);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 128);
const _: () = assert!(core::mem::size_of::<Config>() == 56);
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 48);
const _: () = assert!(core::mem::size_of::<Layout>() == 16);

/// The IPv4-mapped IPv6 form of an IPv4 address.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Whether a 16-byte address is IPv4-mapped.
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}
