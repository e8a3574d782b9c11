//! The crypto provider of every TLS connection and certificate key in the mesh, in one
//! place for both sides: agent to agent, agent to control plane, the webhook and the
//! control plane's Kubernetes client all build their rustls configurations from
//! [`provider()`], so that the key exchange both ends offer cannot drift apart.
//!
//! The provider is aws-lc-rs, because it is the only built-in rustls provider with the
//! hybrid post-quantum key exchange X25519MLKEM768 (X25519 and ML-KEM-768 together: the
//! session keys stay secret unless both break). Mesh traffic recorded today cannot then
//! be decrypted later with a quantum computer ("harvest now, decrypt later"). The
//! measurements and the choice are in docs/benchmarks.md, "Post-quantum key exchange".

use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};

/// The key-exchange groups offered and accepted, most preferred first.
///
/// - X25519MLKEM768 first: two agents of this build always agree on it.
/// - X25519 next: an older agent built with *ring* offers it first, so it negotiates
///   X25519 with no HelloRetryRequest; and our ClientHello carries an X25519 key share
///   beside the hybrid one (rustls sends the hybrid's classical half for free), so an
///   X25519-only server answers in one round trip too.
/// - P-256 and P-384 last, for peers that are not ours: a Kubernetes API server calling
///   the webhook, or the one the control plane watches, may offer only NIST curves (a
///   build for FIPS). Listing them costs a few bytes of the ClientHello, no key share.
///
/// The list is explicit rather than rustls's defaults so that a dependency's feature
/// change (e.g. `prefer-post-quantum` turned off) cannot silently demote the hybrid.
pub const KX_GROUPS: &[&dyn SupportedKxGroup] = &[
    kx_group::X25519MLKEM768,
    kx_group::X25519,
    kx_group::SECP256R1,
    kx_group::SECP384R1,
];

/// The mesh's crypto provider: aws-lc-rs with the key-exchange groups of [`KX_GROUPS`].
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        kx_groups: KX_GROUPS.to_vec(),
        ..aws_lc_rs::default_provider()
    }
}

/// The key-exchange group a finished handshake used, as a bounded metric label: one of
/// [`KX_GROUPS`]'s names, `other`, or `none` if the handshake used none.
pub fn group_label(group: Option<&dyn SupportedKxGroup>) -> &'static str {
    use rustls::NamedGroup;
    match group.map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hybrid_group_is_preferred_and_x25519_offered() {
        let names: Vec<_> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            names[..2],
            [
                rustls::NamedGroup::X25519MLKEM768,
                rustls::NamedGroup::X25519
            ]
        );
        // Every group has its own label, so the metric stays bounded and readable.
        for group in KX_GROUPS {
            assert_ne!(group_label(Some(*group)), "other");
        }
        assert_eq!(group_label(None), "none");
    }
}
