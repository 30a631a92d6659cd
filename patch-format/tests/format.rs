//! The file format: round trips, canonical encoding, strict parsing, signatures.

use patch_format::*;
use proptest::prelude::*;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

fn sample() -> Patch {
    Patch {
        meta: Metadata {
            name: "fix-compute".into(),
            description: "Two lines.\n\tIndented.".into(),
            author: "Ops <ops@example.org>".into(),
            created: 1_700_000_000,
            advisories: vec!["CVE-2026-0001".into(), "CVE-2026-0002".into()],
            replaces: vec![PatchId([1; 32]), PatchId([2; 32])],
        },
        target: TargetIdentity {
            name: "guest v1".into(),
            build_id: Some(vec![0xab; 20]),
            text_sha256: Some([0xcd; 32]),
        },
        sites: vec![
            Site {
                kind: SiteKind::Function,
                target: Location::Symbol {
                    name: "compute".into(),
                    offset: 0,
                },
                expected: vec![0x55, 0x48, 0x89, 0xe5, 0x90, 0xc3],
                code: vec![0xe8, 0, 0, 0, 0, 0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xc3],
                relocations: vec![
                    Relocation {
                        offset: 1,
                        kind: RelocKind::Rel32,
                        target: RelocTarget::Symbol("mix".into()),
                        addend: -4,
                    },
                    Relocation {
                        offset: 7,
                        kind: RelocKind::Abs64,
                        target: RelocTarget::Symbol("table".into()),
                        addend: 8,
                    },
                ],
            },
            Site {
                kind: SiteKind::Micropatch,
                target: Location::Symbol {
                    name: "triangle".into(),
                    offset: 0x12,
                },
                expected: vec![0x8b, 0x44, 0x24, 0xfc, 0x01, 0xc2],
                code: vec![0x85, 0xff, 0x79, 0x02, 0x31, 0xff],
                relocations: vec![],
            },
            Site {
                kind: SiteKind::Function,
                target: Location::Address(0x10_2000),
                expected: vec![0xc3; 5],
                code: vec![0x31, 0xc0, 0xc3],
                relocations: vec![],
            },
        ],
        data: Vec::new(),
    }
}

