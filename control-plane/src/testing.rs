//! Helpers for unit tests: models from the example folder and from YAML snippets.

use std::path::Path;

use crate::api::{self, Decoded};
use crate::model::Model;
use crate::source::dir::DirSource;
use crate::source::documents;

/// The model of `/examples` and its loopback endpoints in `/examples/local` (the demo
/// mesh).
pub fn examples() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let outcome = DirSource::open_all([dir.clone(), dir.join("local")])
        .unwrap()
        .load()
        .unwrap();
    assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
    outcome.model
}

/// A model built from multi-document YAML; panics on any invalid document.
pub fn model(yaml: &str) -> Model {
    with_document(Model::default(), yaml)
}

/// `model` with the objects of `yaml` added or replaced.
pub fn with_document(mut model: Model, yaml: &str) -> Model {
    for doc in documents::split(yaml) {
        match api::decode(documents::parse(&doc).unwrap()) {
            Ok(Decoded::Object(object)) => model.insert(object),
            Ok(_) => {}
            Err(e) => panic!("document {}: {e}", doc.index),
        }
    }
    model
}
