//! Live patching of the stock Debian kernel under QEMU (TCG here; KASLR on, as shipped), with no
//! agent in the guest: a fix written in C replaces `version_proc_show` (what the guest's
//! `cat /proc/version` runs every 100 ms), calling `seq_printf` through relocations resolved
//! at apply time. The output changes within a bounded time, sequence numbers and uptime carry
//! on (no reboot), revert restores the original output, and refused patches change nothing.

use std::time::{Duration, Instant};

use guest_control::GuestControl;
use guest_tools::kernel_patch::{self, VERSION_PROC_SHOW_TAG};
use integration_tests::linux::{BootOptions, Kit, LinuxGuest, WorkloadLine, kernel_fix_build_args};
use integration_tests::{TempDir, cli, cli_output, stdout};
use qemu_backend::QemuGuest;
use sha2::{Digest, Sha256};

const ARENA_GPA: u64 = 0x1000_0000;
const CHANGE_WITHIN: Duration = Duration::from_secs(30);
/// The kernel's first workload line: a TCG boot takes seconds alone, far more on a loaded host.
const BOOT_WITHIN: Duration = Duration::from_secs(180);

/// The first workload line after `seq` that satisfies `pred`.
fn wait_line(
    g: &LinuxGuest,
    seq: u64,
    what: &str,
    pred: impl Fn(&WorkloadLine) -> bool,
) -> WorkloadLine {
    wait_line_within(g, seq, what, CHANGE_WITHIN, pred)
}

fn wait_line_within(
    g: &LinuxGuest,
    seq: u64,
    what: &str,
    within: Duration,
    pred: impl Fn(&WorkloadLine) -> bool,
) -> WorkloadLine {
    g.wait_workload(seq, what, within, pred)
}

fn last_seq(g: &LinuxGuest) -> u64 {
    g.workload_lines().last().map_or(0, |l| l.seq)
}

/// SHA-256 of the kernel text the patch targets and of the arena's first 64 KiB, read through
/// the gdbstub: what a refused patch must leave exactly as it was.
fn memory_hash(g: &LinuxGuest, image: &linux_guest::attach::KernelImage) -> String {
    memory_hash_of(g, image, "version_proc_show")
}

/// [`memory_hash`] with the text of `function`.
fn memory_hash_of(
    g: &LinuxGuest,
    image: &linux_guest::attach::KernelImage,
    function: &str,
) -> String {
    let guest = QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach");
    let idt = guest.idt_base().expect("IDT");
    let a = linux_guest::attach::attach(&guest, idt, image, ARENA_GPA).expect("attach kernel");
    let f = image.kallsyms.lookup(function).expect("symbol") + a.slide.slide;
    let states = guest.pause_all().expect("pause");
    let vcpu = states.iter().flatten().next().expect("a vCPU");
    let text = guest
        .read_virtual(
            &linux_guest::address_space::kernel_view(
                vcpu,
                linux_guest::address_space::has_pti(&image.kallsyms),
            ),
            f,
            64,
        )
        .expect("read text");
    let mut arena = vec![0u8; 64 << 10];
    guest.read_phys(ARENA_GPA, &mut arena).expect("read arena");
    guest.resume_all().expect("resume");
    let mut h = Sha256::new();
    h.update(&text);
    h.update(&arena);
    hex::encode(h.finalize())
}

