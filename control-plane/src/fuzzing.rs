//! The body of the control plane's fuzz target, called both by the libFuzzer target in
//! `fuzz/` (with the `fuzzing` feature) and by the unit test below, which replays its
//! committed corpus (`fuzz/corpus/yaml_documents/`) in `make test`. The seed corpora of
//! every target that takes config are written from the examples by [`seeds`]. See
//! `docs/fuzzing.md`.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;

use crate::discovery::view::{AgentView, ViewCache};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::source::{dir, documents};

#[cfg(test)]
mod seeds;

/// The name the input's file is shown under.
const FILE: &str = "fuzz.yaml";
/// Agents viewed per input, at most: one per pod of the model, then one with no labels.
const MAX_AGENTS: usize = 4;
/// The oldest agent protocol, whose views hold back what it cannot enforce.
const OLDEST_PROTOCOL: u32 = 1;

/// The `yaml_documents` target: `data` as a file of the folder source, decoded into
/// objects as a load decodes it, then the objects indexed and each agent's snapshot
/// encoded as the gRPC stream encodes it. Panics when a rejection names no document of
/// the file, or when the shared encoding of a snapshot is not prost's.
pub fn yaml_documents(data: &[u8]) {
    // The folder source reads files as UTF-8 text and rejects any other file whole.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let count = documents::split(text).len();
    let (objects, rejected) = dir::read_text(FILE, text);
    for r in &rejected {
        assert!(
            r.document.is_some_and(|d| d < count),
            "rejection {r:?} names no document of the file's {count}"
        );
    }
    assert!(objects.iter().all(|(_, document)| *document < count));

    let model: Model = objects.into_iter().map(|(object, _)| object).collect();
    let index = Index::new(1, &model, Arc::new(Metrics::new()));
    let state = index.state();
    let cache = Arc::new(ViewCache::new());
    let agents = model
        .pods
        .values()
        .map(|pod| (pod.name.namespace.clone(), pod.labels.clone()))
        .take(MAX_AGENTS)
        .chain([("default".to_owned(), BTreeMap::new())]);
    for (namespace, labels) in agents {
        for protocol in [bulwark_proto::PROTOCOL_VERSION, OLDEST_PROTOCOL] {
            let mut view = AgentView::new(namespace.clone(), labels.clone(), Arc::clone(&cache))
                .with_protocol(protocol);
            let Some(snapshot) = view.update(&state) else {
                panic!("a new view has no snapshot");
            };
            let mut wire = Vec::with_capacity(snapshot.encoded_len());
            snapshot.encode(&mut wire);
            assert_eq!(wire.len(), snapshot.encoded_len(), "encoded_len is wrong");
            assert!(
                wire == snapshot.to_snapshot().encode_to_vec(),
                "the shared encoding of a snapshot differs from prost's"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn yaml_documents_corpus_replays() {
        let corpus =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/yaml_documents");
        bulwark_testkit::corpus::replay(&corpus, super::yaml_documents);
    }
}
