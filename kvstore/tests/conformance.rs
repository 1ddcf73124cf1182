//! The KV store's conformance suite: the behaviour every backend must have (memory, a local
//! directory read directly and through object_store, and S3, Azure and GCS on their test
//! servers), listing and garbage collection, corrupt and foreign blobs rejected with their
//! reasons, concurrent writers and readers, the memory tier, bounded cloud requests, keys,
//! and the storage dtypes.
//!
//! The caches are a synthetic model's (see `common`): the store moves, checks and converts
//! tensors whatever numbers they hold, so no real model is needed here. That stored KV
//! continues a real model's forward pass as the original does is tested in the root's
//! integration tests (`tests/integration/kvstore.rs`).

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ragcake_engine::{DType, Device, KvRange, LlmFingerprint};
use ragcake_kvstore::lifecycle::{self, GcPolicy};
use ragcake_kvstore::object_store::ObjectStoreExt;
use ragcake_kvstore::{
    CacheKey, CacheKind, KvStore, Lookup, RejectReason, StorageDtype, format, open_url,
};
use ragcake_scheduler::LoadBackend;

use crate::common::{
    MODEL, SHAPE, kv_of, max_abs, max_abs_diff, runtime, store_for, store_over, stored_bytes,
    token_ids,
};

/// The synthetic model's KV of `tokens` computed from position 0, and the key it is stored
/// under.
fn chunk_kv(tokens: &[u32]) -> (CacheKey, KvRange) {
    (CacheKey::chunk(&MODEL, &[], tokens), kv_of(tokens))
}

/// Asserts that `part`'s layers equal `whole`'s from layer `first` on, bit for bit.
fn assert_same_layers(part: &KvRange, whole: &KvRange, first: usize, what: &str) {
    for (i, (k, v)) in part.layers().iter().enumerate() {
        let (whole_k, whole_v) = &whole.layers()[first + i];
        assert_eq!(
            max_abs_diff(k, whole_k),
            0.0,
            "{what}: keys of layer {}",
            first + i
        );
        assert_eq!(
            max_abs_diff(v, whole_v),
            0.0,
            "{what}: values of layer {}",
            first + i
        );
    }
}

/// Whether `key` loads as a verified hit.
async fn loads(store: &KvStore, key: &CacheKey, tokens: &[u32]) -> bool {
    store.get(key, Some(tokens)).await.unwrap().hit().is_some()
}

/// The behaviour every backend must have.
async fn conformance(store: KvStore) {
    let tokens = token_ids(64);
    let (key, range) = chunk_kv(&tokens);
    assert!(!store.contains(&key).await.unwrap());
    assert!(matches!(
        store.get(&key, Some(&tokens)).await.unwrap(),
        Lookup::Absent
    ));

    let written = store.put(&key, &tokens, &range).await.unwrap();
    assert!(written > range.bytes() / 2, "f16 blob of {written} bytes");
    assert!(store.contains(&key).await.unwrap());

    let got = store
        .get(&key, Some(&tokens))
        .await
        .unwrap()
        .hit()
        .expect("hit");
    assert_eq!(got.len(), 64);
    assert_eq!(got.dtype(), DType::F16);
    let f16 = range.to_dtype(DType::F16).unwrap();
    assert_same_layers(&got, &f16, 0, "stored and read");

    // Ranged read of a few layers equals those layers of the full read.
    let part = store
        .get_layers(&key, Some(&tokens), 10..13)
        .await
        .unwrap()
        .hit()
        .unwrap();
    assert_eq!(part.layers().len(), 3);
    assert_same_layers(&part, &got, 10, "ranged read");

    // The token ids are checked: same key, other tokens → rejected, never returned.
    let mut other = tokens.clone();
    other[5] += 1;
    assert!(matches!(
        store.get(&key, Some(&other)).await.unwrap(),
        Lookup::Rejected(RejectReason::TokenMismatch)
    ));

    let second = CacheKey::prefix(&MODEL, None, &tokens);
    let prefix_bytes = store.put(&second, &tokens, &range).await.unwrap();
    let mut listed = store.list().await.unwrap();
    listed.sort();
    let mut expected = vec![key, second];
    expected.sort();
    assert_eq!(listed, expected);

    corrupt_objects_are_rejected(&store, &key, &tokens).await;
    lifecycle_conformance(&store, (key, written as u64), (second, prefix_bytes as u64)).await;
    oversized_objects_are_refused_before_they_are_read(&store, &tokens).await;

    store.delete(&key).await.unwrap();
    assert!(!store.contains(&key).await.unwrap());
    store.delete(&key).await.unwrap(); // deleting twice is fine
    let stats = store.stats();
    assert_eq!(stats.puts, 2);
    assert!(stats.hits >= 2 && stats.rejected >= 1, "{stats:?}");
}

