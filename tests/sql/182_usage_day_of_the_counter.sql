-- 182_usage_day_of_the_counter.sql: a report whose transaction began the day before
-- the subscription's counter (just before midnight, or a session in a zone behind)
-- counts, and is recorded, in the counter's day: the day's row of usage_metrics, its
-- distinct agents, its idempotency key, its answer's reset time.
-- CURRENT_DATE is simulated with SET LOCAL TimeZone as in 120_usage_day_forward.sql:
-- UTC+14 is "the new day", UTC-12 "the old day".
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(8);

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO anon, authenticated, service_role;
CREATE FUNCTION pg_temp.v(p_k text) RETURNS jsonb LANGUAGE sql AS $$ SELECT v FROM r WHERE k = p_k $$;
INSERT INTO public.instance_tokens (instance_id, key_id, token_hash) VALUES
    ('aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', repeat('1', 64));
CREATE FUNCTION pg_temp.report(p_k text, p_agent text, p_idem text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.run('service_role', format(
        'INSERT INTO r VALUES (%L, public.instance_track_usage(%L, %L, %L, NULL, %L))',
        p_k, 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', p_agent, p_idem)) $$;
-- One agent a day, and none of the fixture's usage rows.
DELETE FROM public.usage_metrics WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003';
UPDATE public.subscriptions s SET max_agents = 1, current_messages_today = 0, last_reset_at = NULL
  FROM public.instances i WHERE i.id = 'aaaaaaaa-0000-4000-8000-000000000003' AND s.id = i.subscription_id;

SET LOCAL TimeZone = 'Etc/GMT-14';   -- the new day
CREATE TEMP TABLE d AS SELECT CURRENT_DATE AS new_day;
GRANT SELECT ON d TO service_role;
SELECT is(pg_temp.report('new', 'general', 'msg-1'), 'ok:1', 'the new day: agent general reports');

SET LOCAL TimeZone = 'Etc/GMT+12';   -- reports whose transaction began the day before
SELECT is(pg_temp.report('old-other', 'other', 'msg-2') || ':' || (pg_temp.v('old-other') ->> 'allowed')
          || ':' || coalesce(pg_temp.v('old-other') ->> 'limit', ''),
          'ok:1:false:agents', 'a second agent is refused: the new day already has its one agent');
SELECT is(pg_temp.report('old-general', 'general', 'msg-3') || ':' || (pg_temp.v('old-general') ->> 'allowed')
          || ':' || (pg_temp.v('old-general') ->> 'agents_today'),
          'ok:1:true:1', 'the day''s agent is counted, one agent today');
SELECT is((pg_temp.v('old-general') ->> 'resets_at')::timestamptz,
          ((SELECT new_day FROM d) + 1)::timestamptz, 'its answer resets at the end of the new day');

SET LOCAL TimeZone = 'Etc/GMT-14';
SELECT results_eq($$SELECT date, messages_sent, agents_used FROM public.usage_metrics
                     WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003' ORDER BY date$$,
                  $$SELECT new_day, 2, '{"general": 2}'::jsonb FROM d$$,
                  'both messages are in the new day''s row, none in the old day''s');
SELECT is((SELECT s.current_messages_today FROM public.subscriptions s JOIN public.instances i
            ON s.id = i.subscription_id WHERE i.id = 'aaaaaaaa-0000-4000-8000-000000000003'),
          2, 'the counter says two');
SELECT results_eq($$SELECT idempotency_key, date FROM public.usage_report_keys
                     WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003' ORDER BY 1$$,
                  $$SELECT k, new_day FROM d, (VALUES ('msg-1'), ('msg-2'), ('msg-3')) v(k)$$,
                  'the keys are dated the new day');
SELECT is((SELECT count(*)::int FROM public.audit_logs a
            WHERE a.action = 'usage.limit_reached'
              AND a.actor_instance_id = 'aaaaaaaa-0000-4000-8000-000000000003'
              AND a.details ->> 'date' = (SELECT new_day FROM d)::text), 1,
          'the refusal is audited once, under the new day');

SELECT * FROM finish();
ROLLBACK;
