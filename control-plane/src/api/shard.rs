//! `ShardTopology` (`bulwark.io/v1alpha1`): a sharded, replicated Service. Type, schema
//! and validation; the agent routes by it from issue 6 on.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::resilience::positive;
use super::{FieldError, field, item, target};
use crate::duration::Duration;
use crate::model::shard as model;

/// Most shards a topology may list.
pub const MAX_SHARDS: usize = 256;
/// Default virtual nodes per shard of a consistent-hash ring.
pub const DEFAULT_VIRTUAL_NODES: u32 = 100;
/// Most virtual nodes per shard. Every agent calling the service holds the ring: one
/// point is 16 bytes (a u64 hash and a shard index), so 1,000 points x 256 shards
/// is 256,000 points, 4 MB per destination per agent at worst (10,000 would be
/// 40 MB, and as many hashes to compute on every config push). More points buy
/// little: the spread of keys over shards varies by about 1/sqrt(points), 10% at
/// 100, 3% at 1,000. The CRD schema's maximum and the agent's check say the same.
pub const MAX_VIRTUAL_NODES: u32 = 1_000;
/// Default read methods.
pub const DEFAULT_READ_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];

/// A `ShardTopology` document as the folder source reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct ShardTopologyDocument {
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, required.
    pub spec: Option<ShardTopologySpec>,
}

/// A sharded and replicated Service: where a request's shard key comes from, how a key
/// maps to a shard, and which endpoints are each shard's primary and replicas. Reads go
/// to a shard's replicas, writes to its primary.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, kube::CustomResource)]
#[kube(
    group = "bulwark.io",
    version = "v1alpha1",
    kind = "ShardTopology",
    plural = "shardtopologies",
    namespaced,
    doc = "A ShardTopology: how requests to a sharded, replicated Service reach the right shard and copy.",
    status = "super::status::PolicyStatus",
    shortname = "st",
    category = "bulwark",
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".spec.targetRefs[*].name","description":"the Services the topology describes"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.strategy.type"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].status","description":"whether the control plane applies the topology"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.key)", "message": "key is required"},
    {"rule": "has(self.strategy)", "message": "strategy is required"},
    {"rule": "has(self.shards)", "message": "shards is required"},
    {
        "rule": "!has(self.missingKey) || !has(self.missingKey.shard) || !has(self.shards) || self.shards.exists(s, s.name == self.missingKey.shard)",
        "message": "missingKey.shard must name a shard",
    },
    {
        "rule": "!has(self.strategy) || !has(self.strategy.ranges) || !has(self.shards) || self.strategy.ranges.all(r, !has(r.shard) || self.shards.exists(s, s.name == r.shard))",
        "message": "every range must name a shard",
    },
    {
        "rule": "!has(self.strategy) || !has(self.strategy.directory) || !has(self.strategy.directory.defaultShard) || !has(self.shards) || self.shards.exists(s, s.name == self.strategy.directory.defaultShard)",
        "message": "directory.defaultShard must name a shard",
    },
]))]
// Directory entries naming missing shards are caught by the control plane only: checking
// up to 10,000 entries against the shard list in CEL exceeds the API server's cost budget.
pub struct ShardTopologySpec {
    /// The Service (or services) this topology describes, in its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Option<Vec<target::TargetRef>>,
    /// Where the shard key of a request comes from. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<ShardKeySpec>,
    /// What a request without a shard key gets. Default: 400 with
    /// x-bulwark-reason shard-key-missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_key: Option<MissingKeySpec>,
    /// How a key picks a shard. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StrategySpec>,
    /// The shards, each with label selectors for its primary and replicas. Hash maps a
    /// key to a position in this list, so append new shards at the end. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub shards: Option<Vec<ShardSpec>>,
    /// Which requests are reads (to replicas); every other request is a write (to the
    /// primary). Default: GET, HEAD and OPTIONS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<ReadsSpec>,
    /// Reads by a client that just wrote to a shard go to its primary for a while.
    /// Absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_your_writes: Option<ReadYourWritesSpec>,
}