/// Listing with sizes, and garbage collection to a size budget: the prefix cache goes
/// before the chunk cache, and an object that is no cache never goes.
async fn lifecycle_conformance(
    store: &KvStore,
    (chunk, chunk_bytes): (CacheKey, u64),
    (prefix, prefix_bytes): (CacheKey, u64),
) {
    let backend = store.object_store();
    let notes = store.model_dir().join("notes.txt");
    backend.put(&notes, "not a cache".into()).await.unwrap();
    let objects = lifecycle::inventory(&**backend, &store.model_dir())
        .await
        .unwrap();
    let sizes: Vec<(Option<CacheKey>, u64)> = objects
        .iter()
        .map(|o| (o.cache.as_ref().map(|(_, k)| *k), o.size))
        .collect();
    for expected in [
        (Some(chunk), chunk_bytes),
        (Some(prefix), prefix_bytes),
        (None, 11),
    ] {
        assert!(sizes.contains(&expected), "{expected:?} in {sizes:?}");
    }
    let stats = lifecycle::summarize(&objects, SystemTime::now());
    assert_eq!(stats.len(), 3, "{stats:?}");
    assert_eq!(
        stats.iter().map(|g| g.bytes).sum::<u64>(),
        chunk_bytes + prefix_bytes + 11
    );

    // A budget one cache fits in: the prefix cache goes, whatever the ages.
    let policy = GcPolicy {
        max_bytes: Some(chunk_bytes),
        ..GcPolicy::default()
    };
    let plan = lifecycle::plan_gc(&objects, &policy, SystemTime::now());
    assert_eq!(plan.delete.len(), 1);
    assert_eq!(plan.delete[0].kind(), Some(CacheKind::Prefix));
    assert_eq!(
        lifecycle::collect_garbage(&**backend, &plan).await.unwrap(),
        (1, prefix_bytes)
    );
    assert!(!store.contains(&prefix).await.unwrap());
    assert!(store.contains(&chunk).await.unwrap());
    // Everything older than a minute ago: nothing here is, nothing goes.
    let objects = lifecycle::inventory(&**backend, &store.model_dir())
        .await
        .unwrap();
    let policy = GcPolicy {
        older_than: Some(Duration::from_secs(60)),
        ..GcPolicy::default()
    };
    assert!(
        lifecycle::plan_gc(&objects, &policy, SystemTime::now())
            .delete
            .is_empty()
    );
    // Everything written before an hour from now: every cache, but the notes stay.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let plan = lifecycle::plan_gc(&objects, &policy, later);
    assert_eq!(plan.delete.len(), 1);
    assert_eq!(plan.delete[0].cache.as_ref().unwrap().1, chunk);
    backend.head(&notes).await.unwrap();
    backend.delete(&notes).await.unwrap();
}

/// An object larger than any cache of its key can be is refused by its size, unread.
/// A truncated object, a flipped byte in the last tensor and a garbled header are each
/// rejected by whole and by ranged reads, and the intact object loads again afterwards.
async fn corrupt_objects_are_rejected(store: &KvStore, key: &CacheKey, tokens: &[u32]) {
    let backend = store.object_store();
    let path = store.path_of(key);
    let intact = stored_bytes(store, key).await;
    let truncated = intact[..intact.len() - 100].to_vec();
    let mut flipped = intact.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut garbled = intact.clone();
    garbled[9] = b'#';
    let last_layer = SHAPE.n_layers - 1;
    for (what, bytes) in [
        ("truncated", truncated),
        ("flipped", flipped),
        ("garbled", garbled),
    ] {
        backend.put(&path, bytes.into()).await.unwrap();
        let whole = store.get(key, Some(tokens)).await.unwrap();
        assert!(matches!(whole, Lookup::Rejected(_)), "{what}: {whole:?}");
        let part = store
            .get_layers(key, Some(tokens), last_layer..last_layer + 1)
            .await
            .unwrap();
        assert!(
            matches!(part, Lookup::Rejected(_)),
            "{what}, last layer: {part:?}"
        );
    }
    backend.put(&path, intact.into()).await.unwrap();
    assert!(loads(store, key, tokens).await);
}

