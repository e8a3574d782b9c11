//! The local source: folders of Kubernetes-shaped YAML (`--source dir:PATH`, repeatable).
//!
//! Every `*.yaml` and `*.yml` file directly in each folder is read (not recursively;
//! hidden files, such as editor swap files, are skipped; symlinks are followed, so a
//! mounted ConfigMap works). Files may hold several documents separated by `---`.
//! The folders are read in the order given, each one's files by name, and together form
//! one model: an object defined twice, in one folder or in two, is taken from its first
//! definition in that order and the others are rejected.
//! Each load produces a complete model. A document that is invalid is reported, and if
//! it describes an object that was valid before, that previous version stays in force;
//! objects whose documents are gone are deleted. Everything is re-read whenever anything
//! in one of the folders changes, debounced, which also covers editors that save by
//! renaming. If a folder cannot be listed, the whole load fails and nothing changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The file, as shown in rejections: its folder joined with its name.
    file: String,
    document: usize,
}

/// The folder source: reads the folders and remembers the last good version of every object.
#[derive(Debug)]
pub struct DirSource {
    /// The folders, in the order given; never empty, no folder twice.
    dirs: Vec<PathBuf>,
    objects: BTreeMap<ObjectKey, Loaded>,
    rejected: Vec<RejectedObject>,
    /// Invalid fields ignored in objects in force (a pod's bad weight), as last logged:
    /// each is logged when it appears, not at every reload.
    ignored: BTreeSet<IgnoredField>,
    /// Each file's text as last read and what its documents decoded to: a reload
    /// decodes only the files whose text changed (decoding every file was most of the
    /// control plane's CPU per change with thousands of services in one file).
    decoded: HashMap<PathBuf, (String, Arc<[DocumentRead]>)>,
}

/// What one document of a file decodes to: everything about it that depends on its
/// text alone.
#[derive(Clone, Debug)]
struct DocumentRead {
    /// Its index in the file (0-based).
    index: usize,
    /// The file line it starts at.
    line: usize,
    result: DocumentResult,
}

#[derive(Clone, Debug)]
enum DocumentResult {
    /// Not YAML: the parser's message.
    Invalid(String),
    /// A valid object, with the invalid fields it is used without.
    Object {
        object: Object,
        ignored: Vec<api::FieldError>,
    },
    /// A kind the control plane does not use.
    Skipped { api_version: String, kind: String },
    /// Nothing in it.
    Empty,
    /// An invalid object.
    Rejected(api::DecodeError),
}

/// An invalid field that cost its object nothing but itself: the object, where, why.
type IgnoredField = (ObjectKey, String, String);

/// What one load has read so far.
#[derive(Default)]
struct Pass {
    /// Valid objects found.
    next: BTreeMap<ObjectKey, Loaded>,
    /// Rejected documents and files.
    rejected: Vec<RejectedObject>,
    /// Files not fully read (as [`Loaded::file`]): their previous objects are kept (fail
    /// static), since we cannot tell a deleted object from one we failed to see.
    unreadable: HashSet<String>,
    /// Rejected documents that name their object, by index into `rejected`.
    rejected_keys: Vec<(usize, ObjectKey)>,
    /// Invalid fields ignored in valid objects.
    ignored: BTreeSet<IgnoredField>,
}

/// The result of one load.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    /// Every object in force.
    pub model: Model,
    /// Every document currently rejected.
    pub rejected: Vec<RejectedObject>,
    /// Invalid fields this load found for the first time (each is logged once).
    pub newly_ignored: usize,
}

