//! `vmm integrity`: a VM's code integrity as operators read it.

use anyhow::Result;
use clap::Args;
use control_api::client::ApiClient;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct IntegrityArgs {
    /// The VM's API socket (`vmm run --api-sock PATH`).
    #[arg(long)]
    api_sock: std::path::PathBuf,
    /// Protect this guest-physical range too (START-END or START+LENGTH), while the guest runs.
    /// Repeatable. Refused when the VM runs with --code-integrity off.
    #[arg(long, value_name = "RANGE")]
    protect: Vec<String>,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
    /// How many of the latest violations to list.
    #[arg(long, default_value_t = 10)]
    last: usize,
}

pub fn run(args: IntegrityArgs) -> Result<()> {
    let client = ApiClient::new(&args.api_sock);
    for range in &args.protect {
        client.protect(range)?;
    }
    let v = client.integrity()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = |x: Option<&Value>| match x {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    };
    println!(
        "code integrity {}  violations {} (dropped {}, written {}, allowed as the guest's own rewrites {})  log lines held back {}",
        s(v.get("mode")),
        s(v.get("violations")),
        s(v.get("dropped")),
        s(v.get("written")),
        s(v.get("allowed")),
        s(v.get("log_suppressed")),
    );
    let list = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    for r in list("ranges") {
        println!(
            "  protected {}-{}  ({})",
            s(r.get("start")),
            s(r.get("end")),
            s(r.get("source"))
        );
    }
    let slots = list("slots");
    let readonly = slots
        .iter()
        .filter(|x| x.get("readonly") == Some(&Value::Bool(true)))
        .count();
    println!(
        "  KVM memory slots: {} ({} read-only)",
        slots.len(),
        readonly
    );
    let recent = list("recent");
    let skip = recent.len().saturating_sub(args.last);
    for x in recent.iter().skip(skip) {
        println!(
            "  #{} vcpu {} cpl {} rip {} ({}) wrote {} bytes at {}: {} -> {}{}",
            s(x.get("seq")),
            s(x.get("vcpu")),
            s(x.get("cpl")),
            s(x.get("rip")),
            s(x.get("instruction")),
            s(x.get("size")),
            s(x.get("gpa")),
            s(x.get("bytes")),
            s(x.get("action")),
            match x.get("mechanism") {
                Some(Value::String(m)) => format!(" ({m})"),
                _ => String::new(),
            },
        );
    }
    Ok(())
}