#[test]
fn round_trip_same_patch_same_id_same_bytes() {
    let p = sample();
    for bytes in [
        p.to_file_unsigned().unwrap(),
        p.to_file_signed(&key(1)).unwrap(),
    ] {
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.patch, p);
        assert_eq!(parsed.id, p.id().unwrap());
        assert_eq!(parsed.body(), p.encode_body().unwrap().as_slice());
        assert_eq!(parsed.file_len(), bytes.len());
    }
    // Canonical: encoding twice, or after a parse, gives the same bytes.
    let a = p.to_file_signed(&key(1)).unwrap();
    let b = parse(&a).unwrap().patch.to_file_signed(&key(1)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn id_is_independent_of_signature_and_changes_with_content() {
    let p = sample();
    let u = parse(&p.to_file_unsigned().unwrap()).unwrap();
    let s = parse(&p.to_file_signed(&key(1)).unwrap()).unwrap();
    assert_eq!(u.id, s.id);
    let mut q = p.clone();
    q.meta.created += 1;
    assert_ne!(q.id().unwrap(), p.id().unwrap());
}

#[test]
fn non_canonical_orders_and_duplicates_are_refused() {
    let mut p = sample();
    p.sites.swap(0, 2);
    let e = p.encode_body().unwrap_err().to_string();
    assert!(e.contains("sites[1].target") && e.contains("sorted"), "{e}");
    p.normalize();
    assert_eq!(p, sample());

    let mut p = sample();
    p.meta.advisories.reverse();
    assert!(
        p.encode_body()
            .unwrap_err()
            .to_string()
            .contains("meta.advisories[1]")
    );
    let mut p = sample();
    p.meta.advisories[1] = p.meta.advisories[0].clone();
    assert!(p.encode_body().is_err());
    let mut p = sample();
    p.meta.replaces.reverse();
    assert!(p.encode_body().is_err());
    let mut p = sample();
    p.sites[0].relocations.reverse();
    assert!(
        p.encode_body()
            .unwrap_err()
            .to_string()
            .contains("sites[0].relocations[1].offset")
    );
    let mut p = sample();
    p.sites[1].target = p.sites[0].target.clone();
    assert!(p.encode_body().is_err(), "duplicate site target");
    // Overlapping relocation fields.
    let mut p = sample();
    p.sites[0].relocations[1].offset = 3;
    assert!(p.encode_body().unwrap_err().to_string().contains("overlap"));
    // A field past the end of the code.
    let mut p = sample();
    p.sites[0].relocations[1].offset = 9;
    assert!(
        p.encode_body()
            .unwrap_err()
            .to_string()
            .contains("past the end")
    );
}

#[test]
fn field_rules() {
    type Edit = Box<dyn Fn(&mut Patch)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|p| p.meta.name.clear()),
            "meta.name: must not be empty",
        ),
        (
            Box::new(|p| p.meta.name = "a\nb".into()),
            "control character",
        ),
        (
            Box::new(|p| p.meta.author = "\u{1b}[31m".into()),
            "control character",
        ),
        (
            Box::new(|p| p.meta.name = "x".repeat(4097)),
            "over the limit of 4096",
        ),
        (
            Box::new(|p| p.sites[0].code.clear()),
            "sites[0].code: must not be empty",
        ),
        (
            Box::new(|p| p.sites[0].expected.clear()),
            "sites[0].expected: must not be empty",
        ),
        (
            Box::new(|p| p.sites[0].relocations[0].target = RelocTarget::Symbol(String::new())),
            "symbol: must not be empty",
        ),
        (
            Box::new(|p| p.sites[0].relocations[0].target = RelocTarget::Symbol("a\0b".into())),
            "control character",
        ),
        (
            Box::new(|p| p.target.build_id = Some(vec![])),
            "target.build_id: must not be empty",
        ),
        (
            Box::new(|p| p.target.build_id = Some(vec![0; 65])),
            "over the limit of 64",
        ),
        (
            Box::new(|p| {
                p.target.build_id = None;
                p.target.text_sha256 = None;
            }),
            "would not be identified",
        ),
        (
            Box::new(|p| p.sites[0].code = vec![0; 1024 * 1024 + 1]),
            "over the limit of 1048576",
        ),
    ];
    for (i, (f, want)) in cases.iter().enumerate() {
        let mut p = sample();
        f(&mut p);
        let e = p.encode_body().unwrap_err().to_string();
        assert!(e.contains(want), "case {i}: {e:?} should contain {want:?}");
    }
    // Zero sites and empty optional texts are fine.
    let mut p = sample();
    p.sites.clear();
    p.meta.description.clear();
    p.meta.author.clear();
    p.target.build_id = None;
    assert_eq!(parse(&p.to_file_unsigned().unwrap()).unwrap().patch, p);
}

#[test]
fn invisible_formatting_characters_are_refused() {
    // Bidi embeddings/overrides/isolates, LRM/RLM, ALM, and other Cf characters (ZWJ, BOM).
    for ch in [
        '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200e}', '\u{200f}', '\u{061c}',
        '\u{200d}', '\u{feff}',
    ] {
        // The builder's validation (encode_body parses what it wrote)...
        let mut p = sample();
        p.meta.name = format!("fix{ch}cve");
        let e = p.encode_body().expect_err("refused").to_string();
        assert!(
            e.contains("meta.name") && e.contains("formatting"),
            "{ch:?}: {e}"
        );
        let mut p = sample();
        p.meta.description = format!("line one\n{ch}line two");
        assert!(p.encode_body().is_err(), "{ch:?} in the description");

        // ...and the parser, on a file whose name was swapped after encoding (same length).
        let good = sample().to_file_unsigned().expect("encodes");
        let name = sample().meta.name;
        let at = good
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .expect("name in the file");
        let mut text = [0u8; 4];
        let enc = ch.encode_utf8(&mut text).as_bytes();
        assert!(name.len() >= enc.len());
        let mut bad = good.clone();
        bad[at..at + enc.len()].copy_from_slice(enc);
        let e = parse(&bad).expect_err("parser refuses");
        assert!(
            matches!(e, ParseError::FormatChar { ch: c, .. } if c == ch),
            "{ch:?}: {e}"
        );
    }
    // Ordinary non-ASCII text is fine.
    let mut p = sample();
    p.meta.description = "Correctif: déréférencement — ошибка, 修复".into();
    p.encode_body().expect("ordinary Unicode");
}

