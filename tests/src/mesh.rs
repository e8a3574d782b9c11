//! A mesh folder for one test: Services and EndpointSlices in namespace `test`
//! plus any policy YAML, in a temporary directory the control plane reads with
//! `--source dir:PATH`.
//!
//! Each service `NAME` gets port 80 (named `http`) served by the given endpoint
//! addresses and the selector `app: NAME`, so an agent labelled `app=NAME` is one
//! of its pods (and receives its inbound rate limits). Files are replaced
//! atomically (written aside, then renamed) so that a watcher never reads half a file.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The namespace of every service a [`Mesh`] writes.
pub const NAMESPACE: &str = "test";

/// A mesh folder in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct Mesh {
    dir: tempfile::TempDir,
}

impl Mesh {
    /// An empty mesh folder.
    pub fn new() -> io::Result<Mesh> {
        let dir = tempfile::Builder::new().prefix("bulwark-mesh-").tempdir()?;
        Ok(Mesh { dir })
    }

    /// A mesh folder with these services (see [`Mesh::add_service`]).
    pub fn with_services<'a>(
        services: impl IntoIterator<Item = (&'a str, Vec<SocketAddr>)>,
    ) -> io::Result<Mesh> {
        let mesh = Mesh::new()?;
        for (name, endpoints) in services {
            mesh.add_service(name, &endpoints)?;
        }
        Ok(mesh)
    }

    /// The folder (give the control plane `dir:` followed by it).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes (or rewrites) service `name` in namespace `test`: port 80 named
    /// `http`, selector `app: name`, one EndpointSlice per endpoint (so endpoints
    /// may listen on different ports), every endpoint ready. File `service-NAME.yaml`.
    pub fn add_service(&self, name: &str, endpoints: &[SocketAddr]) -> io::Result<()> {
        self.write(&service_file(name), &service_yaml(name, endpoints))
    }

    /// Removes service `name` and its endpoints.
    pub fn remove_service(&self, name: &str) -> io::Result<()> {
        self.remove(&service_file(name))
    }

    /// Writes (or replaces) `file` with `yaml`, e.g. a ResiliencePolicy.
    pub fn write_policy(&self, file: &str, yaml: &str) -> io::Result<()> {
        self.write(file, yaml)
    }

    /// Removes `file` from the folder.
    pub fn remove(&self, file: &str) -> io::Result<()> {
        fs::remove_file(self.file_path(file)?)
    }

    /// Writes `contents` to `file` atomically: the watcher sees the old or the new file, never a mix.
    pub fn write(&self, file: &str, contents: &str) -> io::Result<()> {
        let path = self.file_path(file)?;
        // A name the control plane ignores (not *.yaml), in the same folder so the rename is atomic.
        let aside = self.dir.path().join(format!(".{file}.tmp"));
        fs::write(&aside, contents)?;
        fs::rename(&aside, &path)
    }

    fn file_path(&self, file: &str) -> io::Result<PathBuf> {
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "mesh file name {file:?} must be a plain file name such as reviews-policy.yaml"
                ),
            ));
        }
        Ok(self.dir.path().join(file))
    }
}

fn service_file(name: &str) -> String {
    format!("service-{name}.yaml")
}

/// The YAML of a Service and one EndpointSlice per endpoint.
pub fn service_yaml(name: &str, endpoints: &[SocketAddr]) -> String {
    // A numeric targetPort when every endpoint agrees, so that port-scoped
    // policies (inbound rate limits) resolve to it; otherwise the port name,
    // which resolves through each EndpointSlice.
    let target_port = match endpoints.split_first() {
        Some((first, rest)) if rest.iter().all(|e| e.port() == first.port()) => {
            first.port().to_string()
        }
        Some(_) => "http".to_owned(),
        None => "80".to_owned(),
    };
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  selector:
    app: {name}
  ports:
    - name: http
      port: 80
      targetPort: {target_port}
"
    );
    for (index, endpoint) in endpoints.iter().enumerate() {
        endpoint_slice_yaml(&mut yaml, name, &format!("{name}-{index}"), *endpoint);
    }
    yaml
}

/// One pod of [`service_with_pods_yaml`]: its name, address and labels.
pub type LabelledPod<'a> = (&'a str, SocketAddr, &'a [(&'a str, &'a str)]);

