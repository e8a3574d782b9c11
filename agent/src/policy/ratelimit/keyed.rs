//! Per-key state of a rate limit (local buckets, or a Shared limit's leases): one value
//! for everyone, or one per client address, caller identity or header value.
//!
//! Lookups borrow the request's key; a key is copied only to store a new entry.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::policy::authorization::PeerId;

/// What a limit's buckets are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateLimitKey {
    /// One bucket for everyone.
    None,
    /// One bucket per client IP address.
    ClientAddress,
    /// One bucket per caller's mesh identity (SPIFFE ID, proven by mutual TLS);
    /// plaintext callers share one bucket.
    ClientIdentity,
    /// One bucket per value of this header; requests without it share one bucket.
    Header(HeaderName),
}

/// The parts of a request a key is read from.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// The client's address (inbound: the peer; outbound: the local app).
    pub client: IpAddr,
    /// The caller's mesh identity, if it has one.
    pub caller: Option<&'a Arc<PeerId>>,
    /// The request's headers.
    pub headers: &'a HeaderMap,
}

/// A header value as a key; `None` is the shared entry of requests without the header.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HeaderKey(pub Option<HeaderValue>);

impl Clone for HeaderKey {
    /// A key is cloned only to be stored for a new entry. Copy the bytes then: a value
    /// parsed by hyper shares the connection's read buffer, which a stored key would
    /// otherwise keep alive for as long as the entry lives. Lookups borrow.
    fn clone(&self) -> Self {
        Self(self.0.as_ref().map(|value| {
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            copy
        }))
    }
}

/// A caller's identity as a key (`None`: every plaintext caller).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityKey(pub Option<Arc<PeerId>>);

/// One request's key, owned (a clone of a parsed header value or identity is a reference
/// count, not a copy): kept for after-the-fact charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedKey {
    /// The single entry.
    None,
    /// A client address.
    Address(IpAddr),
    /// A caller identity.
    Identity(IdentityKey),
    /// A header value.
    Header(HeaderKey),
}

impl OwnedKey {
    /// The key as bytes, for a store key: distinct keys give distinct bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            OwnedKey::None => b"-".to_vec(),
            OwnedKey::Address(ip) => format!("a:{ip}").into_bytes(),
            OwnedKey::Identity(IdentityKey(None)) => b"i-".to_vec(),
            OwnedKey::Identity(IdentityKey(Some(id))) => format!("i:{}", id.as_str()).into_bytes(),
            OwnedKey::Header(HeaderKey(None)) => b"h-".to_vec(),
            OwnedKey::Header(HeaderKey(Some(value))) => {
                let mut bytes = b"h:".to_vec();
                bytes.extend_from_slice(value.as_bytes());
                bytes
            }
        }
    }
}

/// Values of type `V` by key.
#[derive(Debug)]
pub enum Keyed<V> {
    /// One value for everyone.
    Single(V),
    /// One per client address.
    ByAddress(DashMap<IpAddr, V>),
    /// One per caller identity.
    ByIdentity(DashMap<IdentityKey, V>),
    /// One per value of a header.
    ByHeader(HeaderName, DashMap<HeaderKey, V>),
}

impl<V: Default> Keyed<V> {
    /// An empty map for `key`.
    pub fn new(key: &RateLimitKey) -> Self {
        match key {
            RateLimitKey::None => Keyed::Single(V::default()),
            RateLimitKey::ClientAddress => Keyed::ByAddress(DashMap::new()),
            RateLimitKey::ClientIdentity => Keyed::ByIdentity(DashMap::new()),
            RateLimitKey::Header(name) => Keyed::ByHeader(name.clone(), DashMap::new()),
        }
    }

    /// The request's key, owned.
    pub fn key(&self, keys: &Keys<'_>) -> OwnedKey {
        match self {
            Keyed::Single(_) => OwnedKey::None,
            // One entry per host whether it connects over IPv4 or IPv4-mapped IPv6.
            Keyed::ByAddress(_) => OwnedKey::Address(keys.client.to_canonical()),
            Keyed::ByIdentity(_) => OwnedKey::Identity(IdentityKey(keys.caller.cloned())),
            // With several values the first one counts.
            Keyed::ByHeader(name, _) => {
                OwnedKey::Header(HeaderKey(keys.headers.get(name).cloned()))
            }
        }
    }

