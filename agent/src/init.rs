//! `bulwark-agent init`: the pod's redirect rules.
//!
//! The rule set is data ([`RuleSet`]), a pure function of [`InitOptions`], rendered
//! to `iptables-restore` input. Applying it ([`apply`]) picks the host's iptables
//! backend (nft or legacy), fills Bulwark's own chains (declaring a chain in
//! `iptables-restore --noflush` input flushes it, so a second run replaces the
//! rules instead of adding to them) and adds the jumps from the built-in chains
//! only when they are not there yet.

pub mod iptables;

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

pub use iptables::{Backend, BackendChoice, InitError, apply};

/// The UID and GID the agent runs as by default; its own traffic is not redirected.
pub const DEFAULT_AGENT_UID: u32 = 1337;

/// Bulwark's chains in the `nat` table.
pub mod chain {
    /// Inbound TCP (jumped to from `PREROUTING`).
    pub const INBOUND: &str = "BULWARK_INBOUND";
    /// Redirects to the inbound listener.
    pub const IN_REDIRECT: &str = "BULWARK_IN_REDIRECT";
    /// Outbound TCP from local processes (jumped to from `OUTPUT`).
    pub const OUTPUT: &str = "BULWARK_OUTPUT";
    /// Redirects to the outbound listener.
    pub const OUT_REDIRECT: &str = "BULWARK_OUT_REDIRECT";
}

/// IPv4 or IPv6: one `iptables`/`ip6tables` rule set each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// The loopback network of the family.
    fn loopback(self) -> Cidr {
        match self {
            Family::V4 => Cidr {
                addr: IpAddr::from([127, 0, 0, 1]),
                prefix: 32,
            },
            Family::V6 => Cidr {
                addr: IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
                prefix: 128,
            },
        }
    }

    fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// An address range, `ADDR/PREFIX` (a bare address is a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

/// A `--exclude-outbound-cidrs` entry that is not `ADDR[/PREFIX]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid CIDR {0:?}: expected ADDR/PREFIX, e.g. 10.0.0.0/8 or fd00::/8")]
pub struct InvalidCidr(String);

impl FromStr for Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidCidr(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(err)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What `init` redirects and what it leaves alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InitOptions {
    /// The agent's UID: its own connections are never redirected.
    pub agent_uid: u32,
    /// The agent's GID: connections of processes in this group are never redirected.
    pub agent_gid: u32,
    /// The agent's outbound listener port.
    pub outbound_port: u16,
    /// The agent's inbound listener port.
    pub inbound_port: u16,
    /// Other ports of the agent (admin) that reach it directly, never redirected.
    pub agent_ports: Vec<u16>,
    /// Inbound destination ports left alone (e.g. an app's own health port).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ranges left alone.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also install the IPv6 rules.
    pub ipv6: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            agent_uid: DEFAULT_AGENT_UID,
            agent_gid: DEFAULT_AGENT_UID,
            outbound_port: 4140,
            inbound_port: 4143,
            agent_ports: vec![4191],
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            ipv6: true,
        }
    }
}

/// A match of one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `-p tcp`.
    Tcp,
    /// `-p tcp --dport N`.
    DstPort(u16),
    /// `-d CIDR`.
    Dst(Cidr),
    /// `-o IFACE`.
    OutIface(&'static str),
    /// `-m owner --uid-owner N`.
    UidOwner(u32),
    /// `-m owner --gid-owner N`.
    GidOwner(u32),
}

/// What a rule does with a matching packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `-j RETURN`: leave the packet alone.
    Return,
    /// `-j CHAIN`.
    Jump(&'static str),
    /// `-j REDIRECT --to-ports N`.
    Redirect(u16),
}

/// One `-A CHAIN ...` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The chain it is appended to.
    pub chain: &'static str,
    /// Matches, all of which must hold.
    pub matches: Vec<Match>,
    /// The target.
    pub action: Action,
}

impl Rule {
    fn new(chain: &'static str, matches: Vec<Match>, action: Action) -> Self {
        Self {
            chain,
            matches,
            action,
        }
    }

    /// Whether this rule jumps from a built-in chain into one of Bulwark's.
    pub fn is_entry(&self) -> bool {
        matches!(self.chain, "PREROUTING" | "OUTPUT")
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {}", self.chain)?;
        for m in &self.matches {
            match m {
                Match::Tcp => write!(f, " -p tcp")?,
                Match::DstPort(p) => write!(f, " -p tcp -m tcp --dport {p}")?,
                Match::Dst(c) => write!(f, " -d {c}")?,
                Match::OutIface(i) => write!(f, " -o {i}")?,
                Match::UidOwner(u) => write!(f, " -m owner --uid-owner {u}")?,
                Match::GidOwner(g) => write!(f, " -m owner --gid-owner {g}")?,
            }
        }
        match &self.action {
            Action::Return => write!(f, " -j RETURN"),
            Action::Jump(c) => write!(f, " -j {c}"),
            Action::Redirect(p) => write!(f, " -j REDIRECT --to-ports {p}"),
        }
    }
}

