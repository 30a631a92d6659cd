//! Guest images for the tests and the demo: the freestanding test guest, built in two versions
//! (v1 and the "fixed" v2) by `build.rs`, plus the protocol it speaks and the reference formulas
//! the host uses to check its results. `protocol.rs` and `reference.rs` are compiled into the
//! guest too: one source of truth.

pub mod initramfs;
pub mod kernel_patch;
pub mod protocol;
pub mod reference;

use std::path::Path;

/// Which build of the test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestBuild {
    V1,
    V2,
}

static V1: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest-v1.elf"));
static V2: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest-v2.elf"));

/// The ELF image (with its symbols) of a test-guest build.
pub fn test_guest(build: GuestBuild) -> &'static [u8] {
    match build {
        GuestBuild::V1 => V1,
        GuestBuild::V2 => V2,
    }
}

/// Where that ELF is on disk (in this crate's build output), for tools that take a path.
pub fn test_guest_path(build: GuestBuild) -> &'static Path {
    match build {
        GuestBuild::V1 => Path::new(concat!(env!("OUT_DIR"), "/test-guest-v1.elf")),
        GuestBuild::V2 => Path::new(concat!(env!("OUT_DIR"), "/test-guest-v2.elf")),
    }
}

/// The guest's command-line parser, compiled on the host to test it (it is plain `core` code and
/// refers to `crate::protocol`, which exists in both crates).
#[cfg(test)]
#[path = "../guest/cmdline.rs"]
#[allow(dead_code)]
mod guest_cmdline;

#[cfg(test)]
mod tests {
    use super::guest_cmdline::{Mode, Options, parse};
    use super::protocol::{self, Report};
    use super::reference;

    #[test]
    fn cmdline_defaults_and_options() {
        let d = parse(b"").unwrap();
        assert_eq!(
            d,
            Options {
                reports: 0,
                batch: protocol::DEFAULT_BATCH,
                cpus: 0,
                mode: Mode::Normal,
                spin: protocol::DEFAULT_SPIN,
                writes: 1,
            }
        );
        assert_eq!(parse(b"  \t ").unwrap(), d);
        let o = parse(b"reports=3 batch=1000  mode=normal cpus=2").unwrap();
        assert_eq!(
            o,
            Options {
                reports: 3,
                batch: 1000,
                cpus: 2,
                mode: Mode::Normal,
                spin: protocol::DEFAULT_SPIN,
                writes: 1,
            }
        );
        assert_eq!(parse(b"reports=1 reports=7").unwrap().reports, 7);
        let p = parse(b"mode=probe reports=3 cpus=1").unwrap();
        assert_eq!(p.mode, Mode::Probe);
        assert_eq!(p.mode.name(), "probe");
        let s = parse(b"spin=12345 mode=spin reports=2").unwrap();
        assert_eq!((s.mode, s.spin, s.reports), (Mode::Spin, 12345, 2));
        assert_eq!(parse(b"mode=spin").unwrap().spin, protocol::DEFAULT_SPIN);
        let t = parse(b"mode=tamper writes=1000").unwrap();
        assert_eq!(
            (t.mode, t.mode.name(), t.writes),
            (Mode::Tamper, "tamper", 1000)
        );
        assert_eq!(parse(b"mode=tamper").unwrap().writes, 1);
        assert_eq!(parse(b"mode=spin mode=normal").unwrap().mode, Mode::Normal);
        for m in [Mode::Normal, Mode::Probe, Mode::Spin, Mode::Spam] {
            let token = format!("mode={}", m.name());
            assert_eq!(parse(token.as_bytes()).unwrap().mode, m);
        }
        assert_eq!(
            parse(b"reports=18446744073709551615").unwrap().reports,
            u64::MAX
        );
    }

    #[test]
    fn cmdline_rejects_garbage() {
        for bad in [
            &b"reports"[..],
            b"reports=",
            b"reports=-1",
            b"reports=0x10",
            b"reports=18446744073709551616",
            b"batch=0",
            b"cpus=33",
            b"mode=fast",
            b"mode=",
            b"mode=Probe",
            b"spin=0",
            b"spin=",
            b"spin=1e9",
            b"console=ttyS0",
            b"=3",
            b"reports=3 bogus",
        ] {
            let err = parse(bad).expect_err(std::str::from_utf8(bad).unwrap());
            assert!(!err.what.is_empty());
            assert!(!err.token.is_empty());
        }
    }