#[test]
fn read_patch_reads_at_most_the_limit() {
    let file = sample().to_file_unsigned().expect("encodes");
    assert_eq!(read_patch(&file[..]).expect("a patch"), file);
    // An endless input is refused after MAX_FILE + 1 bytes instead of exhausting memory.
    let err = read_patch(std::io::repeat(0)).expect_err("endless");
    assert!(
        matches!(err, ReadError::TooLarge { max } if max == limits::MAX_FILE),
        "{err}"
    );
    assert!(read_patch(&vec![0u8; limits::MAX_FILE][..]).is_ok());
}

#[test]
fn header_errors_name_offset_and_field() {
    let good = sample().to_file_unsigned().unwrap();
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(parse(&b), Err(ParseError::BadMagic { .. })));
    let mut b = good.clone();
    b[8] = 3;
    let e = parse(&b).unwrap_err();
    assert!(
        matches!(
            e,
            ParseError::UnsupportedVersion {
                offset: 8,
                found: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("versions 1 and 2"), "{e}");
    // A version-1 body under a version-2 header: refused at the body tag.
    let mut b = good.clone();
    b[8] = 2;
    let e = parse(&b).unwrap_err();
    assert!(
        matches!(&e, ParseError::Invalid { offset: 20, field, .. } if field == "body_tag"),
        "{e}"
    );
    let mut b = good.clone();
    b[11] = 1;
    assert!(matches!(
        parse(&b),
        Err(ParseError::Reserved { offset: 10, .. })
    ));
    let mut b = good.clone();
    b.push(0);
    let e = parse(&b).unwrap_err();
    assert!(
        matches!(e, ParseError::SizeMismatch { offset: 16, .. }),
        "{e}"
    );
    // Body length pointing past the end.
    let mut b = good.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        parse(&b),
        Err(ParseError::SizeMismatch { offset: 12, .. })
    ));
    // Oversized file.
    let big = vec![0u8; limits::MAX_FILE + 1];
    assert!(matches!(parse(&big), Err(ParseError::FileTooLarge { .. })));
}

#[test]
fn body_errors_name_offset_and_field() {
    let p = sample();
    let good = p.to_file_unsigned().unwrap();
    // Find the first relocation's kind byte: it follows "offset" (u32 = 1).
    let body = p.encode_body().unwrap();
    let needle = [1u8, 0, 0, 0, 1, 3, 0, 0, 0, b'm', b'i', b'x'];
    let at = body
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + HEADER_LEN
        + 4;
    let mut b = good.clone();
    b[at] = 9;
    let e = parse(&b).unwrap_err();
    assert_eq!(e.offset(), at);
    let s = e.to_string();
    assert!(
        s.contains("sites[0].relocations[0].kind") && s.contains("unknown value 9"),
        "{s}"
    );
    // An option tag other than 0/1 (build_id present flag).
    let tname = b"guest v1";
    let at = body.windows(tname.len()).position(|w| w == tname).unwrap() + tname.len() + HEADER_LEN;
    let mut b = good.clone();
    b[at] = 2;
    let e = parse(&b).unwrap_err();
    assert!(e.to_string().contains("target.build_id.present"), "{e}");
    assert_eq!(e.offset(), at);
    // Invalid UTF-8 in the name.
    let mut b = good.clone();
    b[HEADER_LEN + 4] = 0xff;
    let e = parse(&b).unwrap_err();
    assert!(matches!(e, ParseError::BadUtf8 { offset: 24, .. }), "{e}");
}

#[test]
fn trailing_bytes_in_body_are_refused() {
    let p = sample();
    let mut body = p.encode_body().unwrap();
    body.push(0);
    // Hand-assemble a file whose header declares the longer body.
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&body);
    f.push(0);
    let e = parse(&f).unwrap_err();
    assert!(
        matches!(e, ParseError::Trailing { after: "body", .. }),
        "{e}"
    );
}

