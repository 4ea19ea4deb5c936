//! What a reload of the config file changed, in words for `lbctl reload`.

use std::collections::BTreeMap;

use crate::model::{Frontend, ServiceSpec};

/// The config file's services before and after, matched by frontend (what
/// identifies a service to the datapath).
pub fn summary(before: &[ServiceSpec], after: &[ServiceSpec], conntrack_changed: bool) -> String {
    let index = |list: &[ServiceSpec]| -> BTreeMap<Frontend, ServiceSpec> {
        list.iter().map(|s| (s.frontend, s.clone())).collect()
    };
    let (before, after) = (index(before), index(after));
    let name = |s: &ServiceSpec| format!("{} ({})", s.name, s.frontend);
    let mut parts = Vec::new();
    let mut say = |verb: &str, names: Vec<String>| {
        if !names.is_empty() {
            parts.push(format!("{verb} {}", names.join(", ")));
        }
    };
    say(
        "added",
        after
            .values()
            .filter(|s| !before.contains_key(&s.frontend))
            .map(name)
            .collect(),
    );
    say(
        "changed",
        after
            .values()
            .filter(|s| before.get(&s.frontend).is_some_and(|b| b != *s))
            .map(name)
            .collect(),
    );
    say(
        "removed",
        before
            .values()
            .filter(|s| !after.contains_key(&s.frontend))
            .map(name)
            .collect(),
    );
    if conntrack_changed {
        parts.push("changed the [conntrack] settings".into());
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(text: &str) -> Vec<ServiceSpec> {
        crate::config::parse(std::path::Path::new("lbd.toml"), text)
            .unwrap()
            .services
    }

    #[test]
    fn names_what_was_added_changed_and_removed() {
        let before = services(
            "[[service]]\nname = \"web\"\nfrontend = \"10.0.0.1:80/tcp\"\nbackends = [\"10.1.0.1:80\"]\n\
             [[service]]\nname = \"dns\"\nfrontend = \"10.0.0.1:53/udp\"\nbackends = [\"10.1.0.1:53\"]\n",
        );
        let after = services(
            "[[service]]\nname = \"web\"\nfrontend = \"10.0.0.1:80/tcp\"\nbackends = [\"10.1.0.2:80\"]\n\
             [[service]]\nname = \"api\"\nfrontend = \"10.0.0.2:80/tcp\"\nbackends = [\"10.1.0.1:81\"]\n",
        );
        assert_eq!(
            summary(&before, &after, false),
            "added api (10.0.0.2:80/tcp); changed web (10.0.0.1:80/tcp); \
             removed dns (10.0.0.1:53/udp)"
        );
        assert_eq!(summary(&after, &after, false), "no change");
        assert_eq!(
            summary(&after, &after, true),
            "changed the [conntrack] settings"
        );
    }
}
