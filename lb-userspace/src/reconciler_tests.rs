//! The reconciler against an in-memory map set: what it writes, in which
//! order, and that a failed change leaves maps and bookkeeping as they were.

use std::collections::BTreeSet;

use lb_common::{
    Backend, ServiceValue, BACKEND_ACTIVE, BACKEND_DRAINING, MAGLEV_M, RINGS_PER_SERVICE,
};

use super::*;
use crate::fake_maps::{Content, FakeMaps, MapKind, Write};
use crate::model::{BackendSpec, DesiredState, Frontend, Proto, ServiceSpec};

fn spec(name: &str, port: u16, backends: &[(u8, u32)]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        frontend: Frontend {
            addr: "10.73.0.10".parse().unwrap(),
            port,
            proto: Proto::Tcp,
        },
        backends: backends
            .iter()
            .map(|(host, weight)| BackendSpec {
                addr: format!("10.0.0.{host}").parse().unwrap(),
                port: 8080,
                weight: *weight,
            })
            .collect(),
        snat: None,
        health: None,
        affinity_secs: 0,
        table_size: None,
        network: None,
        local_frontend: false,
        source: format!("config:{name}.toml"),
    }
}

fn state(services: &[ServiceSpec]) -> DesiredState {
    DesiredState {
        services: services.to_vec(),
        ..Default::default()
    }
}

fn fresh() -> Reconciler<FakeMaps> {
    Reconciler::new(FakeMaps::new(4, 16)).unwrap()
}

/// One service's bookkeeping: frontend, slot, generation, ids, states,
/// entry, spec.
type Row = (
    Frontend,
    u32,
    u32,
    Vec<u32>,
    Vec<u8>,
    ServiceValue,
    ServiceSpec,
);

/// The reconciler's bookkeeping, comparable as a whole.
#[derive(Debug, PartialEq)]
struct Books {
    services: Vec<Row>,
    free_slots: Vec<u32>,
    next_slot: u32,
    next_backend_id: u32,
    orphans: Vec<u32>,
}

fn books(r: &Reconciler<FakeMaps>) -> Books {
    let (free, next_slot) = r.slots();
    Books {
        services: r
            .applied()
            .map(|a| {
                (
                    a.spec.frontend,
                    a.slot,
                    a.generation,
                    a.backend_ids.clone(),
                    a.backend_states.clone(),
                    a.entry,
                    a.spec.clone(),
                )
            })
            .collect(),
        free_slots: free.to_vec(),
        next_slot,
        next_backend_id: r.next_backend_id(),
        orphans: r.orphans().to_vec(),
    }
}

fn ids_of(r: &Reconciler<FakeMaps>, port: u16) -> Vec<u32> {
    r.applied()
        .find(|a| a.spec.frontend.port == port)
        .unwrap()
        .backend_ids
        .clone()
}

fn ring_ids(r: &Reconciler<FakeMaps>, port: u16) -> BTreeSet<u32> {
    let entry = r.maps().service(port).unwrap();
    r.maps().table(&entry).iter().copied().collect()
}

#[test]
fn add_writes_counters_backends_ring_then_the_service_entry() {
    let mut r = fresh();
    let web = spec("web", 80, &[(1, 1), (2, 1), (3, 1)]);
    let changes = r.apply(&state(&[web])).unwrap();
    assert_eq!(changes.added, 1);
    assert_eq!(
        r.maps().log,
        vec![
            Write::ServiceStats { slot: 0 },
            Write::BackendStats { id: 1 },
            Write::Backend {
                id: 1,
                state: BACKEND_ACTIVE
            },
            Write::BackendStats { id: 2 },
            Write::Backend {
                id: 2,
                state: BACKEND_ACTIVE
            },
            Write::BackendStats { id: 3 },
            Write::Backend {
                id: 3,
                state: BACKEND_ACTIVE
            },
            Write::Ring { ring: 0 },
            Write::Service {
                port: 80,
                ring: 0,
                count: 3
            },
        ]
    );
    let ring = r.maps().table(&r.maps().service(80).unwrap());
    assert_eq!(ring.len(), MAGLEV_M as usize);
    for id in 1..=3 {
        let share = ring.iter().filter(|x| **x == id).count();
        // Maglev spreads equal weights within a few percent.
        assert!(
            share.abs_diff(MAGLEV_M as usize / 3) < MAGLEV_M as usize / 20,
            "backend {id} has {share} slots"
        );
    }
    // Applying the same state again writes nothing.
    let writes = r.maps().log.len();
    assert_eq!(
        r.apply(&state(&[spec("web", 80, &[(1, 1), (2, 1), (3, 1)])]))
            .unwrap(),
        Changes::default()
    );
    assert_eq!(r.maps().log.len(), writes);
}

