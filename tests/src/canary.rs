//! A canary set-up for traffic-splitting tests: a parent Service and its two versions
//! (`NAME`, `NAME-v1`, `NAME-v2`), each a Service with one test upstream that says who
//! it is, and a Gateway API route on the parent in the mesh folder.

use crate::assert_eventually;
use crate::harness::{Harness, loopback};
use crate::mesh::{Mesh, NAMESPACE};
use crate::upstream::{Knobs, Upstream};

/// The parent and its two versions.
pub struct Versions {
    /// The parent's name.
    parent: &'static str,
    /// The upstreams of the parent, `-v1` and `-v2`, in this order.
    pub ups: Vec<Upstream>,
}

impl Versions {
    /// Starts healthy upstreams for `parent`, `parent-v1` and `parent-v2`.
    pub async fn start(parent: &'static str) -> Versions {
        let mut ups = Vec::new();
        for name in [
            parent.to_owned(),
            format!("{parent}-v1"),
            format!("{parent}-v2"),
        ] {
            ups.push(
                Upstream::start(loopback(), &name, Knobs::healthy())
                    .await
                    .expect("upstream starts"),
            );
        }
        Versions { parent, ups }
    }

    /// A mesh folder with one Service per upstream.
    pub fn mesh(&self) -> Mesh {
        Mesh::with_services(self.ups.iter().map(|u| (u.name(), vec![u.addr()])))
            .expect("a temporary mesh folder")
    }

    /// The routes the agent has in force on the parent's port 80.
    pub async fn routes(&self, h: &Harness) -> serde_json::Value {
        let destination = format!("{}.{NAMESPACE}:80", self.parent);
        let config = h.config().await;
        config["config"]["destinations"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == destination))
            .map(|d| d["routes"].clone())
            .unwrap_or_default()
    }

    /// Starts the control plane and agent on the mesh with `route_yaml`, once the agent
    /// has the route.
    pub async fn harness(&self, route_yaml: &str) -> Harness {
        let mesh = self.mesh();
        mesh.write("route.yaml", route_yaml)
            .expect("the mesh folder is writable");
        let h = Harness::start(mesh).await;
        assert_eventually!(
            self.routes(&h)
                .await
                .as_array()
                .is_some_and(|r| !r.is_empty())
        );
        h
    }
}

/// A route of `kind` (`HTTPRoute`, `GRPCRoute`) named `PARENT-canary` on Service
/// `parent`'s port 80, with these `rules` lines.
pub fn route(kind: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata:
  name: {parent}-canary
  namespace: {NAMESPACE}
spec:
  parentRefs:
    - group: \"\"
      kind: Service
      name: {parent}
      port: 80
  rules:
{rules}"
    )
}