/// The `nat` rules of one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// IPv4 or IPv6.
    pub family: Family,
    /// Bulwark's own chains, created (or flushed) before the rules are added.
    pub chains: Vec<&'static str>,
    /// The rules, in order; entry rules (from built-in chains) last.
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The rule set `options` call for in `family`.
    pub fn build(options: &InitOptions, family: Family) -> RuleSet {
        use Action::{Jump, Redirect, Return};
        use Match::{Dst, DstPort, GidOwner, OutIface, Tcp, UidOwner};
        let mut rules = vec![
            Rule::new(
                chain::IN_REDIRECT,
                vec![Tcp],
                Redirect(options.inbound_port),
            ),
            Rule::new(
                chain::OUT_REDIRECT,
                vec![Tcp],
                Redirect(options.outbound_port),
            ),
        ];

        // Inbound: the agent's own ports are reached directly (an admin scrape,
        // a connection that was already redirected), then excluded ports.
        let mut inbound_skip: Vec<u16> = [options.inbound_port, options.outbound_port]
            .into_iter()
            .chain(options.agent_ports.iter().copied())
            .chain(options.exclude_inbound_ports.iter().copied())
            .collect();
        dedup_in_order(&mut inbound_skip);
        for port in inbound_skip {
            rules.push(Rule::new(chain::INBOUND, vec![DstPort(port)], Return));
        }
        rules.push(Rule::new(
            chain::INBOUND,
            vec![Tcp],
            Jump(chain::IN_REDIRECT),
        ));

        // Outbound: the agent's own connections (to endpoints, the control plane,
        // the local app) must not come back to it; loopback stays local, so the
        // app can still reach the agent's outbound listener as an explicit proxy
        // and its own sidecars on localhost.
        rules.push(Rule::new(
            chain::OUTPUT,
            vec![UidOwner(options.agent_uid)],
            Return,
        ));
        rules.push(Rule::new(
            chain::OUTPUT,
            vec![GidOwner(options.agent_gid)],
            Return,
        ));
        rules.push(Rule::new(chain::OUTPUT, vec![OutIface("lo")], Return));
        rules.push(Rule::new(
            chain::OUTPUT,
            vec![Dst(family.loopback())],
            Return,
        ));
        let mut outbound_skip = options.exclude_outbound_ports.clone();
        dedup_in_order(&mut outbound_skip);
        for port in outbound_skip {
            rules.push(Rule::new(chain::OUTPUT, vec![DstPort(port)], Return));
        }
        for cidr in options
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| Family::of(c.addr) == family)
        {
            rules.push(Rule::new(chain::OUTPUT, vec![Dst(*cidr)], Return));
        }
        rules.push(Rule::new(
            chain::OUTPUT,
            vec![Tcp],
            Jump(chain::OUT_REDIRECT),
        ));

        rules.push(Rule::new("PREROUTING", vec![Tcp], Jump(chain::INBOUND)));
        rules.push(Rule::new("OUTPUT", vec![Tcp], Jump(chain::OUTPUT)));
        RuleSet {
            family,
            chains: vec![
                chain::INBOUND,
                chain::IN_REDIRECT,
                chain::OUTPUT,
                chain::OUT_REDIRECT,
            ],
            rules,
        }
    }

    /// `iptables-restore --noflush` input for this rule set. `existing` is the
    /// current `nat` table as `iptables-save -t nat` prints it: entry rules
    /// already there are left out, so running `init` twice adds no duplicates.
    pub fn restore_input(&self, existing: &str) -> String {
        let mut out = String::from("*nat\n");
        for chain in &self.chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            let line = rule.to_string();
            if rule.is_entry() && existing.lines().any(|l| l.trim() == line) {
                continue;
            }
            let _ = writeln!(out, "{line}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

fn dedup_in_order(ports: &mut Vec<u16>) {
    let mut seen = std::collections::HashSet::new();
    ports.retain(|p| seen.insert(*p));
}

/// The rule sets `options` call for: IPv4, and IPv6 when enabled.
pub fn rule_sets(options: &InitOptions) -> Vec<RuleSet> {
    let mut sets = vec![RuleSet::build(options, Family::V4)];
    if options.ipv6 {
        sets.push(RuleSet::build(options, Family::V6));
    }
    sets
}

/// What `--dry-run` prints: each command and the input it would be given.
pub fn render_plan(options: &InitOptions, backend: Backend) -> String {
    let mut out = String::new();
    for set in rule_sets(options) {
        let _ = writeln!(
            out,
            "# {} ({}, {} backend)",
            backend.restore_command(set.family).join(" "),
            set.family.as_str(),
            backend.as_str()
        );
        out.push_str(&set.restore_input(""));
    }
    out
}

#[cfg(test)]
mod tests;
