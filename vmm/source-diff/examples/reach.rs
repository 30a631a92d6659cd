//! Which built-in units of a prepared tree the given headers reach:
//! `cargo run -p source-diff --example reach -- TREE CC HEADER...`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, cc, headers @ ..] = args.as_slice() else {
        return Err("usage: reach TREE CC HEADER...".into());
    };
    let tree = source_diff::tree::SourceTree {
        dir: dir.into(),
        cc: cc.clone(),
        describe: dir.clone(),
        prepared_now: false,
    };
    let t = std::time::Instant::now();
    let units = source_diff::reach::KernelUnits::of(&tree)?;
    eprintln!(
        "{} C units, {} assembly units ({:.1} s)",
        units.c.len(),
        units.asm.len(),
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    let index = source_diff::reach::IncludeIndex::of_tree(&tree.dir);
    eprintln!("include index: {:.1} s", t.elapsed().as_secs_f64());
    let reached = index.includers(headers);
    let c: Vec<&String> = reached.iter().filter(|f| units.c.contains(*f)).collect();
    let asm: Vec<&String> = reached.iter().filter(|f| units.asm.contains(*f)).collect();
    println!(
        "{} includers; built-in C units {}, assembly {}",
        reached.len(),
        c.len(),
        asm.len()
    );
    for u in c.iter().take(40) {
        println!("  {u}");
    }
    Ok(())
}
