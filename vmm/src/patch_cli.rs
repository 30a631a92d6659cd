//! `vmm patch …`: build, sign, verify and inspect hot-patch files.
//!
//! A thin layer over the `patch-format` crate: argument parsing, file I/O and
//! messages for the operator. `anyhow` is used only here, at the binary's edge.
//! `apply`, `list` and `revert` act on a [`PatchTarget`]: a VMM's API socket or a QEMU VM.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use patch_format::{
    BuildOutput, Metadata, PatchId, PatchInfo, PublicKey, SecretKey, SignatureBlock,
    build_from_elfs, build_from_manifest_file, inspect_json, inspect_text, parse, sign_file,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use control_api::client::ApiClient;
use patch_engine::journal::{PatchRecord, PatchState};
use qemu_backend::QemuGuest;
use serde::{Deserialize, Serialize};

use crate::exit::ApiFailure;

#[derive(Subcommand, Debug)]
pub enum PatchCommand {
    /// Build a patch from two builds of the guest (--old/--new), from a manifest, or for a stock
    /// Linux kernel from a C object (--linux-kernel). Code built from an object may use
    /// read-only data (string literals, const arrays), carried as data blocks (format version
    /// 2); writable data is refused.
    Build(Box<BuildArgs>),
    /// Make a signing key pair: NAME.key (secret, mode 0600) and NAME.pub.
    Keygen(KeygenArgs),
    /// Sign (or re-sign) a patch file; its id does not change.
    Sign(SignArgs),
    /// Check a patch's signature against trusted public keys.
    Verify(VerifyArgs),
    /// Show a patch: id, format version, signature, metadata, target, read-only data blocks,
    /// sites with disassembly.
    Inspect(InspectArgs),
    /// Apply a patch to a running VM (through its API socket, or to a QEMU VM through its QMP
    /// socket and a gdbstub). Applying it again is a no-op.
    Apply(ApplyArgs),
    /// List the patches a running VM has seen: id, name, state, sites, blackout.
    List(ListArgs),
    /// Revert an applied patch: every byte it changed is restored.
    Revert(RevertArgs),
}

/// Which VM: one of this VMM's (its API socket), or one running under stock QEMU.
#[derive(Args, Debug)]
pub struct SockArg {
    /// The VM's API socket (`vmm run --api-sock PATH`).
    #[arg(
        long,
        required_unless_present_any = ["qemu_gdb", "qmp"],
        conflicts_with_all = ["qemu_gdb", "qmp"]
    )]
    pub api_sock: Option<PathBuf>,
    #[command(flatten)]
    pub qemu: QemuArgs,
}

/// A VM under stock QEMU, patched through its QMP socket and a gdbstub (`docs/qemu-backend.md`).
#[derive(Args, Debug)]
pub struct QemuArgs {
    /// Patch a VM running under QEMU through its QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    /// Alone it is enough: for the length of the command vmm starts a gdbstub on a Unix socket
    /// in a new owner-only directory (HMP `gdbserver`), then stops it and removes the directory.
    #[arg(long, value_name = "PATH", requires = "state_dir")]
    pub qmp: Option<PathBuf>,
    /// Use the VM's own gdbstub instead: HOST:PORT (`-gdb tcp:HOST:PORT`) or unix:PATH
    /// (`-gdb unix:PATH,server=on,wait=off`).
    #[arg(long, value_name = "HOST:PORT|unix:PATH", requires_all = ["qmp", "state_dir"])]
    pub qemu_gdb: Option<String>,
    /// The ELF image the QEMU guest booted: its symbols and build identity.
    #[arg(long, value_name = "ELF", required_unless_present_any = ["api_sock", "linux_kernel"])]
    pub image: Option<PathBuf>,
    /// The guest runs this stock Linux kernel (the bzImage it booted): symbols from its
    /// kallsyms, the KASLR slide from the IDT, the arena (--arena, which the kernel must not
    /// use: boot it with memmap=2M$GPA) mapped into the kernel's address space.
    #[arg(
        long = "linux-kernel",
        value_name = "BZIMAGE",
        conflicts_with = "image"
    )]
    pub linux_kernel: Option<PathBuf>,
    /// Patch states (the journal): QEMU keeps none, so give every command on one VM the same
    /// directory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Accept patches signed by this public key. Repeatable.
    #[arg(long = "trusted-key", value_name = "PUB")]
    pub trusted_keys: Vec<PathBuf>,
    /// Accept unsigned patches too (development only).
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Guest-physical address of the 2 MiB patch arena: memory the guest never uses. For an
    /// --image guest it must be mapped 1:1 and executable by the guest (the test guest maps its
    /// low 4 GiB so; run QEMU with at least 2 GiB for the default); for --linux-kernel it is the
    /// memory reserved with memmap=2M$GPA, which the backend maps into the kernel.
    #[arg(long, value_name = "GPA", default_value = "0x7fe00000", value_parser = parse_gpa)]
    pub arena: u64,
}