#[test]
fn update_reuses_ids_and_writes_a_drained_backend_after_the_ring_flip() {
    let mut r = fresh();
    r.apply(&state(&[spec("web", 80, &[(1, 1), (2, 1), (3, 1)])]))
        .unwrap();
    let start = r.maps().log.len();
    // 1 unchanged, 2 drained, 3 removed, 4 added.
    let changes = r
        .apply(&state(&[spec("web", 80, &[(1, 1), (2, 0), (4, 1)])]))
        .unwrap();
    assert_eq!(changes.updated, 1);
    assert_eq!(ids_of(&r, 80), vec![1, 2, 4]);
    assert_eq!(
        r.maps().log[start..],
        [
            Write::Backend {
                id: 1,
                state: BACKEND_ACTIVE
            },
            Write::BackendStats { id: 4 },
            Write::Backend {
                id: 4,
                state: BACKEND_ACTIVE
            },
            // The idle generation, then the flip.
            Write::Ring { ring: 1 },
            Write::Service {
                port: 80,
                ring: 1,
                count: 2
            },
            // Only now: no ring names 2 any more, and 3 can go.
            Write::Backend {
                id: 2,
                state: BACKEND_DRAINING
            },
            Write::RemoveBackend { id: 3 },
            Write::RemoveBackendStats { id: 3 },
        ]
    );
    assert_eq!(ring_ids(&r, 80), BTreeSet::from([1, 4]));
    // The next change flips back to generation 0.
    r.apply(&state(&[spec("web", 80, &[(1, 1), (4, 1)])]))
        .unwrap();
    assert_eq!(r.maps().service(80).unwrap().ring, 0);
    assert_eq!(r.maps().service(80).unwrap().ring_size, MAGLEV_M);
    assert!(r.maps().backend(2).is_none());
}

#[test]
fn remove_frees_the_slot_but_never_an_id() {
    let mut r = fresh();
    r.apply(&state(&[
        spec("a", 80, &[(1, 1)]),
        spec("b", 81, &[(2, 1)]),
    ]))
    .unwrap();
    let start = r.maps().log.len();
    let changes = r.apply(&state(&[spec("b", 81, &[(2, 1)])])).unwrap();
    assert_eq!(changes.removed, 1);
    assert_eq!(
        r.maps().log[start..],
        [
            Write::RemoveService { port: 80 },
            Write::RemoveBackend { id: 1 },
            Write::RemoveBackendStats { id: 1 },
        ]
    );
    r.apply(&state(&[
        spec("b", 81, &[(2, 1)]),
        spec("c", 82, &[(1, 1)]),
    ]))
    .unwrap();
    let c = r.applied().find(|a| a.spec.name == "c").unwrap();
    assert_eq!(c.slot, 0, "the freed slot is taken again");
    assert_eq!(c.backend_ids, vec![3], "ids are not reused");
}

/// How many writes applying `desired` takes from `r`'s state (on a copy
/// of the same history).
fn writes_needed(setup: &[DesiredState], desired: &DesiredState) -> usize {
    let mut r = fresh();
    for s in setup {
        r.apply(s).unwrap();
    }
    let before = r.maps().attempts;
    r.apply(desired).unwrap();
    r.maps().attempts - before
}