impl DirSource {
    /// A source for `dir`, which must be a readable folder.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        Self::open_all([dir.into()])
    }

    /// A source for `dirs`, read in this order: each must be a readable folder, and no
    /// folder may come twice (however it is spelled).
    pub fn open_all(dirs: impl IntoIterator<Item = PathBuf>) -> Result<Self, Error> {
        let mut opened: Vec<(PathBuf, PathBuf)> = Vec::new();
        for dir in dirs {
            let read_error = |source| Error::ReadDir {
                path: dir.clone(),
                source,
            };
            let meta = std::fs::metadata(&dir).map_err(read_error)?;
            if !meta.is_dir() {
                return Err(Error::NotADir { path: dir });
            }
            let canonical = std::fs::canonicalize(&dir).map_err(read_error)?;
            if let Some((first, _)) = opened.iter().find(|(_, c)| *c == canonical) {
                return Err(Error::SameDir {
                    first: first.clone(),
                    second: dir,
                });
            }
            opened.push((dir, canonical));
        }
        if opened.is_empty() {
            return Err(Error::NoDir);
        }
        Ok(DirSource {
            dirs: opened.into_iter().map(|(dir, _)| dir).collect(),
            objects: BTreeMap::new(),
            rejected: Vec::new(),
            ignored: BTreeSet::new(),
            decoded: HashMap::new(),
        })
    }

    /// The folders, in the order they are read.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Reads the folders. Fails only when a folder itself cannot be read, in which case
    /// nothing changes; bad files and documents are reported in the outcome instead.
    pub fn load(&mut self) -> Result<LoadOutcome, Error> {
        // List every folder before reading any file, so a failure changes nothing.
        let mut files = Vec::new();
        for dir in &self.dirs {
            files.extend(list(dir)?.into_iter().map(|name| dir.join(name)));
        }
        let mut pass = Pass::default();
        let mut decoded = HashMap::with_capacity(files.len());
        for path in files {
            read_file(&path, &mut pass, &self.decoded, &mut decoded);
        }
        self.decoded = decoded;
        let Pass {
            mut next,
            mut rejected,
            unreadable,
            rejected_keys,
            ignored,
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
        let newly_ignored = self.report_ignored(ignored);
        self.objects = next;
        self.rejected = rejected.clone();
        let model = self.objects.values().map(|l| l.object.clone()).collect();
        Ok(LoadOutcome {
            model,
            rejected,
            newly_ignored,
        })
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
}

impl DirSource {
    /// Logs each ignored field once, when it first appears (a pod's bad weight would
    /// otherwise be logged at every reload of any file).
    /// Returns how many were logged.
    fn report_ignored(&mut self, ignored: BTreeSet<IgnoredField>) -> usize {
        let mut logged = 0;
        for (object, path, reason) in ignored.difference(&self.ignored) {
            warn!(
                %object, %path, %reason,
                "ignoring an invalid field; the object is used without it"
            );
            logged += 1;
        }
        self.ignored = ignored;
        logged
    }
}

/// Reads one file's documents into `pass`. An object already in `pass` (from an earlier
/// file, in this folder or an earlier one) is rejected as a duplicate. A file whose text
/// is what it was at the last load (in `before`) is not decoded again; what it decodes
/// to is kept in `after` for the next load.
fn read_file(
    path: &Path,
    pass: &mut Pass,
    before: &HashMap<PathBuf, (String, Arc<[DocumentRead]>)>,
    after: &mut HashMap<PathBuf, (String, Arc<[DocumentRead]>)>,
) {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let reads = match before.get(path) {
                Some((old, reads)) if *old == text => Arc::clone(reads),
                _ => decode_documents(&text).into(),
            };
            replay(&shown, &reads, pass);
            after.insert(path.to_owned(), (text, reads));
        }
        Err(e) => {
            let reason = format!("cannot read the file: {e}");
            pass.rejected
                .push(rejection(&shown, None, None, String::new(), reason));
            pass.unreadable.insert(shown);
        }
    }
}

/// What each document of `text` decodes to.
fn decode_documents(text: &str) -> Vec<DocumentRead> {
    documents::split(text)
        .iter()
        .map(|doc| {
            let result = match documents::parse(doc) {
                Err(e) => DocumentResult::Invalid(e),
                Ok(value) => {
                    let mut ignored = Vec::new();
                    match api::decode_noting(value, &mut ignored) {
                        Ok(Decoded::Object(object)) => DocumentResult::Object { object, ignored },
                        Ok(Decoded::Skipped { api_version, kind }) => {
                            DocumentResult::Skipped { api_version, kind }
                        }
                        Ok(Decoded::Empty) => DocumentResult::Empty,
                        Err(e) => DocumentResult::Rejected(e),
                    }
                }
            };
            DocumentRead {
                index: doc.index,
                line: doc.line,
                result,
            }
        })
        .collect()
}