#[test]
fn signatures() {
    let p = sample();
    let k1 = key(1);
    let signed = p.to_file_signed(&k1).unwrap();
    let parsed = parse(&signed).unwrap();
    assert_eq!(parsed.verify(&[k1.public()]), Ok(k1.key_id()));
    assert_eq!(
        parsed.verify(&[key(2).public(), k1.public()]),
        Ok(k1.key_id())
    );
    // Wrong key.
    assert_eq!(
        parsed.verify(&[key(2).public()]),
        Err(VerifyError::UntrustedKey {
            key_id: k1.key_id()
        })
    );
    // A key that claims the right id but is another key: signature mismatch.
    let SignatureBlock::Ed25519 { signature, .. } = parsed.signature.clone() else {
        panic!()
    };
    let mut forged = signed.clone();
    let n = forged.len();
    forged[n - 72..n - 64].copy_from_slice(&key(2).key_id().0);
    let _ = signature;
    assert_eq!(
        parse(&forged).unwrap().verify(&[key(2).public()]),
        Err(VerifyError::BadSignature {
            key_id: key(2).key_id()
        })
    );
    // Unsigned is refused.
    let u = parse(&p.to_file_unsigned().unwrap()).unwrap();
    assert_eq!(u.verify(&[k1.public()]), Err(VerifyError::Unsigned));
    // Signing an existing file (and re-signing) keeps the id.
    let s2 = sign_file(&p.to_file_unsigned().unwrap(), &key(3)).unwrap();
    let p2 = parse(&s2).unwrap();
    assert_eq!(p2.id, parsed.id);
    assert_eq!(p2.verify(&[key(3).public()]), Ok(key(3).key_id()));
    assert_eq!(sign_file(&s2, &k1).unwrap(), signed);
    assert_eq!(
        unsigned_file(&signed).unwrap(),
        p.to_file_unsigned().unwrap()
    );
}

#[test]
fn every_flipped_bit_fails_verification() {
    let k = key(1);
    let signed = sample().to_file_signed(&k).unwrap();
    let trusted = [k.public()];
    for i in 0..signed.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = signed.clone();
            b[i] ^= bit;
            if let Ok(p) = parse(&b) {
                assert!(
                    p.verify(&trusted).is_err(),
                    "flip {bit:#x} at byte {i} still verifies"
                );
            }
        }
    }
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    let signed = sample().to_file_signed(&key(1)).unwrap();
    for n in 0..signed.len() {
        let e = parse(&signed[..n]).unwrap_err();
        assert!(
            e.offset() <= n,
            "error offset {} beyond truncation {n}: {e}",
            e.offset()
        );
    }
    assert!(parse(&signed).is_ok());
}

#[test]
fn key_files() {
    let k = key(7);
    let text = k.to_file_text();
    assert!(text.starts_with(SECRET_KEY_HEADER));
    let k2 = SecretKey::from_file_text(&text).unwrap();
    assert_eq!(k2.key_id(), k.key_id());
    let pubtext = k.public().to_file_text();
    assert_eq!(PublicKey::from_file_text(&pubtext).unwrap(), k.public());
    assert_eq!(
        PublicKey::from_file_text(pubtext.trim_end()).unwrap(),
        k.public(),
        "final newline optional"
    );
    assert!(matches!(
        PublicKey::from_file_text(&text),
        Err(KeyFileError::BadHeader { .. })
    ));
    assert!(matches!(
        SecretKey::from_file_text(&pubtext),
        Err(KeyFileError::BadHeader { .. })
    ));
    let bad = format!("{PUBLIC_KEY_HEADER}\nzz\n");
    assert!(matches!(
        PublicKey::from_file_text(&bad),
        Err(KeyFileError::BadHex { .. })
    ));
    let extra = format!("{pubtext}more\n");
    assert!(matches!(
        PublicKey::from_file_text(&extra),
        Err(KeyFileError::Trailing { .. })
    ));
    // Key id = first 8 bytes of SHA-256(public key).
    use sha2::Digest;
    let h = sha2::Sha256::digest(k.public().to_bytes());
    assert_eq!(k.key_id().0, h[..8]);
    let g1 = SecretKey::generate().unwrap();
    let g2 = SecretKey::generate().unwrap();
    assert_ne!(g1.key_id(), g2.key_id());
}

