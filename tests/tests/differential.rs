//! Differential test of the datapath against its reference model
//! (tests/model, written from docs/datapath.md): generated packets run
//! through the real program with BPF_PROG_TEST_RUN and through the model,
//! and the two must agree on the action, every output byte, every
//! conntrack and affinity entry a packet touches, the full tables now and
//! then, and the counters.
//!
//! Seeded and reproducible: `LB_DIFF_SEED` (decimal or 0x-hex) and
//! `LB_DIFF_PACKETS` override the defaults. Runs as root, in a network
//! namespace of its own built like the model's routing table.

// The parts live in differential/ (this file is the test's crate root).
#[path = "differential/compare.rs"]
mod compare;
#[path = "differential/control.rs"]
mod control;
#[path = "differential/kernel.rs"]
mod kernel;
#[path = "differential/network.rs"]
mod network;

use std::collections::BTreeMap;
use std::time::Instant;

use compare::{ct_diff, diff_fields, hex, show_action, show_affinity, show_ct, Log};
use kernel::{Kernel, Run};
use lb_common::{global, Config, FlowKey, TrafficStats};
use lb_model::gen::{Generated, Generator, Kind};
use lb_model::state::Forwarding;
use lb_model::{scenario, step, ModelState, Outcome, Path, Rng, Table};
use lb_userspace::datapath::Limits;
use lb_userspace::reconciler::addr_of;

const DEFAULT_SEED: u64 = 0x5eed_1b0c;
const DEFAULT_PACKETS: u64 = 1_000_000;
/// Packets between control-plane changes.
const RECONFIGURE_EVERY: u64 = 2_000;
/// Packets between deletions of one conntrack half behind the datapath's
/// back (what an LRU eviction or lbd's garbage collector does), so that
/// halves get restored from their peers.
const EVICT_EVERY: u64 = 200;
/// Packets between comparisons of whole tables.
const TABLES_EVERY: u64 = 4096;
/// Share of packets run with BPF_F_TEST_SKB_CHECKSUM_COMPLETE, in percent.
const CSUM_COMPLETE_PERCENT: u64 = 25;
/// Share of the other packets run through the XDP program first (see
/// `Kernel::run_xdp_first`), in percent.
const XDP_FIRST_PERCENT: u64 = 50;
const T0: u64 = 1_000_000_000_000;
const S: u64 = 1_000_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        }
        Err(_) => default,
    }
}

fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn datapath_matches_its_model() {
    let seed = env_u64("LB_DIFF_SEED", DEFAULT_SEED);
    let packets = env_u64("LB_DIFF_PACKETS", DEFAULT_PACKETS);
    println!("differential: seed {seed:#x}, {packets} packets (LB_DIFF_SEED, LB_DIFF_PACKETS)");
    in_fresh_netns(move || Session::new(seed).go(packets));
}

fn base_config() -> Config {
    Config {
        timeout_syn_ns: 10 * S,
        timeout_tcp_ns: 60 * S,
        timeout_closing_ns: 5 * S,
        timeout_udp_ns: 15 * S,
        clock_offset_ns: 0,
        clock_frozen_ns: T0,
        snat_port_min: 40000,
        snat_port_max: 40003,
        // The reconciler's, once it has written the prefilter.
        prefilter_bits: 0,
    }
}

struct Session {
    seed: u64,
    kernel: Kernel,
    model: ModelState,
    gen: Generator,
    rng: Rng,
    control: control::Control,
    now: u64,
    log: Log,
    /// A packet differed since the last full comparison: the tables are
    /// expected to differ too, and are taken from the kernel without a
    /// report.
    dirty: bool,
    /// The same for the service and backend counters, compared less often.
    stats_dirty: bool,
    /// Coverage: what was generated and which rules decided.
    kinds: BTreeMap<Kind, u64>,
    paths: BTreeMap<(Path, Forwarding), u64>,
    refused: BTreeMap<i32, u64>,
    csum_complete_runs: u64,
    /// Datapath-sent ICMP errors run with CHECKSUM_COMPLETE whose skb was
    /// resized (see `packet`).
    csum_demoted: u64,
}

