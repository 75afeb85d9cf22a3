-- 114_event_status_index.sql: stripe_events' status index holds the events that need
-- attention and serves the queries that look for them (114_event_status_index.sql).
BEGIN;
SELECT plan(3);

SELECT is(pg_get_indexdef('public.stripe_events_status_idx'::regclass),
          $$CREATE INDEX stripe_events_status_idx ON public.stripe_events USING btree (status, received_at) WHERE (status = ANY (ARRAY['received'::text, 'deferred'::text, 'failed'::text, 'refused'::text]))$$,
          'indexed: received, deferred, failed, refused; settled events are not');

CREATE FUNCTION pg_temp.plan_of(p_sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r record; v text := '';
BEGIN
    FOR r IN EXECUTE 'EXPLAIN ' || p_sql LOOP v := v || r."QUERY PLAN" || E'\n'; END LOOP;
    RETURN v;
END $$;
SET LOCAL enable_seqscan = off;
SELECT ok(pg_temp.plan_of($$SELECT id FROM public.stripe_events WHERE status IN ('failed', 'deferred')
                            ORDER BY received_at$$) LIKE '%stripe_events_status_idx%',
          'mindroomctl failed-events reads the index');
SELECT ok(pg_temp.plan_of($$SELECT status, count(*) FROM public.stripe_events
                            WHERE status IN ('deferred', 'received', 'failed') GROUP BY status$$)
          LIKE '%stripe_events_status_idx%', 'ops_metrics'' counts read the index');

SELECT * FROM finish();
ROLLBACK;
