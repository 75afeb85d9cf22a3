-- 118_claim_leases_index_scan.sql: a claim counts the leases in force with a plain
-- index scan, which marks the versions of leases given back dead in the index, never
-- with a bitmap scan, which reads each of them again at every claim
-- (118_claim_leases_index_scan.sql).
BEGIN;
SELECT plan(3);

-- The plan a statement gets under the claim's own planner settings (its SET enable_*
-- clauses; its empty search_path is left out, the test's statements name schemas).
CREATE FUNCTION pg_temp.claim_plan(p_sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r record; v text := ''; c text;
BEGIN
    FOREACH c IN ARRAY (SELECT proconfig FROM pg_catalog.pg_proc
                         WHERE oid = 'public.lifecycle_claim(text, integer)'::regprocedure) LOOP
        IF c LIKE 'enable\_%' THEN
            PERFORM pg_catalog.set_config(split_part(c, '=', 1), split_part(c, '=', 2), true);
        END IF;
    END LOOP;
    FOR r IN EXECUTE 'EXPLAIN ' || p_sql LOOP v := v || r."QUERY PLAN" || E'\n'; END LOOP;
    RETURN v;
END $$;

SELECT ok((SELECT proconfig @> ARRAY['enable_bitmapscan=off', 'enable_sort=off', 'enable_seqscan=off']
             FROM pg_catalog.pg_proc
            WHERE oid = 'public.lifecycle_claim(text, integer)'::regprocedure),
          'the claim runs with bitmap scans, sorts and sequential scans priced out');

-- Statistics as a busy instances table has them between analyses: many rows, no page
-- all-visible, no column statistics (rolled back with the test). Under them and 110's
-- settings alone the planner reads the leases with a bitmap scan.
UPDATE pg_catalog.pg_class SET reltuples = 1000000, relpages = 20000, relallvisible = 0
 WHERE oid = 'public.instances'::regclass;
DELETE FROM pg_catalog.pg_statistic WHERE starelid = 'public.instances'::regclass;

SELECT ok(pg_temp.claim_plan($$SELECT count(*) FROM public.instances x
                               WHERE x.claimed_by IS NOT NULL AND x.claim_expires_at > now()$$)
          ~ 'Index (Only )?Scan using instances_claimed_idx', 'the leases in force: read by an index scan');
SELECT unalike(pg_temp.claim_plan($$SELECT count(*) FROM public.instances x
                                   WHERE x.claimed_by IS NOT NULL AND x.claim_expires_at > now()$$),
              '%Bitmap%', 'the leases in force: no bitmap scan');

SELECT * FROM finish();
ROLLBACK;