/// A key in a readable form.
fn show_key(k: &FlowKey) -> String {
    format!(
        "{}:{} -> {}:{} proto {}",
        addr_of(&k.src),
        u16::from_be(k.sport),
        addr_of(&k.dst),
        u16::from_be(k.dport),
        k.proto
    )
}

impl Session {
    fn new(seed: u64) -> Session {
        let mut sc = scenario::standard();
        network::build(&mut sc);
        // Maps far larger than the pools can fill: LRU eviction would make
        // the kernel's tables depend on its per-CPU free lists.
        let mut kernel = Kernel::load(Limits {
            max_services: 16,
            max_backends: 1024,
            max_flows: 1 << 16,
            ..Default::default()
        });
        let mut rng = Rng::new(seed);
        let control = control::Control::new();
        kernel
            .reconciler
            .apply(&control.desired)
            .expect("apply the services");
        let config = Config {
            prefilter_bits: kernel.config().prefilter_bits,
            ..base_config()
        };
        assert_ne!(
            config.prefilter_bits, 0,
            "the reconciler turned the prefilter on"
        );
        kernel.set_config(&config);
        let mut model = ModelState::new(config, sc.fib.clone());
        kernel.mirror_control_plane(&mut model);
        model.backend_stats = kernel.backend_stats();
        model.service_stats = kernel.service_stats(0..16);
        let mut gen = Generator::new(rng.next_u64(), sc.pools.clone());
        gen.sync(&model);
        Session {
            seed,
            kernel,
            model,
            gen,
            rng,
            control,
            now: T0,
            log: Log::default(),
            dirty: false,
            stats_dirty: false,
            kinds: BTreeMap::new(),
            paths: BTreeMap::new(),
            refused: BTreeMap::new(),
            csum_complete_runs: 0,
            csum_demoted: 0,
        }
    }

    fn go(mut self, packets: u64) {
        let start = Instant::now();
        for i in 0..packets {
            if i % RECONFIGURE_EVERY == RECONFIGURE_EVERY - 1 {
                self.compare_stats(i);
                self.reconfigure();
                // A slot given to a new service starts from zero.
                self.take_stats();
            }
            if i % EVICT_EVERY == EVICT_EVERY - 1 {
                self.evict();
            }
            // Counted in packets the program ran on: BPF_PROG_TEST_RUN
            // refuses a few malformed frames outright.
            loop {
                self.advance_clock();
                let g = self.gen.next(&self.model);
                if self.packet(i, &g) {
                    break;
                }
            }
            if i % TABLES_EVERY == TABLES_EVERY - 1 || (self.dirty && i % 512 == 511) {
                self.compare_tables(i);
            }
        }
        self.compare_tables(packets);
        self.compare_stats(packets);
        let elapsed = start.elapsed();
        self.print_coverage();
        println!(
            "differential: {packets} packets in {:.1} s ({} with CHECKSUM_COMPLETE, of which {} \
             resized ICMP errors left CHECKSUM_NONE), seed {:#x}",
            elapsed.as_secs_f64(),
            self.csum_complete_runs,
            self.csum_demoted,
            self.seed
        );
        if !self.log.is_empty() {
            println!("{}", self.log.report());
            panic!(
                "the datapath and its model differ: {} mismatch(es), seed {:#x}:\n{}",
                self.log.total(),
                self.seed,
                self.log.summary()
            );
        }
    }

    fn advance_clock(&mut self) {
        let step = self.gen.clock_step();
        if step > 0 {
            self.now += step;
            self.model.config.clock_frozen_ns = self.now;
            let c = self.model.config;
            self.kernel.set_config(&c);
        }
    }