#[test]
fn regression_inputs_from_fuzzing() {
    // Every file in tests/fuzz-regressions/ must parse or fail without panicking,
    // and whatever parses must re-encode to the same bytes (canonical).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        check_canonical(&bytes);
    }
}

/// Parse; if it parses, the file must be exactly the canonical encoding.
fn check_canonical(bytes: &[u8]) {
    if let Ok(p) = parse(bytes) {
        let again = match &p.signature {
            SignatureBlock::Unsigned => p.patch.to_file_unsigned().unwrap(),
            SignatureBlock::Ed25519 { .. } => {
                let mut v = p.patch.to_file_signed(&key(0)).unwrap();
                let n = v.len();
                v[n - 72..].copy_from_slice(&bytes[bytes.len() - 72..]);
                v
            }
        };
        assert_eq!(again, bytes, "accepted a non-canonical encoding");
    }
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_.$]{0,12}"
}

fn arb_site() -> impl Strategy<Value = Site> {
    (
        prop_oneof![Just(SiteKind::Function), Just(SiteKind::Micropatch)],
        prop_oneof![
            (arb_name(), any::<u64>()).prop_map(|(name, offset)| Location::Symbol { name, offset }),
            any::<u64>().prop_map(Location::Address),
        ],
        prop::collection::vec(any::<u8>(), 1..40),
        prop::collection::vec(any::<u8>(), 8..80),
        prop::collection::vec((0u8..4, arb_name(), any::<i64>()), 0..6),
    )
        .prop_map(|(kind, target, expected, code, rel)| {
            let relocations = rel
                .into_iter()
                .enumerate()
                .filter(|(i, _)| (i + 1) * 8 <= code.len())
                .map(|(i, (k, symbol, addend))| Relocation {
                    offset: (i * 8) as u32,
                    kind: [
                        RelocKind::Rel32,
                        RelocKind::Abs64,
                        RelocKind::Abs32,
                        RelocKind::Abs32S,
                    ][k as usize],
                    target: RelocTarget::Symbol(symbol),
                    addend,
                })
                .collect();
            Site {
                kind,
                target,
                expected,
                code,
                relocations,
            }
        })
}

fn arb_patch() -> impl Strategy<Value = Patch> {
    (
        arb_name(),
        "[ -~\n\t]{0,40}",
        "[ -~]{0,20}",
        any::<u64>(),
        prop::collection::vec("CVE-[0-9]{4}-[0-9]{1,5}", 0..4),
        prop::collection::vec(any::<[u8; 32]>(), 0..3),
        prop::option::of(prop::collection::vec(any::<u8>(), 1..30)),
        any::<[u8; 32]>(),
        prop::collection::vec(arb_site(), 0..5),
        prop::option::of((0u32..13, prop::collection::vec(any::<u8>(), 1..40))),
    )
        .prop_map(
            |(name, description, author, created, adv, rep, build_id, sha, sites, data)| {
                let mut p = Patch {
                    meta: Metadata {
                        name,
                        description,
                        author,
                        created,
                        advisories: adv,
                        replaces: rep.into_iter().map(PatchId).collect(),
                    },
                    target: TargetIdentity {
                        name: "guest".into(),
                        build_id,
                        text_sha256: Some(sha),
                    },
                    sites,
                    data: Vec::new(),
                };
                p.normalize();
                p.meta.advisories.dedup();
                p.meta.replaces.dedup();
                p.sites.dedup_by(|a, b| a.target == b.target);
                // Version 2: a data block, the target of the first relocation there is.
                if let (Some((align_log, bytes)), Some(r)) = (
                    data,
                    p.sites
                        .iter_mut()
                        .flat_map(|s| s.relocations.iter_mut())
                        .next(),
                ) {
                    r.target = RelocTarget::Data(0);
                    p.data.push(DataBlock {
                        align: 1 << align_log,
                        bytes,
                    });
                }
                p
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes: the parser returns (never panics), and anything it
    /// accepts is canonical.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_canonical(&bytes);
    }

    /// Arbitrary bytes behind a valid header, so the body parser is reached.
    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..600), sig in 0usize..80) {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&(1 + (sig % 2) as u16).to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&(sig.min(body.len()) as u32).to_le_bytes());
        f.extend_from_slice(&body);
        check_canonical(&f);
    }

    /// Valid patches round-trip exactly, and mutations of them never panic.
    #[test]
    fn arbitrary_patches_round_trip(p in arb_patch(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let bytes = p.to_file_signed(&key(1)).unwrap();
        let parsed = parse(&bytes).unwrap();
        prop_assert_eq!(&parsed.patch, &p);
        prop_assert_eq!(parsed.id, p.id().unwrap());
        prop_assert!(parsed.verify(&[key(1).public()]).is_ok());
        let mut m = bytes.clone();
        for (i, x) in flips {
            let n = m.len();
            m[i % n] ^= x | 1;
        }
        if let Ok(q) = parse(&m) {
            prop_assert!(q.verify(&[key(1).public()]).is_err());
        }
    }
}

