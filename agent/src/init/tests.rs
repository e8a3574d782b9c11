use std::path::PathBuf;

use super::iptables::{choose_backend, count_rules, has_net_admin};
use super::*;

/// Compares `actual` with the golden file `name`; `BULWARK_BLESS=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/init/golden")
        .join(name);
    if std::env::var_os("BULWARK_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with BULWARK_BLESS=1", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs (BULWARK_BLESS=1 rewrites it)",
        path.display()
    );
}

#[test]
fn default_rules_for_both_backends() {
    let options = InitOptions::default();
    golden("defaults-nft.txt", &render_plan(&options, Backend::Nft));
    golden(
        "defaults-legacy.txt",
        &render_plan(&options, Backend::Legacy),
    );
}

#[test]
fn exclusions_and_custom_ids() {
    let options = InitOptions {
        agent_uid: 2102,
        agent_gid: 2103,
        outbound_port: 15001,
        inbound_port: 15006,
        agent_ports: vec![15020, 15001],
        exclude_inbound_ports: vec![22, 8081],
        exclude_outbound_ports: vec![3306, 3306],
        exclude_outbound_cidrs: vec![
            "169.254.169.254/32".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ],
        ipv6: true,
    };
    golden("exclusions-nft.txt", &render_plan(&options, Backend::Nft));
}

#[test]
fn ipv4_only() {
    let options = InitOptions {
        ipv6: false,
        ..InitOptions::default()
    };
    let plan = render_plan(&options, Backend::Legacy);
    golden("ipv4-only-legacy.txt", &plan);
    assert!(!plan.contains("ip6tables"));
}

#[test]
fn cidrs_go_to_their_own_family() {
    let options = InitOptions {
        exclude_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        ..InitOptions::default()
    };
    let v4 = RuleSet::build(&options, Family::V4).restore_input("");
    let v6 = RuleSet::build(&options, Family::V6).restore_input("");
    assert!(v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"));
    assert!(v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0/8"));
    assert!(v6.contains("-d ::1/128 -j RETURN"));
}

#[test]
fn entry_rules_already_installed_are_not_added_again() {
    let set = RuleSet::build(&InitOptions::default(), Family::V4);
    let fresh = set.restore_input("");
    assert!(fresh.contains("-A OUTPUT -p tcp -j BULWARK_OUTPUT\n"));
    // What iptables-save prints after a first run.
    let existing = "*nat\n:PREROUTING ACCEPT [0:0]\n:BULWARK_OUTPUT - [0:0]\n\
        -A PREROUTING -p tcp -j BULWARK_INBOUND\n-A OUTPUT -p tcp -j BULWARK_OUTPUT\nCOMMIT\n";
    let again = set.restore_input(existing);
    assert!(!again.contains("-A OUTPUT -p tcp -j BULWARK_OUTPUT"));
    assert!(!again.contains("-A PREROUTING"));
    // Bulwark's own chains are declared (and so flushed) and refilled every time.
    assert!(again.contains(":BULWARK_OUTPUT - [0:0]\n"));
    assert!(again.contains("-A BULWARK_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 4140"));
}

#[test]
fn parses_cidrs() {
    assert_eq!(
        "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
        "10.0.0.0/8"
    );
    assert_eq!(
        "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
        "10.1.2.3/32"
    );
    assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    assert!("nonsense/8".parse::<Cidr>().is_err());
}

#[test]
fn picks_the_backend_holding_rules() {
    assert_eq!(choose_backend(Some(0), Some(0)), Some(Backend::Nft));
    assert_eq!(choose_backend(Some(3), Some(12)), Some(Backend::Legacy));
    assert_eq!(choose_backend(Some(12), Some(3)), Some(Backend::Nft));
    assert_eq!(choose_backend(None, Some(0)), Some(Backend::Legacy));
    assert_eq!(choose_backend(Some(0), None), Some(Backend::Nft));
    assert_eq!(choose_backend(None, None), None);
    assert_eq!(
        count_rules("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j X\n-A Y -j RETURN\nCOMMIT\n"),
        2
    );
}

#[test]
fn reads_net_admin_from_proc_status() {
    assert!(has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n"));
    assert!(has_net_admin("CapEff:\t0000000000001000\n"));
    assert!(!has_net_admin("CapEff:\t0000000000000000\n"));
    assert!(!has_net_admin("Name:\tx\n"));
}
