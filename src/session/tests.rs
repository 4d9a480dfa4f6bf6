use super::*;

#[test]
fn tokens_are_long_and_distinct() {
    let (a, b) = (new_token(), new_token());
    assert_eq!(a.len(), 48);
    assert_ne!(a, b);
}

#[tokio::test(start_paused = true)]
async fn tokens_expire_and_rotate() {
    let root = CancellationToken::new();
    let target: Target = "127.0.0.1:5901".parse().expect("target");
    let first = SessionToken::issue(Some(Duration::from_secs(60)));
    let s = Session::new(
        "vm",
        Some(7000),
        first.clone(),
        SystemTime::now(),
        target,
        SessionLimits::default(),
        &root,
    );
    assert_eq!(s.check_token(&first.value), TokenCheck::Valid);
    assert_eq!(s.check_token("nope"), TokenCheck::Wrong);
    assert_eq!(s.check_token(""), TokenCheck::Wrong);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(s.check_token(&first.value), TokenCheck::Valid);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(s.check_token(&first.value), TokenCheck::Expired);
    assert_eq!(
        s.check_token("nope"),
        TokenCheck::Wrong,
        "a wrong token is not told it expired"
    );
    let second = SessionToken::issue(Some(Duration::from_secs(60)));
    s.replace_token(second.clone());
    assert_eq!(s.check_token(&second.value), TokenCheck::Valid);
    assert_eq!(
        s.check_token(&first.value),
        TokenCheck::Wrong,
        "a rotated token is gone"
    );
    let record: SessionRecord = serde_json::from_slice(&s.record()).expect("record");
    assert_eq!(record.tokens[0].value, second.value);
    assert_eq!(record.tokens[0].expires_at, second.expires_at.map(rfc3339));
}

#[test]
fn revocation_names_only_the_generations_it_ended() {
    let root = CancellationToken::new();
    let target: Target = "127.0.0.1:5901".parse().expect("target");
    let s = Session::new(
        "vm",
        Some(7000),
        SessionToken::issue(None),
        SystemTime::now(),
        target,
        SessionLimits::default(),
        &root,
    );
    let before = s.ticket();
    s.revoke_viewers();
    assert!(before.cancel.is_cancelled());
    assert_eq!(
        s.cancel_reason(before.generation),
        CloseReason::TokenRevoked
    );
    let after = s.ticket();
    assert!(!after.cancel.is_cancelled());
    assert_eq!(s.cancel_reason(after.generation), CloseReason::Retargeted);
}