    #[test]
    fn report_layout_matches_the_documented_offsets() {
        use core::mem::offset_of;
        assert_eq!(offset_of!(Report, magic), Report::OFFSET_MAGIC);
        assert_eq!(offset_of!(Report, version), Report::OFFSET_VERSION);
        assert_eq!(offset_of!(Report, vcpu), Report::OFFSET_VCPU);
        assert_eq!(offset_of!(Report, build), Report::OFFSET_BUILD);
        assert_eq!(offset_of!(Report, flags), Report::OFFSET_FLAGS);
        assert_eq!(offset_of!(Report, seq), Report::OFFSET_SEQ);
        assert_eq!(offset_of!(Report, calls), Report::OFFSET_CALLS);
        assert_eq!(offset_of!(Report, v1), Report::OFFSET_V1);
        assert_eq!(offset_of!(Report, v2), Report::OFFSET_V2);
        assert_eq!(offset_of!(Report, bad), Report::OFFSET_BAD);
        assert_eq!(offset_of!(Report, last_input), Report::OFFSET_LAST_INPUT);
        assert_eq!(offset_of!(Report, last_output), Report::OFFSET_LAST_OUTPUT);
        assert_eq!(size_of::<Report>(), protocol::REPORT_SIZE);

        let r = Report {
            magic: protocol::REPORT_MAGIC,
            version: protocol::PROTOCOL_VERSION,
            vcpu: 3,
            build: protocol::BUILD_V2,
            flags: protocol::REPORT_FLAG_FINAL,
            seq: 9,
            calls: 100,
            v1: 60,
            v2: 39,
            bad: 1,
            last_input: 12345,
            last_output: u64::MAX - 1,
        };
        let bytes = r.to_bytes();
        assert_eq!(&bytes[0..4], b"HPRP");
        // The in-memory repr(C) image the guest writes is the wire format.
        // SAFETY: Report is repr(C) plain integers without padding (size asserted above).
        let raw: [u8; protocol::REPORT_SIZE] = unsafe { core::mem::transmute(r) };
        assert_eq!(raw, bytes);
        assert_eq!(Report::from_bytes(&bytes), Some(r));
        assert!(r.is_valid());
        assert_eq!(Report::from_bytes(&bytes[..71]), None);
        assert!(!Report { bad: 2, ..r }.is_valid());
        assert!(!Report { magic: 0, ..r }.is_valid());
    }

    #[test]
    fn oracles_differ_on_every_input_and_partial_patches_are_bad() {
        for x in reference::INPUT_MIN..=reference::INPUT_MAX {
            let (v1, v2) = (reference::compute_v1(x), reference::compute_v2(x));
            assert_ne!(v1, v2, "x = {x}");
            assert_eq!(reference::compute_with(x, 1, 1), v1);
            assert_eq!(reference::compute_with(x, 2, 2), v2);
            if x % 97 == 0 {
                for mixed in [
                    reference::compute_with(x, 1, 2),
                    reference::compute_with(x, 2, 1),
                ] {
                    assert_eq!(reference::classify(x, mixed), reference::Verdict::Bad);
                }
            }
        }
        assert_eq!(reference::triangle_v1(4), 6);
        assert_eq!(reference::triangle_v2(4), 10);
    }

    #[test]
    fn probe_oracles_differ_exactly_above_the_limit() {
        use reference::{PROBE_FACTOR, PROBE_LIMIT, Verdict};
        assert_eq!(PROBE_FACTOR % 2, 1, "an odd factor makes x * F a bijection");
        // Most generated inputs exceed the limit, so a clamping micropatch changes most results.
        let mut above = 0;
        let n = 100_000;
        for cpu in 0..4 {
            for x in reference::Inputs::for_vcpu(cpu).take(n) {
                let (v1, clamped) = (reference::probe_v1(x), reference::probe_clamped(x));
                assert_eq!(v1, x.wrapping_mul(PROBE_FACTOR));
                assert_eq!(clamped, x.min(PROBE_LIMIT).wrapping_mul(PROBE_FACTOR));
                assert_eq!(reference::classify_probe(x, v1), Verdict::V1);
                if x > PROBE_LIMIT {
                    above += 1;
                    assert_ne!(v1, clamped, "x = {x}");
                    assert_eq!(reference::classify_probe(x, clamped), Verdict::V2);
                } else {
                    assert_eq!(v1, clamped, "x = {x}");
                }
                assert_eq!(reference::classify_probe(x, v1 ^ 1), Verdict::Bad);
                // The probe oracles are not the compute ones.
                assert_eq!(
                    reference::classify_probe(x, reference::compute_v1(x)),
                    Verdict::Bad
                );
            }
        }
        let share = above as f64 / (4 * n) as f64;
        assert!(
            share > 0.85,
            "only {share:.3} of the inputs exceed PROBE_LIMIT"
        );
        assert!(share < 1.0, "some inputs must stay below PROBE_LIMIT");
        assert_eq!(
            reference::probe_clamped(u64::MAX),
            reference::probe_v1(PROBE_LIMIT)
        );
    }

    #[test]
    fn inputs_are_in_range_and_seeds_distinct() {
        let seeds: Vec<u64> = (0..protocol::MAX_CPUS as u64)
            .map(reference::seed_for_vcpu)
            .collect();
        for (i, s) in seeds.iter().enumerate() {
            assert_ne!(*s, 0);
            assert!(!seeds[..i].contains(s));
        }
        let first: Vec<u64> = reference::Inputs::for_vcpu(0).take(1000).collect();
        assert!(
            first
                .iter()
                .all(|x| (reference::INPUT_MIN..=reference::INPUT_MAX).contains(x))
        );
        assert_ne!(
            first,
            reference::Inputs::for_vcpu(1)
                .take(1000)
                .collect::<Vec<_>>()
        );
    }
}
