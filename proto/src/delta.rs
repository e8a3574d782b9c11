//! What a delta means, on the wire types: [`apply`] turns the whole view an agent holds
//! and a delta into the whole view at the delta's version. The agent applies deltas onto
//! its typed config (`bulwark_agent::config`), not through this; this is the reference
//! the control plane's tests and the scale simulator check deltas against.

use crate::v1::{Service, Snapshot};

/// Why a delta cannot be applied to a view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta was made for another version than the one held.
    #[error(
        "delta onto version {base} but version {held} is held: the control plane should send the whole view"
    )]
    Base {
        /// `Snapshot.base_version` of the delta.
        base: u64,
        /// The version of the view held.
        held: u64,
    },
}

/// Whether `snapshot` is a delta (from protocol 6) rather than a whole view.
pub fn is_delta(snapshot: &Snapshot) -> bool {
    snapshot.base_version != 0
}

/// Applies `next` to `view`: a whole view replaces it; a delta onto `view.version`
/// replaces and removes the services it names (keeping the order by namespace, then
/// name, that the control plane sends) and the inbound part when present.
pub fn apply(view: &mut Snapshot, next: Snapshot) -> Result<(), DeltaError> {
    if !is_delta(&next) {
        *view = next;
        return Ok(());
    }
    if next.base_version != view.version {
        return Err(DeltaError::Base {
            base: next.base_version,
            held: view.version,
        });
    }
    let key = |s: &Service| (s.namespace.clone(), s.name.clone());
    let mut services: std::collections::BTreeMap<(String, String), Service> =
        std::mem::take(&mut view.services)
            .into_iter()
            .map(|s| (key(&s), s))
            .collect();
    for gone in &next.removed_services {
        services.remove(&(gone.namespace.clone(), gone.name.clone()));
    }
    for service in next.services {
        services.insert(key(&service), service);
    }
    view.services = services.into_values().collect();
    if next.inbound.is_some() {
        view.inbound = next.inbound;
    }
    view.version = next.version;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ServiceRef;

    fn service(name: &str, version: u64) -> Service {
        Service {
            name: name.into(),
            namespace: "demo".into(),
            version,
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_replaces_and_removes_what_it_names_and_keeps_the_rest() {
        let mut view = Snapshot {
            version: 3,
            services: vec![service("a", 1), service("b", 2), service("c", 3)],
            inbound: Some(Default::default()),
            ..Default::default()
        };
        let delta = Snapshot {
            version: 5,
            base_version: 3,
            services: vec![service("d", 5), service("b", 5)],
            removed_services: vec![ServiceRef {
                namespace: "demo".into(),
                name: "c".into(),
                version: 5,
            }],
            ..Default::default()
        };
        apply(&mut view, delta).unwrap();
        let names: Vec<_> = view
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.version))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 5), ("d", 5)]);
        assert_eq!(view.version, 5);
        assert!(view.inbound.is_some(), "absent in a delta: unchanged");
    }

    #[test]
    fn a_delta_onto_another_version_is_refused_and_changes_nothing() {
        let mut view = Snapshot {
            version: 4,
            services: vec![service("a", 1)],
            ..Default::default()
        };
        let before = view.clone();
        let delta = Snapshot {
            version: 6,
            base_version: 5,
            ..Default::default()
        };
        assert_eq!(
            apply(&mut view, delta),
            Err(DeltaError::Base { base: 5, held: 4 })
        );
        assert_eq!(view, before);
    }
}
