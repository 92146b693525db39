//! `ferry iptables`: the pod's init step, the job Istio's `istio-iptables` init container does.
//! It owns the nat-table rules that steer a pod's TCP traffic into the sidecar — outbound to
//! 15001, inbound to 15006 — while the proxy's own traffic (its uid/gid), loopback traffic and
//! the configured exclusions pass untouched. The rules live in chains named like Istio's
//! (`ISTIO_INBOUND`, `ISTIO_IN_REDIRECT`, `ISTIO_OUTPUT`, `ISTIO_REDIRECT`) so existing tooling
//! recognises them. [`rules`] renders them without touching the system (unit tests and
//! `--dry-run`); [`run`] applies them through `iptables-restore --noflush` in one atomic
//! transaction that recreates Ferry's chains and replaces the jumps into them, so a second run
//! yields exactly the same rule set; `--cleanup` removes all of it the same way.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::{IpNet, Ipv4Net};

/// Inbound traffic enters here from `PREROUTING`.
pub const CHAIN_INBOUND: &str = "ISTIO_INBOUND";
/// Redirects to the inbound capture port.
pub const CHAIN_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// Locally generated traffic enters here from `OUTPUT`.
pub const CHAIN_OUTPUT: &str = "ISTIO_OUTPUT";
/// Redirects to the outbound capture port.
pub const CHAIN_REDIRECT: &str = "ISTIO_REDIRECT";
/// DNS capture: the app's queries to its resolvers go to the agent's DNS
/// proxy (nat), and DNS flows get their conntrack zones (raw).
pub const CHAIN_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";

/// Every chain Ferry owns in the nat table, in the order they are rendered.
pub const CHAINS: [&str; 5] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
    CHAIN_OUTPUT_DNS,
];

/// The chains Ferry owns in the raw table (DNS capture only).
pub const RAW_CHAINS: [&str; 2] = [CHAIN_OUTPUT_DNS, CHAIN_INBOUND];

/// The agent's DNS proxy port.
pub const DNS_PROXY_PORT: u16 = 15053;

/// The proxy's own listeners. Inbound connections to them must reach them directly (health
/// probes, metrics scrapes, HBONE), so they are never redirected whatever the flags say.
pub const PROXY_PORTS: [u16; 8] = [15000, 15001, 15004, 15006, 15008, 15020, 15021, 15090];

/// HBONE: the proxy's tunnel port, exempt from the loopback hairpin like Istio does.
const HBONE_PORT: u16 = 15008;

/// `-m multiport` accepts at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// Binaries tried, in order, when `--iptables-bin` is not given.
const IPTABLES_CANDIDATES: [&str; 3] = ["iptables", "iptables-nft", "iptables-legacy"];

/// A boolean as Istio's Go tools read their flags and environment
/// (`strconv.ParseBool`): 1, t, T, TRUE, true, True and their false forms.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// Options of `ferry iptables`, spelled like Istio's `istio-iptables` so manifests carry over.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct IptablesArgs {
    /// User id the proxy runs as; its traffic is never captured.
    #[arg(long, short = 'u', default_value_t = 1337)]
    pub proxy_uid: u32,

    /// Group id the proxy runs as; its traffic is never captured.
    #[arg(long, short = 'g', default_value_t = 1337)]
    pub proxy_gid: u32,

    /// Port outbound TCP traffic is redirected to.
    #[arg(long, short = 'p', default_value_t = 15001)]
    pub outbound_port: u16,

    /// Port inbound TCP traffic is redirected to.
    #[arg(long, short = 'z', default_value_t = 15006)]
    pub inbound_port: u16,

    /// Comma-separated CIDRs whose outbound traffic is captured; `*` for all, empty for none.
    #[arg(long, short = 'i', default_value = "*")]
    pub include_outbound_ip_ranges: String,

    /// Comma-separated CIDRs whose outbound traffic bypasses the proxy.
    #[arg(long, short = 'x', default_value = "")]
    pub exclude_outbound_ip_ranges: String,

    /// Comma-separated inbound ports that are captured; `*` for all, empty for none.
    #[arg(long, short = 'b', default_value = "*")]
    pub include_inbound_ports: String,

    /// Comma-separated inbound ports that bypass the proxy (the proxy's own ports always do).
    #[arg(long, short = 'd', default_value = "")]
    pub exclude_inbound_ports: String,

    /// Comma-separated destination ports whose outbound traffic bypasses the proxy.
    #[arg(long, short = 'o', default_value = "")]
    pub exclude_outbound_ports: String,

    /// Also program ip6tables.
    #[arg(long)]
    pub ipv6: bool,

    /// Capture the app's DNS (UDP and TCP 53 to the resolvers of
    /// --resolv-conf) into the sidecar's DNS proxy on 15053, as istio-iptables
    /// does with `ISTIO_META_DNS_CAPTURE`.
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_go_bool)]
    pub redirect_dns: bool,

    /// With --redirect-dns: capture DNS to any address, not only the resolvers.
    #[arg(long, env = "CAPTURE_ALL_DNS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_go_bool)]
    pub capture_all_dns: bool,

    /// Where the pod's resolvers are listed (for --redirect-dns).
    #[arg(long, default_value = "/etc/resolv.conf", value_name = "PATH")]
    pub resolv_conf: PathBuf,

    /// Print the iptables-restore input and change nothing (with --cleanup:
    /// what removing the current rules would run).
    #[arg(long)]
    pub dry_run: bool,

    /// Remove Ferry's chains and the jumps into them.
    #[arg(long)]
    pub cleanup: bool,

    /// iptables binary to use; its `-save`/`-restore` siblings are used too. Default: the
    /// first of `iptables`, `iptables-nft`, `iptables-legacy` that works.
    #[arg(long, value_name = "PATH")]
    pub iptables_bin: Option<PathBuf>,
}

impl Default for IptablesArgs {
    /// The same defaults the command line has.
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            include_outbound_ip_ranges: "*".to_owned(),
            exclude_outbound_ip_ranges: String::new(),
            include_inbound_ports: "*".to_owned(),
            exclude_inbound_ports: String::new(),
            exclude_outbound_ports: String::new(),
            ipv6: false,
            redirect_dns: false,
            capture_all_dns: false,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            dry_run: false,
            cleanup: false,
            iptables_bin: None,
        }
    }
}