fn parse_gpa(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let v = match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    match v {
        Ok(v) if v % 4096 == 0 => Ok(v),
        Ok(_) => Err("the arena must be page-aligned".into()),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// Both arenas (the test guest's and a Linux kernel's) are one 2 MiB page.
const ARENA_SIZE: u64 = linux_guest::arena::ARENA_SIZE;
const _: () = assert!(ARENA_SIZE == kvm_vmm::layout::PATCH_ARENA_SIZE);

/// Attaches to the QEMU VM named by `q`, for one command: through its own gdbstub with
/// --qemu-gdb, else through a gdbstub started over QMP for the command.
fn qemu_attach(q: &QemuArgs) -> Result<Arc<QemuGuest>> {
    let Some(qmp) = &q.qmp else {
        bail!("a QEMU VM needs --qmp (its QMP socket) and --state-dir");
    };
    Ok(Arc::new(match &q.qemu_gdb {
        Some(gdb) => QemuGuest::attach(gdb, qmp)?,
        None => QemuGuest::attach_qmp(qmp)?,
    }))
}

/// Detaches from QEMU (a gdbstub vmm started is stopped) and returns every halt the command
/// caused. A failure to clean up is a warning: the command itself was done.
fn qemu_detach(guest: &QemuGuest) -> HaltView {
    if let Err(e) = guest.detach() {
        eprintln!(
            "warning: detaching from QEMU: {}",
            crate::exit::render(&anyhow::Error::new(e))
        );
    }
    guest.halts().into()
}

/// An engine over `guest`, the QEMU VM named by `q`.
fn qemu_engine(q: &QemuArgs, guest: Arc<QemuGuest>) -> Result<patch_engine::Engine<QemuGuest>> {
    let Some(state_dir) = &q.state_dir else {
        bail!("a QEMU VM needs --state-dir (where its patch states are journaled)");
    };
    let config = patch_engine::EngineConfig {
        trusted_keys: patch_engine::keys::read_keys(&q.trusted_keys)?,
        allow_unsigned: q.allow_unsigned,
        ..Default::default()
    };
    if let Some(kernel) = &q.linux_kernel {
        let image = linux_guest::attach::KernelImage::from_file(kernel)?;
        let idt = guest.idt_base()?;
        return Ok(linux_guest::engine::engine_for_kernel(
            guest,
            idt,
            &image,
            q.arena,
            linux_guest::engine::over_gdbstub(config),
            Some(state_dir),
        )?);
    }
    let Some(image) = &q.image else {
        bail!("a QEMU VM needs --image (an ELF guest) or --linux-kernel (a Linux guest)");
    };
    let bytes = read(image)?;
    let window = patch_engine::arena::ArenaWindow {
        gpa: q.arena,
        gva: q.arena,
        size: ARENA_SIZE,
    };
    Ok(patch_engine::Engine::for_elf_image(
        guest,
        &image.display().to_string(),
        &bytes,
        window,
        config,
        Some(state_dir),
    )?)
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub sock: SockArg,
    /// The patch file.
    pub file: PathBuf,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub sock: SockArg,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RevertArgs {
    #[command(flatten)]
    pub sock: SockArg,
    /// Patch id, or a unique prefix of it (at least 4 hex digits).
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The guest build that is running now (expected bytes and target identity come from it).
    #[arg(long, requires = "new", conflicts_with = "manifest")]
    pub old: Option<PathBuf>,
    /// The fixed build of the guest.
    #[arg(long, requires = "old")]
    pub new: Option<PathBuf>,
    /// Only patch these functions (each must differ between the builds). Repeatable.
    #[arg(long = "function", value_name = "NAME", requires = "old")]
    pub functions: Vec<String>,
    /// A hand-written manifest (TOML) naming target symbols and an object file with the new code.
    #[arg(long, required_unless_present_any = ["old", "linux_kernel"])]
    pub manifest: Option<PathBuf>,
    /// A stock Linux kernel (its bzImage, as booted): replace its functions with code from
    /// --object, named by --replace, or with what --source-diff changes; symbols come from the
    /// kernel's own kallsyms.
    #[arg(long, value_name = "BZIMAGE", conflicts_with_all = ["old", "manifest"])]
    pub linux_kernel: Option<PathBuf>,
    /// A fix as a unified diff (`git diff`, `git format-patch`, `diff -u`, paths a/… b/…):
    /// the kernel's own source is fetched (Debian: linux-source and the headers' .config at the
    /// banner's version, apt; prepared once into --source-cache) or taken from
    /// --linux-source, every touched .c file (and every built-in unit including a touched
    /// header) compiled before and after, and each changed function becomes a site
    /// (docs/source-patches.md).
    #[arg(long, value_name = "FIX.patch", requires = "linux_kernel", conflicts_with_all = ["object", "replacements"])]
    pub source_diff: Option<PathBuf>,
    /// The prepared source tree the kernel was built from (.config, `make prepare` done),
    /// instead of fetching the distribution's.
    #[arg(long, value_name = "DIR", requires = "source_diff")]
    pub linux_source: Option<PathBuf>,
    /// Where fetched kernel sources are unpacked and prepared (~1.5 GB each). Default:
    /// $VMM_CACHE_DIR/linux-source, else ~/.cache/vmm/linux-source.
    #[arg(long, value_name = "DIR", requires = "source_diff")]
    pub source_cache: Option<PathBuf>,
    /// At most this many units compiled for a --source-diff (a changed header brings in every
    /// built-in unit that includes it, unless it only declares names no other file uses; each
    /// is compiled three or four times).
    #[arg(long, value_name = "N", default_value_t = source_diff::build::DEFAULT_MAX_UNITS, requires = "source_diff")]
    pub max_units: usize,
    /// The relocatable object with the new code (gcc -c with kernel flags; see
    /// guest-tools/src/kernel_patch.rs). Its string literals and const data (.rodata*) go into
    /// the patch as read-only data blocks; variables (.data, .bss) are refused.
    #[arg(long, value_name = "FILE.o")]
    pub object: Option<PathBuf>,
    /// KERNEL_FUNCTION=CODE_SYMBOL: the kernel function to replace and the object's symbol
    /// that replaces it. Repeatable.
    #[arg(long = "replace", value_name = "FN=SYMBOL")]
    pub replacements: Vec<String>,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Sign with this secret key file (from `vmm patch keygen`). Without it the
    /// patch is UNSIGNED, for development only.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Patch name (default: the output file's stem). With --manifest, the manifest's wins.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "")]
    pub description: String,
    #[arg(long, default_value = "")]
    pub author: String,
    /// Advisory id such as CVE-2026-1234. Repeatable.
    #[arg(long = "advisory", value_name = "ID")]
    pub advisories: Vec<String>,
    /// Id of a patch this one supersedes (cumulative patch). Repeatable.
    #[arg(long = "replaces", value_name = "PATCH_ID")]
    pub replaces: Vec<String>,
    /// Creation time, seconds since the Unix epoch. Default: $SOURCE_DATE_EPOCH, else now.
    #[arg(long)]
    pub created: Option<u64>,
    /// Name of the target image in the patch (default: the --old file's name).
    #[arg(long)]
    pub target_name: Option<String>,
    /// Print one JSON object (file, bytes, id, sites, key id) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Base name of the key files: writes NAME.key and NAME.pub.
    #[arg(short, long, value_name = "NAME")]
    pub output: PathBuf,
    /// Overwrite existing key files.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// Secret key file.
    #[arg(long)]
    pub key: PathBuf,
    /// The patch to sign.
    pub file: PathBuf,
    /// Where to write the signed patch (default: replace FILE).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A trusted public key file (NAME.pub). Repeatable.
    #[arg(long = "trusted-key", value_name = "PUB", required = true)]
    pub trusted_keys: Vec<PathBuf>,
    pub file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also verify the signature against these public keys. Repeatable.
    #[arg(long = "trusted-key", value_name = "PUB")]
    pub trusted_keys: Vec<PathBuf>,
    /// List every relocation and instruction; without it, long lists are summarised.
    #[arg(long)]
    pub full: bool,
}

/// Runs one `vmm patch` subcommand.
pub fn run(cmd: PatchCommand) -> Result<()> {
    match cmd {
        PatchCommand::Build(a) => build(*a),
        PatchCommand::Keygen(a) => keygen(a),
        PatchCommand::Sign(a) => sign(a),
        PatchCommand::Verify(a) => verify(a),
        PatchCommand::Inspect(a) => inspect(a),
        PatchCommand::Apply(a) => apply(a),
        PatchCommand::List(a) => list(a),
        PatchCommand::Revert(a) => revert(a),
    }
}

fn pretty<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// What an apply did, as both targets report it (the engine's `ApplyOutcome`, which the API
/// serves as JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct ApplyView {
    pub patch: PatchRecord,
    pub already_applied: bool,
    #[serde(default)]
    pub replaced: Vec<String>,
    pub attempts: u32,
    pub total_us: u64,
    /// A QEMU VM only: every halt of the guest the command caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halts: Option<HaltView>,
}

/// Every halt of a QEMU guest one command caused (attaching, memory access, blackouts).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HaltView {
    pub count: u64,
    pub total_us: u64,
    pub longest_us: u64,
}

impl From<qemu_backend::HaltStats> for HaltView {
    fn from(h: qemu_backend::HaltStats) -> Self {
        HaltView {
            count: h.count,
            total_us: h.total_us,
            longest_us: h.longest_us,
        }
    }
}

impl std::fmt::Display for HaltView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest halted {} time{}, {} µs in total (longest {} µs)",
            self.count,
            if self.count == 1 { "" } else { "s" },
            self.total_us,
            self.longest_us
        )
    }
}