#[test]
fn inspect_is_linear_and_summarises_large_sites() {
    // One site of 65,536 `call rel32`s, each with a relocation: this took minutes (a linear
    // instruction search per relocation) and printed every line.
    let n = limits::MAX_RELOCATIONS;
    let mut p = sample();
    p.sites[0].code = [0xe8, 0, 0, 0, 0].repeat(n);
    p.sites[0].relocations = (0..n)
        .map(|k| Relocation {
            offset: (k * 5 + 1) as u32,
            kind: RelocKind::Rel32,
            target: RelocTarget::Symbol("mix".into()),
            addend: -4,
        })
        .collect();
    let parsed = parse(&p.to_file_unsigned().expect("encodes")).expect("parses");
    let started = std::time::Instant::now();
    let summary = inspect_text(&parsed, None, false);
    let elapsed = started.elapsed();
    assert!(elapsed.as_secs() < 30, "inspect took {elapsed:?}");
    assert!(
        summary.len() < 64 * 1024,
        "{} bytes of summary",
        summary.len()
    );
    assert!(
        summary.contains(&format!("... {} more relocations", n - 32)),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("... {} more instructions", n - 64)),
        "{summary}"
    );
    assert!(summary.contains("call    mix"), "{summary}");

    let full = inspect_text(&parsed, None, true);
    assert!(!full.contains("more relocations"));
    assert_eq!(full.matches("call    mix").count(), n);
    let json = inspect_json(&parsed, None, false);
    let site = &json["sites"][0];
    assert_eq!(site["new_disassembly"].as_array().map(Vec::len), Some(64));
    assert_eq!(site["new_disassembly_lines"], n);
    assert_eq!(site["relocations"].as_array().map(Vec::len), Some(n));
}

// ---------------------------------------------------------------- format version 2: data

/// The data block string of [`sample_v2`], unique in its files.
const LITERAL: &[u8] = b"%s patched by hvpatch\n\0";

/// [`sample`] with two read-only data blocks: a string for the function site's code and an
/// aligned constant for the micropatch's.
fn sample_v2() -> Patch {
    let mut p = sample();
    p.data = vec![
        DataBlock {
            align: 1,
            bytes: LITERAL.to_vec(),
        },
        DataBlock {
            align: 8,
            bytes: 0x0123_4567_89ab_cdefu64.to_le_bytes().to_vec(),
        },
    ];
    // compute: the abs64 field now holds the address of the string + 3.
    p.sites[0].relocations[1].target = RelocTarget::Data(0);
    p.sites[0].relocations[1].addend = 3;
    // triangle+0x12: a rel32 to the constant.
    p.sites[1].relocations.push(Relocation {
        offset: 2,
        kind: RelocKind::Rel32,
        target: RelocTarget::Data(1),
        addend: -4,
    });
    p
}

/// Where the data of a [`sample_v2`] file starts: the `data` count, then block 0's `align` and
/// its `bytes` length, then [`LITERAL`].
fn data_offsets(file: &[u8]) -> (usize, usize, usize) {
    let lit = file
        .windows(LITERAL.len())
        .position(|w| w == LITERAL)
        .expect("the literal is in the file");
    (lit - 12, lit - 8, lit - 4)
}

