-- What a producer's one-row statement costs in the insert trigger: no planning, and only its
-- provider's validation.
--
-- jobs_after_insert was planned afresh at every call (plan_cache_mode = force_custom_plan):
-- five statements, one of them the validation with every validation function inlined. Its plans
-- do not depend on how many rows the statement inserted (every pass reads the transition table
-- once; the account check joins the small accounts table by its key), so one plan per session
-- is kept now. The validation expression covered both providers, and Postgres sets up the whole
-- expression at each call, whichever branch the rows take: a statement whose rows all have one
-- provider (an enqueue() call, a captured statement, which inserts per account) now validates
-- with that provider as a constant, so the other provider's branch is folded away when the plan
-- is made. A statement mixing providers, or naming an unknown one, validates as before. The
-- emptiness test and the providers present are one pass over the transition table.
--
-- What is checked, and which fault a statement with several reports, are unchanged: every
-- row's account, then every row's fields (in the rows' order), then every row's run_at.
--
-- contact_sync.enqueue() was also planned afresh at every call. Its statements are an INSERT of
-- its arguments and a look-up by the unique (account, idempotency_key) index, whose plans are
-- the same for every argument: it keeps them now.
--
-- Only function definitions change: no table is rewritten or scanned. A worker of the build
-- before keeps working against this schema.
CREATE OR REPLACE FUNCTION contact_sync.jobs_after_insert() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    AS $$
DECLARE
    v_not_all_justclick boolean;
    v_not_all_smartlink boolean;
BEGIN
    SELECT bool_or(n.provider IS DISTINCT FROM 'justclick'), bool_or(n.provider IS DISTINCT FROM 'smartlink')
    INTO v_not_all_justclick, v_not_all_smartlink
    FROM new_jobs n;
    IF v_not_all_justclick IS NULL THEN
        RETURN NULL;  -- an insert of no rows
    END IF;
    PERFORM contact_sync.reject(
        format('contact_sync: account %s is a %s account, not %s', quote_literal(n.account), a.provider, n.provider),
        format('enqueue it with provider %s, or name one of the %s accounts', quote_literal(a.provider), n.provider),
        to_jsonb(n.id))
    FROM new_jobs n JOIN contact_sync.accounts a ON a.account = n.account
    WHERE a.provider IS NOT NULL AND a.provider <> n.provider;
    IF NOT v_not_all_justclick THEN
        PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job('justclick', n.email, n.payload);
    ELSIF NOT v_not_all_smartlink THEN
        PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job('smartlink', n.email, n.payload);
    ELSE
        PERFORM 1 FROM new_jobs n WHERE NOT contact_sync.validate_job(n.provider, n.email, n.payload);
    END IF;
    PERFORM contact_sync.reject('contact_sync: run_at must be a finite time, got ' || n.run_at::text,
                                'pass a timestamp (or omit run_at for now)', to_jsonb(n.id))
    FROM new_jobs n WHERE NOT isfinite(n.run_at);
    PERFORM pg_notify('contact_sync_jobs', '');
    RETURN NULL;
END
$$;

ALTER FUNCTION contact_sync.enqueue(text, text, text, jsonb, text, timestamp with time zone, integer)
    RESET plan_cache_mode;