    /// Runs `f` on the value of `key`, made on first use.
    pub fn with<R>(&self, key: &OwnedKey, f: impl FnOnce(&V) -> R) -> R {
        match (self, key) {
            (Keyed::Single(value), _) => f(value),
            (Keyed::ByAddress(map), OwnedKey::Address(ip)) => with_entry(map, ip, f),
            (Keyed::ByIdentity(map), OwnedKey::Identity(id)) => with_entry(map, id, f),
            (Keyed::ByHeader(_, map), OwnedKey::Header(value)) => with_entry(map, value, f),
            // A key of another kind cannot come from this map's `key`; count it as the
            // shared entry of requests without a key.
            (Keyed::ByAddress(map), _) => with_entry(map, &IpAddr::from([0, 0, 0, 0]), f),
            (Keyed::ByIdentity(map), _) => with_entry(map, &IdentityKey(None), f),
            (Keyed::ByHeader(_, map), _) => with_entry(map, &HeaderKey(None), f),
        }
    }

    /// Keeps only the entries `keep` holds for.
    pub fn retain(&self, keep: impl Fn(&V) -> bool) {
        match self {
            Keyed::Single(_) => {}
            Keyed::ByAddress(map) => retain(map, keep),
            Keyed::ByIdentity(map) => retain(map, keep),
            Keyed::ByHeader(_, map) => retain(map, keep),
        }
    }

    /// Keys with an entry of their own (1 for a single value).
    pub fn len(&self) -> usize {
        match self {
            Keyed::Single(_) => 1,
            Keyed::ByAddress(map) => map.len(),
            Keyed::ByIdentity(map) => map.len(),
            Keyed::ByHeader(_, map) => map.len(),
        }
    }

    /// Whether there are no entries (never, for a single value).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn with_entry<K: Hash + Eq + Clone, V: Default, R>(
    map: &DashMap<K, V>,
    key: &K,
    f: impl FnOnce(&V) -> R,
) -> R {
    if let Some(value) = map.get(key) {
        return f(&value);
    }
    let value = map.entry(key.clone()).or_default();
    f(&value)
}

fn retain<K: Hash + Eq, V>(map: &DashMap<K, V>, keep: impl Fn(&V) -> bool) {
    map.retain(|_, value| keep(value));
    map.shrink_to_fit();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_header_keys_do_not_share_the_request_buffer() {
        let buffer = bytes::Bytes::from_static(b"acme-and-the-rest-of-a-request");
        let value = HeaderValue::from_maybe_shared(buffer.slice(0..4)).unwrap();
        let key = HeaderKey(Some(value));
        assert_eq!(
            key.0.as_ref().unwrap().as_bytes().as_ptr(),
            buffer.as_ptr(),
            "a parsed value shares the buffer"
        );
        let stored = key.clone();
        assert_eq!(stored, key);
        let stored_bytes = stored.0.as_ref().unwrap().as_bytes();
        assert_ne!(
            stored_bytes.as_ptr(),
            buffer.as_ptr(),
            "the stored key owns a copy"
        );
    }

    #[test]
    fn store_keys_of_different_kinds_and_values_differ() {
        let keys = [
            OwnedKey::None,
            OwnedKey::Address("10.0.0.1".parse().unwrap()),
            OwnedKey::Identity(IdentityKey(None)),
            OwnedKey::Header(HeaderKey(None)),
            OwnedKey::Header(HeaderKey(Some(HeaderValue::from_static("acme")))),
            OwnedKey::Header(HeaderKey(Some(HeaderValue::from_static("-")))),
        ];
        let bytes: std::collections::BTreeSet<Vec<u8>> =
            keys.iter().map(OwnedKey::to_bytes).collect();
        assert_eq!(bytes.len(), keys.len());
    }
}
