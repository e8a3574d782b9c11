//! The local source: a folder of Kubernetes-shaped YAML (`--source dir:PATH`).
//!
//! Every `*.yaml` and `*.yml` file directly in the folder is read (not recursively;
//! hidden files, such as editor swap files, are skipped; symlinks are followed, so a
//! mounted ConfigMap works). Files may hold several documents separated by `---`.
//! Each load produces a complete model. A document that is invalid is reported, and if
//! it describes an object that was valid before, that previous version stays in force;
//! objects whose documents are gone are deleted. The folder is re-read whenever
//! anything in it changes, debounced, which also covers editors that save by renaming.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify_debouncer_full::notify::event::{
    AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind,
};
use notify_debouncer_full::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::documents;
use super::{Error, Publisher, RejectedObject};
use crate::api::{self, Decoded};
use crate::model::{Model, Object, ObjectKey};
use crate::timestamp::Timestamp;

/// A valid object and the document it came from.
#[derive(Clone, Debug)]
struct Loaded {
    object: Object,
    file: String,
    document: usize,
}

/// The folder source: reads the folder and remembers the last good version of every object.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    objects: BTreeMap<ObjectKey, Loaded>,
    rejected: Vec<RejectedObject>,
}

/// What one load has read so far.
#[derive(Default)]
struct Pass {
    /// Valid objects found.
    next: BTreeMap<ObjectKey, Loaded>,
    /// Rejected documents and files.
    rejected: Vec<RejectedObject>,
    /// Files not fully read: their previous objects are kept (fail static), since we
    /// cannot tell a deleted object from one we failed to see.
    unreadable: HashSet<String>,
    /// Rejected documents that name their object, by index into `rejected`.
    rejected_keys: Vec<(usize, ObjectKey)>,
}

/// The result of one load.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    /// Every object in force.
    pub model: Model,
    /// Every document currently rejected.
    pub rejected: Vec<RejectedObject>,
}

impl DirSource {
    /// A source for `dir`, which must be a readable folder.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        let meta = std::fs::metadata(&dir).map_err(|source| Error::ReadDir {
            path: dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(Error::NotADir { path: dir });
        }
        Ok(DirSource {
            dir,
            objects: BTreeMap::new(),
            rejected: Vec::new(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the folder. Fails only when the folder itself cannot be read, in which case
    /// nothing changes; bad files and documents are reported in the outcome instead.
    pub fn load(&mut self) -> Result<LoadOutcome, Error> {
        let mut pass = Pass::default();
        for name in self.list()? {
            self.read_file(name, &mut pass);
        }
        let Pass {
            mut next,
            mut rejected,
            unreadable,
            rejected_keys,
        } = pass;

        for (i, key) in rejected_keys {
            if next.contains_key(&key) {
                continue;
            }
            if let Some(previous) = self.objects.get(&key) {
                next.insert(key, previous.clone());
                rejected[i].kept_previous = true;
            }
        }
        for (key, previous) in &self.objects {
            if unreadable.contains(&previous.file) && !next.contains_key(key) {
                next.insert(key.clone(), previous.clone());
            }
        }

        self.report(&mut rejected);
        self.objects = next;
        self.rejected = rejected.clone();
        let model = self.objects.values().map(|l| l.object.clone()).collect();
        Ok(LoadOutcome { model, rejected })
    }

    /// Reads one file's documents into `pass`.
    fn read_file(&self, name: String, pass: &mut Pass) {
        let path = self.dir.join(&name);
        let shown = path.display().to_string();
        let reject = |document: Option<&documents::Document<'_>>,
                      key: Option<&ObjectKey>,
                      field: String,
                      reason: String| RejectedObject {
            file: shown.clone(),
            document: document.map(|d| d.index),
            line: document.map(|d| d.line),
            object: RejectedObject::object_key(key),
            path: field,
            reason,
            kept_previous: false,
            since: Timestamp::now(),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                let reason = format!("cannot read the file: {e}");
                pass.rejected
                    .push(reject(None, None, String::new(), reason));
                pass.unreadable.insert(name);
                return;
            }
        };
        for doc in documents::split(&text) {
            let value = match documents::parse(&doc) {
                Ok(value) => value,
                Err(e) => {
                    let reason = format!("invalid YAML: {e}");
                    pass.rejected
                        .push(reject(Some(&doc), None, String::new(), reason));
                    pass.unreadable.insert(name.clone());
                    continue;
                }
            };
            match api::decode(value) {
                Ok(Decoded::Object(object)) => {
                    let key = object.key();
                    if let Some(first) = pass.next.get(&key) {
                        let reason = format!(
                            "{key} is already defined in {} document {}; this duplicate is ignored",
                            self.dir.join(&first.file).display(),
                            first.document
                        );
                        pass.rejected
                            .push(reject(Some(&doc), Some(&key), String::new(), reason));
                        continue;
                    }
                    let loaded = Loaded {
                        object,
                        file: name.clone(),
                        document: doc.index,
                    };
                    pass.next.insert(key, loaded);
                }
                Ok(Decoded::Skipped { api_version, kind }) => debug!(
                    file = %shown, document = doc.index, %api_version, %kind,
                    "skipping a kind the control plane does not use"
                ),
                Ok(Decoded::Empty) => {}
                Err(e) => {
                    if let Some(key) = &e.key {
                        pass.rejected_keys.push((pass.rejected.len(), key.clone()));
                    }
                    let rejection =
                        reject(Some(&doc), e.key.as_ref(), e.error.path, e.error.reason);
                    pass.rejected.push(rejection);
                }
            }
        }
    }

    /// Logs new and resolved rejections once (not on every reload), keeping first-seen times.
    fn report(&self, rejected: &mut [RejectedObject]) {
        for r in rejected.iter_mut() {
            match self.rejected.iter().find(|old| old.same_problem(r)) {
                Some(old) => r.since = old.since,
                None if r.kept_previous => warn!(
                    file = %r.file,
                    document = r.document,
                    object = r.object.as_deref(),
                    path = %r.path,
                    reason = %r.reason,
                    "rejected an invalid document; the previous valid version stays in force"
                ),
                None => warn!(
                    file = %r.file,
                    document = r.document,
                    object = r.object.as_deref(),
                    path = %r.path,
                    reason = %r.reason,
                    "rejected an invalid document"
                ),
            }
        }
        for old in &self.rejected {
            if !rejected.iter().any(|r| r.same_problem(old)) {
                info!(file = %old.file, document = old.document, object = old.object.as_deref(), "a previously rejected document is no longer rejected");
            }
        }
    }

    /// The YAML files in the folder, sorted by name.
    fn list(&self) -> Result<Vec<String>, Error> {
        let read_error = |source| Error::ReadDir {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                debug!(file = ?entry.file_name(), "skipping a file whose name is not UTF-8");
                continue;
            };
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if !yaml || name.starts_with('.') {
                continue;
            }
            // metadata() follows symlinks, as ConfigMap mounts need; a dangling link
            // is reported when reading it.
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            files.push(name);
        }
        files.sort();
        Ok(files)
    }
}

