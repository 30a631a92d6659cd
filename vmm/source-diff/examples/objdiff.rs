//! Prints what the object differ sees between two builds of one unit:
//! `cargo run -p source-diff --example objdiff -- PRE.o POST.o`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, pre, post] = args.as_slice() else {
        return Err("usage: objdiff PRE.o POST.o".into());
    };
    let pre = source_diff::elf::Unit::parse(&std::fs::read(pre)?)?;
    let post = source_diff::elf::Unit::parse(&std::fs::read(post)?)?;
    let d = source_diff::objdiff::diff(&pre, &post);
    println!("changed: {:?}", d.changed);
    println!("added: {:?}", d.added);
    println!("removed: {:?}", d.removed);
    println!("data changed: {:?}", d.data_changed);
    println!("data added: {:?}", d.data_added);
    println!("static locals: {:?}", d.locals);
    Ok(())
}
