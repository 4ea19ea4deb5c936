//! Whether the maps pinned in a pin directory are what this build expects.
//! The loader adopts whatever is pinned under a map's name, so without this
//! check an lbd would run on maps of another build or other `--max-*`
//! values, misreading their entries or reporting capacities they lack.
//!
//! Two checks: every pinned map's shape (type, key and value size,
//! max_entries, flags) against this build's object, and a layout record for
//! what shapes cannot show (a value whose fields changed meaning but not
//! size). The record is a pinned one-entry array, LAYOUT, rather than a file
//! under /run: bpffs holds no plain files, and a record pinned beside the
//! maps lives and dies with them, so it can never describe maps it did not
//! come with.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{Array, Map, MapData, MapType};
use aya_obj::generated::bpf_map_type;
use lb_common::{maps, Layout, LAYOUT_VERSION};

use crate::datapath::Limits;

/// What one map must look like.
#[derive(Debug)]
pub struct Shape {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The shapes of `names` in `object`, with the sizes the loader will give
/// them (`max_entries`, by name, overrides the object's).
pub fn expected(
    object: &[u8],
    names: &[&'static str],
    max_entries: &[(&'static str, u32)],
) -> Result<Vec<Shape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    names
        .iter()
        .map(|name| {
            let map = obj
                .maps
                .get(*name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
            let raw = bpf_map_type::try_from(map.map_type())
                .map_err(|_| anyhow!("map {name}: unknown type {}", map.map_type()))?;
            Ok(Shape {
                name,
                map_type: MapType::try_from(raw)?,
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: max_entries
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(map.max_entries(), |(_, v)| *v),
                flags: map.map_flags(),
            })
        })
        .collect()
}

/// Before the loader runs: refuses pins that this lbd would misread (see
/// [`check`]); with no map pinned yet, pins the record of this build's
/// layout and `limits` first, so maps are never pinned without one (an lbd
/// that dies between the two leaves a record and no maps, which is fine).
pub fn check_or_record(dir: &Path, shapes: &[Shape], limits: Limits) -> Result<()> {
    if check(dir, shapes, limits)? {
        return Ok(());
    }
    let wanted = record_of(limits);
    if read_record(dir)? == Some(wanted) {
        return Ok(());
    }
    let path = dir.join(maps::LAYOUT);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => {}
    }
    write_record(&path, wanted)
}

/// Refuses pins that this lbd would misread: another layout version, or a
/// map whose shape differs from `shapes`. Maps not pinned yet are fine (the
/// loader creates them). Returns whether any map is pinned.
pub fn check(dir: &Path, shapes: &[Shape], limits: Limits) -> Result<bool> {
    let pinned: Vec<&Shape> = shapes
        .iter()
        .filter(|s| dir.join(s.name).exists())
        .collect();
    let record = read_record(dir)?;
    let cleanup = format!(
        "`lbd --cleanup --pin-dir {}` removes them, which drops every connection the \
         datapath tracks",
        dir.display()
    );
    match record {
        None if !pinned.is_empty() => bail!(
            "the maps pinned in {} carry no layout record (made by an older lbd): their \
             layout cannot be trusted; {cleanup}",
            dir.display()
        ),
        Some(r) if r.version != LAYOUT_VERSION => bail!(
            "the maps pinned in {} have layout version {}, this lbd uses version {}; \
             {cleanup} (or keep running the lbd that made them)",
            dir.display(),
            r.version,
            LAYOUT_VERSION
        ),
        _ => {}
    }
    let mut problems = Vec::new();
    for shape in &pinned {
        let path = dir.join(shape.name);
        let data = match MapData::from_pin(&path) {
            Ok(data) => data,
            Err(e) => {
                problems.push(format!("{}: not a map ({e})", shape.name));
                continue;
            }
        };
        let info = data
            .info()
            .with_context(|| format!("reading {}", path.display()))?;
        let mut differ = Vec::new();
        match info.map_type() {
            Ok(t) if t == shape.map_type => {}
            Ok(t) => differ.push(format!("type {t:?}, expected {:?}", shape.map_type)),
            Err(e) => differ.push(format!("type unknown ({e}), expected {:?}", shape.map_type)),
        }
        let mut field = |what: &str, pinned: u32, wanted: u32| {
            if pinned != wanted {
                differ.push(format!("{what} {pinned}, expected {wanted}"));
            }
        };
        field("key size", info.key_size(), shape.key_size);
        field("value size", info.value_size(), shape.value_size);
        field("max_entries", info.max_entries(), shape.max_entries);
        field("flags", info.map_flags(), shape.flags);
        if !differ.is_empty() {
            problems.push(format!("{}: {}", shape.name, differ.join(", ")));
        }
    }
    if problems.is_empty() {
        return Ok(!pinned.is_empty());
    }
    let limits_hint = match record {
        Some(r)
            if (r.max_services, r.max_backends, r.max_flows)
                != (limits.max_services, limits.max_backends, limits.max_flows) =>
        {
            format!(
                "they were made with --max-services {} --max-backends {} --max-flows {}: start \
                 lbd with those values to keep the connections, or ",
                r.max_services, r.max_backends, r.max_flows
            )
        }
        _ => String::new(),
    };
    bail!(
        "the maps pinned in {} do not fit this lbd ({}); {limits_hint}{cleanup}",
        dir.display(),
        problems.join("; ")
    )
}

/// The layout record pinned in `dir`, if any.
pub fn read_record(dir: &Path) -> Result<Option<Layout>> {
    let path = dir.join(maps::LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| anyhow!("{}: not a pinned map ({e})", path.display()))?;
    let info = data.info()?;
    if info.map_type().ok() != Some(MapType::Array) || info.max_entries() != 1 {
        bail!(
            "{} is not a layout record (a one-entry array); {}",
            path.display(),
            "`lbd --cleanup` removes it with the maps, which drops every tracked connection"
        );
    }
    let array: Array<MapData, Layout> = Array::try_from(Map::Array(data))
        .map_err(|e| anyhow!("{}: not a layout record ({e})", path.display()))?;
    let record = array
        .get(&0, 0)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(record))
}

fn record_of(limits: Limits) -> Layout {
    Layout {
        version: LAYOUT_VERSION,
        max_services: limits.max_services,
        max_backends: limits.max_backends,
        max_flows: limits.max_flows,
    }
}

fn write_record(path: &Path, record: Layout) -> Result<()> {
    let size = std::mem::size_of::<Layout>() as u32;
    let def = aya_obj::Map::new_from_params(bpf_map_type::BPF_MAP_TYPE_ARRAY as u32, 4, size, 1, 0);
    let data = MapData::create(def, maps::LAYOUT, None).context("creating the layout record")?;
    let mut array: Array<MapData, Layout> = Array::try_from(Map::Array(data))?;
    array.set(0, record, 0)?;
    // Pinned only once written: a record is never seen empty.
    array.pin(path).context("pinning the layout record")?;
    Ok(())
}
