//! A validated `ShardTopology`: how a sharded, replicated Service maps requests to
//! shards and copies. The agent-side routing comes with issue 6; this is the contract.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ObjectName, TargetRef};
use crate::timestamp::Timestamp;

/// A validated ShardTopology.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardTopology {
    /// The topology's namespace and name.
    pub name: ObjectName,
    /// When it was created, for conflict resolution.
    pub created: Option<Timestamp>,
    /// The Services it describes.
    pub targets: Vec<TargetRef>,
    /// Where the shard key comes from.
    pub key: ShardKey,
    /// What a request without a key gets.
    pub missing_key: MissingKey,
    /// How a key picks a shard.
    pub strategy: ShardStrategy,
    /// The shards, in order (`Hash` maps to positions in this list).
    pub shards: Vec<Shard>,
    /// Which requests are reads (to replicas); the rest are writes (to the primary).
    pub reads: ReadMatch,
    /// Read-your-writes: reads by a client that just wrote go to the primary.
    pub read_your_writes: Option<ReadYourWrites>,
}

/// Where a request's shard key is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardKey {
    /// A request header (lower case).
    Header(String),
    /// The path segment at this 0-based position (`/a/b`: `a` is 0).
    PathSegment(u32),
    /// The named capture `key` of a regular expression over the path.
    PathPattern(String),
    /// A query parameter.
    Query(String),
    /// gRPC metadata (lower case).
    GrpcMetadata(String),
}

/// What happens to a request without a shard key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissingKey {
    /// 400 with `x-bulwark-reason: shard-key-missing`.
    Reject,
    /// Route it to this shard.
    DefaultShard(String),
}

/// How a key maps to a shard.
#[derive(Clone, Debug, PartialEq)]
pub enum ShardStrategy {
    /// A stable hash of the key (fixed seed), modulo the number of shards.
    Hash,
    /// A consistent-hash ring with this many virtual nodes per shard.
    ConsistentHash {
        /// Virtual nodes per shard.
        virtual_nodes: u32,
    },
    /// Ordered, non-overlapping key ranges.
    Range(Vec<KeyRange>),
    /// An explicit key → shard table.
    Directory {
        /// Key → shard name.
        entries: BTreeMap<String, String>,
        /// The shard of keys not in the table; `None`: such keys are missing keys.
        default: Option<String>,
    },
}

/// One range of a `Range` strategy: keys `start <= key < end` (byte order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// Inclusive lower bound; empty: from the smallest key.
    pub start: String,
    /// Exclusive upper bound; `None`: to the largest key.
    pub end: Option<String>,
    /// The shard.
    pub shard: String,
}

/// One shard: its primary and replicas, chosen by labels among the Service's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The shard's name.
    pub name: String,
    /// Labels the primary's pods carry.
    pub primary: BTreeMap<String, String>,
    /// Labels the replicas' pods carry; `None`: the shard has no replicas.
    pub replicas: Option<BTreeMap<String, String>>,
}

/// Which requests are reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadMatch {
    /// HTTP methods that are reads.
    pub methods: Vec<String>,
    /// Regular expressions over the path that make a request a read whatever its method.
    pub paths: Vec<String>,
    /// gRPC methods (`/package.Service/Method`) that are reads.
    pub grpc_methods: Vec<String>,
}

/// Read-your-writes settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadYourWrites {
    /// How long after a write a client's reads go to the primary.
    pub window: Duration,
    /// What identifies a client: a header (lower case), or `None` for the client address.
    pub client_header: Option<String>,
}