/// Fails each write of `desired` in turn, from the state `setup` leaves,
/// and checks maps and books after each failure against `expect`:
/// Some(n) for a failure at write n that must leave everything as it was.
fn fail_each_write(setup: &[DesiredState], desired: &DesiredState, failing: &str) {
    let n = writes_needed(setup, desired);
    assert!(n > 0);
    for k in 0..n {
        let mut r = fresh();
        for s in setup {
            r.apply(s).unwrap();
        }
        let content: Content = r.maps().content();
        let before = books(&r);
        r.maps_mut().fail_attempt = Some(r.maps().attempts + k);
        let err = r.apply(desired).expect_err("the injected failure");
        assert_eq!(err.failures.len(), 1, "write {k}: {err}");
        assert_eq!(err.failures[0].name, failing);
        assert_eq!(err.failures[0].source, format!("config:{failing}.toml"));
        assert!(err.failures[0].reason.contains("injected"), "{err}");
        assert_eq!(r.maps().content(), content, "maps after failing write {k}");
        assert_eq!(books(&r), before, "books after failing write {k}");
        // And the same change goes through once the maps work again.
        r.maps_mut().fail_attempt = None;
        r.apply(desired).unwrap();
    }
}

#[test]
fn a_failure_at_any_write_of_an_add_rolls_it_back() {
    let setup = [state(&[spec("a", 80, &[(1, 1), (2, 1)])])];
    // A second service with three backends.
    let desired = state(&[
        spec("a", 80, &[(1, 1), (2, 1)]),
        spec("b", 81, &[(3, 1), (4, 1), (5, 1)]),
    ]);
    fail_each_write(&setup, &desired, "b");
}

#[test]
fn a_failure_at_any_write_of_an_update_before_it_commits_rolls_it_back() {
    let setup = [state(&[spec("a", 80, &[(1, 1), (2, 1), (3, 1)])])];
    // Keep 1, drain 2 (written after the flip), drop 3, add 4 and 5.
    let desired = state(&[spec("a", 80, &[(1, 1), (2, 0), (4, 1), (5, 1)])]);
    let total = writes_needed(&setup, &desired);
    // The last two writes remove backend 3 once the update has committed.
    let committed = total - 2;
    for k in 0..committed {
        let mut r = fresh();
        r.apply(&setup[0]).unwrap();
        let content = r.maps().content();
        let before = books(&r);
        r.maps_mut().fail_attempt = Some(r.maps().attempts + k);
        let err = r.apply(&desired).expect_err("the injected failure");
        assert_eq!(err.failures[0].name, "a");
        assert_eq!(r.maps().content(), content, "maps after failing write {k}");
        let after = books(&r);
        assert_eq!(after.services, before.services, "books after write {k}");
        assert_eq!(after.free_slots, before.free_slots);
        assert_eq!(after.orphans, before.orphans);
        // New ids go back only if no ring ever named them.
        let flipped = r
            .maps()
            .log
            .iter()
            .rev()
            .any(|w| matches!(w, Write::Service { ring: 1, .. }));
        if !flipped {
            assert_eq!(after.next_backend_id, before.next_backend_id, "write {k}");
        }
        r.maps_mut().fail_attempt = None;
        r.apply(&desired).unwrap();
        assert_eq!(ring_ids(&r, 80).len(), 3);
    }
    // A failed removal after the commit keeps the update and retries the
    // removal at the next apply.
    for k in committed..total {
        let mut r = fresh();
        r.apply(&setup[0]).unwrap();
        r.maps_mut().fail_attempt = Some(r.maps().attempts + k);
        r.apply(&desired).unwrap();
        assert_eq!(r.orphans(), [3]);
        r.apply(&desired).unwrap();
        assert!(r.orphans().is_empty());
        let content = r.maps().content();
        assert!(!content.backends.contains_key(&3));
        assert!(!content.backend_stats.contains(&3));
    }
}

#[test]
fn a_failed_removal_keeps_the_service_and_reports_it() {
    let mut r = fresh();
    r.apply(&state(&[
        spec("a", 80, &[(1, 1)]),
        spec("b", 81, &[(2, 1)]),
    ]))
    .unwrap();
    let content = r.maps().content();
    r.maps_mut().fail_map = Some(MapKind::Services);
    let err = r.apply(&state(&[spec("b", 81, &[(2, 1)])])).unwrap_err();
    assert_eq!(err.failures.len(), 1);
    assert_eq!(err.failures[0].name, "a");
    assert_eq!(r.maps().content(), content);
    assert_eq!(r.applied().count(), 2);
    r.maps_mut().fail_map = None;
    assert_eq!(
        r.apply(&state(&[spec("b", 81, &[(2, 1)])]))
            .unwrap()
            .removed,
        1
    );
}

