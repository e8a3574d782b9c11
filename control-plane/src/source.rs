//! Sources of configuration. A source turns the outside world into a complete
//! [`Model`] after every change, and keeps a list of the documents it rejected.
//! The local folder source and the Kubernetes source feed the same index through the
//! same [`Publisher`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::{Model, ObjectKey};
use crate::timestamp::Timestamp;

pub mod dir;
pub mod documents;
pub mod kubernetes;

/// Where the control plane reads its configuration from (`--source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `dir:PATH`, once or repeated: folders of Kubernetes-shaped YAML files, read as one
    /// model (in this order) and re-read on change. Built from the flags by
    /// [`Source::combine`], which keeps it non-empty and free of repeated folders.
    Dir(Vec<PathBuf>),
    /// `kubernetes` or `kubernetes:KUBECONFIG`: watch a cluster.
    Kubernetes(kubernetes::KubernetesSettings),
}

impl Source {
    /// The Kubernetes source with the default Lease (`bulwark-control-plane` in
    /// `namespace`, held as `identity`).
    pub fn kubernetes(kubeconfig: Option<PathBuf>, namespace: &str, identity: &str) -> Self {
        Source::Kubernetes(kubernetes::KubernetesSettings {
            kubeconfig,
            lease: crate::lease::LeaseSettings::new(namespace, identity),
            gateway_api_recheck: kubernetes::GATEWAY_API_RECHECK,
        })
    }
}

/// A `--source` value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid source {value:?}: {reason}")]
pub struct ParseSourceError {
    value: String,
    reason: &'static str,
}

impl FromStr for Source {
    type Err = ParseSourceError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParseSourceError {
            value: value.to_owned(),
            reason,
        };
        if let Some(path) = value.strip_prefix("dir:") {
            if path.is_empty() {
                return Err(error("dir: needs a folder, e.g. dir:examples"));
            }
            return Ok(Source::Dir(vec![PathBuf::from(path)]));
        }
        if value == "kubernetes" {
            return Ok(Source::kubernetes(
                None,
                crate::api::DEFAULT_NAMESPACE,
                "bulwark",
            ));
        }
        if let Some(path) = value.strip_prefix("kubernetes:") {
            if path.is_empty() {
                return Err(error(
                    "kubernetes: needs a kubeconfig file, or say just kubernetes",
                ));
            }
            return Ok(Source::kubernetes(
                Some(PathBuf::from(path)),
                crate::api::DEFAULT_NAMESPACE,
                "bulwark",
            ));
        }
        Err(error(
            "expected dir:PATH (a folder of YAML manifests), kubernetes, or kubernetes:KUBECONFIG",
        ))
    }
}

impl Source {
    /// Combines the values of a repeated `--source` flag into one source: any number of
    /// `dir:` folders (read together, in the order given), or one `kubernetes` source.
    /// `None` when no flag was given.
    pub fn combine(sources: Vec<Source>) -> Result<Option<Source>, ParseSourceError> {
        let mut combined: Option<Source> = None;
        for source in sources {
            let error = |reason| ParseSourceError {
                value: source.to_string(),
                reason,
            };
            combined = Some(match (combined, source.clone()) {
                (None, source) => source,
                (Some(Source::Dir(mut dirs)), Source::Dir(more)) => {
                    for dir in more {
                        if dirs.contains(&dir) {
                            return Err(error("this folder is given twice; give each folder once"));
                        }
                        dirs.push(dir);
                    }
                    Source::Dir(dirs)
                }
                (Some(Source::Kubernetes(_)), Source::Kubernetes(_)) => {
                    return Err(error("give one kubernetes source, not several"));
                }
                (Some(_), _) => {
                    return Err(error(
                        "kubernetes and dir: cannot be combined; give either kubernetes alone \
                         or one or more dir:PATH",
                    ));
                }
            });
        }
        Ok(combined)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dir(dirs) => {
                for (i, dir) in dirs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    write!(f, "dir:{}", dir.display())?;
                }
                Ok(())
            }
            Source::Kubernetes(k) => match &k.kubeconfig {
                None => f.write_str("kubernetes"),
                Some(path) => write!(f, "kubernetes:{}", path.display()),
            },
        }
    }
}

/// A source failure that stops it from loading at all (as opposed to a bad document).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The folder cannot be read.
    #[error(
        "cannot read the source folder {path}: {source}; check that it exists and that the \
         control plane may read it"
    )]
    ReadDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The path is a file, not a folder.
    #[error("the source path {path} is not a folder: dir:PATH takes a folder of YAML files")]
    NotADir {
        /// The path.
        path: PathBuf,
    },
    /// Two of the folders are the same folder (perhaps spelled differently, or a symlink).
    #[error("the source folders {first} and {second} are the same folder; give each folder once")]
    SameDir {
        /// The folder as given first.
        first: PathBuf,
        /// The same folder given again.
        second: PathBuf,
    },
    /// No folder was given.
    #[error("the folder source needs at least one folder (dir:PATH)")]
    NoDir,
    /// The Kubernetes client cannot be set up.
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeError),
    /// The file watcher could not be set up.
    #[error(
        "cannot watch the source folder {path} for changes: {source}; check the inotify limits \
         (fs.inotify.max_user_instances, fs.inotify.max_user_watches)"
    )]
    Watch {
        /// The folder.
        path: PathBuf,
        /// The watcher's error.
        source: notify::Error,
    },
}

