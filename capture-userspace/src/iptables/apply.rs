//! Applying and removing the rendered rules in the current network namespace.
//!
//! Each family gets one `iptables-restore --noflush` document that first removes whatever capture state
//! is there and then writes the new rules. iptables-restore commits each table atomically, so a namespace
//! is never left half-captured: re-applying (same or different flags) is idempotent, and a failing
//! document changes nothing.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::render::{Family, Rule, Ruleset, Table};
use crate::config::IptablesFlavour;

/// Prefix of every chain istio-iptables creates; chains with it are ours to flush and delete.
const CHAIN_PREFIX: &str = "ISTIO_";
/// Seconds iptables waits for the xtables lock held by another writer.
const LOCK_WAIT_SECS: &str = "10";

/// The iptables binaries of one family and flavour.
#[derive(Clone, Copy, Debug)]
pub struct Binaries {
    family: Family,
    flavour: IptablesFlavour,
}

impl Binaries {
    /// The binaries for `family` in `flavour`.
    pub fn new(family: Family, flavour: IptablesFlavour) -> Self {
        Binaries { family, flavour }
    }

    fn name(&self, tool: &str) -> String {
        let base = match self.family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self.flavour {
            IptablesFlavour::Auto => format!("{base}{tool}"),
            IptablesFlavour::Legacy => format!("{base}-legacy{tool}"),
            IptablesFlavour::Nft => format!("{base}-nft{tool}"),
        }
    }