async fn oversized_objects_are_refused_before_they_are_read(store: &KvStore, tokens: &[u32]) {
    let key = CacheKey::chunk(&MODEL, &[1], tokens);
    let limit = store.max_blob_bytes(Some(tokens.len()));
    let huge = vec![0u8; limit as usize + 1];
    store
        .object_store()
        .put(&store.path_of(&key), huge.into())
        .await
        .unwrap();
    let read_before = store.stats().bytes_read;
    assert!(matches!(
        store.get(&key, Some(tokens)).await.unwrap(),
        Lookup::Rejected(RejectReason::Oversized { size, .. }) if size == limit + 1
    ));
    assert_eq!(store.stats().bytes_read, read_before, "nothing was read");
    store.delete(&key).await.unwrap();
}

#[test]
fn memory_backend_passes_the_conformance_suite() {
    runtime().block_on(conformance(store_for("memory://")));
}

#[test]
fn local_directory_backend_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("kv").display());
    runtime().block_on(conformance(store_for(&url)));
    // Objects are laid out by model and kind, readable in a listing.
    let model_dir = dir.path().join("kv").join(MODEL.short());
    assert!(model_dir.join("prefix").is_dir());
}

/// The same suite with the directory read through object_store's reads, as any wrapper
/// around a local store reads it (the plain store reads files into the cache's buffers).
#[test]
fn local_directory_read_through_object_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let (store, prefix) = open_url(&url, Vec::new()).unwrap();
    runtime().block_on(conformance(store_over(store, prefix)));
}

/// Reading files straight into the cache's buffers loads what decoding the same bytes in
/// memory loads, bit for bit, in every storage dtype, whole and by layers.
#[test]
fn local_reads_into_cache_buffers_equal_decoding_in_memory_for_every_storage_dtype() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let tokens = token_ids(40);
        let (_, range) = chunk_kv(&tokens);
        for dtype in StorageDtype::ALL {
            let local = store_for(&url).with_storage_dtype(dtype);
            let key = local.chunk_key(&[], &tokens);
            local.put(&key, &tokens, &range).await.unwrap();
            let in_memory = decode(&key, &tokens, &stored_bytes(&local, &key).await).unwrap();
            let read = local.get(&key, Some(&tokens)).await.unwrap().hit().unwrap();
            assert_eq!(read.dtype(), dtype.loaded_dtype(), "{dtype}");
            let layers = local
                .get_layers(&key, Some(&tokens), 2..5)
                .await
                .unwrap()
                .hit()
                .unwrap();
            assert_same_layers(&read, &in_memory, 0, &format!("{dtype}, whole"));
            assert_same_layers(&layers, &read, 2, &format!("{dtype}, layers 2..5"));
        }
    });
}

fn valid_blob() -> (CacheKey, Vec<u32>, Vec<u8>) {
    let tokens = token_ids(16);
    let (key, range) = chunk_kv(&tokens);
    let blob = format::encode(&key, &MODEL, &tokens, &range, StorageDtype::F16).unwrap();
    (key, tokens, blob)
}

fn decode(key: &CacheKey, tokens: &[u32], blob: &[u8]) -> Result<KvRange, RejectReason> {
    let expected = format::Expectation {
        key,
        model: &MODEL,
        shape: SHAPE,
        tokens: Some(tokens),
    };
    format::decode(blob, &expected, &Device::Cpu).map(|(_, r)| r)
}

/// Replaces `from` by `to` (same length) in the blob's header.
fn patch(blob: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = blob
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in blob"));
    let mut out = blob.to_vec();
    out[at..at + to.len()].copy_from_slice(to.as_bytes());
    out
}