    /// A control-plane change through the reconciler; the model takes the
    /// maps it wrote. Now and then the SNAT range changes too.
    fn reconfigure(&mut self) {
        let what = self.control.mutate(&mut self.rng);
        self.kernel.reconciler.set_reset(self.control.reset.clone());
        self.kernel
            .reconciler
            .set_local_vips(self.control.local_vips);
        if let Err(e) = self.kernel.reconciler.apply(&self.control.desired) {
            panic!("apply after {what}: {e:#}");
        }
        self.kernel.mirror_control_plane(&mut self.model);
        if self.rng.chance(30) {
            let tiny = self.model.config.snat_port_max - self.model.config.snat_port_min < 100;
            let (min, max) = if tiny { (20000, 59999) } else { (40000, 40003) };
            self.model.config.snat_port_min = min;
            self.model.config.snat_port_max = max;
            let c = self.model.config;
            self.kernel.set_config(&c);
        }
        self.gen.sync(&self.model);
    }

    /// Runs one packet through both; false when the kernel refused it.
    fn packet(&mut self, i: u64, g: &Generated) -> bool {
        let csum = self.rng.chance(CSUM_COMPLETE_PERCENT);
        let run = if !csum && self.rng.chance(XDP_FIRST_PERCENT) {
            self.kernel.run_xdp_first(&g.frame, g.ingress.ifindex)
        } else {
            self.kernel.run(&g.frame, g.ingress.ifindex, csum)
        };
        if let Run::Refused(errno) = run {
            // The program never ran: nothing to compare, no state changed.
            let n = self.refused.entry(errno).or_default();
            *n += 1;
            if *n <= 3 {
                println!(
                    "refused (errno {errno}), {:?}, {} bytes: {}",
                    g.kind,
                    g.frame.len(),
                    hex(&g.frame)
                );
            }
            return false;
        }
        if csum {
            self.csum_complete_runs += 1;
        }
        let before = self.model.global;
        let out = step(&mut self.model, &g.frame, g.ingress, self.now);
        *self.kinds.entry(g.kind).or_default() += 1;
        *self.paths.entry((out.path, out.forwarding)).or_default() += 1;
        let mut differs = false;
        // A difference that may leave the tables or counters apart too
        // (an affinity entry or skb->csum alone cannot).
        let mut suspect = false;
        let context = format!("{:?}/{:?}", out.path, out.forwarding);
        // The counters, packet by packet: a difference is then tied to the
        // packet that made it (and shown with any other difference).
        let k = self.kernel.globals();
        let counter_names: Vec<&str> = (0..k.len())
            .filter(|n| k[*n] != self.model.global[*n])
            .map(|n| global::NAMES[n])
            .collect();
        let counter_lines: Vec<String> = (0..k.len())
            .filter(|n| k[*n] != self.model.global[*n])
            .map(|n| {
                format!(
                    "    counter {}: model +{}, kernel +{}",
                    global::NAMES[n],
                    self.model.global[n] as i128 - before[n] as i128,
                    k[n] as i128 - before[n] as i128
                )
            })
            .collect();
        match &run {
            Run::Ran { action, packet } => {
                let counter_lines = if *action != out.action || *packet != out.packet {
                    [self.related(&out), counter_lines.clone()].concat()
                } else {
                    counter_lines.clone()
                };
                if *action != out.action {
                    differs = true;
                    suspect = true;
                    let sig = format!(
                        "action: model {} kernel {} [{context}]",
                        state_name(out.action),
                        state_name(*action)
                    );
                    self.log.record(i, sig, || {
                        detail(
                            (self.seed, self.now),
                            i,
                            g,
                            csum,
                            &out,
                            &run,
                            &counter_lines,
                        )
                    });
                } else if *packet != out.packet {
                    differs = true;
                    suspect = true;
                    let sig = format!(
                        "bytes: {} [{context}]",
                        diff_fields(&out.packet, packet).join(", ")
                    );
                    self.log.record(i, sig, || {
                        detail(
                            (self.seed, self.now),
                            i,
                            g,
                            csum,
                            &out,
                            &run,
                            &counter_lines,
                        )
                    });
                }
            }
            Run::BadChecksumComplete
                if matches!(
                    out.forwarding,
                    Forwarding::TimeExceededSent | Forwarding::TooBigSent
                ) && out.packet.len() != g.frame.len() =>
            {
                // bpf_skb_change_tail demotes a CHECKSUM_COMPLETE skb to
                // CHECKSUM_NONE when it changes its length, and the test
                // run's check compares skb->csum without looking at
                // ip_summed: nothing is wrong with such a packet.
                self.csum_demoted += 1;
            }
            Run::BadChecksumComplete => {
                differs = true;
                let sig = format!(
                    "CHECKSUM_COMPLETE: skb->csum left inconsistent (EBADMSG) [{context}{}]",
                    if zero_udp_checksum(&g.frame) {
                        ", UDP checksum 0"
                    } else {
                        ""
                    }
                );
                self.log.record(i, sig, || {
                    detail(
                        (self.seed, self.now),
                        i,
                        g,
                        csum,
                        &out,
                        &run,
                        &counter_lines,
                    )
                });
            }
            Run::Refused(_) => unreachable!(),
        }
        // Every conntrack entry the model touched must be the same in the
        // kernel (same contents, or absent from both).
        let mut keys: Vec<(Table, FlowKey)> = out.ct_touched.clone();
        for k in &out.ct_read {
            keys.push((Table::Conntrack, *k));
            keys.push((Table::Pending, *k));
        }
        keys.sort_by_key(|(t, k)| (*t, k.src, k.dst, k.sport, k.dport, k.proto));
        keys.dedup();
        let mut bad = Vec::new();
        for (t, k) in &keys {
            let m = self.model.table(*t).get(k).copied();
            let kv = self.kernel.ct(*t, k);
            if m != kv {
                bad.push((*t, *k, m, kv));
            }
        }
        if !bad.is_empty() {
            differs = true;
            suspect = true;
            let mut fields: Vec<String> = bad
                .iter()
                .map(|(t, _, m, k)| format!("{t:?} {}", ct_diff(m, k)))
                .collect();
            fields.sort();
            fields.dedup();
            let sig = format!("conntrack: {} [{context}]", fields.join("; "));
            let lines: Vec<String> = bad
                .iter()
                .map(|(t, k, m, kv)| {
                    format!(
                        "    {t:?} {}\n      model  {}\n      kernel {}",
                        show_key(k),
                        show_ct(m),
                        show_ct(kv)
                    )
                })
                .collect();
            let lines = [lines, counter_lines.clone()].concat();
            self.log.record(i, sig, || {
                detail((self.seed, self.now), i, g, csum, &out, &run, &lines)
            });
            for (t, k, _, kv) in bad {
                match kv {
                    Some(e) => self.model.table_mut(t).insert(k, e),
                    None => self.model.table_mut(t).remove(&k),
                };
            }
        }
        for k in &out.affinity_touched {
            let m = self.model.affinity.get(k).copied();
            let kv = self.kernel.affinity(k);
            if m != kv {
                differs = true;
                let line = format!(
                    "    affinity slot {} client {}\n      model  {}\n      kernel {}",
                    k.service_slot,
                    addr_of(&k.client),
                    show_affinity(&m),
                    show_affinity(&kv)
                );
                let lines = [vec![line], counter_lines.clone()].concat();
                let written_here = kv.is_some_and(|e| e.last_ns == self.now)
                    && m.is_none_or(|e| e.last_ns != self.now);
                let what = if written_here {
                    "affinity: the kernel wrote an entry the model did not"
                } else {
                    "affinity: entries differ"
                };
                self.log.record(i, format!("{what} [{context}]"), || {
                    detail((self.seed, self.now), i, g, csum, &out, &run, &lines)
                });
                match kv {
                    Some(e) => self.model.affinity.insert(*k, e),
                    None => self.model.affinity.remove(k),
                };
            }
        }
        if k != self.model.global {
            if !differs {
                self.log.record(
                    i,
                    format!("counters: {} [{context}]", counter_names.join(",")),
                    || {
                        detail(
                            (self.seed, self.now),
                            i,
                            g,
                            csum,
                            &out,
                            &run,
                            &counter_lines,
                        )
                    },
                );
            }
            self.model.global = k;
            suspect = true;
        }
        if suspect {
            self.dirty = true;
            self.stats_dirty = true;
        }
        true
    }

