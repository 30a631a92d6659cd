//! `vmm bench patch-l1`: `vmm bench patch` (blackout vs floor, `engine_us`, the guest-checked
//! storm) run where KVM has real SVM/VMX semantics, so the ratios are measured on the kind of
//! KVM production runs, not only on this host's PVM backend.
//!
//! On the project's machines that is L1 of the nested tier (QEMU TCG `-cpu max`, kvm-amd
//! inside); on a host whose `/dev/kvm` is kvm-intel/kvm-amd the same job runs on the host
//! ([`crate::nested::run_where_real_kvm`]). The bench inside prints its own table, which comes
//! back line by line, and its JSON report, which comes back on one `BENCH-JSON` line.
//!
//! Absolute times under TCG mean nothing against a real host; the ratios within the run are
//! what this is for (docs/nested-tier.md).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::HostInfo;
use crate::nested::{L1Kit, L1Options, NestedJob, Placement};

const JOB: &str = r#"
set -u
"$VMM" bench patch --vcpus "$VCPUS" --cycles "$CYCLES" --storm "$STORM" --storm-vcpus "$STORM_VCPUS" \
  --out patch.json > table.txt
rc=$?
grep -v '^wrote ' table.txt | sed 's/^/BENCH-TABLE /'
[ -f patch.json ] && echo "BENCH-JSON patch $(tr -d '\n' < patch.json)"
if [ "$rc" = 0 ]; then nested_result bench-patch pass; else nested_result bench-patch fail "exit=$rc"; fi
exit $rc
"#;

/// What `vmm bench patch-l1` writes: where it ran, and the inner bench's own report.
#[derive(Debug, Clone, Serialize)]
pub struct PatchL1Report {
    pub benchmark: &'static str,
    /// The host that ran L1 (or the job).
    pub host: HostInfo,
    /// `l1` (QEMU TCG with emulated SVM) or `host`.
    pub ran: String,
    /// The nested runner's one-line summary (L1 shape, boot and job times).
    pub nested: String,
    /// The table the bench printed where it ran.
    pub table: String,
    /// `vmm bench patch`'s JSON report, from where it ran.
    pub report: Value,
}

/// What to run inside.
#[derive(Debug, Clone)]
pub struct PatchL1Args {
    pub vcpus: Vec<usize>,
    pub cycles: usize,
    pub storm: usize,
    pub storm_vcpus: usize,
    /// L1's vCPUs: at least the largest guest's, so each guest vCPU has a CPU of its own.
    pub l1_vcpus: usize,
}

/// Runs the job and collects its table and report. A storm with a wrong result, or a bench
/// that failed inside, is an error carrying the log.
pub fn run(
    kit: &L1Kit,
    vmm: &Path,
    args: &PatchL1Args,
    host: HostInfo,
) -> anyhow::Result<PatchL1Report> {
    let vcpus = args
        .vcpus
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "VCPUS={vcpus}\nCYCLES={}\nSTORM={}\nSTORM_VCPUS={}\n{JOB}",
        args.cycles, args.storm, args.storm_vcpus
    );
    let job = NestedJob::new("bench-patch", &script, vmm).timeout(Duration::from_secs(4 * 3600));
    let opts = L1Options {
        vcpus: args.l1_vcpus.max(1),
        ..L1Options::default()
    };
    let outcome =
        crate::nested::run_where_real_kvm(&job, Placement::from_env()?, || Ok(kit.clone()), &opts)?;
    let (table, report) = parse_job_lines(&outcome.job_lines());
    if let Err(why) = outcome.check(&["bench-patch"]) {
        anyhow::bail!(
            "vmm bench patch failed where it ran ({why}):\n{}",
            outcome.log()
        );
    }
    let Some(report) = report else {
        anyhow::bail!(
            "vmm bench patch wrote no JSON report where it ran:\n{}",
            outcome.log()
        );
    };
    Ok(PatchL1Report {
        benchmark: "patch-l1",
        host,
        ran: format!("{:?}", outcome.ran).to_lowercase(),
        nested: outcome.summary(),
        table,
        report,
    })
}

/// The table's lines (`BENCH-TABLE `) and the report (`BENCH-JSON patch `) among the job's
/// output; kernel messages interleaved on the console are skipped.
fn parse_job_lines(lines: &[&str]) -> (String, Option<Value>) {
    let mut table = String::new();
    let mut report = None;
    for line in lines {
        if let Some(row) = line.strip_prefix("BENCH-TABLE ") {
            table.push_str(row);
            table.push('\n');
        } else if let Some(json) = line.strip_prefix("BENCH-JSON patch ") {
            report = serde_json::from_str(json).ok();
        }
    }
    (table, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_and_report_come_back_from_the_console() {
        let lines = [
            "NESTED-JOB-START bench-patch",
            "bench: 1 vCPU(s), 10 cycles…",
            "BENCH-TABLE vcpus | floor",
            "[   12.3] kvm: some message",
            "BENCH-TABLE     1 | 431/900",
            r#"BENCH-JSON patch {"benchmark": "patch", "storm": {"bad": 0}}"#,
        ];
        let (table, report) = parse_job_lines(&lines);
        assert_eq!(table, "vcpus | floor\n    1 | 431/900\n");
        let report = report.expect("the report parses");
        assert_eq!(report["storm"]["bad"], 0);
        // A line cut short on the console gives no report rather than a wrong one.
        let (_, cut) = parse_job_lines(&[r#"BENCH-JSON patch {"benchmark": "pat"#]);
        assert!(cut.is_none());
    }
}