/// Whether a file event may have changed what the folder holds. Opening a file (which
/// our own reads do) does not; anything else might, including renames onto a file.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    }
}

/// A running watch of a folder; it must be started before the first load so that no
/// change between that load and the watch is missed.
pub struct DirWatcher {
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    changes: mpsc::Receiver<()>,
}

impl DirWatcher {
    /// Starts watching `dir`; changes are reported once per `debounce` quiet period.
    pub fn start(dir: &Path, debounce: Duration) -> Result<Self, Error> {
        let watch_error = |source| Error::Watch {
            path: dir.to_owned(),
            source,
        };
        // One pending signal is enough: a reload reads everything anyway.
        let (tx, changes) = mpsc::channel(1);
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            let changed = match result {
                Ok(events) => events.iter().any(|e| is_change(&e.event.kind)),
                Err(errors) => {
                    for error in errors {
                        warn!(%error, "file watcher error; reloading the folder to be safe");
                    }
                    true
                }
            };
            if changed {
                let _ = tx.try_send(());
            }
        })
        .map_err(watch_error)?;
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(DirWatcher { debouncer, changes })
    }

    /// Reloads `source` on every change and publishes the outcome, until `shutdown` is set.
    pub fn spawn(
        self,
        mut source: DirSource,
        publisher: Publisher,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let DirWatcher {
            debouncer,
            mut changes,
        } = self;
        tokio::spawn(async move {
            // Dropping the debouncer stops its threads when this task ends.
            let _debouncer = debouncer;
            loop {
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => break,
                    change = changes.recv() => if change.is_none() { break },
                }
                let reloaded = tokio::task::spawn_blocking(move || {
                    let outcome = source.load();
                    (source, outcome)
                })
                .await;
                let outcome;
                (source, outcome) = match reloaded {
                    Ok(done) => done,
                    Err(error) => {
                        warn!(%error, "folder reload task failed; the source stops watching");
                        break;
                    }
                };
                match outcome {
                    Ok(LoadOutcome { model, rejected }) => {
                        debug!(dir = %source.dir().display(), rejected = rejected.len(), "folder reloaded");
                        publisher.publish(model, rejected);
                    }
                    Err(error) => warn!(
                        %error,
                        "cannot reload the source folder; the last loaded configuration stays in force"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, ObjectName};

    const POLICY: &str = "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
        metadata: {name: reviews, namespace: demo}\n\
        spec:\n  targetRefs: [{kind: Service, name: reviews}]\n  retry: {attempts: ATTEMPTS}\n";

    fn policy(attempts: &str) -> String {
        POLICY.replace("ATTEMPTS", attempts)
    }

    fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 80}}]}}\n"
        )
    }

    fn attempts(model: &Model) -> Option<u32> {
        let p = model
            .resilience_policies
            .get(&ObjectName::new("demo", "reviews"))?;
        Some(p.retry.as_ref()?.attempts)
    }

    #[test]
    fn a_bad_document_does_not_stop_the_others_and_is_reported_precisely() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}---\n{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n{}",
            service("a"),
            policy("42"),
            service("b")
        );
        std::fs::write(dir.path().join("mesh.yaml"), text).unwrap();
        let mut source = DirSource::open(dir.path()).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(outcome.model.services.len(), 2, "both services load");
        assert_eq!(outcome.model.count(Kind::ResiliencePolicy), 0);
        assert_eq!(outcome.rejected.len(), 1);
        let r = &outcome.rejected[0];
        assert!(r.file.ends_with("mesh.yaml"), "{r}");
        assert_eq!(r.document, Some(1));
        assert_eq!(r.line, Some(5), "where its --- is");
        assert_eq!(r.object.as_deref(), Some("ResiliencePolicy demo/reviews"));
        assert_eq!(r.path, "spec.retry.attempts");
        assert!(r.reason.contains("between 1 and 10"), "{r}");
        assert!(!r.kept_previous);
    }

    #[test]
    fn the_previous_good_version_stays_until_the_document_is_fixed_or_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, policy("2")).unwrap();
        let mut source = DirSource::open(dir.path()).unwrap();
        assert_eq!(attempts(&source.load().unwrap().model), Some(2));

        std::fs::write(&file, policy("0")).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(2), "old version in force");
        assert!(outcome.rejected[0].kept_previous);
        let since = outcome.rejected[0].since;

        // Still broken on the next load: still kept, and the rejection keeps its age.
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(2));
        assert_eq!(outcome.rejected[0].since, since);

        std::fs::write(&file, policy("4")).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(4));
        assert!(outcome.rejected.is_empty());

        std::fs::remove_file(&file).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), None, "deleted with its file");
    }

    #[test]
    fn a_new_invalid_object_is_simply_absent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), policy("11")).unwrap();
        let outcome = DirSource::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(attempts(&outcome.model), None);
        assert!(!outcome.rejected[0].kept_previous);
    }

    #[test]
    fn a_yaml_syntax_error_keeps_what_the_file_held_before() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, format!("{}---\n{}", service("a"), policy("2"))).unwrap();
        let mut source = DirSource::open(dir.path()).unwrap();
        source.load().unwrap();

        std::fs::write(&file, format!("{}---\nkind: [unclosed\n", service("a"))).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(2), "unknown object kept");
        assert_eq!(outcome.model.services.len(), 1);
        let r = &outcome.rejected[0];
        assert_eq!((r.document, r.object.as_deref()), (Some(1), None));
        assert!(r.reason.starts_with("invalid YAML"), "{r}");
    }

    #[test]
    fn duplicates_are_rejected_and_the_first_definition_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), policy("2")).unwrap();
        std::fs::write(dir.path().join("b.yml"), policy("3")).unwrap();
        let outcome = DirSource::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(2));
        assert_eq!(outcome.rejected.len(), 1);
        assert!(outcome.rejected[0].file.ends_with("b.yml"));
        assert!(outcome.rejected[0].reason.contains("already defined in"));
    }

    #[test]
    fn only_visible_yaml_files_directly_in_the_folder_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), service("a")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage: [").unwrap();
        std::fs::write(dir.path().join(".a.yaml.swp"), "garbage: [").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        std::fs::write(dir.path().join("sub.yaml/b.yaml"), service("b")).unwrap();
        let outcome = DirSource::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(outcome.model.services.len(), 1);
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
    }

    #[test]
    fn a_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = DirSource::open(dir.path().join("nope")).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the source folder"),
            "{err}"
        );
        let file = dir.path().join("f.yaml");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(DirSource::open(&file), Err(Error::NotADir { .. })));
    }

    #[test]
    fn the_example_folder_loads_cleanly() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let outcome = DirSource::open(examples).unwrap().load().unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        assert_eq!(outcome.model.services.len(), 4);
        assert_eq!(outcome.model.endpoint_slices.len(), 4);
        assert_eq!(outcome.model.resilience_policies.len(), 3);
        assert_eq!(outcome.model.rate_limit_policies.len(), 1);
    }

    #[test]
    fn the_sharded_example_loads_cleanly() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sharded");
        let outcome = DirSource::open(examples).unwrap().load().unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        assert_eq!(outcome.model.shard_topologies.len(), 1);
        assert_eq!(outcome.model.resilience_policies.len(), 1);
        // The demo's pods: one slice, a primary and two replicas per shard.
        assert_eq!(outcome.model.endpoint_slices.len(), 1);
        assert_eq!(outcome.model.pods.len(), 6);
    }

    #[test]
    fn the_canary_example_loads_cleanly() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/canary");
        let outcome = DirSource::open(examples).unwrap().load().unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        let route =
            &outcome.model.http_routes[&crate::model::ObjectName::new("shop", "checkout-canary")];
        assert_eq!(route.rules.len(), 2);
        assert_eq!(route.rules[1].backends[0].weight, 90);
        assert_eq!(outcome.model.services.len(), 3);
        // The demo's pods: a slice per Service, two pods of v1 and one of v2.
        assert_eq!(outcome.model.endpoint_slices.len(), 3);
        assert_eq!(outcome.model.pods.len(), 3);
    }

    #[test]
    fn opening_a_file_is_not_a_change() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(
            notify_debouncer_full::notify::event::CreateKind::File
        )));
    }
}