    /// The kernel's entries for the other halves of what the model touched
    /// (where a different decision usually comes from).
    fn related(&self, out: &Outcome) -> Vec<String> {
        let mut lines = Vec::new();
        let mut seen: Vec<FlowKey> = out.ct_touched.iter().map(|(_, k)| *k).collect();
        for (t, k) in &out.ct_touched {
            let Some(e) = self.model.table(*t).get(k) else {
                continue;
            };
            let other = lb_model::conntrack::other_key(e);
            if seen.contains(&other) {
                continue;
            }
            seen.push(other);
            for t in [Table::Conntrack, Table::Pending] {
                lines.push(format!(
                    "    kernel {t:?} {}: {}",
                    show_key(&other),
                    show_ct(&self.kernel.ct(t, &other))
                ));
            }
        }
        lines
    }

    /// Deletes one conntrack half, chosen at random, from both.
    fn evict(&mut self) {
        let mut keys: Vec<(Table, FlowKey)> = [Table::Conntrack, Table::Pending]
            .into_iter()
            .flat_map(|t| self.model.table(t).keys().map(move |k| (t, *k)))
            .collect();
        if keys.is_empty() {
            return;
        }
        keys.sort_by_key(|(t, k)| (*t, k.src, k.dst, k.sport, k.dport, k.proto));
        let (t, k) = *self.rng.pick(&keys);
        self.model.table_mut(t).remove(&k);
        self.kernel.ct_remove(t, &k);
    }

