//! Numeric settings: a value the code cannot compute with is refused at
//! start, naming the key and the range; the largest values allowed work end to end.

use crate::helpers::*;
use contact_sync::config::bounds;
use contact_sync::outbox::prune;
use serde_json::json;

#[tokio::test]
async fn absurd_numbers_are_refused_at_start_and_the_largest_allowed_work() {
    let mut env = TestEnv::new().await;
    // Regression: 1e307 passed, overflowed the token bucket (float8), and every claim of the
    // worker's limited accounts failed for ever.
    for (extra, message) in [
        (
            "rate_limit_per_second = 1e307\n",
            "configuration key accounts.jc.rate_limit_per_second: must be a number from 0.000001 to 1000000 (calls per second)",
        ),
        (
            "rate_limit_per_second = nan\n",
            "configuration key accounts.jc.rate_limit_per_second: must be a number from 0.000001 to 1000000 (calls per second)",
        ),
        (
            "rate_limit_per_second = 5\nburst = 4000000000\n",
            "configuration key accounts.jc.burst: must be between 1 and 1000000",
        ),
    ] {
        let config = env.config_file_with(extra, "");
        for args in [&["status"][..], &["run", "--drain"][..]] {
            let (code, _, stderr) = env.cli(&config, args).await;
            assert_ne!(code, 0, "{args:?} {extra}");
            assert!(stderr.contains(message), "{args:?} {extra}: {stderr}");
        }
    }
    let config = env.config_file("[retention]\nfinished = \"36501d\"\n");
    let (code, _, stderr) = env.cli(&config, &["status"]).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("configuration key retention.finished: must be between 0ms and 36500d"),
        "{stderr}"
    );

    // The largest values: the bucket (a rate times the seconds since its last refill), the
    // lease, the retry delay and retention are computed with them.
    {
        let jc = env.settings.accounts.get_mut("jc").unwrap();
        jc.rate_limit_per_second = Some(bounds::RATE_PER_SECOND.1);
        jc.burst = Some(bounds::BURST.1);
        jc.max_in_flight = Some(bounds::MAX_IN_FLIGHT.1);
    }
    env.settings.worker.lease = bounds::LEASE.1;
    env.settings.worker.max_attempts = bounds::MAX_ATTEMPTS.1;
    env.settings.worker.max_coalesce = bounds::MAX_COALESCE.1;
    env.settings.retention.finished = bounds::RETENTION.1;
    env.settings.validate().unwrap();
    let worker = env.worker();
    let first = env.enqueue(jc("edge1@example.com", json!({}))).await;
    env.settle(&worker).await;
    assert_eq!(env.job(first).await.state, "succeeded");
    // an account idle for a thousand years refills its bucket without overflowing
    sqlx::query(
        "UPDATE contact_sync.accounts SET tokens = 0, refilled_at = now() - interval '1000 years' WHERE account = 'jc'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let second = env.enqueue(jc("edge2@example.com", json!({}))).await;
    env.settle(&worker).await;
    assert_eq!(env.job(second).await.state, "succeeded");
    let (tokens, burst): (f64, f64) =
        sqlx::query_as("SELECT tokens, burst FROM contact_sync.accounts WHERE account = 'jc'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(tokens.is_finite() && tokens <= burst, "{tokens} {burst}");
    // retention of a hundred years: nothing is old enough, and the statement runs
    let pruned = prune::prune_finished(&env.pool, bounds::RETENTION.1, 1000)
        .await
        .unwrap();
    assert_eq!(pruned, 0);
    // the longest retry delay and lease are intervals Postgres adds to now()
    let later: bool = sqlx::query_scalar(
        "SELECT now() + make_interval(secs => $1::bigint / 1000.0) + make_interval(secs => $2::bigint / 1000.0) > now()",
    )
    .bind(i64::try_from(bounds::BACKOFF.1.as_millis()).unwrap())
    .bind(i64::try_from(bounds::LEASE.1.as_millis()).unwrap())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(later);
}