#[test]
fn version_2_round_trips_and_version_1_is_written_without_data() {
    let p = sample_v2();
    assert_eq!(p.format_version(), 2);
    for bytes in [
        p.to_file_unsigned().unwrap(),
        p.to_file_signed(&key(1)).unwrap(),
    ] {
        assert_eq!(&bytes[8..10], &[2, 0], "header version 2");
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 4], &BODY_TAG_V2);
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.version, 2);
        assert_eq!(parsed.patch, p);
        assert_eq!(parsed.id, p.id().unwrap());
        check_canonical(&bytes);
    }
    let signed = p.to_file_signed(&key(1)).unwrap();
    parse(&signed).unwrap().verify(&[key(1).public()]).unwrap();
    // Re-signing and stripping keep the version and the id.
    let resigned = sign_file(&signed, &key(2)).unwrap();
    let stripped = unsigned_file(&signed).unwrap();
    for f in [&resigned, &stripped] {
        let q = parse(f).unwrap();
        assert_eq!((q.version, q.id), (2, p.id().unwrap()));
    }
    // Without data the same patch is version 1, byte for byte what version 1 always was.
    let v1 = sample();
    assert_eq!(v1.format_version(), 1);
    let f = v1.to_file_unsigned().unwrap();
    assert_eq!(&f[8..10], &[1, 0]);
    assert_eq!(parse(&f).unwrap().version, 1);
    assert_ne!(p.id().unwrap(), v1.id().unwrap());
}

/// Files written by the version-1-only build (commit 8f30581) of [`sample`]: this build reads
/// them as the same patch with the same id, and writes them again byte for byte.
#[test]
fn version_1_files_of_the_previous_build_still_parse() {
    for (name, bytes) in [
        (
            "unsigned",
            &include_bytes!("fixtures/v1-sample-unsigned.hpatch")[..],
        ),
        (
            "signed",
            &include_bytes!("fixtures/v1-sample-signed.hpatch")[..],
        ),
    ] {
        let parsed = parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.version, 1, "{name}");
        assert_eq!(parsed.patch, sample(), "{name}");
        assert_eq!(parsed.id, sample().id().unwrap(), "{name}");
        check_canonical(bytes);
        if name == "signed" {
            parsed.verify(&[key(1).public()]).unwrap();
            assert_eq!(sample().to_file_signed(&key(1)).unwrap(), bytes);
        } else {
            assert_eq!(sample().to_file_unsigned().unwrap(), bytes);
        }
    }
}