/// `spec.key`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.type)", "message": "type is required"},
    {
        "rule": "!has(self.type) || (self.type in ['Header', 'Query', 'GrpcMetadata'] ? has(self.name) : !has(self.name))",
        "message": "name is required for Header, Query and GrpcMetadata keys, and only allowed then",
    },
    {
        "rule": "!has(self.type) || self.type != 'Path' || (has(self.segment) ? !has(self.pattern) : has(self.pattern))",
        "message": "a Path key needs exactly one of segment and pattern",
    },
    {
        "rule": "!has(self.type) || self.type == 'Path' || (!has(self.segment) && !has(self.pattern))",
        "message": "segment and pattern are only allowed for Path keys",
    },
]))]
pub struct ShardKeySpec {
    /// Header, Path, Query or GrpcMetadata. Required.
    #[serde(rename = "type")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ShardKeyType>,
    /// The header, query parameter or gRPC metadata key (headers and metadata in lower
    /// case).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub name: Option<String>,
    /// For Path: the 0-based position of the path segment (/tenants/acme: acme is 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 64))]
    pub segment: Option<u32>,
    /// For Path: a regular expression over the path with a named capture `key`, e.g.
    /// ^/tenants/(?P<key>[^/]+).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
}

/// `spec.key.type`: Header, Path, Query or GrpcMetadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 32))]
pub enum ShardKeyType {
    /// A request header.
    Header,
    /// A path segment or a pattern over the path.
    Path,
    /// A query parameter.
    Query,
    /// gRPC request metadata.
    GrpcMetadata,
}

/// `spec.missingKey`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.action) && self.action == 'DefaultShard' ? has(self.shard) : !has(self.shard)",
    "message": "shard is required for DefaultShard, and only allowed then",
}]))]
pub struct MissingKeySpec {
    /// Reject (400 shard-key-missing) or DefaultShard. Default Reject.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Reject"))]
    pub action: Option<MissingKeyAction>,
    /// For DefaultShard: the shard that gets requests without a key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub shard: Option<String>,
}

/// `spec.missingKey.action`: Reject (400 shard-key-missing, the default) or
/// DefaultShard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 32))]
pub enum MissingKeyAction {
    /// Answer 400 with x-bulwark-reason shard-key-missing.
    Reject,
    /// Route to `shard`.
    DefaultShard,
}

/// `spec.strategy`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.type)", "message": "type is required"},
    {
        "rule": "!has(self.type) || (self.type == 'Range' ? has(self.ranges) : !has(self.ranges))",
        "message": "ranges is required for Range, and only allowed then",
    },
    {
        "rule": "!has(self.type) || (self.type == 'Directory' ? has(self.directory) : !has(self.directory))",
        "message": "directory is required for Directory, and only allowed then",
    },
    {
        "rule": "!has(self.virtualNodes) || (has(self.type) && self.type == 'ConsistentHash')",
        "message": "virtualNodes is only allowed for ConsistentHash",
    },
]))]
pub struct StrategySpec {
    /// Hash (a stable hash with a fixed seed, modulo the number of shards),
    /// ConsistentHash (a ring: adding a shard moves about 1/(N+1) of the keys), Range
    /// (ordered key ranges) or Directory (an explicit key to shard table). Required.
    #[serde(rename = "type")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<StrategyType>,
    /// For ConsistentHash: virtual nodes per shard on the ring, 1 to 1000. Default 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub virtual_nodes: Option<u32>,
    /// For Range: non-overlapping ranges of keys, compared byte by byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub ranges: Option<Vec<RangeSpec>>,
    /// For Directory: the table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<DirectorySpec>,
}

/// `spec.strategy.type`: Hash, ConsistentHash, Range or Directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("maxLength" = 32))]
pub enum StrategyType {
    /// Hash modulo the number of shards.
    Hash,
    /// A consistent-hash ring.
    ConsistentHash,
    /// Ordered key ranges.
    Range,
    /// An explicit table.
    Directory,
}

/// One of `spec.strategy.ranges`: keys with start <= key < end.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.shard)", "message": "shard is required"},
    {
        "rule": "!has(self.start) || !has(self.end) || self.start < self.end",
        "message": "start must be less than end",
    },
]))]
pub struct RangeSpec {
    /// Inclusive lower bound. Default: from the smallest key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub start: Option<String>,
    /// Exclusive upper bound. Default: to the largest key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub end: Option<String>,
    /// The shard of these keys. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub shard: Option<String>,
}