#[test]
fn every_kind_of_corrupt_or_foreign_blob_is_rejected_with_its_reason() {
    let (key, tokens, blob) = valid_blob();
    assert!(decode(&key, &tokens, &blob).is_ok());

    // Truncated.
    for keep in [0, 7, 100, blob.len() / 2, blob.len() - 1] {
        assert!(
            matches!(
                decode(&key, &tokens, &blob[..keep]),
                Err(RejectReason::Malformed(_))
            ),
            "{keep} bytes"
        );
    }
    // A flipped byte in the tensor data.
    let mut flipped = blob.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x10;
    assert!(matches!(
        decode(&key, &tokens, &flipped),
        Err(RejectReason::Checksum(_))
    ));
    // Another model.
    let other_model = LlmFingerprint([9; 32]);
    let other = format::encode(
        &key,
        &other_model,
        &tokens,
        &decode(&key, &tokens, &blob).unwrap(),
        StorageDtype::F16,
    )
    .unwrap();
    assert!(matches!(
        decode(&key, &tokens, &other),
        Err(RejectReason::LlmMismatch { .. })
    ));
    // Another token count.
    assert!(matches!(
        decode(&key, &tokens[..10], &blob),
        Err(RejectReason::TokenCountMismatch {
            expected: 10,
            found: 16
        })
    ));
    // Unknown format version.
    let v9 = patch(
        &blob,
        "\"format_version\":\"1\"",
        "\"format_version\":\"9\"",
    );
    assert!(matches!(
        decode(&key, &tokens, &v9),
        Err(RejectReason::UnknownFormat { .. })
    ));
    // Metadata edited behind the checksum's back (a different base position).
    let moved = patch(&blob, "\"base_position\":\"0\"", "\"base_position\":\"5\"");
    assert!(matches!(
        decode(&key, &tokens, &moved),
        Err(RejectReason::Checksum(_))
    ));
    // Wrong dtype declared for the tensors (metadata says f32, data is f16).
    let f32_meta = patch(&blob, "\"dtype\":\"f16\"", "\"dtype\":\"f32\"");
    assert!(decode(&key, &tokens, &f32_meta).is_err());
    // Wrong shape in a tensor header.
    let wrong_shape = patch(&blob, "\"shape\":[3,16,64]", "\"shape\":[3,16,32]");
    assert!(decode(&key, &tokens, &wrong_shape).is_err());
    // A blob read under another key.
    let other_key = CacheKey::chunk(&MODEL, &[], &[1, 2, 3]);
    assert!(matches!(
        decode(&other_key, &tokens, &blob),
        Err(RejectReason::KeyMismatch { .. })
    ));
}

#[test]
fn random_corruptions_never_panic_and_never_pass() {
    let (key, tokens, blob) = valid_blob();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..400 {
        let mut bad = blob.clone();
        match i % 3 {
            0 => {
                let at = (next() as usize) % bad.len();
                bad[at] ^= 1 << (next() % 8);
            }
            1 => bad.truncate((next() as usize) % bad.len()),
            _ => {
                for _ in 0..8 {
                    let at = (next() as usize) % bad.len();
                    bad[at] = next() as u8;
                }
            }
        }
        if bad == blob {
            continue;
        }
        // A change inside the header's space padding is harmless; anything else must fail.
        if let Ok(range) = decode(&key, &tokens, &bad) {
            let original = decode(&key, &tokens, &blob).unwrap();
            for (a, b) in range.layers().iter().zip(original.layers()) {
                assert_eq!(
                    max_abs_diff(&a.0, &b.0),
                    0.0,
                    "case {i} returned different data"
                );
            }
        }
    }
}

#[test]
fn a_corrupt_object_in_the_store_is_a_counted_miss() {
    runtime().block_on(async {
        let store = store_for("memory://");
        let (key, tokens, blob) = valid_blob();
        let mut bad = blob.clone();
        let at = bad.len() - 10;
        bad[at] ^= 0xff;
        store
            .object_store()
            .put(&store.path_of(&key), bad.into())
            .await
            .unwrap();
        assert!(matches!(
            store.get(&key, Some(&tokens)).await.unwrap(),
            Lookup::Rejected(RejectReason::Checksum(_))
        ));
        let stats = store.stats();
        assert_eq!((stats.rejected, stats.misses, stats.hits), (1, 1, 0));
    });
}