    fn compare_tables(&mut self, i: u64) {
        for t in [Table::Conntrack, Table::Pending] {
            let k = self.kernel.ct_dump(t);
            let m = self.model.table(t);
            if &k != m && !self.dirty {
                let mut lines = Vec::new();
                let mut keys: Vec<&FlowKey> = k.keys().chain(m.keys()).collect();
                keys.sort_by_key(|k| (k.src, k.dst, k.sport, k.dport, k.proto));
                keys.dedup();
                for key in keys {
                    let (mv, kv) = (m.get(key).copied(), k.get(key).copied());
                    if mv != kv {
                        lines.push(format!(
                            "    {t:?} {}: {}\n      model  {}\n      kernel {}",
                            show_key(key),
                            ct_diff(&mv, &kv),
                            show_ct(&mv),
                            show_ct(&kv)
                        ));
                    }
                }
                self.log.record(
                    i,
                    format!("{t:?} table differs outside the keys packets touched"),
                    || format!("  by packet {i}:\n{}", lines.join("\n")),
                );
            }
            *self.model.table_mut(t) = k;
        }
        let k = self.kernel.affinity_dump();
        if k != self.model.affinity && !self.dirty {
            self.log.record(
                i,
                "AFFINITY table differs outside the keys packets touched".into(),
                || {
                    format!(
                        "  by packet {i}: model {:?}\n  kernel {:?}",
                        self.model.affinity, k
                    )
                },
            );
        }
        self.model.affinity = k;
        self.dirty = false;
    }