/// `spec.strategy.directory`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectorySpec {
    /// Key to shard name, e.g. acme: "3"; every shard must be in spec.shards.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 10000,
        "additionalProperties" = {"type": "string", "maxLength": 63}
    ))]
    pub entries: BTreeMap<String, String>,
    /// The shard of keys not in the table. Default: such requests are treated as
    /// having no key (see missingKey).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub default_shard: Option<String>,
}

/// One of `spec.shards`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.primary)", "message": "primary is required"},
]))]
pub struct ShardSpec {
    /// The shard's name, unique in the topology.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Labels of the shard's primary endpoints (e.g. shard: "3", role: primary).
    /// Required, not empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<SelectorSpec>,
    /// Labels of the shard's replicas (e.g. shard: "3", role: replica). Absent: reads
    /// go to the primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<SelectorSpec>,
}

/// A label selector over the Service's endpoints (their pods' labels).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorSpec {
    /// Labels an endpoint's pod must all carry. At least one.
    // Absent reads as empty so that our own check names the field (see label_selector).
    #[serde(default)]
    #[schemars(transform = crate::api::meta::label_selector)]
    pub match_labels: BTreeMap<String, String>,
}

impl SelectorSpec {
    /// The labels, within the schema's bounds (`path` is the `matchLabels` field's). An
    /// empty map passes: each caller refuses it with its own reason.
    pub fn checked_labels(self, path: &str) -> Result<BTreeMap<String, String>, FieldError> {
        use crate::api::meta::{MAX_LABEL_VALUE, MAX_SELECTOR_LABELS};
        if self.match_labels.len() > MAX_SELECTOR_LABELS {
            return Err(FieldError::new(
                path,
                format!(
                    "names {} labels; at most {MAX_SELECTOR_LABELS}",
                    self.match_labels.len()
                ),
            ));
        }
        for (key, value) in &self.match_labels {
            at_most(value, MAX_LABEL_VALUE, &field(path, key))?;
        }
        Ok(self.match_labels)
    }
}

/// `spec.reads`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadsSpec {
    /// HTTP methods that are reads. Default [GET, HEAD, OPTIONS].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = "^[A-Z]+$"), length(max = MAX_METHOD))
    )]
    pub methods: Option<Vec<String>>,
    /// Regular expressions over the path that make a request a read whatever its method.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = MAX_PATTERN)))]
    pub paths: Option<Vec<String>>,
    /// gRPC methods that are reads, as /package.Service/Method.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 256),
        inner(regex(pattern = "^/[^/]+/[^/]+$"), length(max = MAX_PATTERN))
    )]
    pub grpc_methods: Option<Vec<String>>,
}

/// `spec.readYourWrites`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadYourWritesSpec {
    /// How long after a write the client's reads go to the primary (a duration, more
    /// than 0). Default 5s.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "5s"))]
    pub window: Option<Duration>,
    /// A request header (lower case) that identifies the client. Default: the client
    /// address.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub client_header: Option<String>,
}

/// Longest HTTP method name in `spec.reads.methods`.
const MAX_METHOD: usize = 32;
/// Longest path regex or gRPC method in `spec.reads`.
const MAX_PATTERN: usize = 1024;

/// Refuses a value longer than the schema allows, so that the folder source accepts what
/// the API server accepts and no more.
fn at_most(value: &str, max: usize, path: &str) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(FieldError::new(
            path,
            format!("is {} characters long; at most {max}", value.len()),
        ));
    }
    Ok(())
}

/// Default `readYourWrites.window`.
pub const DEFAULT_RYW_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

impl TryFrom<ShardTopologyDocument> for model::ShardTopology {
    type Error = FieldError;

    fn try_from(doc: ShardTopologyDocument) -> Result<Self, FieldError> {
        let name = doc.metadata.object_name()?;
        let spec = doc.spec.ok_or_else(|| FieldError::required("spec"))?;
        spec.validate(name, doc.metadata.creation_timestamp)
    }
}

fn header_name(value: String, path: &str) -> Result<String, FieldError> {
    at_most(&value, 256, path)?;
    let valid = http::HeaderName::from_str(&value).is_ok()
        && !value.bytes().any(|b| b.is_ascii_uppercase());
    if valid {
        Ok(value)
    } else {
        Err(FieldError::new(
            path,
            format!("{value:?} is not a valid lowercase header name"),
        ))
    }
}

fn regex(value: &str, path: &str) -> Result<regex::Regex, FieldError> {
    regex::Regex::new(value)
        .map_err(|e| FieldError::new(path, format!("not a valid regular expression: {e}")))
}

