use super::*;

fn lifecycle(params: &[&str]) -> Lifecycle {
    Lifecycle::new(
        &LifecycleConfig {
            events: true,
            query_params: params.iter().map(|p| (*p).to_owned()).collect(),
            ..LifecycleConfig::default()
        },
        crate::keys::Keys::Standalone,
    )
}

#[test]
fn only_allowed_query_parameters_are_copied() {
    let l = lifecycle(&["lang", "plan"]);
    assert_eq!(
        l.allowed_query(Some("access_token=t&lang=fr&x=1&plan=a%20b")),
        [
            ("lang".to_owned(), "fr".to_owned()),
            ("plan".to_owned(), "a b".to_owned())
        ]
    );
    assert!(l.allowed_query(None).is_empty());
    assert!(lifecycle(&[]).allowed_query(Some("lang=fr")).is_empty());
    // A parameter repeated a thousand times is copied a bounded number
    // of times.
    let many = "lang=x&".repeat(1000);
    assert_eq!(l.allowed_query(Some(&many)).len(), 1);
    // Issue 22, defect 9: a repeated parameter was copied twice, a
    // duplicate key in the event's JSON. The first value wins.
    assert_eq!(
        l.allowed_query(Some("lang=a&lang=b&plan=p&plan=q&lang=c")),
        [
            ("lang".to_owned(), "a".to_owned()),
            ("plan".to_owned(), "p".to_owned())
        ]
    );
}

#[test]
fn process_ids_and_connection_ids_are_distinct() {
    let (a, b) = (lifecycle(&[]), lifecycle(&[]));
    assert_ne!(a.process(), b.process());
    assert_eq!(a.process().len(), 12);
    let (n1, n2) = (a.next_connection(), a.next_connection());
    assert!(n1 != 0 && n1 != n2);
    assert_eq!(a.connection_id(7), format!("{}:7", a.process()));
}
