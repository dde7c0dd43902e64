use std::time::Instant;

use super::*;
use crate::resource::Kind;

fn ns_doc(name: &str) -> String {
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

fn key(name: &str) -> ResourceKey {
    ResourceKey::new(Kind::Namespace, "", name)
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).expect("write test file");
}

fn names(index: &SharedIndex) -> Vec<String> {
    index.read().keys().map(|k| k.name.clone()).collect()
}

fn reasons(index: &SharedIndex) -> Vec<(String, Option<String>, String)> {
    index
        .read()
        .rejections()
        .into_iter()
        .map(|r| {
            let file = Path::new(&r.origin)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            (file, r.key.map(|k| k.to_string()), r.reason)
        })
        .collect()
}

/// Waits until `check` holds, failing after one second.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "not within 1 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn loads_every_yaml_file_and_records_bad_documents() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.yaml", &(ns_doc("a1") + &ns_doc("a2")));
    write(
        dir.path(),
        "b.yml",
        &(ns_doc("b1") + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"),
    );
    write(dir.path(), "notes.txt", &ns_doc("ignored"));
    write(dir.path(), ".hidden.yaml", &ns_doc("hidden"));
    std::fs::create_dir(dir.path().join("sub.yaml")).expect("a directory named like a file");

    let index = SharedIndex::new();
    load_once(dir.path(), &index).expect("directory loads");
    assert_eq!(names(&index), ["a1", "a2", "b1"]);
    let origin = index.read().origin(&key("a1")).map(str::to_string);
    assert_eq!(
        origin,
        Some(dir.path().join("a.yaml").display().to_string())
    );
    let rejected = reasons(&index);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, "b.yml");
    assert!(
        rejected[0]
            .2
            .starts_with("document 2: unknown kind \"ConfigMap\""),
        "{rejected:?}"
    );

    let missing = load_once(dir.path().join("nope"), &index).expect_err("no such directory");
    assert_eq!(missing.kind(), "directory");
    let file = load_once(dir.path().join("a.yaml"), &index).expect_err("a file");
    assert_eq!(file.kind(), "not_a_directory");
}

#[test]
fn invalid_documents_keep_the_last_good_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tt = |kind: &str| {
        format!(
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: t, namespace: shop}}\nspec:\n  destination: {{kind: ServiceAccount, name: api}}\n  rules: [{{kind: {kind}, name: r}}]\n  sources: [{{kind: ServiceAccount, name: web}}]\n"
        )
    };
    let route = "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: r, namespace: shop}\nspec: {matches: {ports: []}}\n";
    write(dir.path(), "route.yaml", route);
    write(dir.path(), "a.yaml", &(ns_doc("shop") + &tt("TCPRoute")));
    let index = SharedIndex::new();
    let mut loader = Loader::new(dir.path().to_path_buf());
    loader.step(&index, true).expect("scan");
    let tt_key = ResourceKey::new(Kind::TrafficTarget, "shop", "t");
    assert!(index.read().contains(&tt_key));

    // The TrafficTarget turns invalid: its previous version stays, with a rejection.
    write(dir.path(), "a.yaml", &(ns_doc("shop") + &tt("Foo")));
    loader.step(&index, true).expect("scan");
    assert!(index.read().contains(&tt_key));
    let rejected = reasons(&index);
    let own: Vec<_> = rejected.iter().filter(|r| r.0 == "a.yaml").collect();
    assert_eq!(own.len(), 1, "{rejected:?}");
    assert_eq!(own[0].1.as_deref(), Some("TrafficTarget shop/t"));
    assert!(own[0].2.contains("spec.rules[0].kind: \"Foo\""), "{own:?}");
    assert!(
        own[0].2.ends_with("the previous version stays in force"),
        "{own:?}"
    );

    // Broken YAML: every resource of the file stays.
    write(dir.path(), "a.yaml", "kind: [oops\n");
    loader.step(&index, true).expect("scan");
    assert!(index.read().contains(&tt_key));
    assert!(index.read().contains(&key("shop")));
    let rejected = reasons(&index);
    assert!(
        rejected
            .iter()
            .any(|r| r.0 == "a.yaml" && r.2.starts_with("document 1: invalid YAML")),
        "{rejected:?}"
    );

    // Fixed: rejections go, and a resource that left the file is removed.
    write(dir.path(), "a.yaml", &tt("TCPRoute"));
    loader.step(&index, true).expect("scan");
    assert!(!index.read().contains(&key("shop")));
    assert!(index.read().contains(&tt_key));
    let own: Vec<_> = reasons(&index)
        .into_iter()
        .filter(|r| r.0 == "a.yaml")
        .collect();
    assert!(own.is_empty(), "{own:?}");
}