#[test]
fn a_c_fix_replaces_a_function_of_the_running_stock_kernel_and_reverts() {
    let kit = Kit::ensure();
    let dir = TempDir::new("linux-patch");
    let d = |n: &str| dir.path().join(n).to_str().expect("utf-8").to_string();
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            ..BootOptions::default()
        },
    );
    let first = wait_line_within(&g, 0, "workload line", BOOT_WITHIN, |_| true);
    let original = first.version.clone();
    assert!(!original.contains(VERSION_PROC_SHOW_TAG));

    // Build the fix from C, signed: the operator's side.
    cli(&["patch", "keygen", "-o", &d("ops")]);
    let object = kernel_patch::compile(kernel_patch::VERSION_PROC_SHOW_C, dir.path())
        .expect("compile the C fix");
    let build = |extra: &[&str], out: &str| {
        let mut args = kernel_fix_build_args(
            &kit,
            &object,
            kernel_patch::VERSION_PROC_SHOW_FIX,
            &d("ops.key"),
            out,
        );
        args.extend(extra.iter().map(|a| a.to_string()));
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    build(&["--name", "version-tag"], &d("fix.hpatch"));

    let target = |verb: &[&str]| -> Vec<String> {
        g.patch_args(verb, &kit.vmlinuz, ARENA_GPA, &d("state"), &d("ops.pub"))
    };
    let run = |args: Vec<String>| cli(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Refusals leave the kernel and the arena exactly as they are.
    let image = linux_guest::attach::KernelImage::from_file(&kit.vmlinuz).expect("image");
    let fix = patch_format::parse(&std::fs::read(d("fix.hpatch")).expect("read")).expect("parse");
    let key = patch_format::SecretKey::from_file_text(
        &std::fs::read_to_string(d("ops.key")).expect("key"),
    )
    .expect("key");
    let mut other_build = fix.patch.clone();
    other_build.target.build_id = Some(vec![0x5a; 20]);
    let mut wrong_bytes = fix.patch.clone();
    wrong_bytes.meta.name = "wrong-bytes".into();
    wrong_bytes.sites[0].expected[12] ^= 0xff;
    for (name, p, why) in [
        ("other-build", other_build, "build"),
        ("wrong-bytes", wrong_bytes, "differ"),
    ] {
        std::fs::write(d(name), p.to_file_signed(&key).expect("sign")).expect("write");
        let h0 = memory_hash(&g, &image);
        let out = cli_output(
            &target(&["apply", &d(name)])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && err.contains(why), "{name}: {err}");
        assert_eq!(
            memory_hash(&g, &image),
            h0,
            "{name}: the refusal changed guest memory"
        );
        let s = last_seq(&g);
        wait_line(&g, s, "workload after the refusal", |l| {
            l.version == original
        });
    }

    let before = last_seq(&g);
    let t = Instant::now();
    let out = stdout(&run(target(&["apply", &d("fix.hpatch")])));
    println!("{out}");
    // Reported, not asserted (a shared host): the whole command, image cache warm.
    println!("wall time of `vmm patch apply`: {:?}", t.elapsed());
    assert!(out.starts_with("applied "), "{out}");
    let patched = wait_line(&g, before, "patched /proc/version", |l| {
        l.version.contains(VERSION_PROC_SHOW_TAG)
    });
    println!(
        "patched output after {:?}: {}",
        t.elapsed(),
        patched.version
    );
    assert!(
        patched.version.starts_with(original.trim_end()),
        "{}",
        patched.version
    );
    let first_id = out.split_whitespace().nth(1).expect("id").to_string();

    // Another state dir (or this one lost) still sees the live patch, from the guest's arena
    // ledger, and says it cannot take it out without its signed file.
    let mut other_dir = target(&["list"]);
    let at = other_dir
        .iter()
        .position(|a| a == "--state-dir")
        .expect("state dir")
        + 1;
    other_dir[at] = d("state-2");
    let listed = stdout(&run(other_dir));
    println!("{listed}");
    assert!(listed.contains(&first_id[..16]), "{listed}");
    assert!(listed.contains("arena ledger"), "{listed}");

    // A second build of the fix replaces the first in one blackout (`--replaces`): the fixed
    // code never goes away in between, so no workload line shows the original.
    build(
        &["--replaces", &first_id, "--name", "version-tag-2"],
        &d("fix2.hpatch"),
    );
    let out = stdout(&run(target(&["apply", &d("fix2.hpatch")])));
    println!("{out}");
    assert!(out.starts_with("applied "), "{out}");
    assert!(out.contains(&format!("replaced {first_id}")), "{out}");
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    assert_ne!(id, first_id);
    let after_swap = last_seq(&g);
    wait_line(
        &g,
        after_swap + 2,
        "more patched lines after the swap",
        |l| l.version.contains(VERSION_PROC_SHOW_TAG),
    );
    let hole: Vec<_> = g
        .workload_lines()
        .into_iter()
        .filter(|l| l.seq > patched.seq && !l.version.contains(VERSION_PROC_SHOW_TAG))
        .collect();
    assert!(hole.is_empty(), "the fix was out during the swap: {hole:?}");
    let listed = stdout(&run(target(&["list"])));
    assert!(listed.contains("version-tag-2"), "{listed}");

    // Through another state dir the second fix is named by the guest's ledger only: its revert
    // is refused (nothing vouches for the bytes) and changes nothing; applying its signed file
    // there adopts it, and then that state dir reverts it.
    let in_state = |verb: &[&str], dir: &str| {
        let mut v = target(verb);
        let at = v
            .iter()
            .position(|a| a == "--state-dir")
            .expect("state dir")
            + 1;
        v[at] = d(dir);
        v
    };
    let refused = cli_output(
        &in_state(&["revert", &id[..8]], "state-3")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        !refused.status.success() && err.contains("arena ledger"),
        "{err}"
    );
    let still = wait_line(
        &g,
        last_seq(&g),
        "the fix still in after a refused revert",
        |_| true,
    );
    assert!(
        still.version.contains(VERSION_PROC_SHOW_TAG),
        "{}",
        still.version
    );
    let adopted = stdout(&run(in_state(&["apply", &d("fix2.hpatch")], "state-3")));
    println!("{adopted}");
    assert!(adopted.starts_with("already applied"), "{adopted}");
    let before = last_seq(&g);
    let out = stdout(&run(in_state(&["revert", &id[..8]], "state-3")));
    assert!(out.starts_with("reverted "), "{out}");
    wait_line(&g, before, "the original /proc/version again", |l| {
        l.version == original
    });

    // No reboot: one boot's sequence numbers, strictly increasing, and uptime never went back.
    let lines = g.workload_lines();
    for w in lines.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "workload lines lost or restarted: {w:?}"
        );
        assert!(w[1].uptime >= w[0].uptime, "uptime went back: {w:?}");
    }
}

