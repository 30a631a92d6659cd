use super::*;

/// `compute` of the v1 test guest (rustc, frame pointers): push rbp; mov rbp,rsp; push rbx;
/// push rax; mov rbx,rdi; call triangle; ...
const COMPUTE: [u8; 35] = [
    0x55, 0x48, 0x89, 0xe5, 0x53, 0x50, 0x48, 0x89, 0xfb, 0xe8, 0x22, 0x00, 0x00, 0x00, 0x48,
    0xc1, 0xc3, 0x20, 0x48, 0x31, 0xc3, 0x48, 0x89, 0xdf, 0x48, 0x83, 0xc4, 0x08, 0x5b, 0x5d,
    0xe9, 0x2d, 0x00, 0x00, 0x00,
];

fn function_site(at: u64, bytes: &[u8]) -> SiteInput<'_> {
    SiteInput {
        name: "f".into(),
        kind: SiteKind::Function,
        at,
        expected: bytes,
        current: bytes,
        function: None,
    }
}

#[test]
fn function_jump_displaces_whole_instructions() {
    let a = analyze(&function_site(0x100480, &COMPUTE), JMP_REL32_LEN).unwrap();
    assert_eq!(a.jump_at, 0x100480);
    assert_eq!(a.displaced_len(), 5); // push rbp; mov rbp,rsp; push rbx
    let p = build(&a, &[0xc3], 0x7fe0_0000, 0x7fe0_0040).unwrap();
    assert_eq!(p.jump[0], 0xe9);
    assert_eq!(p.original, COMPUTE[..5]);
    assert_eq!(p.relocate_rip(0x100480), Some(0x100480));
    assert_eq!(p.relocate_rip(0x100481), Some(0x7fe0_0041));
    assert_eq!(p.relocate_rip(0x100484), Some(0x7fe0_0044));
    assert_eq!(p.relocate_rip(0x100485), Some(0x100485));
}
