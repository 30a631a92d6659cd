//! The nested tier for tests: [`run_with_real_kvm`] runs a [`NestedJob`] where there is a KVM
//! with real SVM/VMX (this host if its KVM is kvm-intel/kvm-amd, else L1 under QEMU TCG;
//! `HOTPATCH_NESTED=host|l1` forces one) and fails the test, with the whole log, unless the
//! job got that far. The runner itself is [`vmm_tools::nested`] (docs/nested-tier.md).

use std::path::PathBuf;

pub use vmm_tools::nested::{
    FileSource, HostKvm, JobFile, L1Kit, L1Options, NestedJob, NestedOutcome, Placement, Ran,
    host_kvm,
};

use crate::linux::Kit;

/// The L1 kit from `scripts/linux-kit` (fetched once when missing).
pub fn l1_kit() -> L1Kit {
    let kit = Kit::ensure();
    L1Kit {
        qemu: kit.qemu,
        vmlinuz: kit.vmlinuz,
        modules: kit.modules,
        busybox: kit.busybox,
    }
}

/// The `vmm` the nested jobs run: `$NESTED_VMM_BIN`, else the one the rest of the suite tests
/// ([`crate::vmm_bin`], target/<profile>/vmm). Under TCG a debug build costs the built-in
/// guest's tier about a second more than a release build (docs/nested-tier.md).
pub fn nested_vmm_bin() -> PathBuf {
    match std::env::var_os("NESTED_VMM_BIN") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "NESTED_VMM_BIN={} does not exist", p.display());
            p
        }
        _ => crate::vmm_bin(),
    }
}

/// L1 options for the tests: the defaults, `-smp $NESTED_L1_VCPUS` and `-cpu max,la57=off`
/// when `NESTED_L1_LA57=0`, `NESTED_L1_GZIP=1` to gzip the initramfs, `NESTED_L1_STRIP=0` to
/// put `vmm` in with its debug info, `NESTED_L1_BZIMAGE=1` to boot the bzImage instead of its
/// vmlinux's PVH entry.
pub fn l1_options() -> L1Options {
    let mut o = L1Options::default();
    if let Ok(n) = std::env::var("NESTED_L1_VCPUS") {
        o.vcpus = n
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("NESTED_L1_VCPUS={n:?} is not a number"));
    }
    if std::env::var("NESTED_L1_LA57").is_ok_and(|v| v.trim() == "0") {
        o = o.la57(false);
    }
    if std::env::var("NESTED_L1_GZIP").is_ok_and(|v| v.trim() == "1") {
        o.gzip = true;
    }
    if std::env::var("NESTED_L1_STRIP").is_ok_and(|v| v.trim() == "0") {
        o.strip_vmm = false;
    }
    if std::env::var("NESTED_L1_BZIMAGE").is_ok_and(|v| v.trim() == "1") {
        o.pvh = false;
    }
    o
}

/// Runs `job` where there is a real SVM/VMX KVM and returns what it did. Panics, printing the
/// whole log, when L1 does not boot, its KVM modules do not load, nested paging or `/dev/kvm`
/// is missing, or the job does not finish in time. Whether the job *passed* is for the caller
/// ([`expect_passed`]).
pub fn run_with_real_kvm(job: &NestedJob, opts: &L1Options) -> NestedOutcome {
    let placement = Placement::from_env().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "nested: job {} (host KVM: {:?}, placement {placement:?})",
        job.name,
        host_kvm()
    );
    match vmm_tools::nested::run_where_real_kvm(job, placement, || Ok(l1_kit()), opts) {
        Ok(outcome) => {
            eprintln!("{}", outcome.summary());
            outcome
        }
        Err(e) => panic!("nested job {} failed to run: {e}", job.name),
    }
}

/// Fails the test, printing the whole log, unless the job exited 0 with every result passed
/// and each of `expected` reported.
pub fn expect_passed(outcome: &NestedOutcome, expected: &[&str]) {
    // What each step measured stays in the test's output, pass or fail.
    for r in &outcome.results {
        println!("  {} {} {}", r.name, r.status, r.detail);
    }
    if let Err(why) = outcome.check(expected) {
        panic!(
            "nested job {} failed: {why}\n{}\n--- whole log ---\n{}",
            outcome.name,
            outcome.summary(),
            outcome.log()
        );
    }
}