#[test]
fn one_failing_service_does_not_stop_the_others() {
    // Room for 4 backends: b's three do not fit after a's two, and c's one
    // still does once b is rolled back.
    let mut r = Reconciler::new(FakeMaps::new(8, 4)).unwrap();
    let mut c = spec("c", 82, &[(9, 1)]);
    c.source = "docker:labels".into();
    let err = r
        .apply(&state(&[
            spec("a", 80, &[(1, 1), (2, 1)]),
            spec("b", 81, &[(3, 1), (4, 1), (5, 1)]),
            c,
        ]))
        .unwrap_err();
    assert_eq!(err.changes.added, 2);
    assert_eq!(err.failures.len(), 1);
    let f = &err.failures[0];
    assert_eq!((f.name.as_str(), f.source.as_str()), ("b", "config:b.toml"));
    assert!(f.reason.contains("full"), "{f}");
    assert_eq!(f.frontend, "10.73.0.10:81/tcp");
    let names: Vec<&str> = r.applied().map(|a| a.spec.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert!(r.maps().service(81).is_none());
    assert_eq!(r.maps().content().backends.len(), 3);
    assert_eq!(ring_ids(&r, 82), BTreeSet::from([ids_of(&r, 82)[0]]));
}

#[test]
fn running_out_of_slots_or_ids_is_an_error_for_that_service_only() {
    let mut r = Reconciler::new(FakeMaps::new(2, 16)).unwrap();
    let err = r
        .apply(&state(&[
            spec("a", 80, &[(1, 1)]),
            spec("b", 81, &[(2, 1)]),
            spec("c", 82, &[(3, 1)]),
        ]))
        .unwrap_err();
    assert_eq!(err.failures.len(), 1);
    assert_eq!(err.failures[0].name, "c");
    assert!(err.failures[0].reason.contains("service slots"), "{err}");
    assert_eq!(r.slots(), (&[][..], 2));

    // The last id there is: the second backend finds none left.
    let mut maps = FakeMaps::new(2, 16);
    maps.conntrack_backends = vec![u32::MAX - 2];
    let mut r = Reconciler::new(maps).unwrap();
    let content = r.maps().content();
    let err = r
        .apply(&state(&[spec("a", 80, &[(1, 1), (2, 1)])]))
        .unwrap_err();
    assert!(err.failures[0].reason.contains("exhausted"), "{err}");
    assert_eq!(r.maps().content(), content);
    assert_eq!(r.next_backend_id(), u32::MAX - 1);
    assert_eq!(r.slots(), (&[][..], 0));
    // One backend still fits.
    r.apply(&state(&[spec("a", 80, &[(1, 1)])])).unwrap();
    assert_eq!(ids_of(&r, 80), vec![u32::MAX - 1]);
}

#[test]
fn two_services_on_one_frontend_first_one_wins() {
    let mut r = fresh();
    let mut other = spec("other", 80, &[(2, 1)]);
    other.source = "docker:labels".into();
    let err = r
        .apply(&state(&[spec("a", 80, &[(1, 1)]), other]))
        .unwrap_err();
    assert_eq!(err.failures.len(), 1);
    assert_eq!(err.failures[0].name, "other");
    assert_eq!(err.changes.added, 1);
    assert_eq!(r.applied().next().unwrap().spec.name, "a");
}

#[test]
fn adoption_keeps_slots_and_ids_and_drops_leftovers() {
    let mut maps = FakeMaps::new(4, 16);
    let web = spec("web", 80, &[(1, 1), (2, 0)]);
    let backend = |host: u8, state: u8, slot: u32| Backend {
        addr: addr16(format!("10.0.0.{host}").parse().unwrap()),
        port: 8080u16.to_be(),
        state,
        _pad: 0,
        service_slot: slot,
    };
    // Slot 2, generation 1; ids 7 (active) and 9 (draining); 5 belongs to
    // a slot no service has.
    maps.preload_service(
        &service_key(&web.frontend),
        ServiceValue {
            slot: 2,
            ring: (2 * RINGS_PER_SERVICE + 1) * MAGLEV_M,
            backend_count: 1,
            ring_size: MAGLEV_M,
            ..Default::default()
        },
    );
    maps.preload_backend(7, backend(1, BACKEND_ACTIVE, 2));
    maps.preload_backend(9, backend(2, BACKEND_DRAINING, 2));
    maps.preload_backend(5, backend(3, BACKEND_ACTIVE, 3));
    maps.preload_ring(2 * RINGS_PER_SERVICE + 1, &vec![7; MAGLEV_M as usize]);
    maps.conntrack_backends = vec![12];
    let mut r = Reconciler::new(maps).unwrap();
    let adopted = r.applied().next().unwrap();
    assert!(adopted.adopted);
    assert_eq!((adopted.slot, adopted.generation), (2, 1));
    assert_eq!(adopted.backend_ids, vec![7, 9]);
    assert_eq!(adopted.spec.backends[1].weight, 0);
    assert_eq!(r.slots(), (&[1, 0][..], 3));
    assert_eq!(r.next_backend_id(), 13, "above every id conntrack names");
    let content = r.maps().content();
    assert!(!content.backends.contains_key(&5));
    assert!(!content.backend_stats.contains(&5));

    // A source names it: same ids, the other generation, the same slot.
    let mut named = web.clone();
    named.backends[1].weight = 1;
    r.apply(&state(&[named])).unwrap();
    assert_eq!(ids_of(&r, 80), vec![7, 9]);
    let entry = r.maps().service(80).unwrap();
    assert_eq!(
        (entry.slot, entry.ring),
        (2, 2 * RINGS_PER_SERVICE * MAGLEV_M)
    );
    assert_eq!(ring_ids(&r, 80), BTreeSet::from([7, 9]));
    // New services take the free slots before new ones.
    r.apply(&state(&[
        {
            let mut s = web.clone();
            s.backends[1].weight = 1;
            s
        },
        spec("x", 81, &[(4, 1)]),
    ]))
    .unwrap();
    assert_eq!(r.applied().find(|a| a.spec.name == "x").unwrap().slot, 0);
    assert_eq!(ids_of(&r, 81), vec![13]);
}

fn member(cookie: u64, network: u32) -> crate::model::Member {
    crate::model::Member {
        netns_cookie: cookie,
        network,
    }
}

#[test]
fn a_network_scoped_service_is_flagged_with_its_network() {
    let mut r = fresh();
    let mut vip = spec("api", 0, &[(1, 1), (2, 1)]);
    vip.network = Some(4097);
    for b in &mut vip.backends {
        b.port = 0;
    }
    let mut desired = state(&[vip, spec("web", 80, &[(3, 1)])]);
    desired.members = [member(7, 4097), member(8, 4097)].into();
    r.apply(&desired).unwrap();
    let scoped = r.maps().service(0).unwrap();
    assert_eq!(scoped.flags & FLAG_SOCKET, FLAG_SOCKET);
    assert_eq!(scoped.network, 4097);
    assert_eq!(scoped.backend_count, 2);
    let plain = r.maps().service(80).unwrap();
    assert_eq!((plain.flags & FLAG_SOCKET, plain.network), (0, 0));
    assert_eq!(r.maps().members, desired.members);

    // Members follow the desired state: one leaves, another joins.
    desired.members = [member(8, 4097), member(9, 4097)].into();
    r.apply(&desired).unwrap();
    assert_eq!(r.maps().members, desired.members);
    assert_eq!(r.members(), &desired.members);
}

#[test]
fn adopted_members_stay_until_the_sources_have_reported() {
    let mut maps = FakeMaps::new(4, 16);
    maps.members = [member(7, 4097)].into();
    let mut r = Reconciler::new(maps).unwrap();
    // A source that has not reported yet: nothing is taken away.
    r.apply(&DesiredState::default()).unwrap();
    assert_eq!(r.maps().members, [member(7, 4097)].into());
    r.release_adopted();
    r.apply(&DesiredState::default()).unwrap();
    assert!(r.maps().members.is_empty());
}

#[test]
fn a_failed_membership_write_is_reported_and_retried() {
    let mut r = fresh();
    let mut desired = state(&[spec("web", 80, &[(1, 1)])]);
    desired.members = [member(7, 4097)].into();
    r.maps_mut().fail_map = Some(MapKind::Members);
    let failed = r.apply(&desired).unwrap_err();
    assert_eq!(failed.failures.len(), 1, "{failed}");
    assert!(failed.failures[0].reason.contains("injected"), "{failed}");
    assert!(
        r.maps().service(80).is_some(),
        "services are applied anyway"
    );
    r.maps_mut().fail_map = None;
    r.apply(&desired).unwrap();
    assert_eq!(r.maps().members, desired.members);
}

/// Whether the fake's PREFILTER holds the frontend or backend (addr, port).
fn prefiltered(r: &Reconciler<FakeMaps>, addr: &str, port: u16) -> bool {
    let m = r.maps();
    let bits = m.prefilter_bits();
    crate::prefilter::holds(
        &m.prefilter,
        bits,
        &addr16(addr.parse().unwrap()),
        port.to_be(),
    )
}

#[test]
fn prefilter_holds_every_frontend_and_backend_and_a_restart_forgets_removed_ones() {
    let mut r = fresh();
    assert_eq!(r.maps().prefilter_on, 0, "off until written");
    let web = spec("web", 80, &[(1, 1), (2, 1)]);
    let api = spec("api", 81, &[(3, 1)]);
    r.apply(&state(&[web.clone(), api.clone()])).unwrap();
    assert_eq!(r.maps().prefilter_on, lb_common::PREFILTER_MIN_BITS);
    for (addr, port) in [
        ("10.73.0.10", 80),
        ("10.73.0.10", 81),
        ("10.0.0.1", 8080),
        ("10.0.0.2", 8080),
        ("10.0.0.3", 8080),
    ] {
        assert!(prefiltered(&r, addr, port), "{addr}:{port}");
    }
    // A removed service keeps its bits while lbd runs: its backend's
    // replies already on their way must still be translated.
    r.apply(&state(&[web])).unwrap();
    assert!(prefiltered(&r, "10.73.0.10", 81) && prefiltered(&r, "10.0.0.3", 8080));
    // A new reconciler (lbd restarted) rebuilds from what it adopts.
    let maps = std::mem::take(&mut r.maps);
    let mut r = Reconciler::new(maps).unwrap();
    r.apply(&state(&[spec("web", 80, &[(1, 1), (2, 1)])]))
        .unwrap();
    assert!(prefiltered(&r, "10.73.0.10", 80) && prefiltered(&r, "10.0.0.2", 8080));
    assert!(!prefiltered(&r, "10.73.0.10", 81) && !prefiltered(&r, "10.0.0.3", 8080));
}

#[test]
fn tables_built_ahead_in_batches_are_those_built_one_by_one() {
    // Three batches (256, 256, 88), each built while the one before is
    // written, then one service changed alone.
    let n = 2 * PREBUILD_BATCH + 88;
    let mut r = Reconciler::new(FakeMaps::new(n as u32, 4 * n as u32)).unwrap();
    let mut services: Vec<ServiceSpec> = (0..n)
        .map(|i| {
            let hosts = [(1 + (i % 200) as u8, 1), (2 + (i % 7) as u8, 2), (250, 1)];
            spec(&format!("s{i}"), 1000 + i as u16, &hosts)
        })
        .collect();
    services[n - 1].table_size = Some(251);
    assert_eq!(r.apply(&state(&services)).unwrap().added, n);
    services[5].backends.pop();
    assert_eq!(r.apply(&state(&services)).unwrap().updated, 1);
    for a in r.applied() {
        let keys = maglev_keys(&a.spec);
        let size = a.spec.table_size.unwrap_or(MAGLEV_M);
        let active: Vec<u32> = a.backend_ids.clone();
        let expected: Vec<u32> = maglev::build_table(&keys, size)
            .iter()
            .map(|i| active[*i as usize])
            .collect();
        let entry = r.maps().service(a.spec.frontend.port).unwrap();
        assert_eq!(r.maps().table(&entry), expected, "{}", a.spec.name);
    }
}