impl From<patch_engine::ApplyOutcome> for ApplyView {
    fn from(o: patch_engine::ApplyOutcome) -> Self {
        ApplyView {
            patch: o.patch,
            already_applied: o.already_applied,
            replaced: o.replaced,
            attempts: o.attempts,
            total_us: o.total_us,
            halts: None,
        }
    }
}

/// `vmm patch list --json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListView {
    pub patches: Vec<PatchRecord>,
    /// A QEMU VM only: every halt of the guest the command caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halts: Option<HaltView>,
}

/// `vmm patch revert --json`: the patch's record, and for a QEMU VM the halts.
#[derive(Debug, Serialize)]
pub struct RevertView {
    #[serde(flatten)]
    pub patch: PatchRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halts: Option<HaltView>,
}

/// The VM `apply`, `list` and `revert` act on: one of this VMM's (its API socket) or one under
/// QEMU. Both answer with the same typed values, which are printed as text or `--json`.
pub enum PatchTarget<'a> {
    Api(ApiClient),
    Qemu(&'a QemuArgs),
}

impl<'a> PatchTarget<'a> {
    pub fn from_args(a: &'a SockArg) -> Self {
        match &a.api_sock {
            Some(sock) => PatchTarget::Api(ApiClient::new(sock)),
            None => PatchTarget::Qemu(&a.qemu),
        }
    }

