//! Key → shard strategies: hash modulo N, a consistent-hash ring, ordered ranges and an
//! explicit directory. Shards are positions in the topology's shard list.

use std::collections::HashMap;

use bulwark_proto::v1::shard_strategy::Kind;

use super::InvalidTopology;
use crate::policy::hash::stable_hash;

/// Virtual nodes per shard when the topology gives 0.
pub const DEFAULT_VIRTUAL_NODES: u32 = 100;
/// Most virtual nodes per shard accepted, as the control plane's API allows: 16 bytes
/// a point, so at most 1,000 x 256 shards = 4 MB of ring per destination.
pub const MAX_VIRTUAL_NODES: u32 = 1_000;

/// A validated key → shard mapping.
#[derive(Debug, Clone)]
pub enum Mapper {
    /// `stable_hash(key) % n`.
    Hash {
        /// The number of shards.
        shards: usize,
    },
    /// A ring of `(point, shard)` sorted by point: a key goes to the first point at or
    /// after its hash, wrapping around. A shard's points are the hashes of
    /// `"{shard name}#{i}"`, so they depend on its name only: adding a shard moves only
    /// the keys the new shard's points take over (about 1/(N+1) of them).
    Ring(Vec<(u64, usize)>),
    /// Ranges `start <= key < end`, sorted by start and not overlapping.
    Range(Vec<(String, Option<String>, usize)>),
    /// key → shard, with the shard of other keys.
    Directory {
        /// The table.
        entries: HashMap<String, usize>,
        /// Keys not in the table; `None`: they count as missing.
        default: Option<usize>,
    },
}