impl ShardTopologySpec {
    /// Checks the spec (every rule, CEL ones included) and applies the defaults.
    pub fn validate(
        self,
        name: crate::model::ObjectName,
        created: Option<crate::timestamp::Timestamp>,
    ) -> Result<model::ShardTopology, FieldError> {
        let targets = target::validate(self.target_refs, "spec.targetRefs")?;
        let shards = validate_shards(self.shards)?;
        let names: BTreeSet<&str> = shards.iter().map(|s| s.name.as_str()).collect();
        let known = |shard: &str, path: &str| -> Result<String, FieldError> {
            if names.contains(shard) {
                Ok(shard.to_owned())
            } else {
                Err(FieldError::new(
                    path,
                    format!("names shard {shard:?}, which is not in spec.shards"),
                ))
            }
        };
        let key = validate_key(self.key.ok_or_else(|| FieldError::required("spec.key"))?)?;
        let missing_key = match self.missing_key {
            None => model::MissingKey::Reject,
            Some(m) => match (m.action.unwrap_or(MissingKeyAction::Reject), m.shard) {
                (MissingKeyAction::Reject, None) => model::MissingKey::Reject,
                (MissingKeyAction::Reject, Some(_)) => {
                    return Err(FieldError::new(
                        "spec.missingKey.shard",
                        "only allowed when action is DefaultShard",
                    ));
                }
                (MissingKeyAction::DefaultShard, None) => {
                    return Err(FieldError::new(
                        "spec.missingKey.shard",
                        "required when action is DefaultShard",
                    ));
                }
                (MissingKeyAction::DefaultShard, Some(shard)) => {
                    model::MissingKey::DefaultShard(known(&shard, "spec.missingKey.shard")?)
                }
            },
        };
        let strategy = self
            .strategy
            .ok_or_else(|| FieldError::required("spec.strategy"))?;
        let strategy = validate_strategy(strategy, &known)?;
        let reads = match self.reads {
            None => model::ReadMatch {
                methods: DEFAULT_READ_METHODS.map(str::to_owned).to_vec(),
                paths: Vec::new(),
                grpc_methods: Vec::new(),
            },
            Some(r) => {
                let methods = r
                    .methods
                    .unwrap_or_else(|| DEFAULT_READ_METHODS.map(str::to_owned).to_vec());
                for (i, m) in methods.iter().enumerate() {
                    at_most(m, MAX_METHOD, &item("spec.reads.methods", i))?;
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        return Err(FieldError::new(
                            item("spec.reads.methods", i),
                            format!("{m:?} is not an HTTP method in upper case"),
                        ));
                    }
                }
                let paths = r.paths.unwrap_or_default();
                for (i, p) in paths.iter().enumerate() {
                    at_most(p, MAX_PATTERN, &item("spec.reads.paths", i))?;
                    regex(p, &item("spec.reads.paths", i))?;
                }
                let grpc_methods = r.grpc_methods.unwrap_or_default();
                for (i, m) in grpc_methods.iter().enumerate() {
                    at_most(m, MAX_PATTERN, &item("spec.reads.grpcMethods", i))?;
                    let parts: Vec<&str> = m.split('/').collect();
                    if !(parts.len() == 3
                        && parts[0].is_empty()
                        && parts[1..].iter().all(|p| !p.is_empty()))
                    {
                        return Err(FieldError::new(
                            item("spec.reads.grpcMethods", i),
                            format!("{m:?} is not /package.Service/Method"),
                        ));
                    }
                }
                model::ReadMatch {
                    methods,
                    paths,
                    grpc_methods,
                }
            }
        };
        let read_your_writes = match self.read_your_writes {
            None => None,
            Some(r) => Some(model::ReadYourWrites {
                window: positive(r.window, "spec.readYourWrites", "window")?
                    .unwrap_or(DEFAULT_RYW_WINDOW),
                client_header: r
                    .client_header
                    .map(|h| header_name(h, "spec.readYourWrites.clientHeader"))
                    .transpose()?,
            }),
        };
        Ok(model::ShardTopology {
            name,
            created,
            targets,
            key,
            missing_key,
            strategy,
            shards,
            reads,
            read_your_writes,
        })
    }
}

