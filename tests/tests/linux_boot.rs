//! The stock Debian kernel boots under QEMU (TCG) with the kit's busybox initramfs, runs the
//! workload that reads /proc/version every ~100 ms, and gives up its /proc/kallsyms: the ground
//! the Linux hot-patching tests stand on. `scripts/linux-kit` fetches what is missing.

use std::time::{Duration, Instant};

use integration_tests::linux::{BootOptions, Kit, LinuxGuest, parse_workload_line, proc_kallsyms};

#[test]
fn stock_kernel_boots_to_the_workload() {
    let kit = Kit::ensure();
    let started = Instant::now();
    let guest = LinuxGuest::boot(&kit, &BootOptions::default());
    let init = guest.wait_for_line(Duration::from_secs(90), |l| l.contains("hpl: init uptime="));
    let at_init = started.elapsed();
    guest.wait_for_line(Duration::from_secs(60), |l| {
        parse_workload_line(l).is_some_and(|w| w.seq >= 5)
    });
    eprintln!(
        "boot to /init: {at_init:.1?} ({init}), 5 workload lines: {:.1?}",
        started.elapsed()
    );

    let lines = guest.lines();
    let banner = lines
        .iter()
        .find_map(|l| l.split_once("hpl: banner=").map(|(_, b)| b.to_string()))
        .expect("a banner line");
    assert!(banner.contains(&kit.version), "banner {banner:?}");

    let work = guest.workload_lines();
    assert!(work.len() >= 5, "{work:?}");
    assert_eq!(work[0].seq, 1, "the first workload line is seq 1");
    for pair in work.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "seq goes up by one: {pair:?}");
        assert!(pair[1].uptime >= pair[0].uptime, "uptime goes on: {pair:?}");
    }
    for w in &work {
        assert!(
            w.version.starts_with("Linux version ") && w.version.contains(&kit.version),
            "version {:?} is the kit's kernel {}",
            w.version,
            kit.version
        );
        assert_eq!(
            w.version, banner,
            "no patch applied: the line is the boot banner"
        );
    }
    // ~100 ms apart in guest time, give or take the guest's own overhead under TCG.
    let span = work[work.len() - 1].uptime - work[0].uptime;
    let per_line = span / (work.len() - 1) as f64;
    assert!(
        (0.09..2.0).contains(&per_line),
        "{per_line:.3} s of guest time per workload line"
    );
}

#[test]
fn proc_kallsyms_is_captured() {
    let kit = Kit::ensure();
    let started = Instant::now();
    let text = proc_kallsyms(&kit);
    eprintln!("proc_kallsyms: {:.1?}", started.elapsed());
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 50_000, "only {} symbols", lines.len());
    let find = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .unwrap_or_else(|| panic!("no {name} in kallsyms"))
            .to_string()
    };
    assert_eq!(
        find("_text"),
        "ffffffff81000000 T _text",
        "nokaslr: link address"
    );
    // Static in fs/proc/version.c, so a local text symbol: `t`, not `T`.
    let v = find("version_proc_show");
    assert!(
        v.ends_with(" t version_proc_show") || v.ends_with(" T version_proc_show"),
        "{v} is a text symbol"
    );
    assert!(v.starts_with("ffffffff81"), "{v} is in kernel text");
    // A second call is served from the cache.
    let again = Instant::now();
    assert_eq!(proc_kallsyms(&kit), text);
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "{:?}",
        again.elapsed()
    );
}