/// The YAML of a Service whose endpoints are Pods with labels (e.g. `shard: a`, `role:
/// primary`), for policies that select endpoints by label: the Service (port 80 named
/// `http`, targetPort by name), and per pod an EndpointSlice pointing at it and the Pod.
pub fn service_with_pods_yaml(name: &str, pods: &[LabelledPod<'_>]) -> String {
    service_with_annotated_pods_yaml(name, pods, &[])
}

/// [`service_with_pods_yaml`] with annotations on some pods: `(pod, key, value)`.
pub fn service_with_annotated_pods_yaml(
    name: &str,
    pods: &[LabelledPod<'_>],
    annotations: &[(&str, &str, &str)],
) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  selector:
    app: {name}
  ports:
    - name: http
      port: 80
      targetPort: http
"
    );
    for (pod, addr, labels) in pods {
        let mut label_yaml = format!("app: {name}");
        for (k, v) in labels.iter() {
            let _ = write!(label_yaml, ", {k}: \"{v}\"");
        }
        let annotation_yaml = annotations
            .iter()
            .filter(|(p, _, _)| p == pod)
            .map(|(_, k, v)| format!("{k}: \"{v}\""))
            .collect::<Vec<_>>()
            .join(", ");
        endpoint_slice_yaml(&mut yaml, name, pod, *addr);
        let _ = write!(
            yaml,
            "---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {NAMESPACE}
  labels: {{{label_yaml}}}
  annotations: {{{annotation_yaml}}}
status:
  podIP: \"{ip}\"
",
            ip = addr.ip(),
        );
    }
    yaml
}

/// Appends an EndpointSlice of Service `service` named `pod` with one ready endpoint,
/// `addr`, whose targetRef is Pod `pod`.
fn endpoint_slice_yaml(yaml: &mut String, service: &str, pod: &str, addr: SocketAddr) {
    let address_type = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    let _ = write!(
        yaml,
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {pod}
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {service}
addressType: {address_type}
ports:
  - name: http
    port: {port}
endpoints:
  - addresses: [\"{ip}\"]
    conditions:
      ready: true
    targetRef:
      kind: Pod
      name: {pod}
      namespace: {NAMESPACE}
",
        port = addr.port(),
        ip = addr.ip(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_with_one_port_gets_a_numeric_target_port_and_a_slice_per_endpoint() {
        let yaml = service_yaml(
            "reviews",
            &[
                "127.0.0.1:9001".parse().unwrap(),
                "127.0.0.2:9001".parse().unwrap(),
            ],
        );
        assert!(yaml.contains("targetPort: 9001\n"), "{yaml}");
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 2);
        assert!(yaml.contains("addresses: [\"127.0.0.2\"]"));
        assert!(yaml.contains("namespace: test"));
    }

    #[test]
    fn endpoints_on_different_ports_use_the_port_name() {
        let yaml = service_yaml(
            "reviews",
            &[
                "127.0.0.1:9001".parse().unwrap(),
                "127.0.0.1:9002".parse().unwrap(),
            ],
        );
        assert!(yaml.contains("targetPort: http\n"), "{yaml}");
        assert!(yaml.contains("port: 9002\n"));
    }

    #[test]
    fn ipv6_endpoints_are_typed() {
        let yaml = service_yaml("v6", &["[::1]:9001".parse().unwrap()]);
        assert!(yaml.contains("addressType: IPv6"));
        assert!(yaml.contains("addresses: [\"::1\"]"));
    }

    #[test]
    fn files_are_written_replaced_and_removed() {
        let mesh =
            Mesh::with_services([("reviews", vec!["127.0.0.1:9001".parse().unwrap()])]).unwrap();
        let service = mesh.path().join("service-reviews.yaml");
        assert!(service.exists());
        mesh.write_policy("policy.yaml", "a: 1\n").unwrap();
        mesh.write_policy("policy.yaml", "a: 2\n").unwrap();
        assert_eq!(
            fs::read_to_string(mesh.path().join("policy.yaml")).unwrap(),
            "a: 2\n"
        );
        let names: Vec<_> = fs::read_dir(mesh.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|name| !name.ends_with(".tmp")),
            "{names:?}"
        );
        mesh.remove("policy.yaml").unwrap();
        mesh.remove_service("reviews").unwrap();
        assert!(!service.exists());
        assert!(mesh.write_policy("../escape.yaml", "").is_err());
    }
}