#[test]
fn corrupted_data_is_refused_naming_offset_and_field() {
    let good = sample_v2().to_file_unsigned().unwrap();
    let (count_at, align_at, len_at) = data_offsets(&good);
    let set = |at: usize, v: u32| {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    // A data length over the limit, one the file cannot hold, zero, and one byte off.
    let e = parse(&set(len_at, limits::MAX_DATA as u32 + 1)).unwrap_err();
    assert!(
        matches!(&e, ParseError::OverLimit { offset, field, .. } if *offset == len_at && field == "data[0].bytes"),
        "{e}"
    );
    let e = parse(&set(len_at, 1 << 20)).unwrap_err();
    assert!(
        matches!(&e, ParseError::Truncated { field, .. } if field == "data[0].bytes"),
        "{e}"
    );
    let e = parse(&set(len_at, 0)).unwrap_err();
    assert!(
        matches!(&e, ParseError::Empty { offset, .. } if *offset == len_at),
        "{e}"
    );
    for delta in [1u32, u32::MAX] {
        let n = (LITERAL.len() as u32).wrapping_add(delta);
        assert!(parse(&set(len_at, n)).is_err(), "length {n}");
    }
    // Alignments that are not a power of two up to a page.
    for bad in [0u32, 3, 8192] {
        let e = parse(&set(align_at, bad)).unwrap_err();
        assert!(
            matches!(&e, ParseError::Invalid { offset, field, .. } if *offset == align_at && field == "data[0].align"),
            "{bad}: {e}"
        );
    }
    // No data at all in a version-2 file, or more blocks than the limit.
    let e = parse(&set(count_at, 0)).unwrap_err();
    assert!(
        matches!(&e, ParseError::NotCanonical { offset, .. } if *offset == count_at),
        "{e}"
    );
    let e = parse(&set(count_at, limits::MAX_DATA_BLOCKS as u32 + 1)).unwrap_err();
    assert!(matches!(e, ParseError::OverLimit { .. }), "{e}");
    // A version-2 body read as version 1: its tag is an impossible name length.
    let mut b = good.clone();
    b[8] = 1;
    let e = parse(&b).unwrap_err();
    assert!(
        matches!(&e, ParseError::OverLimit { offset: 20, field, .. } if field == "meta.name"),
        "{e}"
    );
    // A flipped data byte in a signed file: parses (it is a valid patch), never verifies.
    let signed = sample_v2().to_file_signed(&key(1)).unwrap();
    let (_, _, len_at) = data_offsets(&signed);
    let mut b = signed.clone();
    b[len_at + 4] ^= 0x20;
    let q = parse(&b).unwrap();
    assert_ne!(q.id, sample_v2().id().unwrap());
    assert!(matches!(
        q.verify(&[key(1).public()]),
        Err(VerifyError::BadSignature { .. })
    ));
    // Truncated anywhere: an error at or before the cut.
    for n in 0..signed.len() {
        let e = parse(&signed[..n]).unwrap_err();
        assert!(e.offset() <= n, "offset {} beyond {n}: {e}", e.offset());
    }
}

#[test]
fn data_rules_are_checked_by_the_encoder() {
    // A relocation to a block that does not exist.
    let mut p = sample_v2();
    p.sites[1].relocations[0].target = RelocTarget::Data(2);
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("data block 2 does not exist"), "{e}");
    // A block nothing refers to.
    let mut p = sample_v2();
    p.data.push(DataBlock {
        align: 4,
        bytes: vec![1, 2, 3],
    });
    let e = p.validate().unwrap_err().to_string();
    assert!(
        e.contains("data[2]") && e.contains("no relocation refers"),
        "{e}"
    );
    // A data relocation without any data.
    let mut p = sample();
    p.sites[0].relocations[0].target = RelocTarget::Data(0);
    assert!(p.validate().is_err());
    // Empty and oversized blocks, bad alignment.
    for (bytes, align) in [
        (vec![], 1),
        (vec![0; limits::MAX_DATA + 1], 1),
        (vec![1], 6),
        (vec![1], limits::MAX_DATA_ALIGN * 2),
    ] {
        let mut p = sample_v2();
        p.data[1] = DataBlock { align, bytes };
        assert!(p.validate().is_err(), "align {align}");
    }
}

#[test]
fn inspect_shows_the_data_blocks_and_data_relocations() {
    let parsed = parse(&sample_v2().to_file_signed(&key(1)).unwrap()).unwrap();
    let text = inspect_text(&parsed, Some(&[key(1).public()]), false);
    assert!(text.contains("format       version 2,"), "{text}");
    assert!(
        text.contains("data         2 read-only blocks, 31 bytes"),
        "{text}"
    );
    assert!(
        text.contains(r#"data[0]  23 bytes, align 1: "%s patched by hvpatch\n\x00""#),
        "{text}"
    );
    assert!(text.contains("data[1]  8 bytes, align 8"), "{text}");
    assert!(text.contains("abs64   data[0]+0x3"), "{text}");
    assert!(text.contains("rel32   data[1]-0x4"), "{text}");
    let json = inspect_json(&parsed, None, false);
    assert_eq!(json["format_version"], 2);
    assert_eq!(json["data"][0]["align"], 1);
    assert_eq!(json["data"][1]["bytes"], "efcdab8967452301");
    assert_eq!(json["sites"][0]["relocations"][1]["data"], 0);
    assert!(json["sites"][0]["relocations"][1]["symbol"].is_null());
    let v1 = parse(&sample().to_file_unsigned().unwrap()).unwrap();
    assert!(inspect_text(&v1, None, false).contains("format       version 1,"));
    assert!(inspect_text(&v1, None, false).contains("data         -"));
}