fn validate_shards(shards: Option<Vec<ShardSpec>>) -> Result<Vec<model::Shard>, FieldError> {
    let shards = shards.unwrap_or_default();
    if shards.is_empty() {
        return Err(FieldError::new(
            "spec.shards",
            "must list at least one shard",
        ));
    }
    if shards.len() > MAX_SHARDS {
        return Err(FieldError::new(
            "spec.shards",
            format!("at most {MAX_SHARDS} shards"),
        ));
    }
    let mut out: Vec<model::Shard> = Vec::with_capacity(shards.len());
    for (i, shard) in shards.into_iter().enumerate() {
        let path = item("spec.shards", i);
        if shard.name.is_empty() {
            return Err(FieldError::required(field(&path, "name")));
        }
        if out.iter().any(|s| s.name == shard.name) {
            return Err(FieldError::new(
                field(&path, "name"),
                format!("duplicate shard name {:?}", shard.name),
            ));
        }
        let primary = match shard.primary {
            Some(p) if !p.match_labels.is_empty() => {
                p.checked_labels(&field(&path, "primary.matchLabels"))?
            }
            _ => {
                return Err(FieldError::new(
                    field(&path, "primary"),
                    "required: a shard needs a primary selector (matchLabels)",
                ));
            }
        };
        let replicas = match shard.replicas {
            None => None,
            Some(r) if r.match_labels.is_empty() => {
                return Err(FieldError::new(
                    field(&path, "replicas.matchLabels"),
                    "must hold at least one label (an empty selector would match every endpoint)",
                ));
            }
            Some(r) => Some(r.checked_labels(&field(&path, "replicas.matchLabels"))?),
        };
        if replicas.as_ref() == Some(&primary) {
            return Err(FieldError::new(
                field(&path, "replicas"),
                "selects the same endpoints as primary",
            ));
        }
        out.push(model::Shard {
            name: shard.name,
            primary,
            replicas,
        });
    }
    Ok(out)
}

fn validate_key(key: ShardKeySpec) -> Result<model::ShardKey, FieldError> {
    let kind = key
        .kind
        .ok_or_else(|| FieldError::required("spec.key.type"))?;
    let only_path = |present: bool, name: &str| {
        if present {
            Err(FieldError::new(
                field("spec.key", name),
                format!("only allowed when type is Path, not {kind:?}"),
            ))
        } else {
            Ok(())
        }
    };
    let named = |name: Option<String>| {
        name.filter(|n| !n.is_empty()).ok_or_else(|| {
            FieldError::new("spec.key.name", format!("required when type is {kind:?}"))
        })
    };
    match kind {
        ShardKeyType::Path => {
            if key.name.is_some() {
                return Err(FieldError::new(
                    "spec.key.name",
                    "not allowed when type is Path (use segment or pattern)",
                ));
            }
            match (key.segment, key.pattern) {
                (Some(segment), None) => Ok(model::ShardKey::PathSegment(segment)),
                (None, Some(pattern)) => {
                    let re = regex(&pattern, "spec.key.pattern")?;
                    if !re.capture_names().any(|n| n == Some("key")) {
                        return Err(FieldError::new(
                            "spec.key.pattern",
                            "needs a named capture `key`, e.g. ^/tenants/(?P<key>[^/]+)",
                        ));
                    }
                    Ok(model::ShardKey::PathPattern(pattern))
                }
                _ => Err(FieldError::new(
                    "spec.key",
                    "a Path key needs exactly one of segment and pattern",
                )),
            }
        }
        ShardKeyType::Header | ShardKeyType::Query | ShardKeyType::GrpcMetadata => {
            only_path(key.segment.is_some(), "segment")?;
            only_path(key.pattern.is_some(), "pattern")?;
            let name = named(key.name)?;
            Ok(match kind {
                ShardKeyType::Header => {
                    model::ShardKey::Header(header_name(name, "spec.key.name")?)
                }
                ShardKeyType::GrpcMetadata => {
                    model::ShardKey::GrpcMetadata(header_name(name, "spec.key.name")?)
                }
                _ => model::ShardKey::Query(name),
            })
        }
    }
}

