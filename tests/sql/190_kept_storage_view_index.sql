-- 190_kept_storage_view_index.sql (190_kept_storage_rule.sql): the view
-- instances_kept_storage selects exactly the rows of the partial index
-- instances_kept_storage_idx, so that every reader of the rule keeps the index. A
-- change of one without the other (a condition added to or dropped from either)
-- leaves the planner unable to prove the index's predicate from the view's WHERE:
-- each reader then scans every destroyed instance, and this test fails.
BEGIN;
\ir _helpers.inc
SELECT plan(2);

-- Only the plan's choice is asked: any other way of reading is made dear.
SET LOCAL enable_seqscan = off;
SET LOCAL enable_bitmapscan = off;
CREATE FUNCTION pg_temp.plan_of(p_sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || p_sql INTO v;
    RETURN v::text;
END $$;

SELECT ok(pg_temp.plan_of($q$SELECT id FROM public.instances_kept_storage
                              WHERE dokku_app_name = 'mindroom-x'$q$)
              LIKE '%"Index Name": "instances_kept_storage_idx"%',
          'a lookup by name in the view reads instances_kept_storage_idx');
SELECT ok(pg_temp.plan_of($q$SELECT id FROM public.instances_kept_storage
                              WHERE dokku_app_name = 'mindroom-x' AND takeable$q$)
              LIKE '%"Index Name": "instances_kept_storage_idx"%',
          'so does the takeover''s (takeable)');
SELECT * FROM finish();
ROLLBACK;