/// Adds what the documents of the file `shown` decoded to into `pass`.
fn replay(shown: &str, reads: &[DocumentRead], pass: &mut Pass) {
    for read in reads {
        let at = Some((read.index, read.line));
        match &read.result {
            DocumentResult::Invalid(e) => {
                let reason = format!("invalid YAML: {e}");
                pass.rejected
                    .push(rejection(shown, at, None, String::new(), reason));
                pass.unreadable.insert(shown.to_owned());
            }
            DocumentResult::Object { object, ignored } => {
                let key = object.key();
                if let Some(first) = pass.next.get(&key) {
                    let reason = format!(
                        "{key} is already defined in {} document {}; this duplicate is ignored",
                        first.file, first.document
                    );
                    pass.rejected
                        .push(rejection(shown, at, Some(&key), String::new(), reason));
                    continue;
                }
                pass.ignored.extend(
                    ignored
                        .iter()
                        .map(|e| (key.clone(), e.path.clone(), e.reason.clone())),
                );
                let loaded = Loaded {
                    object: object.clone(),
                    file: shown.to_owned(),
                    document: read.index,
                };
                pass.next.insert(key, loaded);
            }
            DocumentResult::Skipped { api_version, kind } => debug!(
                file = %shown, document = read.index, %api_version, %kind,
                "skipping a kind the control plane does not use"
            ),
            DocumentResult::Empty => {}
            DocumentResult::Rejected(e) => {
                if let Some(key) = &e.key {
                    pass.rejected_keys.push((pass.rejected.len(), key.clone()));
                }
                let rejection = rejection(
                    shown,
                    at,
                    e.key.as_ref(),
                    e.error.path.clone(),
                    e.error.reason.clone(),
                );
                pass.rejected.push(rejection);
            }
        }
    }
}

/// The valid objects of one file's text, each with its document's index, and the
/// rejections of its other documents: what a load reads from that file.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn read_text(shown: &str, text: &str) -> (Vec<(Object, usize)>, Vec<RejectedObject>) {
    let mut pass = Pass::default();
    replay(shown, &decode_documents(text), &mut pass);
    let objects = pass
        .next
        .into_values()
        .map(|l| (l.object, l.document))
        .collect();
    (objects, pass.rejected)
}

/// A rejection of the file `file` (of one of its documents, when `document` gives its
/// index and first line).
fn rejection(
    file: &str,
    document: Option<(usize, usize)>,
    key: Option<&ObjectKey>,
    path: String,
    reason: String,
) -> RejectedObject {
    RejectedObject {
        file: file.to_owned(),
        document: document.map(|(index, _)| index),
        line: document.map(|(_, line)| line),
        object: RejectedObject::object_key(key),
        path,
        reason,
        kept_previous: false,
        since: Timestamp::now(),
    }
}