    /// `iptables-save` output.
    pub fn save(&self) -> Result<String> {
        let bin = self.name("-save");
        let out = Command::new(&bin).output().with_context(|| format!("run {bin}"))?;
        if !out.status.success() {
            bail!("{bin} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        String::from_utf8(out.stdout).with_context(|| format!("{bin} printed non-UTF-8"))
    }

    /// Feeds `document` to `iptables-restore --noflush`.
    fn restore(&self, document: &str) -> Result<()> {
        let bin = self.name("-restore");
        let mut child = Command::new(&bin)
            .args(["--noflush", "--wait", LOCK_WAIT_SECS])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {bin}"))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(document.as_bytes())
            .with_context(|| format!("write to {bin}"))?;
        let out = child.wait_with_output().with_context(|| format!("wait for {bin}"))?;
        if !out.status.success() {
            bail!(
                "{bin} rejected the rules (nothing was changed): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Whether `rule` is present (`iptables -C`).
    fn contains(&self, rule: &Rule) -> Result<bool> {
        let bin = self.name("");
        let status = Command::new(&bin)
            .args(["--wait", LOCK_WAIT_SECS, "-t", rule.table.name(), "-C", &rule.chain])
            .args(&rule.spec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("run {bin}"))?;
        Ok(status.success())
    }
}

/// What `iptables-save` shows of one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// The table's name.
    pub name: String,
    /// User-defined chains.
    pub chains: Vec<String>,
    /// Rules as `(chain, spec)`, spec being the words after `-A CHAIN`.
    pub rules: Vec<(String, String)>,
}

/// Parses `iptables-save` output.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable {
                name: name.to_owned(),
                ..Default::default()
            });
        } else if let Some(table) = tables.last_mut() {
            if let Some(decl) = line.strip_prefix(':') {
                let mut words = decl.split_whitespace();
                if let (Some(chain), Some("-")) = (words.next(), words.next()) {
                    table.chains.push(chain.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                table.rules.push((chain.to_owned(), spec.to_owned()));
            }
        }
    }
    tables
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// Whether a saved rule jumps to one of our chains.
fn jumps_to_ours(spec: &str) -> bool {
    let mut words = spec.split_whitespace();
    while let Some(w) = words.next() {
        if (w == "-j" || w == "-g") && words.next().is_some_and(is_ours) {
            return true;
        }
    }
    false
}

/// The removal lines for one table: every built-in-chain rule that jumps to one of our chains, every
/// built-in-chain rule of `ours` that is present (the `-k`/`-c` RETURNs and TPROXY marks, found with
/// `iptables -C` since iptables-save prints them in a normalised form), then flush and delete our chains.
fn removal(table: &SavedTable, ours: &[&Rule], present: &dyn Fn(&Rule) -> Result<bool>) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for (chain, spec) in &table.rules {
        if !is_ours(chain) && jumps_to_ours(spec) {
            lines.push(format!("-D {chain} {spec}"));
        }
    }
    for rule in ours {
        if rule.table.name() == table.name
            && rule.is_builtin_chain()
            && !rule.jump_target().is_some_and(is_ours)
            && present(rule)?
        {
            lines.push(format!("-D {} {}", rule.chain, rule.spec.join(" ")));
        }
    }
    let chains: Vec<_> = table.chains.iter().filter(|c| is_ours(c)).collect();
    lines.extend(chains.iter().map(|c| format!("-F {c}")));
    lines.extend(chains.iter().map(|c| format!("-X {c}")));
    Ok(lines)
}

/// The document that replaces whatever capture state is in `saved` by `ruleset` (or, with `None`, only
/// removes it). `previous` names the built-in-chain rules that do not jump to our chains and so can only be
/// found by asking iptables: those of the ruleset being applied or cleaned.
fn document(
    saved: &[SavedTable],
    previous: &Ruleset,
    ruleset: Option<&Ruleset>,
    present: &dyn Fn(&Rule) -> Result<bool>,
) -> Result<String> {
    let ours: Vec<&Rule> = previous.rules.iter().collect();
    let new_doc = ruleset.map(Ruleset::restore_document).unwrap_or_default();
    let mut out = String::new();
    let mut written = Vec::new();
    for table in saved {
        let lines = removal(table, &ours, present)?;
        if lines.is_empty() {
            continue;
        }
        written.push(table.name.clone());
        out.push_str(&format!("*{}\n", table.name));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        // The new rules for this table follow in the same transaction.
        out.push_str(&table_body(&new_doc, &table.name));
        out.push_str("COMMIT\n");
    }
    for table in [Table::Mangle, Table::Nat, Table::Raw] {
        let body = table_body(&new_doc, table.name());
        if !body.is_empty() && !written.iter().any(|w| w == table.name()) {
            out.push_str(&format!("*{}\n{body}COMMIT\n", table.name()));
        }
    }
    Ok(out)
}

/// The lines of `table` in a restore document, without its `*table` and `COMMIT` lines.
fn table_body(doc: &str, table: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in doc.lines() {
        if let Some(name) = line.strip_prefix('*') {
            inside = name.trim() == table;
        } else if line == "COMMIT" {
            inside = false;
        } else if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Replaces the capture state of the current namespace by `rulesets` (one per family). A family whose
/// ruleset is absent (IPv6 turned off) is only cleaned.
pub fn apply(rulesets: &[Ruleset], flavour: IptablesFlavour) -> Result<()> {
    for family in [Family::V4, Family::V6] {
        let ruleset = rulesets.iter().find(|r| r.family == family);
        let bins = Binaries::new(family, flavour);
        let saved = match (ruleset, bins.save()) {
            (_, Ok(text)) => parse_save(&text),
            (Some(_), Err(e)) => return Err(e),
            // istio: IPv6 unavailable while IPv6 is off is only a warning.
            (None, Err(_)) => continue,
        };
        let empty = Ruleset {
            family,
            rules: Vec::new(),
        };
        let doc = document(&saved, ruleset.unwrap_or(&empty), ruleset, &|r| bins.contains(r))?;
        if !doc.is_empty() {
            bins.restore(&doc)?;
        }
    }
    Ok(())
}

/// Removes capture from the current namespace: every jump to and every one of istio's chains, and the
/// built-in-chain rules that `rulesets` (rendered from the same flags as were applied) would have added.
pub fn clean(rulesets: &[Ruleset], flavour: IptablesFlavour) -> Result<()> {
    for family in [Family::V4, Family::V6] {
        let bins = Binaries::new(family, flavour);
        let Ok(text) = bins.save() else { continue };
        let empty = Ruleset {
            family,
            rules: Vec::new(),
        };
        let previous = rulesets.iter().find(|r| r.family == family).unwrap_or(&empty);
        let doc = document(&parse_save(&text), previous, None, &|r| bins.contains(r))?;
        if !doc.is_empty() {
            bins.restore(&doc)?;
        }
    }
    Ok(())
}

/// The capture rules present in the current namespace, as `iptables-save` lines (for `capture status`).
pub fn status(flavour: IptablesFlavour) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let Ok(text) = Binaries::new(family, flavour).save() else {
            continue;
        };
        for table in parse_save(&text) {
            for (chain, spec) in &table.rules {
                if is_ours(chain) || jumps_to_ours(spec) {
                    out.push(format!("{} {} -A {chain} {spec}", family_name(family), table.name));
                }
            }
        }
    }
    Ok(out)
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
        :ISTIO_OUTPUT - [0:0]\n:KUBE-SVC - [0:0]\n-A PREROUTING -i eth1 -j RETURN\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n\
        -A OUTPUT -j KUBE-SVC\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\nCOMMIT\n";

    fn rule(chain: &str, spec: &str) -> Rule {
        Rule {
            table: Table::Nat,
            chain: chain.into(),
            insert_at: None,
            spec: spec.split(' ').map(String::from).collect(),
        }
    }

    #[test]
    fn save_output_is_parsed_into_user_chains_and_rules() {
        let t = &parse_save(SAVED)[0];
        assert_eq!(t.name, "nat");
        assert_eq!(t.chains, ["ISTIO_OUTPUT", "KUBE-SVC"]);
        assert_eq!(t.rules.len(), 5);
        assert_eq!(t.rules[1], ("PREROUTING".into(), "-p tcp -j ISTIO_INBOUND".into()));
    }

    #[test]
    fn removal_touches_only_our_chains_jumps_and_present_rules() {
        let saved = parse_save(SAVED);
        let virt = rule("PREROUTING", "-i eth1 -j RETURN");
        let absent = rule("PREROUTING", "-i eth9 -j RETURN");
        let previous = Ruleset {
            family: Family::V4,
            rules: vec![virt.clone(), absent],
        };
        let doc = document(&saved, &previous, None, &|r| Ok(*r == virt)).unwrap();
        assert_eq!(
            doc,
            "*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-D OUTPUT -j ISTIO_OUTPUT\n\
             -D PREROUTING -i eth1 -j RETURN\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn new_rules_share_the_removal_transaction() {
        let saved = parse_save(SAVED);
        let new = Ruleset {
            family: Family::V4,
            rules: vec![rule("OUTPUT", "-j ISTIO_OUTPUT"), rule("ISTIO_OUTPUT", "-j RETURN")],
        };
        let doc = document(&saved, &new, Some(&new), &|_| Ok(false)).unwrap();
        let expected = format!(
            "*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n\
             -X ISTIO_OUTPUT\n{}COMMIT\n",
            table_body(&new.restore_document(), "nat")
        );
        assert_eq!(doc, expected);
    }
}
