-- 181_usage_report_keys.sql: a usage report sent again with its key is counted once,
-- answered as the first one was; the same key with another agent or tool is refused;
-- keys are the instance's own and go two days after their report; no tenant reads them.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(20);

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO anon, authenticated, service_role;
CREATE FUNCTION pg_temp.v(p_k text) RETURNS jsonb LANGUAGE sql AS $$ SELECT v FROM r WHERE k = p_k $$;
CREATE FUNCTION pg_temp.sent() RETURNS int LANGUAGE sql AS $$
    SELECT coalesce((SELECT messages_sent FROM public.usage_metrics
                      WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003'
                        AND date = CURRENT_DATE), 0) $$;
-- A's instance (starter: 3 agents, 1,000 messages a day) and B's, each with a credential.
INSERT INTO public.instance_tokens (instance_id, key_id, token_hash) VALUES
    ('aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', repeat('1', 64)),
    ('bbbbbbbb-0000-4000-8000-000000000003', '00000000000000b1', repeat('2', 64));
-- Each call is its own statement, as each report is its own transaction.
CREATE FUNCTION pg_temp.report(p_k text, p_inst text, p_key_id text, p_agent text, p_tool text,
                               p_idem text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.run('service_role', format(
        'INSERT INTO r VALUES (%L, public.instance_track_usage(%L, %L, %L, %L, %L))',
        p_k, p_inst, p_key_id, p_agent, p_tool, p_idem)) $$;

-- 1. Sent again: counted once, its first answer --------------------------------------------
SELECT is(pg_temp.report('k1', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'general', 'search', 'msg-1'), 'ok:1', 'a report with a key');
SELECT is(pg_temp.report('k1b', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'general', 'search', 'msg-1'), 'ok:1', 'the same report sent again');
SELECT is(pg_temp.sent(), 1, 'is counted once');
SELECT results_eq($$SELECT k, (v ->> 'allowed')::boolean, (v ->> 'remaining')::int,
                           coalesce((v ->> 'replayed')::boolean, false), (v ->> 'agents_today')::int
                      FROM r WHERE k IN ('k1', 'k1b') ORDER BY k$$,
                  $$VALUES ('k1', true, 999, false, 1), ('k1b', true, 999, true, 1)$$,
                  'answered as the first one was, and said to be a replay');
SELECT is(pg_temp.report('k2', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'general', 'search', 'msg-2'), 'ok:1', 'another key');
SELECT is(pg_temp.report('k3', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'general', 'search', NULL), 'ok:1', 'and no key');
SELECT is(pg_temp.sent(), 3, 'are counted each');
SELECT is(pg_temp.report('k1c', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'general', 'search', 'msg-1'), 'ok:1', 'the first key once more');
SELECT results_eq($$SELECT (v ->> 'allowed')::boolean, (v ->> 'remaining')::int FROM r WHERE k = 'k1c'$$,
                  $$VALUES (true, 997)$$, 'the counters as they are now');

-- 2. The same key for another message: refused, nothing counted ---------------------------
SELECT is(pg_temp.report('k4', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'research', 'search', 'msg-1'), 'ok:1', 'msg-1 with another agent');
SELECT is(pg_temp.v('k4'), '{"outcome": "key_reused"}'::jsonb, 'is refused as a key reused');
SELECT is(pg_temp.report('k5', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         'general', NULL, 'msg-1'), 'ok:1', 'msg-1 without its tool');
SELECT is(pg_temp.v('k5') ->> 'outcome', 'key_reused', 'too');
SELECT is(pg_temp.sent(), 3, 'neither counted');

-- 3. A refusal; keys are each instance's own -----------------------------------------------
UPDATE public.subscriptions SET current_messages_today = 1000
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.report('k7', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1',
                         NULL, NULL, 'msg-5'), 'ok:1', 'a report over the limit');
SELECT is(pg_temp.report('k8', 'bbbbbbbb-0000-4000-8000-000000000003', '00000000000000b1',
                         NULL, NULL, 'msg-5'), 'ok:1', 'B''s instance with the same key');
SELECT results_eq($$SELECT k, (v ->> 'allowed')::boolean, v ->> 'limit', coalesce((v ->> 'replayed')::boolean, false)
                      FROM r WHERE k IN ('k7', 'k8') ORDER BY k$$,
                  $$VALUES ('k7', false, 'messages', false), ('k8', true, NULL, false)$$,
                  'A''s is refused, B''s counted: a key is the instance''s own');

-- 4. Keys go two days after their report; no tenant reads them ------------------------------
INSERT INTO public.usage_report_keys (instance_id, idempotency_key, date, allowed) VALUES
    ('aaaaaaaa-0000-4000-8000-000000000003', 'old', CURRENT_DATE - 2, true),
    ('aaaaaaaa-0000-4000-8000-000000000003', 'yesterday', CURRENT_DATE - 1, true),
    ('bbbbbbbb-0000-4000-8000-000000000003', 'b-old', CURRENT_DATE - 2, true);
-- A's counter last moved yesterday: the next report is the first of a new day.
UPDATE public.subscriptions SET current_messages_today = 5, last_reset_at = CURRENT_DATE - 1
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.report('k9', 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', NULL, NULL, NULL),
          'ok:1', 'the first report of a new day');
SELECT results_eq($$SELECT instance_id::text || ':' || idempotency_key FROM public.usage_report_keys
                     WHERE idempotency_key IN ('old', 'yesterday', 'b-old') ORDER BY 1$$,
                  $$VALUES ('aaaaaaaa-0000-4000-8000-000000000003:yesterday'),
                           ('bbbbbbbb-0000-4000-8000-000000000003:b-old')$$,
                  'the first report of a day removes its instance''s keys of the days before yesterday');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001', 'SELECT * FROM public.usage_report_keys'),
          'err:42501', 'a tenant cannot read report keys');

SELECT * FROM finish();
ROLLBACK;