    pub fn apply(&self, file: &[u8]) -> Result<ApplyView> {
        match self {
            PatchTarget::Api(c) => api_call(c, "POST", "/v1/patches", file),
            PatchTarget::Qemu(q) => {
                let guest = qemu_attach(q)?;
                let outcome = qemu_engine(q, guest.clone())?.apply(file)?;
                let mut v = ApplyView::from(outcome);
                v.halts = Some(qemu_detach(&guest));
                Ok(v)
            }
        }
    }

    /// Never writes to the guest: for QEMU it reads the journal in --state-dir read-only
    /// (without taking the lock or running recovery) and the arena's ledger from guest memory
    /// (two short reads), so patches applied through another state dir are listed too.
    pub fn list(&self) -> Result<ListView> {
        match self {
            PatchTarget::Api(c) => api_call::<ListView>(c, "GET", "/v1/patches", b""),
            PatchTarget::Qemu(q) => {
                let Some(dir) = &q.state_dir else {
                    bail!("a QEMU VM needs --state-dir (the directory apply and revert used)");
                };
                let mut patches = patch_engine::journal::Journal::read_only(dir)?;
                let mut halts = None;
                // The journal alone still answers when the VM cannot be reached.
                match qemu_attach(q) {
                    Ok(guest) => {
                        if let Some(l) =
                            patch_engine::ledger::read_from(guest.as_ref(), q.arena, ARENA_SIZE)
                        {
                            let extra = patch_engine::ledger::unjournaled(&l, &patches, q.arena);
                            patches.extend(extra);
                        }
                        halts = Some(qemu_detach(&guest));
                    }
                    Err(e) => eprintln!(
                        "warning: the VM cannot be reached ({}); listing this state dir's journal only, not the patches the guest's arena ledger names",
                        crate::exit::render(&e)
                    ),
                }
                Ok(ListView { patches, halts })
            }
        }
    }