#[test]
fn concurrent_puts_and_gets_of_one_key_never_see_a_torn_blob() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store_for(&format!("file://{}", dir.path().display())));
        let tokens = token_ids(32);
        let (key, range) = chunk_kv(&tokens);
        let mut tasks = Vec::new();
        for i in 0..24 {
            let (store, tokens, range) = (store.clone(), tokens.clone(), range.clone());
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    store.put(&key, &tokens, &range).await.unwrap();
                    None
                } else {
                    Some(store.get(&key, Some(&tokens)).await.unwrap())
                }
            }));
        }
        for task in tasks {
            if let Some(lookup) = task.await.unwrap() {
                assert!(
                    matches!(lookup, Lookup::Hit(_) | Lookup::Absent),
                    "a reader saw a partial object: {lookup:?}"
                );
            }
        }
        assert!(loads(&store, &key, &tokens).await);
    });
}

#[test]
fn memory_tier_serves_hits_and_evicts_by_bytes() {
    runtime().block_on(async {
        let tokens_a = token_ids(40);
        let (key_a, range_a) = chunk_kv(&tokens_a);
        let tokens_b = token_ids(41);
        let (key_b, range_b) = chunk_kv(&tokens_b);
        let one = range_a.to_dtype(DType::F16).unwrap().bytes();
        let store = store_for("memory://").with_memory_tier(one + one / 2);
        store.put(&key_a, &tokens_a, &range_a).await.unwrap();
        assert!(loads(&store, &key_a, &tokens_a).await);
        assert_eq!(store.stats().memory_hits, 1);
        assert_eq!(store.stats().bytes_read, 0, "served from memory");
        // A memory hit checks the token ids like a read from the backend does.
        let mut wrong = tokens_a.clone();
        wrong[0] += 1;
        assert!(matches!(
            store.get(&key_a, Some(&wrong)).await.unwrap(),
            Lookup::Rejected(RejectReason::TokenMismatch)
        ));
        store.put(&key_b, &tokens_b, &range_b).await.unwrap(); // evicts a
        assert_eq!(store.stats().evictions, 1);
        assert!(loads(&store, &key_a, &tokens_a).await);
        assert!(store.stats().bytes_read > 0, "a came from the backend");
    });
}

