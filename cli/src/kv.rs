//! `ragcake kv`: what the KV store holds, and garbage collection.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand};
use ragcake::kvstore::lifecycle::{self, GcPolicy, GroupStats};
use ragcake::kvstore::object_store::ObjectStore;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::{CacheKind, open_url};
use ragcake_bench::named;

/// `ragcake kv …`.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Objects and bytes per model and kind, with the ages of the oldest and newest.
    Stats(StatsArgs),
    /// Deletes caches by age and to a size budget: prefix caches (written back by requests)
    /// before chunk caches (the precompute job's), oldest first. Objects that are no cache
    /// are never deleted.
    Gc(GcArgs),
}

/// The store to work on.
#[derive(Debug, Args)]
pub struct KvStoreArg {
    /// KV store URL: file://DIR, memory://, s3://BUCKET/PREFIX, az://…, gs://…
    /// [default: file://$RAGCAKE_HOME/data/kv].
    #[arg(long, env = "RAGCAKE_KV")]
    kv: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `ragcake kv stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    store: KvStoreArg,
}

/// `ragcake kv gc`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("rule").required(true).multiple(true)
    .args(["max_bytes", "older_than"])))]
pub struct GcArgs {
    #[command(flatten)]
    store: KvStoreArg,
    /// Delete until the caches take at most this much (e.g. 20GiB, 500MB, 1000000).
    #[arg(long, value_parser = parse_size)]
    max_bytes: Option<u64>,
    /// Delete caches written longer ago than this (e.g. 7d, 12h, 30min).
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only caches of this kind.
    #[arg(long, value_parser = named::<CacheKind>())]
    kind: Option<CacheKind>,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(anyhow::Error::msg)
}

/// Runs a `kv` command.
pub fn run(command: KvCommand) -> anyhow::Result<()> {
    ragcake_bench::tokio_runtime()?.block_on(async {
        match command {
            KvCommand::Stats(args) => stats(args).await,
            KvCommand::Gc(args) => gc(args).await,
        }
    })
}

/// The store and the prefix under it that the caches live in.
fn open(arg: &KvStoreArg) -> anyhow::Result<(Arc<dyn ObjectStore>, Path)> {
    let url = arg
        .kv
        .clone()
        .unwrap_or_else(ragcake::paths::default_kv_url);
    open_url(&url, Vec::new()).with_context(|| format!("opening {url}"))
}

async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let (store, prefix) = open(&args.store)?;
    let objects = lifecycle::inventory(&*store, &prefix).await?;
    let groups = lifecycle::summarize(&objects, SystemTime::now());
    if args.store.json {
        println!("{}", serde_json::to_string_pretty(&groups)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<7} {:>9} {:>12} {:>12} {:>12}",
        "model", "kind", "objects", "bytes", "oldest", "newest"
    );
    for g in &groups {
        print_group(g);
    }
    let (n, bytes) = groups
        .iter()
        .fold((0, 0), |(n, b), g| (n + g.objects, b + g.bytes));
    println!(
        "{:<26} {n:>9} {:>12}",
        "total",
        bytesize::ByteSize(bytes).display().iec().to_string()
    );
    Ok(())
}

fn print_group(g: &GroupStats) {
    let age = |secs: u64| humantime::format_duration(Duration::from_secs(secs)).to_string();
    let first_unit = |text: String| text.split(' ').next().unwrap_or_default().to_string();
    println!(
        "{:<18} {:<7} {:>9} {:>12} {:>12} {:>12}",
        g.model.as_deref().unwrap_or("(not a cache)"),
        g.kind.unwrap_or("-"),
        g.objects,
        bytesize::ByteSize(g.bytes).display().iec().to_string(),
        first_unit(age(g.oldest_age_secs)),
        first_unit(age(g.newest_age_secs)),
    );
}

async fn gc(args: GcArgs) -> anyhow::Result<()> {
    let (store, prefix) = open(&args.store)?;
    let objects = lifecycle::inventory(&*store, &prefix).await?;
    let policy = GcPolicy {
        max_bytes: args.max_bytes,
        older_than: args.older_than,
        kind: args.kind,
    };
    let plan = lifecycle::plan_gc(&objects, &policy, SystemTime::now());
    let count = |kind: CacheKind| {
        plan.delete
            .iter()
            .filter(|o| o.kind() == Some(kind))
            .count()
    };
    let (deleted, deleted_bytes) = if args.dry_run {
        (0, 0)
    } else {
        lifecycle::collect_garbage(&*store, &plan).await?
    };
    let report = serde_json::json!({
        "dry_run": args.dry_run,
        "selected": plan.delete.len(),
        "selected_prefix": count(CacheKind::Prefix),
        "selected_chunk": count(CacheKind::Chunk),
        "selected_bytes": plan.cache_bytes_before - plan.cache_bytes_after,
        "deleted": deleted,
        "deleted_bytes": deleted_bytes,
        "cache_bytes_before": plan.cache_bytes_before,
        "cache_bytes_after": plan.cache_bytes_after,
        "over_budget": plan.over_budget,
    });
    if args.store.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let size = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
        let verb = if args.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        println!(
            "{verb} {} caches ({} prefix, {} chunk), {}: caches took {}, now {}",
            plan.delete.len(),
            count(CacheKind::Prefix),
            count(CacheKind::Chunk),
            size(plan.cache_bytes_before - plan.cache_bytes_after),
            size(plan.cache_bytes_before),
            size(plan.cache_bytes_after),
        );
    }
    if plan.over_budget {
        eprintln!("warning: the caches this rule may delete are not enough to reach --max-bytes");
    }
    Ok(())
}