    pub fn revert(&self, id: &str) -> Result<RevertView> {
        let id: String = id.chars().filter(char::is_ascii_hexdigit).collect();
        match self {
            PatchTarget::Api(c) => Ok(RevertView {
                patch: api_call(c, "POST", &format!("/v1/patches/{id}/revert"), b"")?,
                halts: None,
            }),
            PatchTarget::Qemu(q) => {
                let guest = qemu_attach(q)?;
                let patch = qemu_engine(q, guest.clone())?.revert(&id)?;
                Ok(RevertView {
                    patch,
                    halts: Some(qemu_detach(&guest)),
                })
            }
        }
    }
}

/// One API request whose 2xx answer is a `T`; an error answer becomes an [`ApiFailure`] that
/// keeps the server's `kind` (for the exit status).
fn api_call<T: serde::de::DeserializeOwned>(
    c: &ApiClient,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<T> {
    let (status, value) = c.raw(method, path, body)?;
    if !(200..300).contains(&status) {
        return Err(ApiFailure::from_body(status, &value).into());
    }
    serde_json::from_value(value)
        .with_context(|| format!("the VMM's answer to {method} {path} is not what this vmm expects; is it another version?"))
}

fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

fn apply(a: ApplyArgs) -> Result<()> {
    let bytes = read(&a.file)?;
    let v = PatchTarget::from_args(&a.sock).apply(&bytes)?;
    if a.json {
        return pretty(&v);
    }
    let p = &v.patch;
    if v.already_applied {
        println!("already applied: {} {}", p.id, p.name);
        print_halts(v.halts);
        return Ok(());
    }
    let blackout = p
        .apply_blackout_us
        .map_or("-".to_string(), |b| b.to_string());
    println!(
        "applied {} {}: {} site(s), blackout {blackout} µs, {} attempt(s), {} vCPU(s) moved, {} µs in the VMM",
        p.id,
        p.name,
        p.sites.len(),
        v.attempts,
        p.moved_vcpus,
        v.total_us,
    );
    if let Some(n) = p.threads_checked {
        println!("  the stacks of {n} guest tasks no vCPU was running were checked");
    }
    for r in &v.replaced {
        println!("  replaced {r}");
    }
    print_halts(v.halts);
    Ok(())
}

/// The halts line of a QEMU VM, under the command's result.
fn print_halts(halts: Option<HaltView>) {
    if let Some(h) = halts {
        println!("{h}");
    }
}

fn state_name(s: PatchState) -> &'static str {
    match s {
        PatchState::Applying => "applying",
        PatchState::Applied => "applied",
        PatchState::Reverting => "reverting",
        PatchState::Reverted => "reverted",
        PatchState::Failed => "failed",
    }
}

