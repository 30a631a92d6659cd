//! Lists the kallsyms entries of a kernel image whose names start with a prefix:
//! `cargo run -p source-diff --example kallsyms -- VMLINUZ PREFIX`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, vmlinuz, prefix] = args.as_slice() else {
        return Err("usage: kallsyms VMLINUZ PREFIX".into());
    };
    let image = linux_guest::attach::KernelImage::from_file(std::path::Path::new(vmlinuz))?;
    for s in image.kallsyms.symbols() {
        if s.name.starts_with(prefix.as_str()) {
            println!("{:016x} {} {}", s.address, s.kind, s.name);
        }
    }
    Ok(())
}
