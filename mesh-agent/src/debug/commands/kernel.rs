//! The commands that read the kernel directly: `bpf` and `doctor` (root only).
use std::path::Path;

use mesh_datapath::maps;

use super::status::maps_table;
use super::*;

// === bpf ===

/// `mesh-agent bpf [MAP [list|get KEY]]`.
pub fn bpf(pin_dir: &Path, map: Option<&str>, key: Option<&str>, json: bool) -> Result<u8> {
    require_root("bpf")?;
    let Some(map) = map else {
        let all = maps::summaries(pin_dir);
        if all.iter().all(|m| m.error.is_some()) {
            return Err(CommandError::new(
                EXIT_FINDING,
                format!(
                    "no pinned maps under {}: is an agent of this instance running, or did \
                     it run here? (--instance names it)",
                    pin_dir.display()
                ),
            ));
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            print!("{}", maps_table(&all).render());
        }
        return Ok(0);
    };
    let def = maps::find(map).ok_or_else(|| {
        CommandError::new(
            EXIT_USAGE,
            format!("unknown map {map:?}: the maps are {}", maps::known()),
        )
    })?;
    let usage = |e: maps::MapError| {
        let code = match e {
            maps::MapError::BadKey { .. } | maps::MapError::NotListable { .. } => EXIT_USAGE,
            _ => EXIT_FINDING,
        };
        CommandError::new(code, e.to_string())
    };
    let wanted = key
        .map(|k| maps::canonical_key(def, k))
        .transpose()
        .map_err(usage)?;
    let mut entries = maps::entries(pin_dir, def).map_err(usage)?;
    if let Some(k) = &wanted {
        entries.retain(|e| e.key == *k);
        if entries.is_empty() {
            return Err(CommandError::new(
                EXIT_FINDING,
                format!("{} has no entry {k}", def.name),
            ));
        }
    }
    if json {
        let v = serde_json::json!({ "map": def.name, "entries": entries });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if entries.is_empty() {
        println!("{} is empty ({})", def.name, def.purpose);
        return Ok(0);
    }
    let mut t = Table::new(&["~KEY", "~VALUE"]);
    for e in &entries {
        t.row(vec![e.key.clone(), e.value.clone()]);
    }
    print!("{}", t.render());
    Ok(0)
}

// === doctor ===

/// `mesh-agent doctor`.
pub fn doctor(load: bool, json: bool) -> Result<u8> {
    require_root("doctor")?;
    let checks = mesh_datapath::features::doctor(load);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok",
                (false, true) => "FAIL",
                (false, false) => "WARN",
            };
            print!(
                "{}",
                render::wrap(&format!("{mark:<4}  {:<width$}  ", c.name), &c.detail)
            );
            if let Some(h) = &c.hint {
                print!(
                    "{}",
                    render::wrap(&format!("{:<w$}fix: ", "", w = width + 8), h)
                );
            }
        }
        let failed = checks.iter().filter(|c| !c.ok && c.required).count();
        let warned = checks.iter().filter(|c| !c.ok && !c.required).count();
        if failed + warned > 0 {
            println!(
                "\n{failed} of {} checks failed, {warned} warnings",
                checks.len()
            );
        }
    }
    Ok(verdict(checks.iter().all(|c| c.ok || !c.required)))
}