/// A document (or a whole file) the source could not use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RejectedObject {
    /// The file, as a path that includes the source folder.
    pub file: String,
    /// 0-based index of the document in the file; `None` when the whole file failed.
    pub document: Option<usize>,
    /// 1-based line where the document starts.
    pub line: Option<usize>,
    /// The object the document describes (`ResiliencePolicy demo/reviews`), if known.
    pub object: Option<String>,
    /// The offending field (`spec.retry.attempts`); empty for the whole document.
    pub path: String,
    /// What is wrong.
    pub reason: String,
    /// Whether a previous valid version of the object is still in force.
    pub kept_previous: bool,
    /// When this rejection was first seen.
    pub since: Timestamp,
}

impl RejectedObject {
    /// The same problem as `other` (ignoring when it was seen and what was kept).
    pub fn same_problem(&self, other: &RejectedObject) -> bool {
        self.file == other.file
            && self.document == other.document
            && self.object == other.object
            && self.path == other.path
            && self.reason == other.reason
    }

    pub(crate) fn object_key(key: Option<&ObjectKey>) -> Option<String> {
        key.map(ToString::to_string)
    }
}

/// `file[document] (object): path: reason`.
impl fmt::Display for RejectedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(document) = self.document {
            write!(f, " document {document}")?;
        }
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.reason)
    }
}

/// What a source hands on after each load: the model to the index, the rejections to
/// the admin server and metrics.
#[derive(Clone, Debug)]
pub struct Publisher {
    model: watch::Sender<Arc<Model>>,
    rejected: watch::Sender<Arc<[RejectedObject]>>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// A publisher starting from an empty model and no rejections.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Publisher {
            model: watch::Sender::new(Arc::new(Model::default())),
            rejected: watch::Sender::new(Arc::from(Vec::new())),
            metrics,
        }
    }

    /// Publishes a load; the model is sent on only when it changed.
    pub fn publish(&self, model: Model, rejected: Vec<RejectedObject>) {
        self.metrics
            .rejected_objects
            .set(i64::try_from(rejected.len()).unwrap_or(i64::MAX));
        self.rejected.send_replace(Arc::from(rejected));
        self.model.send_if_modified(|current| {
            if **current == model {
                false
            } else {
                *current = Arc::new(model);
                true
            }
        });
    }

    /// Follows the published models.
    pub fn models(&self) -> watch::Receiver<Arc<Model>> {
        self.model.subscribe()
    }

    /// Follows the published rejections.
    pub fn rejections(&self) -> watch::Receiver<Arc<[RejectedObject]>> {
        self.rejected.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_source_flags() {
        assert_eq!(
            "dir:examples".parse::<Source>().unwrap(),
            Source::Dir(vec!["examples".into()])
        );
        assert_eq!(
            Source::Dir(vec!["a".into(), "/b".into()]).to_string(),
            "dir:a dir:/b",
            "several folders show as the flags that give them"
        );
        assert_eq!(
            "dir:/etc/bulwark".parse::<Source>().unwrap().to_string(),
            "dir:/etc/bulwark"
        );
        assert!(matches!(
            "kubernetes".parse::<Source>().unwrap(),
            Source::Kubernetes(k) if k.kubeconfig.is_none()
        ));
        assert_eq!(
            "kubernetes:/tmp/kc".parse::<Source>().unwrap().to_string(),
            "kubernetes:/tmp/kc"
        );
        let err = "examples".parse::<Source>().unwrap_err().to_string();
        assert!(err.contains("expected dir:PATH"), "{err}");
        assert!("dir:".parse::<Source>().is_err());
    }

    #[test]
    fn publishes_only_changed_models() {
        let publisher = Publisher::new(Arc::new(Metrics::new()));
        let mut models = publisher.models();
        models.borrow_and_update();
        publisher.publish(Model::default(), Vec::new());
        assert!(!models.has_changed().unwrap(), "same model, no news");
        let mut model = Model::default();
        model.insert(crate::model::Object::Pod(crate::model::Pod {
            name: crate::model::ObjectName::new("a", "b"),
            labels: Default::default(),
            ips: Vec::new(),
            service_account: "default".into(),
            weight: None,
            meshed: false,
        }));
        publisher.publish(model, Vec::new());
        assert!(models.has_changed().unwrap());
    }
}