    /// Service and backend counters (before the control plane changes
    /// them), then taken from the kernel.
    fn compare_stats(&mut self, i: u64) {
        let slots: Vec<u32> = self.model.services.values().map(|v| v.slot).collect();
        let ks = self.kernel.service_stats(slots.iter().copied());
        let kb = self.kernel.backend_stats();
        if !self.stats_dirty {
            for s in &slots {
                let m = self.model.service_stats.get(s).copied().unwrap_or_default();
                let k = ks.get(s).copied().unwrap_or_default();
                if m != k {
                    self.log.record(
                        i,
                        format!("service counters: {}", stats_diff(&m, &k)),
                        || format!("  slot {s} by packet {i}: model {m:?}\n    kernel {k:?}"),
                    );
                }
            }
            for (id, k) in &kb {
                let m = self
                    .model
                    .backend_stats
                    .get(id)
                    .copied()
                    .unwrap_or_default();
                if m != *k {
                    self.log.record(
                        i,
                        format!("backend counters: {}", stats_diff(&m, k)),
                        || format!("  backend {id} by packet {i}: model {m:?}\n    kernel {k:?}"),
                    );
                }
            }
        }
        self.take_stats();
        self.stats_dirty = false;
    }

    fn take_stats(&mut self) {
        self.model.service_stats = self.kernel.service_stats(0..16);
        self.model.backend_stats = self.kernel.backend_stats();
    }

    fn print_coverage(&self) {
        println!("generated:");
        for (k, n) in &self.kinds {
            println!("  {n:>9}  {k:?}");
        }
        println!("decided by (model):");
        for ((p, f), n) in &self.paths {
            println!("  {n:>9}  {p:?} / {f:?}");
        }
        if !self.refused.is_empty() {
            println!(
                "refused by BPF_PROG_TEST_RUN (errno: count): {:?}",
                self.refused
            );
        }
        println!("kernel counters:");
        for (name, v) in global::NAMES.iter().zip(self.kernel.globals()) {
            println!("  {v:>9}  {name}");
        }
        println!(
            "  {:>9}  of them translated by the XDP program",
            self.kernel.xdp_translated
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn detail(
    (seed, now): (u64, u64),
    i: u64,
    g: &Generated,
    csum: bool,
    out: &Outcome,
    run: &Run,
    extra: &[String],
) -> String {
    let mut s = format!(
        "  packet {i} (seed {:#x}): generated as {:?}, ingress ifindex {}, now {}, \
         CHECKSUM_COMPLETE {csum}\n    in     {}\n    model  {} {:?}/{:?} {}\n",
        seed,
        g.kind,
        g.ingress.ifindex,
        now,
        hex(&g.frame),
        show_action(out.action),
        out.path,
        out.forwarding,
        hex(&out.packet)
    );
    match run {
        Run::Ran { action, packet } => {
            s += &format!("    kernel {} {}\n", show_action(*action), hex(packet));
            if packet != &out.packet {
                s += &format!(
                    "    differ in: {}\n",
                    diff_fields(&out.packet, packet).join(", ")
                );
            }
        }
        Run::BadChecksumComplete => s += "    kernel EBADMSG\n",
        Run::Refused(e) => s += &format!("    kernel refused: errno {e}\n"),
    }
    for l in extra {
        s += l;
        s += "\n";
    }
    s
}

/// Whether a frame is UDP with a zero ("none") checksum.
fn zero_udp_checksum(frame: &[u8]) -> bool {
    match lb_model::packet::parse(frame) {
        lb_model::packet::Parsed::Transport(t) if t.ip.proto == lb_common::PROTO_UDP => {
            let at = t.ip.l4_off() + 6;
            frame[at..at + 2] == [0, 0]
        }
        _ => false,
    }
}

fn state_name(a: u32) -> &'static str {
    lb_model::state::action_name(a)
}

fn stats_diff(m: &TrafficStats, k: &TrafficStats) -> String {
    let mut d = Vec::new();
    macro_rules! cmp {
        ($($f:ident),*) => {$(if m.$f != k.$f { d.push(stringify!($f)); })*};
    }
    cmp!(
        packets,
        bytes,
        new_flows,
        reply_packets,
        reply_bytes,
        no_backend
    );
    d.join(",")
}
