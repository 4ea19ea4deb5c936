//! Comparing the model with the kernel, and the record of what differed:
//! mismatches grouped by a short signature, with the first few examples of
//! each in full (packet, both outputs, the entries involved).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use lb_common::{AffinityEntry, CtEntry};
use lb_model::packet::{self, Parsed};
use lb_model::state::action_name;
use lb_userspace::reconciler::addr_of;

/// Examples kept per signature.
const EXAMPLES: usize = 3;

#[derive(Default)]
pub struct Log {
    groups: BTreeMap<String, Group>,
}

#[derive(Default)]
struct Group {
    count: u64,
    first: u64,
    examples: Vec<String>,
}

impl Log {
    pub fn record(&mut self, index: u64, signature: String, detail: impl FnOnce() -> String) {
        let g = self.groups.entry(signature).or_insert_with(|| Group {
            first: index,
            ..Default::default()
        });
        g.count += 1;
        if g.examples.len() < EXAMPLES {
            g.examples.push(detail());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.groups.values().map(|g| g.count).sum()
    }

    pub fn report(&self) -> String {
        let mut s = String::new();
        for (sig, g) in &self.groups {
            let _ = writeln!(
                s,
                "\n=== {sig}\n    {} time(s), first at packet {}",
                g.count, g.first
            );
            for e in &g.examples {
                let _ = writeln!(s, "{e}");
            }
        }
        s
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (sig, g) in &self.groups {
            let _ = writeln!(s, "  {:>8}  {sig}", g.count);
        }
        s
    }
}

pub fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where in a frame an offset lies, named after the header field.
pub fn locate(frame: &[u8], at: usize) -> String {
    if at < 12 {
        return "eth MAC".into();
    }
    if at < 14 {
        return "ethertype".into();
    }
    let (ip, l4_off, icmp) = match packet::parse(frame) {
        Parsed::Transport(t) => (t.ip, t.ip.l4_off(), None),
        Parsed::IcmpError(e) => (e.ip, e.icmp_off, e.quote),
        _ => return format!("offset {at}"),
    };
    let o = at - 14;
    if at < l4_off {
        let field = if ip.v6 {
            match o {
                0..=3 => "version/class/flow",
                4..=5 => "payload length",
                6 => "next header",
                7 => "hop limit",
                8..=23 => "source",
                24..=39 => "destination",
                _ => "extension header",
            }
        } else {
            match o {
                0..=1 => "version/ihl/tos",
                2..=3 => "total length",
                4..=5 => "id",
                6..=7 => "flags/fragment",
                8 => "TTL",
                9 => "protocol",
                10..=11 => "header checksum",
                12..=15 => "source",
                16..=19 => "destination",
                _ => "options",
            }
        };
        return format!("IP {field}");
    }
    let l = at - l4_off;
    match icmp {
        None => {
            let field = match (ip.proto, l) {
                (_, 0..=1) => "source port",
                (_, 2..=3) => "destination port",
                (6, 16..=17) | (17, 6..=7) => "checksum",
                (6, 4..=15) | (6, 18..=19) | (17, 4..=5) => "header",
                _ => "payload",
            };
            format!("L4 {field}")
        }
        Some(q) => {
            if at < q.off {
                return match l {
                    0..=1 => "ICMP type/code".into(),
                    2..=3 => "ICMP checksum".into(),
                    _ => "ICMP rest of header".into(),
                };
            }
            if at < q.l4_off() {
                return format!("quoted IP +{}", at - q.off);
            }
            format!("quoted L4 +{}", at - q.l4_off())
        }
    }
}

/// Differing byte ranges of two frames, by field.
pub fn diff_fields(model: &[u8], kernel: &[u8]) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    if model.len() != kernel.len() {
        fields.push(format!("length {} vs {}", model.len(), kernel.len()));
    }
    for i in 0..model.len().min(kernel.len()) {
        if model[i] != kernel[i] {
            let f = locate(model, i);
            if !fields.contains(&f) {
                fields.push(f);
            }
        }
    }
    fields
}

/// Names of the fields in which two entries differ.
pub fn ct_diff(model: &Option<CtEntry>, kernel: &Option<CtEntry>) -> String {
    match (model, kernel) {
        (None, None) => String::new(),
        (Some(_), None) => "missing in the kernel".into(),
        (None, Some(_)) => "present in the kernel only".into(),
        (Some(m), Some(k)) => {
            let mut d = Vec::new();
            macro_rules! cmp {
                ($($f:ident),*) => {$(if m.$f != k.$f { d.push(stringify!($f)); })*};
            }
            cmp!(
                client,
                frontend,
                backend,
                nat_addr,
                client_port,
                frontend_port,
                backend_port,
                nat_port,
                backend_id,
                service_slot,
                last_seen_ns,
                proto,
                flags,
                state,
                _pad
            );
            d.join(",")
        }
    }
}

pub fn show_ct(e: &Option<CtEntry>) -> String {
    match e {
        None => "absent".into(),
        Some(e) => format!(
            "client {}:{} frontend {}:{} backend {}:{} (id {}, slot {}) nat {}:{} \
             flags {:#x} state {:#x} last_seen {}",
            addr_of(&e.client),
            u16::from_be(e.client_port),
            addr_of(&e.frontend),
            u16::from_be(e.frontend_port),
            addr_of(&e.backend),
            u16::from_be(e.backend_port),
            e.backend_id,
            e.service_slot,
            addr_of(&e.nat_addr),
            u16::from_be(e.nat_port),
            e.flags,
            e.state,
            e.last_seen_ns
        ),
    }
}

pub fn show_affinity(e: &Option<AffinityEntry>) -> String {
    match e {
        None => "absent".into(),
        Some(e) => format!("backend {} last {}", e.backend_id, e.last_ns),
    }
}

pub fn show_action(a: u32) -> String {
    format!("{} ({a:#x})", action_name(a))
}
