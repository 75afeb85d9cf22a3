-- 204_refused_report_judged_again.sql (204_refused_report_judged_again.sql,
-- instance_track_usage): a report refused at the daily limit counted nothing; sent
-- again with its Idempotency-Key once the limit lifted (the customer upgraded the
-- same day, or the next day came, as its Retry-After said), it is counted, once. A
-- counted report sent again is still answered as it was, counting nothing.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(8);

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO anon, authenticated, service_role;
INSERT INTO public.instance_tokens (instance_id, key_id, token_hash) VALUES
    ('aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', repeat('1', 64));
-- Each call is its own statement, as each report is its own transaction.
CREATE FUNCTION pg_temp.report(p_k text, p_idem text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT pg_temp.run('service_role', format(
        'INSERT INTO r VALUES (%L, public.instance_track_usage(%L, %L, NULL, NULL, %L))',
        p_k, 'aaaaaaaa-0000-4000-8000-000000000003', '00000000000000a1', p_idem));
    SELECT v FROM r WHERE k = p_k $$;
CREATE FUNCTION pg_temp.today() RETURNS integer LANGUAGE sql AS $$
    SELECT current_messages_today FROM public.subscriptions
     WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002' $$;
CREATE FUNCTION pg_temp.answer(p_v jsonb) RETURNS text LANGUAGE sql AS $$
    SELECT (p_v ->> 'allowed') || '/' || coalesce(p_v ->> 'limit', '-') || '/' || (p_v ->> 'replayed') $$;

-- A limit of 2 a day: m1 and m2 counted, m3 refused.
UPDATE public.subscriptions SET max_messages_per_day = 2, current_messages_today = 0,
       last_reset_at = CURRENT_DATE WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT pg_temp.report('1', 'm1'), pg_temp.report('2', 'm2');
SELECT is(pg_temp.answer(pg_temp.report('3', 'm3')), 'false/messages/false', 'm3 is refused at the limit');
SELECT is(pg_temp.answer(pg_temp.report('3a', 'm3')), 'false/messages/false',
          'sent again with nothing changed, m3 is judged again: still refused');

-- The same day, the customer upgrades (the plan's limit, 10,000).
UPDATE public.subscriptions SET tier = 'professional', stripe_price_id = 'price_professional'
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.answer(pg_temp.report('3b', 'm3')), 'true/-/false',
          'after the upgrade, m3 sent again is counted');
SELECT is(pg_temp.today(), 3, 'once');
SELECT is(pg_temp.answer(pg_temp.report('3c', 'm3')), 'true/-/true',
          'sent again after it was counted, it is answered as it was');
SELECT is(pg_temp.today(), 3, 'and counts nothing more');

-- Back to a limit of 2, reached: m9 is refused; then the next day comes.
UPDATE public.subscriptions SET max_messages_per_day = 2, current_messages_today = 2,
       last_reset_at = CURRENT_DATE WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.answer(pg_temp.report('9', 'm9')), 'false/messages/false', 'm9 is refused at the limit');
UPDATE public.subscriptions SET last_reset_at = CURRENT_DATE - 1
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
UPDATE public.usage_report_keys SET date = CURRENT_DATE - 1
 WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003';
SELECT is(pg_temp.answer(pg_temp.report('9b', 'm9')) || '/' || pg_temp.today(), 'true/-/false/1',
          'the next day, as its Retry-After said, m9 sent again is counted');

SELECT * FROM finish();
ROLLBACK;