/// Why `ferry iptables` failed. Flag errors name the flag; command errors carry the
/// command's stderr verbatim.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{flag}: {value:?} is not a valid CIDR: {reason}")]
    InvalidCidr {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{flag}: {value:?} is not a valid port (expected 1-65535)")]
    InvalidPort { flag: &'static str, value: String },
    #[error("{flag}: {reason}")]
    InvalidFlag { flag: &'static str, reason: String },
    #[error("no working iptables found ({tried})")]
    NoIptables { tried: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
        /// What was fed on stdin (the restore input), for the log; kept out of the message.
        input: Option<String>,
    },
    #[error("cannot write the rules: {0}")]
    Output(#[source] io::Error),
}

/// The nat-table rules of one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    /// `true` for ip6tables.
    pub ipv6: bool,
    /// Ferry's chains with their rules (`-A CHAIN ...` lines), in [`CHAINS`] order.
    pub chains: Vec<(&'static str, Vec<String>)>,
    /// Jumps from the built-in chains into Ferry's chains (`-A OUTPUT -p tcp -j ISTIO_OUTPUT`).
    pub jumps: Vec<String>,
    /// The raw table's chains (DNS conntrack zones; empty without DNS capture).
    pub raw: Vec<(&'static str, Vec<String>)>,
    /// Jumps into the raw chains.
    pub raw_jumps: Vec<String>,
}

impl TableRules {
    /// The `iptables-restore --noflush` input that installs these rules. Declaring a chain
    /// flushes it under `--noflush` (or creates it), so Ferry's chains are rebuilt from scratch;
    /// `stale` lists jump rules to delete first (as `iptables-save` printed them), so the jumps
    /// exist exactly once afterwards. It all happens in one atomic commit.
    pub fn restore_input(&self, stale: &[String]) -> String {
        self.restore_input_removing(stale, &[])
    }

    /// [`TableRules::restore_input`], also removing Ferry's chains `present`
    /// from an earlier run that these rules no longer have (the DNS chain
    /// after DNS capture was turned off); nothing jumps to them any more
    /// once their callers are rebuilt.
    pub fn restore_input_removing(&self, stale: &[String], present: &[&str]) -> String {
        let mut out = String::from("*nat\n");
        for (chain, _) in &self.chains {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in stale {
            out.push_str(&delete_form(rule));
            out.push('\n');
        }
        for (_, rules) in &self.chains {
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
        }
        for jump in &self.jumps {
            out.push_str(jump);
            out.push('\n');
        }
        let obsolete: Vec<&&str> = present
            .iter()
            .filter(|c| !self.chains.iter().any(|(own, _)| own == *c))
            .collect();
        for chain in &obsolete {
            out.push_str(&format!("-F {chain}\n"));
        }
        for chain in &obsolete {
            out.push_str(&format!("-X {chain}\n"));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// The raw table's part of the transaction: Ferry's raw chains rebuilt
    /// (after deleting `stale` jumps), or, without DNS capture, the chains
    /// `present` from an earlier run removed. `None` when there is nothing
    /// to do.
    pub fn raw_restore_input(&self, stale: &[String], present: &[&str]) -> Option<String> {
        if self.raw.is_empty() && stale.is_empty() && present.is_empty() {
            return None;
        }
        let mut out = String::from("*raw\n");
        if self.raw.is_empty() {
            for rule in stale {
                out.push_str(&delete_form(rule));
                out.push('\n');
            }
            for chain in present {
                out.push_str(&format!("-F {chain}\n"));
            }
            for chain in present {
                out.push_str(&format!("-X {chain}\n"));
            }
        } else {
            for (chain, _) in &self.raw {
                out.push_str(&format!(":{chain} - [0:0]\n"));
            }
            for rule in stale {
                out.push_str(&delete_form(rule));
                out.push('\n');
            }
            for (_, rules) in &self.raw {
                for rule in rules {
                    out.push_str(rule);
                    out.push('\n');
                }
            }
            for jump in &self.raw_jumps {
                out.push_str(jump);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
        Some(out)
    }
}

/// Everything `ferry iptables` installs: the IPv4 nat table, and the IPv6 one with `--ipv6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub ipv4: TableRules,
    pub ipv6: Option<TableRules>,
}

impl fmt::Display for RuleSet {
    /// The dry-run text: restore input for a pod with no Ferry rules yet. Headers are comments,
    /// which `iptables-restore` skips, so the IPv4 part can be piped straight into it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("# iptables-restore --noflush\n")?;
        f.write_str(&self.ipv4.restore_input(&[]))?;
        if let Some(raw) = self.ipv4.raw_restore_input(&[], &[]) {
            f.write_str(&raw)?;
        }
        if let Some(v6) = &self.ipv6 {
            f.write_str("# ip6tables-restore --noflush\n")?;
            f.write_str(&v6.restore_input(&[]))?;
            if let Some(raw) = v6.raw_restore_input(&[], &[]) {
                f.write_str(&raw)?;
            }
        }
        Ok(())
    }
}

/// Renders the rules for `args` without touching the system.
pub fn rules(args: &IptablesArgs) -> Result<RuleSet, IptablesError> {
    let config = Config::parse(args)?;
    if !args.ipv6 {
        // Istio ignores IPv6 ranges when only IPv4 is programmed; do the same, but say so.
        let included = match &config.include_ranges {
            Include::All => &[][..],
            Include::Only(cidrs) => cidrs,
        };
        let ignored: Vec<String> = included
            .iter()
            .chain(&config.exclude_ranges)
            .filter(|c| c.family() == Family::V6)
            .map(Cidr::to_string)
            .collect();
        if !ignored.is_empty() {
            tracing::warn!(iptables.ranges = %ignored.join(","), "IPv6 ranges ignored without --ipv6");
        }
    }
    Ok(RuleSet {
        ipv4: config.table(Family::V4),
        ipv6: args.ipv6.then(|| config.table(Family::V6)),
    })
}

/// Runs `ferry iptables`: prints the rules (`--dry-run`), removes them (`--cleanup`) or applies
/// them. The dry-run text goes to stdout.
pub fn run(args: &IptablesArgs) -> Result<(), IptablesError> {
    run_with_output(args, &mut io::stdout().lock())
}

/// [`run`] with the dry-run text written to `out` instead of stdout.
pub fn run_with_output(args: &IptablesArgs, out: &mut dyn Write) -> Result<(), IptablesError> {
    if args.cleanup {
        // Cleanup takes no rule options, but a bad flag still deserves an error rather than
        // silence, so the same validation runs first.
        Config::parse(args)?;
        let removal = cleanup(args)?;
        if args.dry_run {
            out.write_all(removal.as_bytes())
                .and_then(|()| out.flush())
                .map_err(IptablesError::Output)?;
        }
        return Ok(());
    }
    let set = rules(args)?;
    if args.dry_run {
        // The rules are this command's output, not a log line: they go to stdout verbatim.
        out.write_all(set.to_string().as_bytes())
            .and_then(|()| out.flush())
            .map_err(IptablesError::Output)?;
        return Ok(());
    }
    let v4 = Backend::detect(args.iptables_bin.as_deref())?;
    apply(&v4, &set.ipv4)?;
    if let Some(rules) = &set.ipv6 {
        apply(&v4.ipv6()?, rules)?;
    }
    Ok(())
}

fn apply(backend: &Backend, rules: &TableRules) -> Result<(), IptablesError> {
    let current = backend.save()?;
    let stale = jumps_into_own_chains(&current);
    let mut input = rules.restore_input_removing(&stale, &own_chains_present(&current));
    // The raw table is only read when DNS capture wants it or an earlier
    // run left chains there.
    let raw = backend.save_table("raw").unwrap_or_default();
    let raw_stale = jumps_into(&raw, "*raw", &RAW_CHAINS);
    let raw_present = chains_present(&raw, "*raw", &RAW_CHAINS);
    if let Some(r) = rules.raw_restore_input(&raw_stale, &raw_present) {
        input.push_str(&r);
    }
    tracing::debug!(iptables.bin = %backend.iptables.display(), iptables.input = %input, "applying nat rules");
    backend.restore(&input)?;
    tracing::info!(
        iptables.bin = %backend.iptables.display(),
        iptables.rules = rules.chains.iter().map(|(_, r)| r.len()).sum::<usize>() + rules.jumps.len(),
        "traffic capture rules installed"
    );
    Ok(())
}

/// Removes Ferry's rules and returns the iptables-restore input that did
/// it; with `--dry-run` only returns it (read from the current rules) and
/// changes nothing.
fn cleanup(args: &IptablesArgs) -> Result<String, IptablesError> {
    let v4 = Backend::detect(args.iptables_bin.as_deref())?;
    let mut removal = cleanup_table(&v4, args.dry_run)?;
    // Rules from an earlier `--ipv6` run must go even if this run forgot the flag, so IPv6 is
    // always attempted; without the flag a host lacking ip6tables is not an error.
    match v4.ipv6().and_then(|v6| cleanup_table(&v6, args.dry_run)) {
        Ok(v6) => {
            removal.push_str(&v6);
            Ok(removal)
        }
        Err(e) if !args.ipv6 => {
            tracing::debug!(error = %e, "skipping ip6tables cleanup");
            Ok(removal)
        }
        Err(e) => Err(e),
    }
}

/// The iptables-restore inputs that remove Ferry's rules from what
/// `backend` holds now: the raw table's, then the nat table's (either may
/// be absent when there is nothing to remove).
fn cleanup_inputs(backend: &Backend) -> Result<(Option<String>, Option<String>), IptablesError> {
    let current = backend.save()?;
    let stale = jumps_into_own_chains(&current);
    let present = own_chains_present(&current);
    let raw = backend.save_table("raw").unwrap_or_default();
    let raw_cleanup = TableRules {
        ipv6: false,
        chains: Vec::new(),
        jumps: Vec::new(),
        raw: Vec::new(),
        raw_jumps: Vec::new(),
    }
    .raw_restore_input(
        &jumps_into(&raw, "*raw", &RAW_CHAINS),
        &chains_present(&raw, "*raw", &RAW_CHAINS),
    );
    if stale.is_empty() && present.is_empty() {
        return Ok((raw_cleanup, None));
    }
    // Jumps first, then flush every chain before deleting any: Ferry's chains jump into each
    // other, and a chain still referenced cannot be deleted.
    let mut input = String::from("*nat\n");
    for rule in &stale {
        input.push_str(&delete_form(rule));
        input.push('\n');
    }
    for chain in &present {
        input.push_str(&format!("-F {chain}\n"));
    }
    for chain in &present {
        input.push_str(&format!("-X {chain}\n"));
    }
    input.push_str("COMMIT\n");
    Ok((raw_cleanup, Some(input)))
}

/// Removes Ferry's rules from one family's tables (unless `dry_run`);
/// returns the iptables-restore input for it.
fn cleanup_table(backend: &Backend, dry_run: bool) -> Result<String, IptablesError> {
    let (raw, nat) = cleanup_inputs(backend)?;
    let text = format!(
        "{}{}",
        raw.as_deref().unwrap_or_default(),
        nat.as_deref().unwrap_or_default()
    );
    if dry_run {
        return Ok(text);
    }
    if let Some(r) = raw {
        tracing::debug!(iptables.input = %r, "removing raw rules");
        backend.restore(&r)?;
    }
    let Some(input) = nat else {
        tracing::info!(iptables.bin = %backend.iptables.display(), "no capture rules to remove");
        return Ok(text);
    };
    tracing::debug!(iptables.bin = %backend.iptables.display(), iptables.input = %input, "removing nat rules");
    backend.restore(&input)?;
    tracing::info!(iptables.bin = %backend.iptables.display(), "capture rules removed");
    Ok(text)
}

/// Turns a saved `-A CHAIN spec` line into `-D CHAIN spec`, which deletes that exact rule.
fn delete_form(rule: &str) -> String {
    match rule.strip_prefix("-A ") {
        Some(rest) => format!("-D {rest}"),
        None => rule.to_owned(),
    }
}

/// The lines of one table's section (`*nat`, `*raw`) of `iptables-save` output.
fn table_section<'a>(save: &'a str, table: &'a str) -> impl Iterator<Item = &'a str> {
    save.lines()
        .map(str::trim)
        .skip_while(move |l| *l != table)
        .skip(1)
        .take_while(|l| *l != "COMMIT")
}

/// Rules outside Ferry's chains that jump (or go) to one of them, as `iptables-save` prints them.
fn jumps_into_own_chains(save: &str) -> Vec<String> {
    jumps_into(save, "*nat", &CHAINS)
}

fn jumps_into(save: &str, table: &str, chains: &[&str]) -> Vec<String> {
    table_section(save, table)
        .filter(|line| {
            let words = split_words(line);
            let from_own = words.get(1).is_some_and(|c| chains.contains(&c.as_str()));
            words.first().is_some_and(|w| w == "-A")
                && !from_own
                && words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && chains.contains(&w[1].as_str()))
        })
        .map(str::to_owned)
        .collect()
}

/// Ferry's chains that exist in the saved nat table.
fn own_chains_present(save: &str) -> Vec<&'static str> {
    chains_present(save, "*nat", &CHAINS)
}

fn chains_present(save: &str, table: &str, chains: &[&'static str]) -> Vec<&'static str> {
    let declared: BTreeSet<&str> = table_section(save, table)
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    chains
        .iter()
        .copied()
        .filter(|c| declared.contains(c))
        .collect()
}

/// Splits a saved rule into words, keeping double-quoted strings (comments) whole so a
/// comment mentioning a chain name is not taken for a jump.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_quotes => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

// ---------------------------------------------------------------------------------------------
// Validated options and rendering.

const FLAG_INCLUDE_RANGES: &str = "--include-outbound-ip-ranges (-i)";
const FLAG_EXCLUDE_RANGES: &str = "--exclude-outbound-ip-ranges (-x)";
const FLAG_INCLUDE_INBOUND: &str = "--include-inbound-ports (-b)";
const FLAG_EXCLUDE_INBOUND: &str = "--exclude-inbound-ports (-d)";
const FLAG_EXCLUDE_OUTBOUND: &str = "--exclude-outbound-ports (-o)";
const FLAG_OUTBOUND_PORT: &str = "--outbound-port (-p)";
const FLAG_INBOUND_PORT: &str = "--inbound-port (-z)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// Loopback destinations that never leave the pod and are never captured.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// Source address the proxy binds when it hands an inbound connection to the app over lo
    /// (Istio's "inbound passthrough" address); such connections must not loop back into it.
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

/// A prefix of `--include-ranges` / `--exclude-ranges`, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr(IpNet);

impl Cidr {
    fn family(&self) -> Family {
        match self.0 {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// Two prefixes overlap exactly when one contains the other.
    fn overlaps(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0) || other.0.contains(&self.0)
    }

    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a host route). Host bits are cleared,
    /// which is what iptables stores anyway, so the rendered rules match `iptables-save`.
    fn parse(flag: &'static str, text: &str) -> Result<Cidr, IptablesError> {
        let invalid = |reason: String| IptablesError::InvalidCidr {
            flag,
            value: text.to_owned(),
            reason,
        };
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| invalid(format!("{addr:?} is not an IP address")))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let net = match len {
            None => IpNet::from(ip),
            Some(len) => len
                .parse::<u8>()
                .ok()
                .and_then(|len| IpNet::new(ip, len).ok())
                .ok_or_else(|| invalid(format!("prefix length must be 0-{max}")))?,
        };
        Ok(Cidr(net.trunc()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An include list: `*` or explicit entries (possibly none).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Include<T> {
    All,
    Only(Vec<T>),
}

/// Comma-separated items, trimmed, empty ones (a trailing comma) dropped.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_cidrs(flag: &'static str, value: &str) -> Result<Vec<Cidr>, IptablesError> {
    items(value)
        .map(|item| {
            if item == "*" {
                Err(IptablesError::InvalidFlag {
                    flag,
                    reason: "`*` is only meaningful in an include list".to_owned(),
                })
            } else {
                Cidr::parse(flag, item)
            }
        })
        .collect()
}

fn parse_include_cidrs(flag: &'static str, value: &str) -> Result<Include<Cidr>, IptablesError> {
    if value.trim() == "*" {
        return Ok(Include::All);
    }
    if items(value).any(|i| i == "*") {
        return Err(IptablesError::InvalidFlag {
            flag,
            reason: "`*` cannot be combined with other entries".to_owned(),
        });
    }
    parse_cidrs(flag, value).map(Include::Only)
}

fn parse_port(flag: &'static str, text: &str) -> Result<u16, IptablesError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| IptablesError::InvalidPort {
            flag,
            value: text.to_owned(),
        })
}

fn parse_ports(flag: &'static str, value: &str) -> Result<Vec<u16>, IptablesError> {
    let mut ports = Vec::new();
    for item in items(value) {
        if item == "*" {
            return Err(IptablesError::InvalidFlag {
                flag,
                reason: "`*` is only meaningful in an include list".to_owned(),
            });
        }
        let port = parse_port(flag, item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

fn parse_include_ports(flag: &'static str, value: &str) -> Result<Include<u16>, IptablesError> {
    if value.trim() == "*" {
        return Ok(Include::All);
    }
    if items(value).any(|i| i == "*") {
        return Err(IptablesError::InvalidFlag {
            flag,
            reason: "`*` cannot be combined with other entries".to_owned(),
        });
    }
    parse_ports(flag, value).map(Include::Only)
}

/// The options after validation.
#[derive(Debug)]
struct Config {
    uid: u32,
    gid: u32,
    outbound_port: u16,
    inbound_port: u16,
    include_ranges: Include<Cidr>,
    exclude_ranges: Vec<Cidr>,
    include_inbound: Include<u16>,
    /// Excluded inbound ports, the proxy's own first.
    exclude_inbound: Vec<u16>,
    exclude_outbound: Vec<u16>,
    /// DNS capture, when on.
    dns: Option<DnsCapture>,
}

/// What istio-iptables' DNS capture redirects: the resolvers of the pod's
/// resolv.conf, or all of port 53.
#[derive(Debug, Clone, Default)]
struct DnsCapture {
    all: bool,
    servers: Vec<IpAddr>,
}

impl DnsCapture {
    fn servers(&self, family: Family) -> Vec<String> {
        self.servers
            .iter()
            .filter(|ip| match family {
                Family::V4 => ip.is_ipv4(),
                Family::V6 => ip.is_ipv6(),
            })
            .map(|ip| match ip {
                IpAddr::V4(a) => format!("{a}/32"),
                IpAddr::V6(a) => format!("{a}/128"),
            })
            .collect()
    }

    /// Whether this family's DNS is captured at all.
    fn captures(&self, family: Family) -> bool {
        self.all || !self.servers(family).is_empty()
    }
}

impl Config {
    fn parse(args: &IptablesArgs) -> Result<Config, IptablesError> {
        let (outbound_port, inbound_port) = (args.outbound_port, args.inbound_port);
        for (flag, port) in [
            (FLAG_OUTBOUND_PORT, outbound_port),
            (FLAG_INBOUND_PORT, inbound_port),
        ] {
            if port == 0 {
                return Err(IptablesError::InvalidPort {
                    flag,
                    value: port.to_string(),
                });
            }
        }
        if outbound_port == inbound_port {
            return Err(IptablesError::InvalidFlag {
                flag: FLAG_INBOUND_PORT,
                reason: format!("must differ from {FLAG_OUTBOUND_PORT} ({outbound_port})"),
            });
        }
        // The capture ports themselves are the proxy's too, even when moved off the defaults.
        let mut exclude_inbound: Vec<u16> = PROXY_PORTS.to_vec();
        for port in [outbound_port, inbound_port].into_iter().chain(parse_ports(
            FLAG_EXCLUDE_INBOUND,
            &args.exclude_inbound_ports,
        )?) {
            if !exclude_inbound.contains(&port) {
                exclude_inbound.push(port);
            }
        }
        let dns = if args.redirect_dns {
            let servers = if args.capture_all_dns {
                Vec::new()
            } else {
                let text = std::fs::read_to_string(&args.resolv_conf).map_err(|e| {
                    IptablesError::InvalidFlag {
                        flag: "--resolv-conf",
                        reason: format!("failed to load {}: {e}", args.resolv_conf.display()),
                    }
                })?;
                crate::resolv_conf::ResolvConf::parse(&text).nameservers
            };
            if !args.capture_all_dns && servers.is_empty() {
                tracing::warn!(
                    "DNS capture requested, but not CAPTURE_ALL_DNS and no DNS servers in the resolv.conf: DNS capture disabled"
                );
                None
            } else {
                Some(DnsCapture {
                    all: args.capture_all_dns,
                    servers,
                })
            }
        } else {
            None
        };
        Ok(Config {
            dns,
            uid: args.proxy_uid,
            gid: args.proxy_gid,
            outbound_port,
            inbound_port,
            include_ranges: parse_include_cidrs(
                FLAG_INCLUDE_RANGES,
                &args.include_outbound_ip_ranges,
            )?,
            exclude_ranges: parse_cidrs(FLAG_EXCLUDE_RANGES, &args.exclude_outbound_ip_ranges)?,
            include_inbound: parse_include_ports(
                FLAG_INCLUDE_INBOUND,
                &args.include_inbound_ports,
            )?,
            exclude_inbound,
            exclude_outbound: parse_ports(FLAG_EXCLUDE_OUTBOUND, &args.exclude_outbound_ports)?,
        })
    }

    fn table(&self, family: Family) -> TableRules {
        let in_family = |c: &&Cidr| c.family() == family;
        // Inbound: everything TCP enters ISTIO_INBOUND; the proxy's ports and the exclusions
        // return, the rest is redirected to the inbound capture port.
        let mut inbound = Vec::new();
        for chunk in self.exclude_inbound.chunks(MULTIPORT_MAX) {
            inbound.push(format!(
                "-A {CHAIN_INBOUND} -p tcp {} -j RETURN",
                dports(chunk)
            ));
        }
        let mut jumps = Vec::new();
        match &self.include_inbound {
            Include::All => {
                inbound.push(format!("-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}"));
            }
            Include::Only(ports) => {
                for port in ports {
                    inbound.push(format!(
                        "-A {CHAIN_INBOUND} -p tcp --dport {port} -j {CHAIN_IN_REDIRECT}"
                    ));
                }
            }
        }
        let capture_inbound = match &self.include_inbound {
            Include::All => true,
            Include::Only(ports) => !ports.is_empty(),
        };
        if capture_inbound {
            jumps.push(format!("-A PREROUTING -p tcp -j {CHAIN_INBOUND}"));
        }

        let in_redirect = vec![format!(
            "-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        )];
        let redirect = vec![format!(
            "-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        )];

        // Outbound, in Istio's order.
        let includes_loopback = match &self.include_ranges {
            Include::All => false,
            Include::Only(cidrs) => {
                let loopback = Cidr(match family {
                    // A constant, valid prefix length.
                    Family::V4 => IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
                    Family::V6 => IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                });
                cidrs.iter().any(|c| c.overlaps(&loopback))
            }
        };
        let mut output = Vec::new();
        for chunk in self.exclude_outbound.chunks(MULTIPORT_MAX) {
            output.push(format!(
                "-A {CHAIN_OUTPUT} -p tcp {} -j RETURN",
                dports(chunk)
            ));
        }
        // The proxy handing an inbound connection to the app binds the passthrough source.
        output.push(format!(
            "-A {CHAIN_OUTPUT} -o lo -s {} -j RETURN",
            family.passthrough_source()
        ));
        let localhost = family.localhost();
        let dns = self.dns.is_some();
        for (i, owner) in [
            format!("--uid-owner {}", self.uid),
            format!("--gid-owner {}", self.gid),
        ]
        .into_iter()
        .enumerate()
        {
            // The proxy connecting to its own pod's IP travels over lo: that is an app calling
            // itself through a service, so it goes through the inbound side like any caller
            // would (inbound policy applies). HBONE is the proxy talking to itself and stays.
            // With DNS capture, the proxy's own DNS over TCP to a resolver on the pod's IP
            // goes straight there (istio-iptables exempts 53 for the uid only).
            if dns && i == 0 {
                output.push(format!(
                    "-A {CHAIN_OUTPUT} -o lo ! -d {localhost} -p tcp -m multiport ! --dports 53,{HBONE_PORT} -m owner {owner} -j {CHAIN_IN_REDIRECT}"
                ));
            } else {
                output.push(format!(
                    "-A {CHAIN_OUTPUT} -o lo ! -d {localhost} -p tcp ! --dport {HBONE_PORT} -m owner {owner} -j {CHAIN_IN_REDIRECT}"
                ));
            }
            // The app reaching itself over lo (its own IP or localhost) is never captured,
            // unless loopback was asked for explicitly in the include list. With DNS
            // capture, its TCP DNS to a resolver on localhost still is.
            if !includes_loopback {
                if dns {
                    output.push(format!(
                        "-A {CHAIN_OUTPUT} -o lo -p tcp ! --dport 53 -m owner ! {owner} -j RETURN"
                    ));
                } else {
                    output.push(format!(
                        "-A {CHAIN_OUTPUT} -o lo -m owner ! {owner} -j RETURN"
                    ));
                }
            }
            // Anything else the proxy sends is on its way out already.
            output.push(format!("-A {CHAIN_OUTPUT} -m owner {owner} -j RETURN"));
        }
        // DNS capture, after the proxy's own traffic returned: the app's queries to its
        // resolvers (or to anyone, with CAPTURE_ALL_DNS) go to the DNS proxy.
        let mut output_dns = Vec::new();
        let mut raw_output_dns = Vec::new();
        let mut raw_inbound = Vec::new();
        let mut raw_jumps = Vec::new();
        if let Some(d) = self.dns.as_ref().filter(|d| d.captures(family)) {
            output.push(format!("-A {CHAIN_OUTPUT} -j {CHAIN_OUTPUT_DNS}"));
            let servers = d.servers(family);
            for proto in ["tcp", "udp"] {
                if d.all {
                    output_dns.push(format!(
                        "-A {CHAIN_OUTPUT_DNS} -p {proto} --dport 53 -j REDIRECT --to-ports {DNS_PROXY_PORT}"
                    ));
                }
                for s in &servers {
                    output_dns.push(format!(
                        "-A {CHAIN_OUTPUT_DNS} -p {proto} --dport 53 -d {s} -j REDIRECT --to-ports {DNS_PROXY_PORT}"
                    ));
                }
            }
            // Conntrack zones keep the two UDP legs apart (app ↔ proxy in zone 2, proxy ↔
            // resolver in zone 1), as istio-iptables splits them against UDP conntrack races.
            raw_jumps.push(format!("-A OUTPUT -j {CHAIN_OUTPUT_DNS}"));
            for owner in [
                format!("--uid-owner {}", self.uid),
                format!("--gid-owner {}", self.gid),
            ] {
                raw_output_dns.push(format!(
                    "-A {CHAIN_OUTPUT_DNS} -p udp --dport 53 -m owner {owner} -j CT --zone 1"
                ));
                raw_output_dns.push(format!(
                    "-A {CHAIN_OUTPUT_DNS} -p udp --sport {DNS_PROXY_PORT} -m owner {owner} -j CT --zone 2"
                ));
            }
            raw_jumps.push(format!("-A PREROUTING -j {CHAIN_INBOUND}"));
            if d.all {
                raw_output_dns.push(format!(
                    "-A {CHAIN_OUTPUT_DNS} -p udp --dport 53 -j CT --zone 2"
                ));
                raw_inbound.push(format!(
                    "-A {CHAIN_INBOUND} -p udp --sport 53 -j CT --zone 1"
                ));
            }
            for s in &servers {
                raw_output_dns.push(format!(
                    "-A {CHAIN_OUTPUT_DNS} -p udp --dport 53 -d {s} -j CT --zone 2"
                ));
                raw_inbound.push(format!(
                    "-A {CHAIN_INBOUND} -p udp --sport 53 -s {s} -j CT --zone 1"
                ));
            }
        }
        // With loopback explicitly included, only localhost itself stays exempt so the
        // include rule below can still match the rest of 127/8.
        let loopback = if includes_loopback {
            localhost
        } else {
            family.loopback()
        };
        output.push(format!("-A {CHAIN_OUTPUT} -d {loopback} -j RETURN"));
        for cidr in self.exclude_ranges.iter().filter(in_family) {
            output.push(format!("-A {CHAIN_OUTPUT} -d {cidr} -j RETURN"));
        }
        match &self.include_ranges {
            Include::All => output.push(format!("-A {CHAIN_OUTPUT} -j {CHAIN_REDIRECT}")),
            Include::Only(cidrs) => {
                for cidr in cidrs.iter().filter(in_family) {
                    output.push(format!("-A {CHAIN_OUTPUT} -d {cidr} -j {CHAIN_REDIRECT}"));
                }
            }
        }
        let mut chains = vec![
            (CHAIN_INBOUND, inbound),
            (CHAIN_IN_REDIRECT, in_redirect),
            (CHAIN_OUTPUT, output),
            (CHAIN_REDIRECT, redirect),
        ];
        let mut raw = Vec::new();
        if output_dns.is_empty() {
            jumps.push(format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}"));
        } else {
            // UDP must reach ISTIO_OUTPUT too.
            jumps.push(format!("-A OUTPUT -j {CHAIN_OUTPUT}"));
            chains.push((CHAIN_OUTPUT_DNS, output_dns));
            raw = vec![
                (CHAIN_OUTPUT_DNS, raw_output_dns),
                (CHAIN_INBOUND, raw_inbound),
            ];
        }

        TableRules {
            ipv6: family == Family::V6,
            chains,
            jumps,
            raw,
            raw_jumps,
        }
    }
}

/// `--dport P` for one port, `-m multiport --dports A,B` for several.
fn dports(ports: &[u16]) -> String {
    match ports {
        [one] => format!("--dport {one}"),
        many => format!(
            "-m multiport --dports {}",
            many.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The iptables binaries.

/// One iptables flavour: the binary and its `-save` / `-restore` siblings.
#[derive(Debug, Clone)]
struct Backend {
    iptables: PathBuf,
    save: PathBuf,
    restore: PathBuf,
}

impl Backend {
    /// `--iptables-bin` if given; otherwise the first candidate that works, preferring one
    /// that already holds Ferry's chains so a re-run or cleanup acts on the same flavour
    /// (legacy and nft rules live side by side and both apply). Legacy is only probed when
    /// this namespace already uses it or nothing else works.
    fn detect(explicit: Option<&Path>) -> Result<Backend, IptablesError> {
        if let Some(bin) = explicit {
            let backend = Backend::for_binary(bin).ok_or_else(|| IptablesError::InvalidFlag {
                flag: "--iptables-bin",
                reason: format!("{} or its -save/-restore siblings not found", bin.display()),
            })?;
            backend.probe()?;
            return Ok(backend);
        }
        let mut tried = Vec::new();
        let mut first_working = None;
        for name in IPTABLES_CANDIDATES {
            if name == "iptables-legacy" && first_working.is_some() && !legacy_nat_present() {
                // Probing would instantiate empty legacy tables in this namespace for nothing.
                continue;
            }
            let Some(backend) = Backend::for_binary(Path::new(name)) else {
                tried.push(format!("{name}: not found"));
                continue;
            };
            match backend.probe() {
                Ok(listing) if listing.lines().any(is_own_chain_decl) => {
                    return Ok(backend);
                }
                Ok(_) => {
                    if first_working.is_none() {
                        first_working = Some(backend);
                    }
                }
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        first_working.ok_or_else(|| IptablesError::NoIptables {
            tried: tried.join("; "),
        })
    }

    /// Resolves `bin`, `bin-save` and `bin-restore`: next to `bin` when it is a path, on
    /// `PATH` (and the sbin directories, which a non-login `PATH` may lack) otherwise.
    fn for_binary(bin: &Path) -> Option<Backend> {
        let name = bin.file_name()?.to_str()?;
        let sibling = |suffix: &str| -> Option<PathBuf> {
            let file = format!("{name}{suffix}");
            match bin.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(dir) => {
                    let path = dir.join(&file);
                    path.is_file().then_some(path)
                }
                None => find_in_path(&file),
            }
        };
        Some(Backend {
            iptables: sibling("")?,
            save: sibling("-save")?,
            restore: sibling("-restore")?,
        })
    }

    /// The ip6tables flavour matching this one (`iptables-nft` → `ip6tables-nft`).
    fn ipv6(&self) -> Result<Backend, IptablesError> {
        let name = self
            .iptables
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or_default();
        let v6 = name
            .strip_prefix("iptables")
            .map(|rest| format!("ip6tables{rest}"))
            .ok_or_else(|| IptablesError::InvalidFlag {
                flag: "--ipv6",
                reason: format!("cannot derive the ip6tables binary from {name:?}"),
            })?;
        let path = match self.iptables.parent() {
            Some(dir) => dir.join(&v6),
            None => PathBuf::from(&v6),
        };
        let backend = Backend::for_binary(&path).ok_or_else(|| IptablesError::InvalidFlag {
            flag: "--ipv6",
            reason: format!(
                "{} or its -save/-restore siblings not found",
                path.display()
            ),
        })?;
        backend.probe()?;
        Ok(backend)
    }

    /// Lists the nat table: proves the binary, the kernel support and our privileges at once.
    fn probe(&self) -> Result<String, IptablesError> {
        run_command(&self.iptables, &["-w", "-t", "nat", "-S"], None)
    }

    fn save(&self) -> Result<String, IptablesError> {
        self.save_table("nat")
    }

    fn save_table(&self, table: &str) -> Result<String, IptablesError> {
        run_command(&self.save, &["-t", table], None)
    }

    fn restore(&self, input: &str) -> Result<(), IptablesError> {
        run_command(&self.restore, &["--noflush", "-w"], Some(input)).map(drop)
    }
}

/// Whether this namespace has a legacy (x_tables) nat table. Reading the list creates nothing,
/// whereas running `iptables-legacy` would instantiate empty legacy tables, after which
/// `iptables-nft` warns about them on every listing.
fn legacy_nat_present() -> bool {
    std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l.trim() == "nat"))
}

fn is_own_chain_decl(line: &str) -> bool {
    line.strip_prefix("-N ")
        .is_some_and(|chain| CHAINS.contains(&chain.trim()))
}

fn find_in_path(file: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(file))
        .find(|p| p.is_file())
}

/// Runs a command, feeding `stdin`; a failure carries its stderr verbatim.
fn run_command(
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, IptablesError> {
    let command_line = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_error = |source| IptablesError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The restore input is small and read before anything is written back, so writing it
        // all before collecting the output cannot deadlock. A write error means the child died
        // early; its exit status and stderr below say why.
        if let Err(e) = pipe.write_all(input.as_bytes()) {
            tracing::debug!(error = %e, command = %command_line, "stdin closed early");
        }
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let err = IptablesError::Command {
            command: command_line,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim_end()
                .to_owned(),
            input: stdin.map(str::to_owned),
        };
        if let Some(input) = stdin {
            tracing::error!(iptables.input = %input, "{err}");
        }
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: IptablesArgs,
    }

    fn parse(flags: &[&str]) -> IptablesArgs {
        let argv = std::iter::once("ferry-iptables").chain(flags.iter().copied());
        Cli::try_parse_from(argv).expect("flags parse").args
    }

    fn dry_run(flags: &[&str]) -> String {
        rules(&parse(flags)).expect("valid rules").to_string()
    }

    fn error(flags: &[&str]) -> String {
        rules(&parse(flags))
            .expect_err("must be rejected")
            .to_string()
    }

    const DEFAULT_V4: &str = "\
# iptables-restore --noflush
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A ISTIO_INBOUND -p tcp -m multiport --dports 15000,15001,15004,15006,15008,15020,15021,15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
COMMIT
";

    #[test]
    fn booleans_as_istio_reads_them() {
        for (v, want) in [("True", true), ("1", true), ("f", false), ("FALSE", false)] {
            assert_eq!(parse(&["--redirect-dns", v]).redirect_dns, want, "{v}");
        }
        assert!(parse(&["--redirect-dns"]).redirect_dns);
        assert!(!parse(&[]).redirect_dns);
    }

    #[test]
    fn dns_capture_renders_istio_iptables_rules() {
        let dir = std::env::temp_dir().join(format!("ferry-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local\n",
        )
        .unwrap();
        let out = dry_run(&["--redirect-dns", "--resolv-conf", resolv.to_str().unwrap()]);
        for line in [
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS\n-A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053\n-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053",
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "*raw\n:ISTIO_OUTPUT_DNS - [0:0]\n:ISTIO_INBOUND - [0:0]\n",
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
            "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2",
            "-A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.10/32 -j CT --zone 1",
            "-A OUTPUT -j ISTIO_OUTPUT_DNS\n-A PREROUTING -j ISTIO_INBOUND\nCOMMIT",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        let all = dry_run(&["--redirect-dns", "--capture-all-dns"]);
        assert!(
            all.contains("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053"),
            "{all}"
        );
        assert!(
            all.contains("-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1"),
            "{all}"
        );
        // No resolver and not capture-all: DNS capture is off, as istio-iptables does.
        std::fs::write(&resolv, "search x\n").unwrap();
        let off = dry_run(&["--redirect-dns", "--resolv-conf", resolv.to_str().unwrap()]);
        assert_eq!(off, DEFAULT_V4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_render_istio_shaped_rules() {
        assert_eq!(dry_run(&[]), DEFAULT_V4);
        assert_eq!(parse(&[]), IptablesArgs::default());
    }

    #[test]
    fn rule_set_is_deterministic() {
        let args = parse(&["-x", "10.0.0.0/8", "-o", "22,443"]);
        assert_eq!(rules(&args).expect("rules"), rules(&args).expect("rules"));
    }

    #[test]
    fn proxy_uid_and_gid() {
        let text = dry_run(&["--proxy-uid", "2000", "--proxy-gid", "3000"]);
        assert!(text.contains("-A ISTIO_OUTPUT -m owner --uid-owner 2000 -j RETURN\n"));
        assert!(text.contains("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 2000 -j RETURN\n"));
        assert!(text.contains("-m owner --uid-owner 2000 -j ISTIO_IN_REDIRECT\n"));
        assert!(text.contains("-A ISTIO_OUTPUT -m owner --gid-owner 3000 -j RETURN\n"));
        assert!(!text.contains("1337"));
        assert_eq!(dry_run(&["-u", "2000", "-g", "3000"]), text);
    }

    #[test]
    fn capture_ports() {
        let text = dry_run(&["-p", "16001", "-z", "16006"]);
        assert!(text.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001\n"));
        assert!(text.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006\n"));
        // Moved capture ports are still the proxy's and never redirected inbound.
        assert!(text.contains(
            "--dports 15000,15001,15004,15006,15008,15020,15021,15090,16001,16006 -j RETURN\n"
        ));
        assert_eq!(
            dry_run(&["--outbound-port", "16001", "--inbound-port", "16006"]),
            text
        );
    }

    #[test]
    fn include_outbound_ranges() {
        let text = dry_run(&["-i", "10.96.0.0/12, 192.168.1.7"]);
        assert!(text.contains(
            "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT -d 192.168.1.7/32 -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT"
        ));
        assert!(!text.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        // Host bits are cleared like iptables does.
        assert!(dry_run(&["-i", "10.1.2.3/8"]).contains("-d 10.0.0.0/8 -j ISTIO_REDIRECT"));
        assert_eq!(
            dry_run(&["--include-outbound-ip-ranges", "10.96.0.0/12,192.168.1.7"]),
            text
        );
    }

    #[test]
    fn empty_include_captures_no_outbound_range() {
        let text = dry_run(&["-i", ""]);
        assert!(!text.contains("-j ISTIO_REDIRECT"));
        // The proxy's hairpin to its own pod still goes through the inbound side.
        assert!(text.contains("-j ISTIO_IN_REDIRECT\n"));
        assert!(text.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"));
    }

    #[test]
    fn loopback_include_keeps_loopback_capturable() {
        assert_eq!(
            dry_run(&["-i", "127.1.2.3/32"]),
            dry_run(&["-i", "127.0.0.0/8"]).replace(
                "127.0.0.0/8 -j ISTIO_REDIRECT",
                "127.1.2.3/32 -j ISTIO_REDIRECT"
            )
        );
        let text = dry_run(&["-i", "127.1.2.3/32"]);
        assert!(!text.contains("! --uid-owner"));
        assert!(!text.contains("127.0.0.0/8"));
        assert!(text.contains(
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT\n"
        ));
    }

    #[test]
    fn exclude_outbound_ranges() {
        let text = dry_run(&["-x", "10.0.0.0/8,169.254.169.254"]);
        assert!(text.contains(
            "-A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN\n-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN\n-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
        ));
        assert_eq!(
            dry_run(&["--exclude-outbound-ip-ranges", "10.0.0.0/8,169.254.169.254"]),
            text
        );
    }

    #[test]
    fn include_inbound_ports() {
        let text = dry_run(&["-b", "9080,8080"]);
        assert!(text.contains(
            "-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT\n-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT\n"
        ));
        assert!(!text.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
        assert!(text.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND\n"));
        assert_eq!(dry_run(&["--include-inbound-ports", "9080,8080"]), text);
    }

    #[test]
    fn empty_inbound_include_installs_no_prerouting_jump() {
        let text = dry_run(&["-b", ""]);
        assert!(!text.contains("PREROUTING"));
        assert!(!text.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
    }

    #[test]
    fn exclude_inbound_ports_add_to_proxy_ports() {
        let text = dry_run(&["-d", "22,15021,9999"]);
        assert!(text.contains(
            "-A ISTIO_INBOUND -p tcp -m multiport --dports 15000,15001,15004,15006,15008,15020,15021,15090,22,9999 -j RETURN\n"
        ));
        assert_eq!(dry_run(&["--exclude-inbound-ports", "22,15021,9999"]), text);
    }

    #[test]
    fn long_port_lists_are_split_for_multiport() {
        let ports: Vec<String> = (1..=20).map(|p| p.to_string()).collect();
        let text = dry_run(&["-o", &ports.join(",")]);
        assert!(text.contains(
            "-A ISTIO_OUTPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN\n-A ISTIO_OUTPUT -p tcp -m multiport --dports 16,17,18,19,20 -j RETURN\n"
        ));
        let text = dry_run(&["-d", &ports.join(",")]);
        // 8 proxy ports + 20 → two full rules of 15 would be 30; 28 gives 15 + 13.
        assert_eq!(
            text.matches("-A ISTIO_INBOUND -p tcp -m multiport").count(),
            2
        );
    }

    #[test]
    fn exclude_outbound_ports() {
        let text = dry_run(&["-o", "3306"]);
        assert!(text.contains(
            "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN\n-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\n"
        ));
        assert!(
            dry_run(&["--exclude-outbound-ports", "22,3306"])
                .contains("-A ISTIO_OUTPUT -p tcp -m multiport --dports 22,3306 -j RETURN\n")
        );
    }

    #[test]
    fn ipv6_renders_a_second_table() {
        let set =
            rules(&parse(&["--ipv6", "-x", "10.0.0.0/8,fd00::/8", "-i", "*"])).expect("rules");
        let v6 = set.ipv6.as_ref().expect("ipv6 table");
        assert!(v6.ipv6);
        let v6_text = v6.restore_input(&[]);
        assert!(v6_text.contains("-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN\n"));
        assert!(v6_text.contains(
            "-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n"
        ));
        assert!(v6_text.contains(
            "-A ISTIO_OUTPUT -d ::1/128 -j RETURN\n-A ISTIO_OUTPUT -d fd00::/8 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
        ));
        assert!(!v6_text.contains("10.0.0.0/8"));
        let v4_text = set.ipv4.restore_input(&[]);
        assert!(v4_text.contains("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN\n"));
        assert!(!v4_text.contains("fd00"));
        let text = set.to_string();
        assert!(text.contains("# ip6tables-restore --noflush\n*nat\n"));
        assert!(!dry_run(&[]).contains("ip6tables"));
    }

    #[test]
    fn ipv6_include_ranges_split_by_family() {
        let set = rules(&parse(&["--ipv6", "-i", "10.96.0.0/12,fd00:10:96::/112"])).expect("rules");
        let v6 = set.ipv6.expect("v6").restore_input(&[]);
        assert!(v6.contains("-A ISTIO_OUTPUT -d fd00:10:96::/112 -j ISTIO_REDIRECT\n"));
        assert!(!v6.contains("10.96.0.0/12"));
        assert!(!set.ipv4.restore_input(&[]).contains("fd00"));
    }

    #[test]
    fn restore_input_replaces_stale_jumps() {
        let set = rules(&IptablesArgs::default()).expect("rules");
        let stale = vec!["-A OUTPUT -p tcp -j ISTIO_OUTPUT".to_owned()];
        let text = set.ipv4.restore_input(&stale);
        assert!(text.contains(":ISTIO_REDIRECT - [0:0]\n-D OUTPUT -p tcp -j ISTIO_OUTPUT\n"));
        assert!(text.ends_with("-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n"));
    }

    #[test]
    fn saved_state_is_parsed() {
        let save = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p udp -m comment --comment \"not -j ISTIO_INBOUND\" -j ACCEPT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A OTHER -g ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
COMMIT
*filter
-A INPUT -j ISTIO_OUTPUT
COMMIT
";
        assert_eq!(
            jumps_into_own_chains(save),
            vec![
                "-A PREROUTING -p tcp -j ISTIO_INBOUND",
                "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
                "-A OTHER -g ISTIO_OUTPUT",
            ]
        );
        assert_eq!(own_chains_present(save), vec![CHAIN_INBOUND, CHAIN_OUTPUT]);
        assert_eq!(
            delete_form("-A OTHER -g ISTIO_OUTPUT"),
            "-D OTHER -g ISTIO_OUTPUT"
        );
        assert!(jumps_into_own_chains("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").is_empty());
    }

    #[test]
    fn dry_run_writes_rules_and_touches_nothing() {
        // An iptables binary that cannot exist: a dry run must never look for one.
        let mut args = parse(&["--dry-run", "--iptables-bin", "/nonexistent/iptables"]);
        let mut out = Vec::new();
        run_with_output(&args, &mut out).expect("dry run");
        assert_eq!(String::from_utf8(out).expect("utf-8"), DEFAULT_V4);
        args.dry_run = false;
        let err = run_with_output(&args, &mut Vec::new()).expect_err("no such binary");
        assert!(err.to_string().contains("--iptables-bin"), "{err}");
    }

    #[test]
    fn dry_run_goes_with_cleanup() {
        // `--cleanup --dry-run` shows the removal (tests/tests/iptables.rs
        // runs it against real rules).
        let argv = ["ferry-iptables", "--dry-run", "--cleanup"];
        let cli = Cli::try_parse_from(argv).expect("both flags");
        assert!(cli.args.dry_run && cli.args.cleanup);
    }

    #[test]
    fn bad_cidrs_name_the_flag() {
        let e = error(&["-i", "10.0.0.0/33"]);
        assert!(e.contains("--include-outbound-ip-ranges"), "{e}");
        assert!(e.contains("prefix length must be 0-32"), "{e}");
        let e = error(&["-x", "10.0.0.0/8,banana"]);
        assert!(e.contains("--exclude-outbound-ip-ranges"), "{e}");
        assert!(e.contains("\"banana\" is not an IP address"), "{e}");
        let e = error(&["-x", "fd00::/129"]);
        assert!(
            e.contains("--exclude-outbound-ip-ranges") && e.contains("0-128"),
            "{e}"
        );
        let e = error(&["-x", "*"]);
        assert!(
            e.contains("--exclude-outbound-ip-ranges") && e.contains("include list"),
            "{e}"
        );
        let e = error(&["-i", "*,10.0.0.0/8"]);
        assert!(
            e.contains("--include-outbound-ip-ranges") && e.contains("combined"),
            "{e}"
        );
    }

    #[test]
    fn bad_ports_name_the_flag() {
        for (flag, name) in [
            ("-b", "--include-inbound-ports"),
            ("-d", "--exclude-inbound-ports"),
            ("-o", "--exclude-outbound-ports"),
        ] {
            for bad in ["0", "65536", "http", "80-90"] {
                let argv = ["ferry-iptables", flag, bad];
                let args = Cli::try_parse_from(argv)
                    .expect("clap accepts any text")
                    .args;
                let e = rules(&args).expect_err("bad port").to_string();
                assert!(e.contains(name), "{flag} {bad}: {e}");
                assert!(e.contains(bad), "{flag} {bad}: {e}");
            }
        }
        let e = error(&["-d", "*"]);
        assert!(e.contains("--exclude-inbound-ports"), "{e}");
        let e = error(&["-b", "80,*"]);
        assert!(e.contains("--include-inbound-ports"), "{e}");
        let e = error(&["-p", "0"]);
        assert!(e.contains("--outbound-port"), "{e}");
        let e = error(&["-z", "0"]);
        assert!(e.contains("--inbound-port"), "{e}");
        let e = error(&["-p", "15001", "-z", "15001"]);
        assert!(
            e.contains("--inbound-port") && e.contains("must differ"),
            "{e}"
        );
        // clap rejects what is not a number for the single ports, naming the flag too.
        let argv = ["ferry-iptables", "--outbound-port", "99999"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn cleanup_validates_flags_too() {
        let args = parse(&["--cleanup", "-x", "nope"]);
        let e = run_with_output(&args, &mut Vec::new())
            .expect_err("bad flag")
            .to_string();
        assert!(e.contains("--exclude-outbound-ip-ranges"), "{e}");
    }

    #[test]
    fn trailing_commas_and_spaces_are_tolerated() {
        assert_eq!(dry_run(&["-o", " 22 , 443 ,"]), dry_run(&["-o", "22,443"]));
        assert_eq!(
            dry_run(&["-x", "10.0.0.0/8,"]),
            dry_run(&["-x", "10.0.0.0/8"])
        );
    }
}