fn list(a: ListArgs) -> Result<()> {
    let view = PatchTarget::from_args(&a.sock).list()?;
    if a.json {
        return pretty(&view);
    }
    let patches = &view.patches;
    if patches.is_empty() {
        println!("no patches");
        print_halts(view.halts);
        return Ok(());
    }
    println!(
        "{:<16}  {:<24} {:<9} {:>5}  {:<20} {:>12}",
        "ID", "NAME", "STATE", "SITES", "APPLIED AT (UTC)", "BLACKOUT µs"
    );
    for p in patches {
        let applied = p
            .applied_at
            .map(patch_format::format_utc)
            .unwrap_or_else(|| "-".into());
        let blackout = p
            .apply_blackout_us
            .map_or("-".to_string(), |b| b.to_string());
        println!(
            "{:<16}  {:<24} {:<9} {:>5}  {:<20} {:>12}",
            short(&p.id),
            p.name,
            state_name(p.state),
            p.sites.len(),
            applied,
            blackout
        );
        if let Some(note) = &p.note {
            println!("{:<18}note: {note}", "");
        }
    }
    print_halts(view.halts);
    Ok(())
}

fn revert(a: RevertArgs) -> Result<()> {
    let v = PatchTarget::from_args(&a.sock).revert(&a.id)?;
    if a.json {
        return pretty(&v);
    }
    let p = &v.patch;
    let blackout = p
        .revert_blackout_us
        .map_or("-".to_string(), |b| b.to_string());
    println!("reverted {} {}: blackout {blackout} µs", p.id, p.name);
    print_halts(v.halts);
    Ok(())
}

/// Reads a patch file for `verify`/`inspect`: at most the format's size limit plus one byte, so
/// a huge or endless input is refused without being buffered.
fn read_patch_file(path: &Path) -> Result<Vec<u8>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    patch_format::read_patch(file).with_context(|| format!("{}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let res = f.write_all(bytes).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = res.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn load_secret(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key {}", path.display()))?;
    SecretKey::from_file_text(&text)
        .with_context(|| format!("{} is not a secret key file", path.display()))
}

fn load_public(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read key {}", p.display()))?;
            PublicKey::from_file_text(&text)
                .with_context(|| format!("{} is not a public key file", p.display()))
        })
        .collect()
}

/// `--created`, else `SOURCE_DATE_EPOCH` (reproducible builds), else now.
fn creation_time(opt: Option<u64>) -> Result<u64> {
    if let Some(t) = opt {
        return Ok(t);
    }
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

fn build(a: BuildArgs) -> Result<()> {
    let created = creation_time(a.created)?;
    let key = a.key.as_deref().map(load_secret).transpose()?;
    let out: BuildOutput = if let Some(manifest) = &a.manifest {
        build_from_manifest_file(manifest, created)?
    } else if let Some(kernel) = &a.linux_kernel {
        build_kernel(&a, kernel, created)?
    } else {
        let (Some(old), Some(new)) = (&a.old, &a.new) else {
            bail!("give either --old and --new, or --manifest");
        };
        let replaces = replaced_ids(&a.replaces)?;
        let default_name = a
            .output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "patch".into());
        let info = PatchInfo {
            meta: Metadata {
                name: a.name.clone().unwrap_or(default_name),
                description: a.description.clone(),
                author: a.author.clone(),
                created,
                advisories: a.advisories.clone(),
                replaces,
            },
            target_name: Some(a.target_name.clone().unwrap_or_else(|| {
                old.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })),
        };
        build_from_elfs(&read(old)?, &read(new)?, &a.functions, &info)?
    };
    let bytes = match &key {
        Some(k) => out.patch.to_file_signed(k)?,
        None => out.patch.to_file_unsigned()?,
    };
    write_atomic(&a.output, &bytes, 0o644)?;
    let r = &out.report;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if !r.added.is_empty() {
        eprintln!(
            "note: functions only in the new build (not patched): {}",
            r.added.join(", ")
        );
    }
    let id = out.patch.id()?;
    let key_id = key.as_ref().map(|k| k.key_id().to_string());
    if key_id.is_none() {
        eprintln!(
            "warning: the patch is UNSIGNED (development only); sign it with `vmm patch sign --key`"
        );
    }
    if a.json {
        return pretty(&serde_json::json!({
            "file": a.output,
            "bytes": bytes.len(),
            "id": id.to_string(),
            "sites": r.changed,
            "key_id": key_id,
        }));
    }
    println!("wrote {} ({} bytes)", a.output.display(), bytes.len());
    println!("patch id  {id}");
    println!("sites     {}: {}", r.changed.len(), r.changed.join(", "));
    if let Some(k) = &key_id {
        println!("signed    ed25519 key id {k}");
    }
    Ok(())
}