impl Mapper {
    /// Builds the mapping; `index` resolves a shard name to its position.
    pub fn build(
        kind: &Kind,
        names: &[String],
        index: impl Fn(&str) -> Result<usize, InvalidTopology>,
    ) -> Result<Self, InvalidTopology> {
        Ok(match kind {
            Kind::Hash(_) => Mapper::Hash {
                shards: names.len(),
            },
            Kind::ConsistentHashVirtualNodes(v) => {
                let v = match *v {
                    0 => DEFAULT_VIRTUAL_NODES,
                    v if v > MAX_VIRTUAL_NODES => {
                        return Err(InvalidTopology::Strategy(format!(
                            "{v} virtual nodes per shard (at most {MAX_VIRTUAL_NODES})"
                        )));
                    }
                    v => v,
                };
                Mapper::Ring(ring(names, v))
            }
            Kind::Ranges(ranges) => {
                let mut out = Vec::with_capacity(ranges.ranges.len());
                for r in &ranges.ranges {
                    out.push((r.start.clone(), r.end.clone(), index(&r.shard)?));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                for pair in out.windows(2) {
                    let overlaps = pair[0].1.as_ref().is_none_or(|end| *end > pair[1].0);
                    if overlaps {
                        return Err(InvalidTopology::Strategy(format!(
                            "ranges starting at {:?} and {:?} overlap",
                            pair[0].0, pair[1].0
                        )));
                    }
                }
                if let Some(bad) = out
                    .iter()
                    .find(|(s, e, _)| e.as_ref().is_some_and(|e| e <= s))
                {
                    return Err(InvalidTopology::Strategy(format!(
                        "range starting at {:?} ends before it starts",
                        bad.0
                    )));
                }
                Mapper::Range(out)
            }
            Kind::Directory(d) => {
                let mut entries = HashMap::with_capacity(d.entries.len());
                for (k, shard) in &d.entries {
                    entries.insert(k.clone(), index(shard)?);
                }
                let default = Some(d.default_shard.as_str())
                    .filter(|s| !s.is_empty())
                    .map(&index)
                    .transpose()?;
                Mapper::Directory { entries, default }
            }
        })
    }

    /// The shard of `key`; `None`: no shard holds it (a gap between ranges, or a key
    /// missing from a directory without default), which counts as a missing key.
    pub fn shard(&self, key: &str) -> Option<usize> {
        match self {
            Mapper::Hash { shards } => {
                let n = u64::try_from(*shards).ok().filter(|n| *n > 0)?;
                usize::try_from(stable_hash(key.as_bytes()) % n).ok()
            }
            Mapper::Ring(points) => {
                let h = stable_hash(key.as_bytes());
                let i = points.partition_point(|(p, _)| *p < h);
                points.get(i).or(points.first()).map(|(_, s)| *s)
            }
            Mapper::Range(ranges) => {
                // The last range starting at or before the key, if the key is before its end.
                let i = ranges.partition_point(|(start, _, _)| start.as_str() <= key);
                let (_, end, shard) = ranges.get(i.checked_sub(1)?)?;
                end.as_ref()
                    .is_none_or(|e| key < e.as_str())
                    .then_some(*shard)
            }
            Mapper::Directory { entries, default } => entries.get(key).copied().or(*default),
        }
    }
}

fn ring(names: &[String], virtual_nodes: u32) -> Vec<(u64, usize)> {
    let mut points = Vec::with_capacity(names.len() * virtual_nodes as usize);
    for (shard, name) in names.iter().enumerate() {
        for i in 0..virtual_nodes {
            points.push((stable_hash(format!("{name}#{i}").as_bytes()), shard));
        }
    }
    // Ties (vanishingly rare) resolve by shard position, so every agent agrees.
    points.sort_unstable();
    points
}

#[cfg(test)]
mod tests {
    use bulwark_proto::v1::{self, KeyRange, KeyRanges};

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("shard-{i}")).collect()
    }

    fn index_of(names: &[String]) -> impl Fn(&str) -> Result<usize, InvalidTopology> + '_ {
        |s| {
            names
                .iter()
                .position(|n| n == s)
                .ok_or_else(|| InvalidTopology::UnknownShard(s.to_owned()))
        }
    }

    fn mapper(kind: Kind, names: &[String]) -> Result<Mapper, InvalidTopology> {
        Mapper::build(&kind, names, index_of(names))
    }

    #[test]
    fn a_ring_is_bounded_by_the_virtual_node_maximum() {
        let n = names(2);
        let Mapper::Ring(points) =
            mapper(Kind::ConsistentHashVirtualNodes(MAX_VIRTUAL_NODES), &n).unwrap()
        else {
            panic!("a ring");
        };
        assert_eq!(points.len(), 2 * MAX_VIRTUAL_NODES as usize);
        let err = mapper(Kind::ConsistentHashVirtualNodes(MAX_VIRTUAL_NODES + 1), &n).unwrap_err();
        assert_eq!(
            err.to_string(),
            InvalidTopology::Strategy("1001 virtual nodes per shard (at most 1000)".into())
                .to_string()
        );
    }

    #[test]
    fn hash_spreads_keys_over_every_shard_and_is_stable() {
        let n = names(4);
        let m = mapper(Kind::Hash(v1::Empty {}), &n).unwrap();
        let mut counts = [0usize; 4];
        for k in 0..10_000 {
            counts[m.shard(&format!("key-{k}")).unwrap()] += 1;
        }
        for c in counts {
            assert!((2_000..3_000).contains(&c), "{counts:?}");
        }
        let again = mapper(Kind::Hash(v1::Empty {}), &n).unwrap();
        assert_eq!(m.shard("tenant-7"), again.shard("tenant-7"));
    }

    #[test]
    fn adding_a_shard_to_a_ring_moves_about_one_in_n_plus_one_keys_all_to_the_new_shard() {
        const KEYS: usize = 100_000;
        for n in [3usize, 4, 8] {
            let before = mapper(Kind::ConsistentHashVirtualNodes(0), &names(n)).unwrap();
            let after = mapper(Kind::ConsistentHashVirtualNodes(0), &names(n + 1)).unwrap();
            let mut moved = 0usize;
            for k in 0..KEYS {
                let key = format!("key-{k}");
                let (a, b) = (before.shard(&key).unwrap(), after.shard(&key).unwrap());
                if a != b {
                    assert_eq!(
                        b, n,
                        "a moved key goes to the new shard, never between old ones"
                    );
                    moved += 1;
                }
            }
            let fraction = moved as f64 / KEYS as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            assert!(
                (fraction - ideal).abs() <= 0.03,
                "{n} -> {}: moved {fraction:.3}, ideal {ideal:.3}",
                n + 1
            );
        }
        // Plain modulo hashing, for contrast, moves most keys.
        let before = mapper(Kind::Hash(v1::Empty {}), &names(4)).unwrap();
        let after = mapper(Kind::Hash(v1::Empty {}), &names(5)).unwrap();
        let moved = (0..10_000)
            .filter(|k| {
                let key = format!("key-{k}");
                before.shard(&key) != after.shard(&key)
            })
            .count();
        assert!(moved > 7_000, "{moved}");
    }

    fn range(start: &str, end: Option<&str>, shard: &str) -> KeyRange {
        KeyRange {
            start: start.into(),
            end: end.map(Into::into),
            shard: shard.into(),
        }
    }

    #[test]
    fn ranges_include_their_start_exclude_their_end_and_leave_gaps_unmapped() {
        let n = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let m = mapper(
            Kind::Ranges(KeyRanges {
                ranges: vec![
                    range("m", Some("t"), "b"),
                    range("", Some("g"), "a"),
                    range("t", None, "c"),
                ],
            }),
            &n,
        )
        .unwrap();
        assert_eq!(
            m.shard(""),
            Some(0),
            "the empty key is in the range from the smallest key"
        );
        assert_eq!(m.shard("apple"), Some(0));
        assert_eq!(m.shard("g"), None, "g is the end of a, and in no range");
        assert_eq!(m.shard("hello"), None);
        assert_eq!(m.shard("m"), Some(1), "a start is inclusive");
        assert_eq!(m.shard("sz"), Some(1));
        assert_eq!(m.shard("t"), Some(2), "an end is exclusive");
        assert_eq!(
            m.shard("zzzz"),
            Some(2),
            "an open end reaches the largest key"
        );
    }

    #[test]
    fn overlapping_backwards_or_unknown_ranges_are_refused() {
        let n = vec!["a".to_owned(), "b".to_owned()];
        let overlap = mapper(
            Kind::Ranges(KeyRanges {
                ranges: vec![range("", Some("n"), "a"), range("m", None, "b")],
            }),
            &n,
        )
        .unwrap_err();
        assert!(overlap.to_string().contains("overlap"), "{overlap}");
        let open = mapper(
            Kind::Ranges(KeyRanges {
                ranges: vec![range("", None, "a"), range("m", None, "b")],
            }),
            &n,
        );
        assert!(open.is_err(), "an open-ended range overlaps any later one");
        let backwards = mapper(
            Kind::Ranges(KeyRanges {
                ranges: vec![range("z", Some("a"), "a")],
            }),
            &n,
        );
        assert!(backwards.is_err());
        let unknown = mapper(
            Kind::Ranges(KeyRanges {
                ranges: vec![range("", None, "q")],
            }),
            &n,
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("\"q\""), "{unknown}");
    }

    #[test]
    fn a_directory_maps_its_keys_and_sends_others_to_the_default_or_nowhere() {
        let n = vec!["a".to_owned(), "b".to_owned()];
        let dir = |default: &str| {
            Kind::Directory(v1::Directory {
                entries: [("acme".to_owned(), "b".to_owned())].into(),
                default_shard: default.into(),
            })
        };
        let m = mapper(dir("a"), &n).unwrap();
        assert_eq!(m.shard("acme"), Some(1));
        assert_eq!(m.shard("globex"), Some(0));
        assert_eq!(m.shard("ACME"), Some(0), "keys are case sensitive");
        let m = mapper(dir(""), &n).unwrap();
        assert_eq!(m.shard("globex"), None);
        let bad = Kind::Directory(v1::Directory {
            entries: [("acme".to_owned(), "zz".to_owned())].into(),
            default_shard: String::new(),
        });
        assert!(mapper(bad, &n).unwrap_err().to_string().contains("zz"));
    }
}