/// The YAML files directly in `dir`, sorted by name.
fn list(dir: &Path) -> Result<Vec<String>, Error> {
    let read_error = |source| Error::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
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

/// A running watch of the source's folders; it must be started before the first load so
/// that no change between that load and the watch is missed.
pub struct DirWatcher {
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    changes: mpsc::Receiver<()>,
    /// Set when a watched folder itself was removed (its watch went with it).
    folder_removed: Arc<AtomicBool>,
    /// How often the folders are read again while one of them cannot be.
    retry: Duration,
}

/// While a folder cannot be read (deleted, or replaced by a deploy tool), it is looked
/// for this often: its watch went with it, so no event would say it is back.
const RETRY_UNREADABLE: Duration = Duration::from_secs(2);

impl DirWatcher {
    /// Starts watching `dirs`; a change in any of them is reported once per `debounce`
    /// quiet period.
    pub fn start(dirs: &[PathBuf], debounce: Duration) -> Result<Self, Error> {
        let watch_error = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Watch { path, source }
        };
        // One pending signal is enough: a reload reads everything anyway.
        let (tx, changes) = mpsc::channel(1);
        let folder_removed = Arc::new(AtomicBool::new(false));
        let removed = Arc::clone(&folder_removed);
        let watched = dirs.to_vec();
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            let changed = match result {
                Ok(events) => {
                    let folder_gone = events.iter().any(|e| {
                        matches!(e.event.kind, EventKind::Remove(_))
                            && e.event.paths.iter().any(|path| watched.contains(path))
                    });
                    if folder_gone {
                        removed.store(true, Ordering::Relaxed);
                    }
                    events.iter().any(|e| is_change(&e.event.kind))
                }
                Err(errors) => {
                    for error in errors {
                        warn!(%error, "file watcher error; reloading the folders to be safe");
                    }
                    true
                }
            };
            if changed {
                let _ = tx.try_send(());
            }
        })
        .map_err(watch_error(
            dirs.first().map_or(Path::new(""), PathBuf::as_path),
        ))?;
        for dir in dirs {
            debouncer
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(watch_error(dir))?;
        }
        Ok(DirWatcher {
            debouncer,
            changes,
            folder_removed,
            retry: RETRY_UNREADABLE,
        })
    }

    /// Reloads `source` on every change and publishes the outcome, until `shutdown` is set.
    pub fn spawn(
        self,
        mut source: DirSource,
        publisher: Publisher,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let DirWatcher {
            mut debouncer,
            mut changes,
            folder_removed,
            retry,
        } = self;
        tokio::spawn(async move {
            // The debouncer lives in this task: dropping it when the task ends stops its
            // threads, and a folder that comes back is watched again from here.
            let mut unreadable = false;
            loop {
                let retry_timer = async {
                    if unreadable {
                        tokio::time::sleep(retry).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = crate::stopped(&mut shutdown) => break,
                    change = changes.recv() => if change.is_none() { break },
                    () = retry_timer => {}
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
                    Ok(LoadOutcome {
                        model, rejected, ..
                    }) => {
                        let was_unreadable = std::mem::take(&mut unreadable);
                        if was_unreadable {
                            info!(dirs = ?source.dirs(), "every source folder is readable again");
                        }
                        // A folder deleted (and created again by now, or while it was
                        // unreadable) lost its watch with it: watch the one there now.
                        if folder_removed.swap(false, Ordering::Relaxed) || was_unreadable {
                            for dir in source.dirs() {
                                if let Err(error) =
                                    debouncer.watch(dir, RecursiveMode::NonRecursive)
                                {
                                    warn!(dir = %dir.display(), %error, "cannot watch the folder again");
                                }
                            }
                        }
                        debug!(dirs = ?source.dirs(), rejected = rejected.len(), "folder reloaded");
                        publisher.publish(model, rejected);
                    }
                    Err(error) if !unreadable => {
                        unreadable = true;
                        warn!(
                            %error,
                            "cannot reload the source folders; the last loaded configuration stays in force"
                        );
                    }
                    Err(error) => debug!(%error, "a source folder is still unreadable"),
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
    fn a_reload_decodes_only_the_files_whose_text_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), service("a")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), service("b")).unwrap();
        let mut source = DirSource::open(dir.path()).unwrap();
        assert_eq!(source.load().unwrap().model.services.len(), 2);
        let reads =
            |source: &DirSource, file: &str| Arc::clone(&source.decoded[&dir.path().join(file)].1);
        let (a, b) = (reads(&source, "a.yaml"), reads(&source, "b.yaml"));
        std::fs::write(dir.path().join("b.yaml"), service("c")).unwrap();
        let outcome = source.load().unwrap();
        let names: Vec<_> = outcome
            .model
            .services
            .keys()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert!(
            Arc::ptr_eq(&a, &reads(&source, "a.yaml")),
            "a.yaml is not decoded again"
        );
        assert!(!Arc::ptr_eq(&b, &reads(&source, "b.yaml")));
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(source.load().unwrap().model.services.len(), 1);
        assert_eq!(source.decoded.len(), 1, "a removed file is forgotten");
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
    fn a_grpc_route_is_read_and_an_unknown_field_is_reported_with_file_line_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let grpc_route = |name: &str, method: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
                 metadata: {{name: {name}, namespace: demo}}\n\
                 spec:\n  parentRefs: [{{group: '', kind: Service, name: a}}]\n  rules:\n\
                 \x20 - matches: [{{method: {method}}}]\n"
            )
        };
        let text = format!(
            "{}---\n{}---\n{}",
            service("a"),
            grpc_route("good", "{service: a.Greeter}"),
            grpc_route("typo", "{service: a.Greeter, methd: SayHello}")
        );
        std::fs::write(dir.path().join("routes.yaml"), text).unwrap();
        let outcome = DirSource::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(outcome.model.count(Kind::GrpcRoute), 1);
        assert_eq!(outcome.rejected.len(), 1);
        let r = &outcome.rejected[0];
        assert!(r.file.ends_with("routes.yaml"), "{r}");
        assert_eq!(r.document, Some(2));
        assert_eq!(r.line, Some(13), "where its --- is");
        assert_eq!(r.object.as_deref(), Some("GRPCRoute demo/typo"));
        assert_eq!(r.path, "spec.rules[0].matches[0].method.methd");
        assert!(r.reason.contains("unknown field `methd`"), "{r}");
    }

    #[test]
    fn a_bad_pod_weight_is_logged_once_until_its_value_changes() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |weight: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  namespace: demo\n  \
                 annotations: {{bulwark.io/weight: {weight:?}}}\nstatus: {{podIP: 10.0.0.1}}\n"
            )
        };
        let file = dir.path().join("pods.yaml");
        std::fs::write(&file, pod("heavy")).unwrap();
        let mut source = DirSource::open(dir.path()).unwrap();
        let first = source.load().unwrap();
        assert_eq!(first.model.count(Kind::Pod), 1, "the pod stays in force");
        assert!(first.rejected.is_empty());
        assert_eq!(first.newly_ignored, 1);
        std::fs::write(dir.path().join("other.yaml"), service("a")).unwrap();
        assert_eq!(source.load().unwrap().newly_ignored, 0, "a reload is quiet");
        std::fs::write(&file, pod("-1")).unwrap();
        assert_eq!(source.load().unwrap().newly_ignored, 1, "a new bad value");
        std::fs::write(&file, pod("3")).unwrap();
        assert_eq!(source.load().unwrap().newly_ignored, 0);
        std::fs::write(&file, pod("-1")).unwrap();
        assert_eq!(
            source.load().unwrap().newly_ignored,
            1,
            "broken again after a fix"
        );
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
        let outcome = DirSource::open_all([examples.clone(), examples.join("local")])
            .unwrap()
            .load()
            .unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        assert_eq!(outcome.model.services.len(), 4);
        assert_eq!(outcome.model.endpoint_slices.len(), 4);
        assert_eq!(outcome.model.resilience_policies.len(), 3);
        assert_eq!(outcome.model.rate_limit_policies.len(), 1);
    }

    #[test]
    fn the_sharded_example_loads_cleanly() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sharded");
        let outcome = DirSource::open_all([examples.clone(), examples.join("local")])
            .unwrap()
            .load()
            .unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        assert_eq!(outcome.model.shard_topologies.len(), 1);
        assert_eq!(outcome.model.resilience_policies.len(), 1);
        // The demo's pods: one slice, a primary and two replicas per shard.
        assert_eq!(outcome.model.endpoint_slices.len(), 1);
        assert_eq!(outcome.model.pods.len(), 6);
    }

    /// What `kubectl apply -f examples/<folder>/` sends must be what an API server
    /// takes: no endpoint on loopback (refused), no Pod without containers (refused).
    /// Those live in each folder's local/ folder, for the folder source only.
    #[test]
    fn the_example_folders_hold_only_what_a_cluster_takes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for folder in [root.clone(), root.join("sharded"), root.join("canary")] {
            for name in list(&folder).unwrap() {
                let file = folder.join(name);
                let text = std::fs::read_to_string(&file).unwrap();
                for doc in documents::split(&text) {
                    let value = documents::parse(&doc).unwrap();
                    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
                    assert!(
                        !matches!(kind, "EndpointSlice" | "Pod"),
                        "{}: a {kind} belongs in local/ (controllers make it on a cluster)",
                        file.display()
                    );
                }
            }
            let local = folder.join("local");
            for name in list(&local).unwrap() {
                let file = local.join(name);
                let text = std::fs::read_to_string(&file).unwrap();
                for doc in documents::split(&text) {
                    let value = documents::parse(&doc).unwrap();
                    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
                    assert!(
                        matches!(kind, "EndpointSlice" | "Pod"),
                        "{}: only loopback endpoints and pods belong in local/, not a {kind}",
                        file.display()
                    );
                }
            }
        }
    }

    #[test]
    fn the_canary_example_loads_cleanly() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/canary");
        let outcome = DirSource::open_all([examples.clone(), examples.join("local")])
            .unwrap()
            .load()
            .unwrap();
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

    /// Two temporary folders, read in this order.
    fn two_folders() -> (tempfile::TempDir, tempfile::TempDir) {
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap())
    }

    fn open_both(first: &Path, second: &Path) -> DirSource {
        DirSource::open_all([first.to_owned(), second.to_owned()]).unwrap()
    }

    #[test]
    fn several_folders_form_one_model() {
        let (first, second) = two_folders();
        std::fs::write(first.path().join("a.yaml"), service("a")).unwrap();
        std::fs::write(
            second.path().join("b.yaml"),
            format!("{}---\n{}", service("b"), policy("3")),
        )
        .unwrap();
        let outcome = open_both(first.path(), second.path()).load().unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        assert_eq!(outcome.model.services.len(), 2);
        assert_eq!(attempts(&outcome.model), Some(3));
    }

    #[test]
    fn an_object_in_two_folders_is_taken_from_the_first_folder() {
        let (first, second) = two_folders();
        // By file name alone b's a.yaml would come first: the folder order decides.
        std::fs::write(first.path().join("z.yaml"), policy("2")).unwrap();
        std::fs::write(second.path().join("a.yaml"), policy("3")).unwrap();
        let mut source = open_both(first.path(), second.path());
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(2));
        assert_eq!(outcome.rejected.len(), 1);
        let r = &outcome.rejected[0];
        let kept = first.path().join("z.yaml").display().to_string();
        let ignored = second.path().join("a.yaml").display().to_string();
        assert_eq!(r.file, ignored);
        assert_eq!(r.object.as_deref(), Some("ResiliencePolicy demo/reviews"));
        assert!(
            r.reason
                .contains(&format!("already defined in {kept} document 0")),
            "{r}"
        );
        let shown = r.to_string();
        assert!(shown.contains(&kept) && shown.contains(&ignored), "{shown}");

        // The same the other way round: the order on the command line decides.
        let outcome = open_both(second.path(), first.path()).load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(3));
        assert_eq!(outcome.rejected[0].file, kept);
    }

    #[test]
    fn a_change_in_the_second_folder_is_read_and_a_bad_one_keeps_the_last_good_version() {
        let (first, second) = two_folders();
        std::fs::write(first.path().join("a.yaml"), service("a")).unwrap();
        let file = second.path().join("policy.yaml");
        std::fs::write(&file, policy("2")).unwrap();
        let mut source = open_both(first.path(), second.path());
        assert_eq!(attempts(&source.load().unwrap().model), Some(2));

        std::fs::write(&file, policy("5")).unwrap();
        assert_eq!(attempts(&source.load().unwrap().model), Some(5));

        std::fs::write(&file, policy("0")).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), Some(5), "last good version kept");
        assert!(outcome.rejected[0].kept_previous);
        assert_eq!(outcome.rejected[0].file, file.display().to_string());

        std::fs::remove_file(&file).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(attempts(&outcome.model), None, "deleted with its file");
        assert_eq!(
            outcome.model.services.len(),
            1,
            "the first folder unchanged"
        );
    }

    #[test]
    fn a_folder_that_disappears_fails_the_load_and_changes_nothing() {
        let (first, second) = two_folders();
        std::fs::write(first.path().join("a.yaml"), service("a")).unwrap();
        std::fs::write(second.path().join("p.yaml"), policy("2")).unwrap();
        let mut source = open_both(first.path(), second.path());
        source.load().unwrap();
        std::fs::remove_dir_all(second.path()).unwrap();
        std::fs::write(first.path().join("b.yaml"), service("b")).unwrap();
        let err = source.load().unwrap_err().to_string();
        assert!(err.contains(&second.path().display().to_string()), "{err}");
        // Once it is back, both folders are read again.
        std::fs::create_dir(second.path()).unwrap();
        std::fs::write(second.path().join("p.yaml"), policy("4")).unwrap();
        let outcome = source.load().unwrap();
        assert_eq!(outcome.model.services.len(), 2);
        assert_eq!(attempts(&outcome.model), Some(4));
    }

    #[test]
    fn the_same_folder_twice_is_refused_however_it_is_spelled() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mesh")).unwrap();
        let other = tempfile::tempdir().unwrap();
        let err = DirSource::open_all([
            dir.path().join("mesh"),
            other.path().to_owned(),
            dir.path().join("mesh/../mesh/."),
        ])
        .unwrap_err();
        assert!(matches!(err, Error::SameDir { .. }), "{err}");
        assert!(err.to_string().contains("are the same folder"), "{err}");
        assert!(matches!(DirSource::open_all([]), Err(Error::NoDir)));
        // A missing second folder is the same error as a missing only folder.
        let err =
            DirSource::open_all([dir.path().to_owned(), dir.path().join("nope")]).unwrap_err();
        assert!(matches!(err, Error::ReadDir { .. }), "{err}");
    }

    /// The real watcher (inotify, debounced): a write in the second folder is published.
    #[tokio::test]
    async fn the_watcher_follows_every_folder() {
        let (first, second) = two_folders();
        std::fs::write(first.path().join("a.yaml"), service("a")).unwrap();
        let dirs = [first.path().to_owned(), second.path().to_owned()];
        let mut source = DirSource::open_all(dirs.clone()).unwrap();
        let watcher = DirWatcher::start(&dirs, Duration::from_millis(50)).unwrap();
        let publisher = Publisher::new(std::sync::Arc::new(crate::metrics::Metrics::new()));
        let loaded = source.load().unwrap();
        publisher.publish(loaded.model, loaded.rejected);
        let mut models = publisher.models();
        let (stop, shutdown) = watch::channel(false);
        let task = watcher.spawn(source, publisher.clone(), shutdown);

        std::fs::write(second.path().join("p.yaml"), policy("7")).unwrap();
        tokio::time::timeout(
            Duration::from_secs(60),
            models.wait_for(|m| attempts(m) == Some(7)),
        )
        .await
        .expect("the change in the second folder is published")
        .unwrap();
        assert_eq!(models.borrow().services.len(), 1, "the first folder kept");
        stop.send_replace(true);
        task.await.unwrap();
    }

    /// A folder deleted and created again (its inotify watch went with it) is found
    /// again and watched: later writes in it are published.
    #[tokio::test]
    async fn a_folder_deleted_and_created_again_is_watched_again() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("mesh");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), policy("2")).unwrap();
        let dirs = [dir.clone()];
        let mut source = DirSource::open_all(dirs.clone()).unwrap();
        let mut watcher = DirWatcher::start(&dirs, Duration::from_millis(50)).unwrap();
        watcher.retry = Duration::from_millis(100);
        let publisher = Publisher::new(std::sync::Arc::new(crate::metrics::Metrics::new()));
        let loaded = source.load().unwrap();
        publisher.publish(loaded.model, loaded.rejected);
        let models = publisher.models();
        let (stop, shutdown) = watch::channel(false);
        let task = watcher.spawn(source, publisher.clone(), shutdown);
        let published = |attempts_wanted: u32| {
            let mut models = models.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    models.wait_for(|m| attempts(m) == Some(attempts_wanted)),
                )
                .await
                .is_ok()
            }
        };

        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), policy("3")).unwrap();
        assert!(published(3).await, "the new folder is read");
        // Now only the new watch can see this write.
        std::fs::write(dir.join("p.yaml"), policy("4")).unwrap();
        assert!(published(4).await, "the new folder is watched");
        stop.send_replace(true);
        task.await.unwrap();
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