#[test]
fn the_first_file_wins_a_duplicate() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.yaml", &ns_doc("shared"));
    write(
        dir.path(),
        "b.yaml",
        &ns_doc("shared").replace("{name: shared}", "{name: shared, labels: {b: \"1\"}}"),
    );
    let index = SharedIndex::new();
    let mut loader = Loader::new(dir.path().to_path_buf());
    loader.step(&index, true).expect("scan");
    let a = dir.path().join("a.yaml").display().to_string();
    assert_eq!(index.read().origin(&key("shared")), Some(a.as_str()));
    let rejected = reasons(&index);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, "b.yaml");
    assert!(
        rejected[0]
            .2
            .starts_with("Namespace shared is also defined in"),
        "{rejected:?}"
    );

    // The winner goes: the other definition takes over.
    std::fs::remove_file(dir.path().join("a.yaml")).expect("remove");
    loader.step(&index, false).expect("scan");
    let b = dir.path().join("b.yaml").display().to_string();
    assert_eq!(index.read().origin(&key("shared")), Some(b.as_str()));
    assert!(reasons(&index).is_empty());
}

#[tokio::test]
async fn follows_edits_and_deletions() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.yaml", &(ns_doc("a1") + &ns_doc("a2")));
    let index = SharedIndex::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let task = tokio::spawn(run(dir.path().to_path_buf(), index.clone(), Some(ready_tx)));
    ready_rx.await.expect("ready");
    assert_eq!(names(&index), ["a1", "a2"]);
    let changes = index.subscribe();

    // An edit replaces the file's resources.
    write(dir.path(), "a.yaml", &(ns_doc("a2") + &ns_doc("a3")));
    eventually("edit applied", || names(&index) == ["a2", "a3"]).await;
    assert!(changes.has_changed().expect("sender alive"));

    // A new file, then bad content in it.
    write(dir.path(), "b.yaml", &ns_doc("b1"));
    eventually("new file applied", || {
        names(&index).contains(&"b1".to_string())
    })
    .await;
    write(
        dir.path(),
        "b.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
    );
    eventually("rejection recorded", || !reasons(&index).is_empty()).await;
    assert!(!names(&index).contains(&"b1".to_string()));

    // A deleted file's resources and rejections go.
    std::fs::remove_file(dir.path().join("a.yaml")).expect("remove");
    std::fs::remove_file(dir.path().join("b.yaml")).expect("remove");
    eventually("deletions applied", || {
        names(&index).is_empty() && reasons(&index).is_empty()
    })
    .await;

    task.abort();
}

#[tokio::test]
async fn run_fails_without_the_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ready_tx, ready_rx) = oneshot::channel();
    let err = run(
        dir.path().join("missing"),
        SharedIndex::new(),
        Some(ready_tx),
    )
    .await
    .expect_err("no directory");
    assert_eq!(err.kind(), "directory");
    assert!(ready_rx.await.is_err(), "never ready");
}

#[test]
fn polling_alone_sees_a_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.yaml", &ns_doc("one"));
    let index = SharedIndex::new();
    let mut loader = Loader::new(dir.path().to_path_buf());
    loader.step(&index, false).expect("scan");
    let generation = index.generation();
    loader.step(&index, false).expect("scan");
    assert_eq!(index.generation(), generation, "nothing changed");
    write(dir.path(), "a.yaml", &ns_doc("two-two"));
    loader.step(&index, false).expect("scan");
    assert_eq!(names(&index), ["two-two"]);
}

#[tokio::test]
async fn reading_the_files_is_not_a_change_but_writing_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "ns.yaml", &ns_doc("a"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _watcher = watch(dir.path(), tx).expect("inotify watch");
    // What a scan does: list, stat and read every file. Reacting to that would rescan forever.
    for _ in 0..3 {
        let _ = std::fs::read_dir(dir.path()).expect("list").count();
        let _ = std::fs::read_to_string(dir.path().join("ns.yaml")).expect("read");
    }
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await;
    assert!(
        quiet.is_err(),
        "reading the directory raised a change event"
    );

    write(dir.path(), "ns.yaml", &ns_doc("b"));
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("a write raises a change event")
        .expect("the watcher is alive");
}