/// A C fix with data of its own (patch format version 2): its `seq_printf` format is a string
/// literal and its tag a `const` array, which the builder carries as read-only data blocks and
/// the engine places in the arena beside the code. Built, inspected, applied to the running
/// stock kernel and reverted through the CLI, as an operator would.
#[test]
fn a_c_fix_carrying_a_string_literal_changes_what_the_guest_reads_and_reverts() {
    use guest_tools::kernel_patch::{
        VERSION_PROC_SHOW_DATA_C, VERSION_PROC_SHOW_DATA_FIX, VERSION_PROC_SHOW_DATA_TAG,
    };
    let kit = Kit::ensure();
    let dir = TempDir::new("linux-data");
    let d = |n: &str| dir.path().join(n).to_str().expect("utf-8").to_string();
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            ..BootOptions::default()
        },
    );
    let first = wait_line_within(&g, 0, "workload line", BOOT_WITHIN, |_| true);
    let original = first.version.clone();
    assert!(!original.contains(VERSION_PROC_SHOW_DATA_TAG));

    cli(&["patch", "keygen", "-o", &d("ops")]);
    let object =
        kernel_patch::compile(VERSION_PROC_SHOW_DATA_C, dir.path()).expect("compile the C fix");
    let mut build = kernel_fix_build_args(
        &kit,
        &object,
        VERSION_PROC_SHOW_DATA_FIX,
        &d("ops.key"),
        &d("fix.hpatch"),
    );
    build.extend(["--name".to_string(), "version-data".to_string()]);
    cli(&build.iter().map(String::as_str).collect::<Vec<_>>());
    // The file says what it carries: version 2, the literal and the tag as data blocks.
    let shown = stdout(&cli(&[
        "patch",
        "inspect",
        &d("fix.hpatch"),
        "--trusted-key",
        &d("ops.pub"),
    ]));
    println!("{shown}");
    assert!(shown.contains("format       version 2,"), "{shown}");
    assert!(shown.contains("data         2 read-only blocks"), "{shown}");
    assert!(shown.contains(r#"%s version %s %s%s\n"#), "{shown}");
    assert!(shown.contains(VERSION_PROC_SHOW_DATA_TAG), "{shown}");
    assert!(shown.contains("VALID"), "{shown}");

    let run = |verb: &[&str]| -> String {
        let args = g.patch_args(verb, &kit.vmlinuz, ARENA_GPA, &d("state"), &d("ops.pub"));
        stdout(&cli(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let before = last_seq(&g);
    let out = run(&["apply", &d("fix.hpatch")]);
    println!("{out}");
    assert!(out.starts_with("applied "), "{out}");
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    let patched = wait_line(
        &g,
        before,
        "/proc/version printed from the patch's data",
        |l| l.version.contains(VERSION_PROC_SHOW_DATA_TAG),
    );
    println!("patched: {}", patched.version);
    // "Linux version <release> <version>" from init_uts_ns, then the tag: the original line's
    // release is there, and the format's own text came from the data block.
    let release = original
        .strip_prefix("Linux version ")
        .and_then(|r| r.split_whitespace().next())
        .expect("the original names its release");
    assert!(
        patched
            .version
            .starts_with(&format!("Linux version {release} ")),
        "{}",
        patched.version
    );
    assert!(
        patched
            .version
            .trim_end()
            .ends_with(VERSION_PROC_SHOW_DATA_TAG),
        "{}",
        patched.version
    );
    let before = last_seq(&g);
    let out = run(&["revert", &id[..8]]);
    assert!(out.starts_with("reverted "), "{out}");
    wait_line(&g, before, "the original /proc/version again", |l| {
        l.version == original
    });
}

/// The same fix on a kernel running with 5-level paging (QEMU `-cpu max` offers LA57 and the
/// Debian kernel turns it on by itself): the arena must be mapped through the PML5, not into
/// whatever table a 4-level walk would take for the PML4.
#[test]
fn the_fix_applies_and_reverts_on_a_kernel_with_5_level_paging() {
    let kit = Kit::ensure();
    let dir = TempDir::new("linux-la57");
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            cpu: Some("max"),
            ..BootOptions::default()
        },
    );
    let first = wait_line_within(&g, 0, "workload line", BOOT_WITHIN, |_| true);
    let original = first.version.clone();
    let image = linux_guest::attach::KernelImage::from_file(&kit.vmlinuz).expect("image");
    let key = patch_format::SecretKey::generate().expect("key");
    let (_, file) =
        vmm_tools::demo_linux::version_fix(dir.path(), &image, &key).expect("build the fix");

    let guest =
        std::sync::Arc::new(QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach"));
    let states = guest.pause_all().expect("pause");
    let cr4 = states.iter().flatten().next().expect("a vCPU").paging.cr4;
    guest.resume_all().expect("resume");
    assert!(
        cr4 & (1 << 12) != 0,
        "the kernel did not enable LA57 (CR4 {cr4:#x})"
    );

    let config = patch_engine::EngineConfig {
        trusted_keys: vec![key.public()],
        ..Default::default()
    };
    let mut engine =
        vmm_tools::demo_linux::engine(guest.clone(), &image, config, &dir.path().join("state"))
            .expect("engine over the LA57 kernel");
    let before = last_seq(&g);
    let applied = engine.apply(&file).expect("apply on LA57");
    wait_line(&g, before, "patched /proc/version", |l| {
        l.version.contains(VERSION_PROC_SHOW_TAG)
    });
    let before = last_seq(&g);
    engine.revert(&applied.patch.id).expect("revert");
    wait_line(&g, before, "the original /proc/version again", |l| {
        l.version == original
    });

    // Per-CPU data from C: the fix reads `current` (%gs:current_task, an absolute per-CPU
    // offset resolved without the slide) and prints the reading task's name.
    let object = guest_tools::kernel_patch::compile(
        guest_tools::kernel_patch::VERSION_PROC_SHOW_COMM_C,
        dir.path(),
    )
    .expect("compile the per-CPU fix");
    let (code, function) = guest_tools::kernel_patch::VERSION_PROC_SHOW_COMM_FIX;
    let comm_fix = linux_guest::patch::build_kernel_patch(
        &image.vmlinux,
        &image.kallsyms,
        &std::fs::read(&object).expect("object"),
        &[linux_guest::patch::KernelFix::new(function, code)],
        patch_format::Metadata {
            name: "version-comm".into(),
            created: 1,
            ..Default::default()
        },
    )
    .expect("build the per-CPU fix");
    assert!(
        comm_fix.sites[0]
            .relocations
            .iter()
            .any(|r| r.symbol_name() == Some("current_task")
                && r.kind == patch_format::RelocKind::Abs32S),
        "{:?}",
        comm_fix.sites[0].relocations
    );
    let before = last_seq(&g);
    let applied = engine
        .apply(&comm_fix.to_file_signed(&key).expect("sign"))
        .expect("apply the per-CPU fix");
    let tag = guest_tools::kernel_patch::VERSION_PROC_SHOW_COMM_TAG;
    let line = wait_line(&g, before, "/proc/version naming its reader", |l| {
        l.version.contains(tag)
    });
    let comm = line
        .version
        .split(tag)
        .nth(1)
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or_default()
        .to_string();
    println!("per-CPU fix: {}", line.version);
    assert!(
        !comm.is_empty() && comm.len() < 16 && comm.bytes().all(|b| b.is_ascii_graphic()),
        "the task name read through current is {comm:?}: {}",
        line.version
    );
    let before = last_seq(&g);
    engine
        .revert(&applied.patch.id)
        .expect("revert the per-CPU fix");
    wait_line(
        &g,
        before,
        "the original /proc/version after the per-CPU fix",
        |l| l.version == original,
    );

    // A jump label right after ping_close's entry (dynamic debug): a jump there would be
    // overwritten by the kernel's next toggle of it, so the patch is refused, naming it, and
    // nothing is written.
    let refused = ping_close_replacement(&image, &key);
    let ping_at = image.kallsyms.lookup("ping_close").expect("ping_close") + engine.target().slide;
    let read_ping = || {
        let at = ping_at;
        let states = guest.pause_all().expect("pause");
        let vcpu = *states.iter().flatten().next().expect("a vCPU");
        let bytes = guest
            .read_virtual(
                &linux_guest::address_space::kernel_view(
                    &vcpu,
                    linux_guest::address_space::has_pti(&image.kallsyms),
                ),
                at,
                64,
            )
            .expect("read ping_close");
        guest.resume_all().expect("resume");
        bytes
    };
    let text_before = read_ping();
    let records = engine.records().to_vec();
    let err = engine
        .apply(&refused)
        .expect_err("a jump over a jump label");
    assert!(
        matches!(
            err,
            patch_engine::EngineError::Plan(patch_engine::plan::PlanError::LiveRewrite { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("jump label"), "{err}");
    assert_eq!(
        read_ping(),
        text_before,
        "the refused patch wrote ping_close"
    );
    assert_eq!(engine.records(), &records[..]);
}

/// A signed function replacement of `ping_close` (by a bare `ret`): its expected bytes are the
/// vmlinux's, so only the engine's rules can refuse it.
fn ping_close_replacement(
    image: &linux_guest::attach::KernelImage,
    key: &patch_format::SecretKey,
) -> Vec<u8> {
    ret_replacement(image, key, "ping_close")
}

/// A signed patch replacing `function` with a bare `ret` (`vmm_tools::demo_linux::ret_replacements`).
fn ret_replacement(
    image: &linux_guest::attach::KernelImage,
    key: &patch_format::SecretKey,
    function: &str,
) -> Vec<u8> {
    vmm_tools::demo_linux::ret_replacements(image, key, &[function]).expect("build the patch")
}

/// A kernel whose QEMU was started without `-gdb`, as operators' VMs are: `vmm patch apply`
/// and `revert` with only `--qmp` start a gdbstub on a private Unix socket for each command
/// (the KASLR slide still comes from QMP's `info registers`, on the connection the backend
/// holds), and leave none behind.
#[test]
fn a_kernel_started_without_gdb_is_patched_with_only_its_qmp_socket() {
    let kit = Kit::ensure();
    let dir = TempDir::new("linux-qmp-only");
    let d = |n: &str| dir.path().join(n).to_str().expect("utf-8").to_string();
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            gdb: false,
            ..BootOptions::default()
        },
    );
    let first = wait_line_within(&g, 0, "workload line", BOOT_WITHIN, |_| true);
    let original = first.version.clone();
    let image = linux_guest::attach::KernelImage::from_file(&kit.vmlinuz).expect("image");
    let key = patch_format::SecretKey::generate().expect("key");
    let (_, file) =
        vmm_tools::demo_linux::version_fix(dir.path(), &image, &key).expect("build the fix");
    std::fs::write(d("fix.hpatch"), file).expect("write the fix");
    std::fs::write(d("ops.pub"), key.public().to_file_text()).expect("write the key");
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).expect("runtime dir");

    let run = |verb: &[&str]| -> String {
        let out = std::process::Command::new(integration_tests::vmm_bin())
            .arg("patch")
            .args(verb)
            .args(["--qmp", g.qmp_path().to_str().expect("utf-8")])
            .arg("--linux-kernel")
            .arg(&kit.vmlinuz)
            .args(["--arena", &format!("{ARENA_GPA:#x}")])
            .args(["--state-dir", &d("state"), "--trusted-key", &d("ops.pub")])
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .expect("spawn vmm");
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "vmm patch {verb:?} failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{text}");
        assert!(text.contains("\nguest halted "), "no halt report: {text}");
        text
    };
    let no_gdbstub = |what: &str| {
        let mut qmp =
            qemu_backend::Qmp::connect(g.qmp_path(), qemu_backend::IO_TIMEOUT).expect("QMP");
        let devs = qmp.chardevs().expect("query-chardev");
        assert!(
            devs.iter().all(|c| c.label != qemu_backend::GDB_CHARDEV),
            "{what}: a gdbstub remains: {devs:?}"
        );
        assert_eq!(qmp.status().expect("status"), "running", "{what}");
        let left: Vec<_> = std::fs::read_dir(&runtime).expect("runtime dir").collect();
        assert!(left.is_empty(), "{what}: left behind: {left:?}");
    };

    let before = last_seq(&g);
    let out = run(&["apply", &d("fix.hpatch")]);
    assert!(out.starts_with("applied "), "{out}");
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    wait_line(&g, before, "patched /proc/version", |l| {
        l.version.contains(VERSION_PROC_SHOW_TAG)
    });
    no_gdbstub("after the apply");
    let before = last_seq(&g);
    let out = run(&["revert", &id[..8]]);
    assert!(out.starts_with("reverted "), "{out}");
    wait_line(&g, before, "the original /proc/version again", |l| {
        l.version == original
    });
    no_gdbstub("after the revert");
}

/// The probe of [`the_preemption_mode_is_read_from_the_kernel_each_time`]: the kernel's
/// preemption mode as debugfs prints it (`none voluntary (full)`), then `/proc/version`. The
/// first run switches the kernel to full preemption at run time; 30 s later it switches it back.
const PREEMPT_PROBE: &str = r#"bb=/bin/busybox
mode=/sys/kernel/debug/sched/preempt
[ -e $mode ] || $bb mount -t debugfs debugfs /sys/kernel/debug
read -r up _ </proc/uptime
if [ ! -e /tmp/full-since ]; then echo full >$mode; echo "${up%.*}" >/tmp/full-since; fi
read -r since </tmp/full-since
if [ ! -e /tmp/switched ] && [ $((${up%.*} - since)) -ge 30 ]; then
  echo voluntary >$mode; : >/tmp/switched
fi
$bb cat $mode
$bb cat /proc/version
"#;

#[test]
fn the_preemption_mode_is_read_from_the_kernel_each_time() {
    // Switched to full preemption at run time (debugfs, as an operator would), a task
    // preempted inside the instructions a jump displaces would resume in the middle of it.
    // cmdline_proc_show's jump covers `push rbx` and the `mov` after it, so its blackout lists
    // the kernel's tasks and scans their stacks for such a resume point (none: the workload
    // never reads /proc/cmdline), and says so. The version fix displaces one 9-byte
    // `mov %gs:...` (nowhere inside to resume): no walk. Back at voluntary, the
    // cmdline_proc_show patch needs no walk either: the mode was read again.
    let kit = Kit::ensure();
    let dir = TempDir::new("linux-preempt");
    let d = |n: &str| dir.path().join(n).to_str().expect("utf-8").to_string();
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            mode: guest_tools::initramfs::InitMode::Probe,
            probe: Some((PREEMPT_PROBE.to_string(), Vec::new())),
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            ..BootOptions::default()
        },
    );
    let full = wait_line_within(
        &g,
        0,
        "the kernel switched to full preemption",
        BOOT_WITHIN,
        |l| l.version.contains("voluntary (full)"),
    );
    let image = linux_guest::attach::KernelImage::from_file(&kit.vmlinuz).expect("image");
    let key = patch_format::SecretKey::generate().expect("key");
    let (_, fix) =
        vmm_tools::demo_linux::version_fix(dir.path(), &image, &key).expect("build the fix");
    std::fs::write(d("fix.hpatch"), fix).expect("write the fix");
    std::fs::write(
        d("cmdline.hpatch"),
        ret_replacement(&image, &key, "cmdline_proc_show"),
    )
    .expect("write the cmdline patch");
    std::fs::write(d("ops.pub"), key.public().to_file_text()).expect("write the key");
    let run = |verb: &[&str]| {
        cli_output(
            &g.patch_args(verb, &kit.vmlinuz, ARENA_GPA, &d("state"), &d("ops.pub"))
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };
    let mode_now = || {
        g.workload_lines()
            .last()
            .map(|l| l.version.clone())
            .unwrap_or_default()
    };

    let tasks_line = |text: &str| {
        text.lines()
            .any(|l| l.contains("guest tasks no vCPU was running"))
    };
    let out = run(&["apply", &d("cmdline.hpatch")]);
    let text = stdout(&out);
    assert!(
        out.status.success() && tasks_line(&text),
        "apply over two instructions under full preemption (switched at {}; now {}): {}\n{text}{}",
        full.uptime,
        mode_now(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("under full preemption: {}", text.trim());
    let id = text.split_whitespace().nth(1).expect("id").to_string();
    assert!(run(&["revert", &id[..8]]).status.success(), "revert");
    let before = last_seq(&g);
    let out = run(&["apply", &d("fix.hpatch")]);
    let text = stdout(&out);
    assert!(out.status.success(), "apply the version fix: {text}");
    assert!(
        !tasks_line(&text),
        "a one-instruction jump listed the tasks: {text}"
    );
    let id = text.split_whitespace().nth(1).expect("id").to_string();
    wait_line(&g, before, "patched /proc/version", |l| {
        l.version.contains(VERSION_PROC_SHOW_TAG)
    });
    assert!(run(&["revert", &id[..8]]).status.success(), "revert");

    // Back at voluntary, read again: the two-instruction jump goes in, and comes out.
    wait_line_within(
        &g,
        last_seq(&g),
        "the kernel switched back to voluntary",
        Duration::from_secs(90),
        |l| l.version.contains("(voluntary) full"),
    );
    let out = run(&["apply", &d("cmdline.hpatch")]);
    let text = stdout(&out);
    assert!(
        out.status.success() && !tasks_line(&text),
        "apply under voluntary, with no walk: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = text.split_whitespace().nth(1).expect("id").to_string();
    assert!(run(&["revert", &id[..8]]).status.success(), "revert");
}
