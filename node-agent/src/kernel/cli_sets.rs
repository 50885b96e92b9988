//! dog's sets through the `ipset` tool: the fallback where the kernel's ipset netlink
//! interface cannot be used from the agent. Writes are one `ipset restore` (without `-exist`,
//! so as strict as the netlink path), reads one `ipset save` of the named sets.

use super::exec::Runner;
use super::KernelError;
use crate::core::sets::{write_fill, SaveReader};
use crate::core::sets::{ReadSet, SetOp};
use dog_protocol::ruleset::write_member;
use std::io::Write;

/// Names of all sets in the namespace.
pub fn names(runner: &Runner) -> Result<Vec<String>, KernelError> {
    Ok(runner
        .run("ipset", &["list", "-n"], None)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// `ipset save` of the named sets, handed over line by line (a 1,000,000-entry set prints
/// about 30 MB, never held whole).
pub fn save_lines(
    runner: &Runner,
    names: &[String],
    on_line: &mut dyn FnMut(&str),
) -> Result<(), KernelError> {
    match names {
        [] => Ok(()),
        [one] => runner.run_lines("ipset", &["save", one], None, on_line),
        many => {
            let script: String = many.iter().map(|n| format!("save {n}\n")).collect();
            // batch mode prints a prompt before each command's output
            runner.run_lines("ipset", &["-"], Some(script.as_bytes()), &mut |l| {
                let mut l = l;
                while let Some(rest) = l.strip_prefix("ipset> ") {
                    l = rest;
                }
                on_line(l)
            })
        }
    }
}

/// The named sets with their members.
pub fn read(runner: &Runner, names: &[String]) -> Result<Vec<ReadSet>, KernelError> {
    let mut reader = SaveReader::default();
    save_lines(runner, names, &mut |l| reader.line(l))?;
    Ok(reader.finish())
}

/// How many members `name` holds (`ipset list -t`: the header only).
pub fn count(runner: &Runner, name: &str) -> Result<Option<usize>, KernelError> {
    let text = match runner.run("ipset", &["list", "-t", name], None) {
        Ok(t) => t,
        Err(KernelError::Failed { stderr, .. }) if stderr.contains("does not exist") => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Number of entries:"))
        .and_then(|n| n.trim().parse().ok()))
}

/// Writes the `ipset restore` lines of `ops`.
fn write_ops(w: &mut dyn Write, ops: &[SetOp<'_>]) -> std::io::Result<()> {
    let mut w = w;
    let mut line = String::with_capacity(64);
    for op in ops {
        match op {
            SetOp::Fill { name, set } => write_fill(&mut w, set, name)?,
            SetOp::Add { name, members } | SetOp::Del { name, members } => {
                let verb = if matches!(op, SetOp::Add { .. }) {
                    "add "
                } else {
                    "del "
                };
                for m in members.iter() {
                    line.clear();
                    line.push_str(verb);
                    line.push_str(name);
                    line.push(' ');
                    write_member(&mut line, m);
                    line.push('\n');
                    w.write_all(line.as_bytes())?;
                }
            }
            SetOp::Swap(a, b) => writeln!(w, "swap {a} {b}")?,
            SetOp::Destroy(name) => writeln!(w, "destroy {name}")?,
        }
    }
    Ok(())
}

/// Runs `ops` as one `ipset restore`, written while ipset reads it.
pub fn write(runner: &Runner, ops: &[SetOp<'_>]) -> Result<(), KernelError> {
    runner.run_feeding("ipset", &["restore"], &mut |w| write_ops(w, ops))
}

/// The script [`write`] runs (for tests and the docs).
pub fn script(ops: &[SetOp<'_>]) -> String {
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_ops(&mut buf, ops);
    String::from_utf8_lossy(&buf).into_owned()
}