fn validate_strategy(
    strategy: StrategySpec,
    known: &dyn Fn(&str, &str) -> Result<String, FieldError>,
) -> Result<model::ShardStrategy, FieldError> {
    let kind = strategy
        .kind
        .ok_or_else(|| FieldError::required("spec.strategy.type"))?;
    let not_for = |present: bool, name: &str| {
        if present {
            Err(FieldError::new(
                field("spec.strategy", name),
                format!("not allowed when type is {kind:?}"),
            ))
        } else {
            Ok(())
        }
    };
    not_for(
        strategy.virtual_nodes.is_some() && kind != StrategyType::ConsistentHash,
        "virtualNodes",
    )?;
    not_for(
        strategy.ranges.is_some() && kind != StrategyType::Range,
        "ranges",
    )?;
    not_for(
        strategy.directory.is_some() && kind != StrategyType::Directory,
        "directory",
    )?;
    match kind {
        StrategyType::Hash => Ok(model::ShardStrategy::Hash),
        StrategyType::ConsistentHash => {
            let virtual_nodes = strategy.virtual_nodes.unwrap_or(DEFAULT_VIRTUAL_NODES);
            if !(1..=MAX_VIRTUAL_NODES).contains(&virtual_nodes) {
                return Err(FieldError::new(
                    "spec.strategy.virtualNodes",
                    format!("must be between 1 and {MAX_VIRTUAL_NODES}"),
                ));
            }
            Ok(model::ShardStrategy::ConsistentHash { virtual_nodes })
        }
        StrategyType::Range => {
            let ranges = strategy.ranges.unwrap_or_default();
            if ranges.is_empty() {
                return Err(FieldError::new(
                    "spec.strategy.ranges",
                    "required when type is Range: at least one range",
                ));
            }
            let mut out = Vec::with_capacity(ranges.len());
            for (i, r) in ranges.into_iter().enumerate() {
                let path = item("spec.strategy.ranges", i);
                let shard = r
                    .shard
                    .ok_or_else(|| FieldError::required(field(&path, "shard")))?;
                let shard = known(&shard, &field(&path, "shard"))?;
                let start = r.start.unwrap_or_default();
                if let Some(end) = &r.end
                    && start.as_str() >= end.as_str()
                {
                    return Err(FieldError::new(
                        path,
                        format!("start {start:?} must be less than end {end:?}"),
                    ));
                }
                out.push((
                    i,
                    model::KeyRange {
                        start,
                        end: r.end,
                        shard,
                    },
                ));
            }
            out.sort_by(|a, b| a.1.start.cmp(&b.1.start));
            for pair in out.windows(2) {
                let (_, a) = &pair[0];
                let (j, b) = &pair[1];
                let overlaps = match &a.end {
                    None => true,
                    Some(end) => end.as_str() > b.start.as_str(),
                };
                if overlaps {
                    return Err(FieldError::new(
                        item("spec.strategy.ranges", *j),
                        format!(
                            "overlaps the range starting at {:?} (shard {})",
                            a.start, a.shard
                        ),
                    ));
                }
            }
            Ok(model::ShardStrategy::Range(
                out.into_iter().map(|(_, r)| r).collect(),
            ))
        }
        StrategyType::Directory => {
            let directory = strategy.directory.ok_or_else(|| {
                FieldError::new("spec.strategy.directory", "required when type is Directory")
            })?;
            let mut entries = BTreeMap::new();
            for (key, shard) in directory.entries {
                let path = format!("spec.strategy.directory.entries[{key}]");
                let shard = known(&shard, &path)?;
                entries.insert(key, shard);
            }
            let default = directory
                .default_shard
                .map(|s| known(&s, "spec.strategy.directory.defaultShard"))
                .transpose()?;
            Ok(model::ShardStrategy::Directory { entries, default })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(spec: &str) -> Result<model::ShardTopology, FieldError> {
        let yaml = format!(
            "metadata: {{name: orders, namespace: shop}}\n\
             spec:\n  targetRefs: [{{kind: Service, name: orders}}]\n{spec}"
        );
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let typed: ShardTopologyDocument = serde_path_to_error::deserialize(value)
            .map_err(|e| FieldError::new(e.path().to_string(), e.into_inner().to_string()))?;
        typed.try_into()
    }

    const SHARDS: &str = "  shards:\n\
        \x20   - {name: a, primary: {matchLabels: {shard: a, role: primary}}, replicas: {matchLabels: {shard: a, role: replica}}}\n\
        \x20   - {name: b, primary: {matchLabels: {shard: b, role: primary}}}\n";

    #[test]
    fn a_full_topology_validates_with_defaults() {
        let t = topology(&format!(
            "  key: {{type: Header, name: x-tenant-id}}\n  strategy: {{type: ConsistentHash}}\n{SHARDS}"
        ))
        .unwrap();
        assert_eq!(t.key, model::ShardKey::Header("x-tenant-id".into()));
        assert_eq!(t.missing_key, model::MissingKey::Reject);
        assert_eq!(
            t.strategy,
            model::ShardStrategy::ConsistentHash { virtual_nodes: 100 }
        );
        assert_eq!(t.shards.len(), 2);
        assert_eq!(t.shards[1].replicas, None);
        assert_eq!(t.reads.methods, ["GET", "HEAD", "OPTIONS"]);
        assert_eq!(t.read_your_writes, None);

        let t = topology(&format!(
            "  key: {{type: Path, pattern: '^/tenants/(?P<key>[^/]+)'}}\n\
             \x20 missingKey: {{action: DefaultShard, shard: b}}\n\
             \x20 strategy: {{type: Directory, directory: {{entries: {{acme: a}}, defaultShard: b}}}}\n\
             \x20 readYourWrites: {{clientHeader: x-client}}\n{SHARDS}"
        ))
        .unwrap();
        assert_eq!(t.missing_key, model::MissingKey::DefaultShard("b".into()));
        assert_eq!(
            t.read_your_writes,
            Some(model::ReadYourWrites {
                window: DEFAULT_RYW_WINDOW,
                client_header: Some("x-client".into())
            })
        );
    }

    #[test]
    fn invalid_topologies_name_the_field_and_the_reason() {
        let header = "  key: {type: Header, name: x-k}\n";
        let cases = [
            (
                format!(
                    "{header}  strategy: {{type: Range, ranges: [{{end: m, shard: a}}, {{start: k, shard: b}}]}}\n{SHARDS}"
                ),
                "spec.strategy.ranges[1]: overlaps the range starting at \"\" (shard a)",
            ),
            (
                format!(
                    "{header}  strategy: {{type: Directory, directory: {{entries: {{acme: z}}}}}}\n{SHARDS}"
                ),
                "spec.strategy.directory.entries[acme]: names shard \"z\", which is not in spec.shards",
            ),
            (
                format!("{header}  strategy: {{type: Hash}}\n  shards: [{{name: a}}]\n"),
                "spec.shards[0].primary: required",
            ),
            (
                format!(
                    "{header}  strategy: {{type: Hash}}\n  shards: [{{name: a, primary: {{matchLabels: {{}}}}}}]\n"
                ),
                "spec.shards[0].primary: required",
            ),
            (
                format!(
                    "  key: {{type: Path, pattern: '^/t/([^/]+)'}}\n  strategy: {{type: Hash}}\n{SHARDS}"
                ),
                "spec.key.pattern: needs a named capture `key`",
            ),
            (
                format!("  key: {{type: Path}}\n  strategy: {{type: Hash}}\n{SHARDS}"),
                "spec.key: a Path key needs exactly one of segment and pattern",
            ),
            (
                format!("  key: {{type: Query}}\n  strategy: {{type: Hash}}\n{SHARDS}"),
                "spec.key.name: required when type is Query",
            ),
            (
                format!("{header}  strategy: {{type: Hash, virtualNodes: 3}}\n{SHARDS}"),
                "spec.strategy.virtualNodes: not allowed when type is Hash",
            ),
            (
                format!(
                    "{header}  strategy: {{type: ConsistentHash, virtualNodes: 1001}}\n{SHARDS}"
                ),
                "spec.strategy.virtualNodes: must be between 1 and 1000",
            ),
            (
                format!(
                    "{header}  missingKey: {{action: DefaultShard, shard: q}}\n  strategy: {{type: Hash}}\n{SHARDS}"
                ),
                "spec.missingKey.shard: names shard \"q\"",
            ),
            (
                format!("{header}  strategy: {{type: Hash}}\n  shards: []\n"),
                "spec.shards: must list at least one shard",
            ),
            (
                format!("{header}  strategy: {{type: Modulo}}\n{SHARDS}"),
                "spec.strategy.type: unknown variant `Modulo`",
            ),
        ];
        for (spec, expected) in cases {
            let got = topology(&spec).unwrap_err().to_string();
            assert!(
                got.starts_with(expected),
                "for {spec:?}\n  got:      {got}\n  expected: {expected}"
            );
        }
    }
}
