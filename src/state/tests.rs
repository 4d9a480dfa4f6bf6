use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vncgate-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

#[test]
fn the_schema_1_fixture_loads() {
    let bytes = include_bytes!("../../tests/fixtures/state-v1.json");
    let records = parse(bytes).expect("fixture parses");
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].vm_id, "vm-100");
    assert_eq!(records[0].target, "127.0.0.1:5901");
    assert_eq!(records[0].ws_port, Some(6100));
    assert_eq!(records[0].tokens[0].expires_at, None);
    assert_eq!(records[1].target, "unix:/run/vnc/vm-101.sock");
}

#[test]
fn unknown_versions_and_garbage_are_refused() {
    for (bytes, want) in [
        (
            &br#"{"version": 2, "sessions": []}"#[..],
            "schema version 2",
        ),
        (b"{\"version\": 1, \"sess", "not valid JSON"),
        (b"\x00\x01garbage", "not valid JSON"),
        (b"{\"sessions\": []}", "no \"version\""),
        (
            br#"{"version": 1, "sessions": [{"vm_id": 5}]}"#,
            "not a schema-1",
        ),
    ] {
        let err = parse(bytes).expect_err("refused");
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn writes_are_atomic_and_round_trip() {
    let dir = scratch("rt");
    let path = dir.join("state.json");
    let doc = StateDoc {
        version: 1,
        sessions: vec![SessionRecord {
            vm_id: "vm-1".into(),
            target: "[::1]:5900".into(),
            ws_port: Some(6101),
            tokens: vec![TokenRecord {
                value: "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978".into(),
                expires_at: None,
            }],
            created_at: "2026-11-26T00:00:00Z".into(),
            idle_timeout: None,
            max_lifetime: None,
        }],
    };
    write_atomic(
        &path,
        &StateDoc {
            version: 1,
            sessions: vec![],
        },
    )
    .expect("first write");
    write_atomic(&path, &doc).expect("write");
    assert_eq!(load(&path, false).expect("load"), doc.sessions);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // The temp file holds the table before (the two swapped names).
    assert_eq!(names, [".state.json.tmp", "state.json"]);
    assert_eq!(
        load(&dir.join(".state.json.tmp"), false).expect("old"),
        vec![]
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "tokens are readable by the owner only");
    // A longer table, then a shorter one: the reused temp file is cut to size.
    write_atomic(&path, &doc_with(50)).expect("long");
    write_atomic(&path, &doc_with(2)).expect("short");
    write_atomic(&path, &doc_with(1)).expect("shorter");
    assert_eq!(load(&path, false).expect("load").len(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tables_no_daemon_writes_are_refused_naming_the_record() {
    let good = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978";
    let rec = |vm: &str, port: u16, token: &str| SessionRecord {
        vm_id: vm.into(),
        target: "127.0.0.1:5900".into(),
        ws_port: Some(port),
        tokens: vec![TokenRecord {
            value: token.into(),
            expires_at: None,
        }],
        created_at: "2026-11-26T00:00:00Z".into(),
        idle_timeout: None,
        max_lifetime: None,
    };
    assert!(validate(&[rec("vm-1", 6100, good), rec("vm-2", 6101, good)]).is_ok());
    let cases = [
        (
            vec![rec("vm-1", 6100, good), rec("vm-1", 6101, good)],
            "vm-1",
        ),
        (
            vec![rec("vm-1", 6100, good), rec("vm-2", 6100, good)],
            "6100",
        ),
        (vec![rec("vm-e", 6100, "")], "vm-e"),
        (vec![rec("vm-s", 6100, "abc")], "vm-s"),
        (
            vec![rec(
                "vm-amp",
                6100,
                "0f1e2d3c4b5a69788796a5b4c3d2e1f0&x=1#frag",
            )],
            "vm-amp",
        ),
        (
            vec![SessionRecord {
                max_lifetime: Some("soon".into()),
                ..rec("vm-life", 6100, good)
            }],
            "max_lifetime",
        ),
        (
            vec![SessionRecord {
                idle_timeout: Some("0s".into()),
                ..rec("vm-idle", 6100, good)
            }],
            "idle_timeout",
        ),
        (vec![rec("../x", 6100, good)], "invalid vm_id \"../x\""),
        (
            vec![SessionRecord {
                target: "evil".into(),
                ..rec("vm-target", 6100, good)
            }],
            "vm-target\") has a bad target",
        ),
        (
            vec![SessionRecord {
                tokens: vec![],
                ..rec("vm-untokened", 6100, good)
            }],
            "vm-untokened\") has no token",
        ),
        (
            vec![SessionRecord {
                created_at: "yesterday".into(),
                ..rec("vm-when", 6100, good)
            }],
            "created_at \"yesterday\"",
        ),
    ];
    let limited = SessionRecord {
        idle_timeout: Some("15m".into()),
        max_lifetime: Some("1h 30m".into()),
        ..rec("vm-ok", 6100, good)
    };
    assert!(validate(&[limited]).is_ok());
    for (records, names) in cases {
        let err = validate(&records).expect_err("refused");
        assert!(err.contains(names), "{err}");
        let doc = serde_json::to_vec(&StateDoc {
            version: 1,
            sessions: records,
        })
        .expect("json");
        assert!(parse(&doc).is_err(), "parse refuses it too");
    }
}

fn doc_with(n: usize) -> StateDoc {
    StateDoc {
        version: 1,
        sessions: (0..n)
            .map(|i| SessionRecord {
                vm_id: format!("vm-{i}"),
                target: "127.0.0.1:5900".into(),
                ws_port: Some(6100 + i as u16),
                tokens: vec![TokenRecord {
                    value: format!("token-{i:0>32}"),
                    expires_at: None,
                }],
                created_at: "2026-11-26T00:00:00Z".into(),
                idle_timeout: None,
                max_lifetime: None,
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_keep_every_acknowledged_change_and_no_undone_one() {
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicUsize;
    let dir = scratch("group");
    let path = dir.join("state.json");
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    // The "table": the callers' ids. The second snapshot is lost, so its write fails.
    let table = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let snap_table = Arc::clone(&table);
    let snapshots = Arc::new(AtomicUsize::new(0));
    let snap_count = Arc::clone(&snapshots);
    let committer = spawn_writer(
        path.clone(),
        move || {
            let ids = snap_table.lock().expect("lock").clone();
            let records: Vec<Vec<u8>> = doc_with(ids.len())
                .sessions
                .into_iter()
                .zip(ids)
                .map(|(r, id)| SessionRecord {
                    vm_id: format!("vm-{id}"),
                    ..r
                })
                .map(|r| serde_json::to_vec(&r).expect("record"))
                .collect();
            (snap_count.fetch_add(1, Ordering::SeqCst) != 1)
                .then(|| render(records.iter().map(Vec::as_slice)))
        },
        |_| {},
        Arc::new(CommitStats::default()),
        &tracker,
        stop.clone(),
    );
    committer
        .commit(Box::new(|| {}))
        .await
        .expect("the first write succeeds");
    let mut calls = Vec::new();
    for id in 0..200usize {
        let (c, table) = (committer.clone(), Arc::clone(&table));
        calls.push(tokio::spawn(async move {
            table.lock().expect("lock").insert(id);
            let undo_table = Arc::clone(&table);
            let result = c
                .commit(Box::new(move || {
                    undo_table.lock().expect("lock").remove(&id);
                }))
                .await;
            (id, result.is_ok())
        }));
    }
    let (mut acked, mut failed) = (BTreeSet::new(), BTreeSet::new());
    for call in calls {
        let (id, ok) = call.await.expect("join");
        if ok {
            acked.insert(format!("vm-{id}"));
        } else {
            failed.insert(format!("vm-{id}"));
        }
    }
    // An earlier write may have caught a failed call's change in its snapshot; the next good
    // write no longer has it.
    committer
        .commit(Box::new(|| {}))
        .await
        .expect("a later write succeeds");
    stop.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .expect("writer stops");
    let on_disk: BTreeSet<String> = load(&path, false)
        .expect("load")
        .into_iter()
        .map(|r| r.vm_id)
        .collect();
    assert!(
        !failed.is_empty(),
        "the calls the lost snapshot covered fail"
    );
    assert_eq!(
        on_disk, acked,
        "exactly the acknowledged changes are on disk"
    );
    let writes = snapshots.load(Ordering::SeqCst);
    assert!(
        writes < 200,
        "calls share writes ({writes} snapshots for 200 calls)"
    );
    let leftovers = std::fs::read_dir(&dir).expect("dir").count();
    assert_eq!(leftovers, 2, "the state file and the one reused temp file");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stale_temp_files_are_removed_and_nothing_else() {
    let dir = scratch("stale");
    let path = dir.join("state.json");
    std::fs::write(&path, "{}").expect("state");
    std::fs::write(dir.join(".state.json.tmp-123-4"), "x").expect("tmp");
    std::fs::write(dir.join(".other.tmp-1"), "x").expect("other");
    std::fs::write(dir.join(".state.json.tmp"), "x").expect("reused temp");
    remove_stale_temps(&path);
    assert!(path.exists());
    assert!(dir.join(".state.json.tmp").exists());
    assert!(dir.join(".other.tmp-1").exists());
    assert!(!dir.join(".state.json.tmp-123-4").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_files_are_kept_and_refused_unless_start_empty() {
    let dir = scratch("corrupt");
    let path = dir.join("state.json");
    std::fs::write(&path, "{\"version\": 1, \"sessions\": [").expect("write");
    match load(&path, false) {
        Err(StateError::Corrupt { kept: Some(k), .. }) => assert!(k.exists()),
        other => panic!("expected refusal, got {other:?}"),
    }
    assert!(path.exists(), "the bad file stays where it was");
    assert_eq!(load(&path, true).expect("start empty"), vec![]);
    assert!(!path.exists(), "moved aside");
    assert_eq!(load(&path, false).expect("now missing = empty"), vec![]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_second_lock_is_refused_with_the_holders_pid() {
    let dir = scratch("lock");
    let path = dir.join("state.json");
    let _held = acquire_lock(&path).expect("first lock");
    match acquire_lock(&path) {
        Err(e @ StateError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("pid {}", std::process::id())),
                "{msg}"
            );
            assert!(msg.contains("is serving"), "{msg}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}
