//! Building a patch from the test guest's two builds (from `guest-tools`).

use guest_tools::{GuestBuild, test_guest};
use patch_format::*;

#[test]
fn test_guest_v1_v2_diff_is_compute_and_triangle() {
    let (v1, v2) = (test_guest(GuestBuild::V1), test_guest(GuestBuild::V2));
    assert!(
        !v1.is_empty() && !v2.is_empty(),
        "guest-tools built no images"
    );
    let info = PatchInfo {
        meta: Metadata {
            name: "test-guest-fix".into(),
            created: 0,
            ..Metadata::default()
        },
        target_name: Some("test-guest v1".into()),
    };
    // The whole diff is exactly the two fixed functions; the rest (mix, next_input, ...) moved
    // but did not change. The guest keeps its build number in a named static so that code
    // reading it is identical in both builds.
    let all = diff_elfs(v1, v2).unwrap();
    assert_eq!(all.changed, vec!["compute", "triangle"], "{all:#?}");
    assert!(all.added.is_empty() && all.removed.is_empty(), "{all:#?}");
    assert!(all.unchanged >= 2, "mix and another function are unchanged");
    // With no --function, the builder takes every changed function.
    let every = build_from_elfs(v1, v2, &[], &info).unwrap();
    assert_eq!(every.report.changed, vec!["compute", "triangle"]);

    // The patch an operator would ship: the two fixed functions.
    let out = build_from_elfs(v1, v2, &["compute".into(), "triangle".into()], &info).unwrap();
    assert_eq!(out.report.changed, vec!["compute", "triangle"]);
    let p = &out.patch;
    assert!(
        p.target.build_id.is_some(),
        "the guest is linked with --build-id"
    );
    let key = SecretKey::from_seed(&[9; 32]);
    let file = p.to_file_signed(&key).unwrap();
    let parsed = parse(&file).unwrap();
    assert_eq!(parsed.patch, *p);
    assert_eq!(parsed.verify(&[key.public()]), Ok(key.key_id()));
    let text = inspect_text(&parsed, Some(&[key.public()]), true);
    assert!(text.contains("site 0: function at compute"), "{text}");
    assert!(text.contains("VALID"), "{text}");
}
