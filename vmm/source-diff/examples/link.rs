//! Builds a patch from two already compiled builds of one unit, without a source tree:
//! `cargo run -p source-diff --example link -- VMLINUZ UNIT PRE.o POST.o OUT.hpatch`
//! (both built as the kernel was: no WARN rewrite).

use patch_format::Metadata;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, vmlinuz, unit, pre, post, out] = args.as_slice() else {
        return Err("usage: link VMLINUZ UNIT PRE.o POST.o OUT.hpatch".into());
    };
    let image = linux_guest::attach::KernelImage::from_file(std::path::Path::new(vmlinuz))?;
    let objects = [source_diff::compile::UnitObjects {
        unit: unit.clone(),
        pre: std::fs::read(pre)?,
        base: std::fs::read(pre)?,
        post: std::fs::read(post)?,
        warn_rewritten: false,
        plain: None,
        // Unknown flags: the IPA-RA check applies (the safe side).
        ipa_ra: true,
    }];
    let kernel = source_diff::TargetKernel {
        vmlinux: &image.vmlinux,
        kallsyms: &image.kallsyms,
        banner: &image.banner,
    };
    let report = source_diff::SourceReport {
        files: vec![unit.clone()],
        source: "objects".into(),
        ..Default::default()
    };
    let meta = Metadata {
        name: "example".into(),
        ..Metadata::default()
    };
    match source_diff::build::build_from_objects(&kernel, &objects, report, meta) {
        Ok((patch, report)) => {
            println!("{}", patch.meta.description);
            std::fs::write(out, patch.to_file_unsigned()?)?;
            println!("changed {:?} added {:?}", report.changed, report.added);
        }
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            println!("REFUSED: {s}");
        }
    }
    Ok(())
}