/// The `--replaces` ids: each a whole patch id.
fn replaced_ids(ids: &[String]) -> Result<Vec<PatchId>> {
    ids.iter()
        .map(|r| {
            PatchId::from_hex(r)
                .with_context(|| format!("--replaces {r:?}: not a patch id (64 hex digits)"))
        })
        .collect()
}

/// The metadata of a kernel patch from the build's flags (name: the output file's stem).
fn kernel_meta(a: &BuildArgs, created: u64) -> Result<Metadata> {
    Ok(Metadata {
        name: a.name.clone().unwrap_or_else(|| {
            a.output
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "kernel-fix".into())
        }),
        description: a.description.clone(),
        author: a.author.clone(),
        created,
        advisories: a.advisories.clone(),
        replaces: replaced_ids(&a.replaces)?,
    })
}

/// `vmm patch build --linux-kernel`: function replacements in a stock kernel, from C.
fn build_kernel(a: &BuildArgs, kernel: &Path, created: u64) -> Result<BuildOutput> {
    if let Some(diff) = &a.source_diff {
        return build_kernel_from_diff(a, kernel, diff, created);
    }
    let Some(object) = &a.object else {
        bail!("--linux-kernel needs --object and --replace, or --source-diff");
    };
    if a.replacements.is_empty() {
        bail!("--linux-kernel --object needs at least one --replace KERNEL_FUNCTION=CODE_SYMBOL");
    }
    let image = linux_guest::attach::KernelImage::from_file(kernel)?;
    let fixes = a
        .replacements
        .iter()
        .map(|r| {
            r.split_once('=')
                .map(|(f, c)| linux_guest::patch::KernelFix::new(f, c))
                .with_context(|| format!("--replace {r:?}: give KERNEL_FUNCTION=CODE_SYMBOL"))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = kernel_meta(a, created)?;
    let patch = linux_guest::patch::build_kernel_patch(
        &image.vmlinux,
        &image.kallsyms,
        &read(object)?,
        &fixes,
        meta,
    )?;
    let report = patch_format::BuildReport {
        changed: fixes.iter().map(|f| f.function.clone()).collect(),
        ..Default::default()
    };
    Ok(BuildOutput { patch, report })
}

/// `vmm patch build --linux-kernel --source-diff`: the changed functions of a source fix.
fn build_kernel_from_diff(
    a: &BuildArgs,
    kernel: &Path,
    diff: &Path,
    created: u64,
) -> Result<BuildOutput> {
    let image = linux_guest::attach::KernelImage::from_file(kernel)?;
    let source = match (&a.linux_source, &a.source_cache) {
        (Some(dir), _) => source_diff::SourceChoice::Tree(dir.clone()),
        (None, Some(dir)) => source_diff::SourceChoice::Cache(dir.clone()),
        (None, None) => {
            source_diff::SourceChoice::Cache(source_diff::tree::default_cache_dir().context(
                "no cache directory for the kernel source (VMM_CACHE_DIR=off, no HOME): give \
                 --source-cache DIR or --linux-source DIR",
            )?)
        }
    };
    let meta = kernel_meta(a, created)?;
    let (patch, report) = source_diff::build_from_source_diff(
        &source_diff::TargetKernel {
            vmlinux: &image.vmlinux,
            kallsyms: &image.kallsyms,
            banner: &image.banner,
        },
        diff,
        &source,
        a.max_units,
        meta,
    )?;
    eprintln!("source    {} ({})", report.source, report.files.join(", "));
    if report.prepared_now {
        eprintln!(
            "note: the kernel's source was fetched and prepared for this build; later builds \
             for this kernel reuse it"
        );
    }
    if !report.added.is_empty() {
        eprintln!(
            "note: functions the fix adds, carried in the patch code: {}",
            report.added.join(", ")
        );
    }
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    let report = patch_format::BuildReport {
        changed: report.changed.clone(),
        ..Default::default()
    };
    Ok(BuildOutput { patch, report })
}

fn keygen(a: KeygenArgs) -> Result<()> {
    let base = a.output.to_string_lossy().into_owned();
    let (kpath, ppath) = (
        PathBuf::from(format!("{base}.key")),
        PathBuf::from(format!("{base}.pub")),
    );
    if !a.force {
        for p in [&kpath, &ppath] {
            if p.exists() {
                bail!(
                    "{} exists; refusing to overwrite a key (use --force)",
                    p.display()
                );
            }
        }
    }
    let key = SecretKey::generate()?;
    write_atomic(&kpath, key.to_file_text().as_bytes(), 0o600)?;
    write_atomic(&ppath, key.public().to_file_text().as_bytes(), 0o644)?;
    if a.json {
        return pretty(&serde_json::json!({
            "secret_key": kpath,
            "public_key": ppath,
            "key_id": key.key_id().to_string(),
        }));
    }
    println!(
        "secret key {} (mode 0600; keep it off the machines that apply patches)",
        kpath.display()
    );
    println!("public key {}", ppath.display());
    println!("key id     {}", key.key_id());
    Ok(())
}

fn sign(a: SignArgs) -> Result<()> {
    let key = load_secret(&a.key)?;
    let bytes = read(&a.file)?;
    let signed = sign_file(&bytes, &key)
        .with_context(|| format!("{} is not a valid patch", a.file.display()))?;
    let out = a.output.as_ref().unwrap_or(&a.file);
    write_atomic(out, &signed, 0o644)?;
    let id = parse(&signed)?.id;
    if a.json {
        return pretty(&serde_json::json!({
            "file": out,
            "id": id.to_string(),
            "key_id": key.key_id().to_string(),
        }));
    }
    println!(
        "signed {} (patch id {id}) with key id {}",
        out.display(),
        key.key_id()
    );
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let keys = load_public(&a.trusted_keys)?;
    let bytes = read_patch_file(&a.file)?;
    let p = parse(&bytes).with_context(|| format!("{} is not a valid patch", a.file.display()))?;
    let key_id = p
        .verify(&keys)
        .with_context(|| format!("{}: signature check failed", a.file.display()))?;
    if a.json {
        return pretty(&serde_json::json!({
            "ok": true,
            "id": p.id.to_string(),
            "name": p.patch.meta.name,
            "key_id": key_id.to_string(),
        }));
    }
    println!(
        "OK: patch {} ({}) is signed by trusted key {key_id}",
        p.id, p.patch.meta.name
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let keys = load_public(&a.trusted_keys)?;
    let trusted = (!keys.is_empty()).then_some(keys.as_slice());
    let bytes = read_patch_file(&a.file)?;
    let p = parse(&bytes).with_context(|| format!("{} is not a valid patch", a.file.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inspect_json(&p, trusted, a.full))?
        );
    } else {
        print!("{}", inspect_text(&p, trusted, a.full));
    }
    if let (Some(_), SignatureBlock::Ed25519 { .. }) = (trusted, &p.signature)
        && p.verify(&keys).is_err()
    {
        bail!("signature check failed");
    }
    Ok(())
}