/// The store a test server holds, from the variable scripts/test.sh sets when it starts the
/// server: a URL, then object_store options as `key=value`, separated by spaces. Without it
/// the test is skipped ([`ragcake_test_support::skip`]: by name, and a failure under CI).
///
/// The cloud backends' tests are compiled with the `cloud` feature only: `cargo test
/// --workspace` (scripts/test.sh) turns it on through the root package's default features;
/// `cargo test -p ragcake-kvstore` runs them with `--features cloud`.
#[cfg(feature = "cloud")]
fn store_from_env(variable: &str) -> Option<KvStore> {
    let value = ragcake_test_support::required_env(
        variable,
        "scripts/test.sh starts the server and sets it",
    )?;
    let mut words = value.split_whitespace();
    let url = words.next().expect("a store URL");
    let options: Vec<(String, String)> = words
        .map(|w| {
            let (k, v) = w.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    // A fresh prefix per run, so reruns against one server start empty.
    let url = format!("{url}/{}", std::process::id());
    let (store, prefix) = open_url(&url, options).unwrap();
    Some(store_over(store, prefix))
}

#[cfg(feature = "cloud")]
#[test]
fn s3_backend_on_moto_passes_the_conformance_suite() {
    // Its endpoint and credentials are in the AWS_* variables scripts/s3-server.sh sets.
    if let Some(store) = store_from_env("RAGCAKE_TEST_S3_URL") {
        runtime().block_on(conformance(store));
    }
}

#[cfg(feature = "cloud")]
#[test]
fn s3_backend_on_s3rver_passes_the_conformance_suite() {
    if let Some(store) = store_from_env("RAGCAKE_TEST_S3RVER_STORE") {
        runtime().block_on(conformance(store));
    }
}

#[cfg(feature = "cloud")]
#[test]
fn azure_backend_on_azurite_passes_the_conformance_suite() {
    if let Some(store) = store_from_env("RAGCAKE_TEST_AZURITE_STORE") {
        runtime().block_on(conformance(store));
    }
}

/// GCS through object_store's own GCS client (`gs://`: its XML API requests, bearer-token
/// auth) against moto's S3 server, which answers those requests (put, get, ranged get,
/// head, list, multipart, delete); no GCS emulator installable here answers its puts.
/// Copy and create-if-absent, which moto's S3 side ignores the GCS headers of, are not
/// used by the store and not exercised.
#[cfg(feature = "cloud")]
#[test]
fn gcs_backend_on_moto_passes_the_conformance_suite() {
    if let Some(store) = store_from_env("RAGCAKE_TEST_GCS_STORE") {
        runtime().block_on(conformance(store));
    }
}

/// The client settings bound every request: a metadata request to a server that accepts
/// connections and never answers fails after the request timeout and its retries, not after
/// object_store's defaults (30 s an attempt, retries for 3 minutes); a refused connection
/// fails after its retries' backoff. Both are errors, never "absent".
#[cfg(feature = "cloud")]
#[test]
fn store_requests_to_a_hung_or_refusing_server_fail_within_the_client_bound() {
    use ragcake_kvstore::{StoreClientConfig, open_url_with};
    let client = StoreClientConfig {
        connect_timeout_secs: 0.5,
        request_timeout_secs: 0.5,
        max_retries: 1,
        retry_timeout_secs: 1.0,
        initial_backoff_secs: 0.05,
        max_backoff_secs: 0.1,
    };
    let bound = client.request_bound() + Duration::from_secs(1);
    runtime().block_on(async {
        for (what, endpoint) in [
            ("silent", crate::common::silent_server()),
            ("refused", "http://127.0.0.1:9".to_string()),
        ] {
            let options = crate::common::s3_options(&endpoint);
            let (backend, prefix) = open_url_with("s3://nowhere/kv", &client, options).unwrap();
            let store = store_over(backend, prefix);
            let key = CacheKey::chunk(&store.key_space(CacheKind::Chunk), &[], &[1, 2, 3]);
            let started = std::time::Instant::now();
            let result = store.contains(&key).await;
            let took = started.elapsed();
            assert!(result.is_err(), "{what}: {result:?}");
            assert!(took <= bound, "{what}: {took:?} > {bound:?}");
        }
    });
}

/// A misspelt option is an error naming it, not silently ignored (an endpoint left unset
/// would send the store's traffic elsewhere).
#[cfg(feature = "cloud")]
#[test]
fn an_unknown_store_option_is_an_error_that_names_it() {
    let options = vec![(
        "aws_endpointt".to_string(),
        "http://127.0.0.1:1".to_string(),
    )];
    let error = open_url("s3://bucket/kv", options).unwrap_err().to_string();
    assert!(error.contains("aws_endpointt"), "{error}");
}

#[test]
fn prefix_keys_chain_each_chunk_to_the_ones_before_it() {
    let store = store_for("memory://");
    let prefixes = store.key_space(CacheKind::Prefix);
    let a = CacheKey::prefix(&prefixes, None, &[1, 2]);
    let b = CacheKey::prefix(&prefixes, Some(&a), &[5]);
    assert_eq!(store.prefix_chain([&[1u32, 2][..], &[5][..]]), vec![a, b]);
    assert_eq!(
        store.chunk_key(&[1], &[5]),
        CacheKey::chunk(&store.key_space(CacheKind::Chunk), &[1], &[5])
    );
    assert_ne!(
        store.chunk_key(&[], &[5]),
        CacheKey::prefix(&prefixes, None, &[5])
    );
}

#[test]
fn keys_differ_with_the_compute_dtype_the_device_kind_and_the_storage_dtype() {
    let store = store_for("memory://");
    let key = |store: &KvStore| store.prefix_chain([&[1u32, 2][..]])[0];
    let plain = key(&store);
    assert_eq!(
        key(&store_for("memory://")),
        plain,
        "keys are deterministic"
    );
    // A bf16 replica's caches (on any device) are not this f32 one's.
    let bf16 = store_for("memory://").with_compute_dtype(DType::BF16);
    assert_ne!(key(&bf16), plain);
    // Nor are caches stored in f16 where this store keeps prefix caches in f32.
    let f16 = store_for("memory://").with_storage_dtype(StorageDtype::F16);
    assert_ne!(key(&f16), plain);
    assert_ne!(key(&f16), key(&bf16));
    // The model is part of it too.
    let other_model = KvStore::new(
        store.object_store().clone(),
        Default::default(),
        LlmFingerprint([9; 32]),
        SHAPE,
        Device::Cpu,
    );
    assert_ne!(key(&other_model), plain);
}

#[test]
fn two_writers_of_the_same_cache_store_the_same_bytes() {
    runtime().block_on(async {
        let tokens = token_ids(32);
        let (key, range) = chunk_kv(&tokens);
        let mut blobs = Vec::new();
        for _ in 0..2 {
            let store = store_for("memory://");
            store.put(&key, &tokens, &range).await.unwrap();
            let blob = store
                .object_store()
                .get(&store.path_of(&key))
                .await
                .unwrap();
            blobs.push(blob.bytes().await.unwrap());
        }
        assert_eq!(blobs[0], blobs[1], "the same cache, different bytes");
        // And the sorted header still reads back as a verified cache.
        let decoded = decode(&key, &tokens, &blobs[0]);
        assert!(decoded.is_ok(), "{decoded:?}");
    });
}

#[test]
fn int8_blobs_take_about_half_the_bytes_of_f16_within_half_a_quantization_step() {
    let tokens = token_ids(256);
    let (key, range) = chunk_kv(&tokens);
    let model = MODEL;
    let f16 = format::encode(&key, &model, &tokens, &range, StorageDtype::F16).unwrap();
    let int8 = format::encode(&key, &model, &tokens, &range, StorageDtype::Int8).unwrap();
    let ratio = int8.len() as f64 / f16.len() as f64;
    assert!(ratio <= 0.55, "int8 / f16 bytes = {ratio:.3}");

    let loaded = decode(&key, &tokens, &int8).unwrap();
    assert_eq!(loaded.dtype(), DType::F32);
    assert_eq!(loaded.len(), tokens.len());
    for ((k, v), (k0, v0)) in loaded.layers().iter().zip(range.layers()) {
        // Keys are scaled per channel, values per token: each element lies within half a
        // step (its group's absolute maximum / 127 / 2) of the original, plus the rounding
        // of the f16 value scales.
        let k_step = max_abs(k0) / 127.0;
        assert!(
            max_abs_diff(k, k0) <= 0.5 * k_step + 1e-3 * max_abs(k0),
            "keys"
        );
        let v_step = max_abs(v0) / 127.0;
        assert!(
            max_abs_diff(v, v0) <= 0.5 * v_step + 1e-3 * max_abs(v0),
            "values"
        );
    }

    // Through a store: the whole blob and a ranged read of a few layers agree.
    runtime().block_on(async {
        let store = store_for("memory://").with_storage_dtype(StorageDtype::Int8);
        let key = store.chunk_key(&[], &tokens);
        store.put(&key, &tokens, &range).await.unwrap();
        let got = store.get(&key, Some(&tokens)).await.unwrap().hit().unwrap();
        let part = store
            .get_layers(&key, Some(&tokens), 3..5)
            .await
            .unwrap()
            .hit()
            .unwrap();
        assert_same_layers(&part, &got, 3, "int8, ranged read");
        // The storage dtype is part of the key: an f16 store never finds it.
        assert_ne!(store_for("memory://").chunk_key(&[], &tokens), key);
    });

    // A flipped byte in a scale is caught by its checksum.
    let header_len = u64::from_le_bytes(int8[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&int8[8..8 + header_len]).unwrap();
    let at = header["vs.000"]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut flipped = int8.clone();
    flipped[8 + header_len + at] ^= 0x01;
    assert!(matches!(
        decode(&key, &tokens, &flipped),
        Err(RejectReason::Checksum(name)) if name == "vs.000"
    ));
}
