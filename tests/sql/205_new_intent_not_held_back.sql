-- 205_new_intent_not_held_back.sql (205_new_intent_not_held_back.sql,
-- instance_request): what billing asks of an instance (the webhook's intent) is due at
-- once, not after the retry backoff of another step: an unpaid customer's stop after
-- an update that kept failing, and, once the customer pays again while that stop
-- itself backs off, the work that runs the instance again.
BEGIN;
SELECT plan(6);

INSERT INTO auth.users (id, email) VALUES ('20500000-0000-4000-8000-0000000000a0', 'intent205@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('20500000-0000-4000-8000-000000000001', '20500000-0000-4000-8000-0000000000a0',
   'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '20500000-0000-4000-8000-000000000001' $$;
CREATE FUNCTION pg_temp.finish(p_k text, p_result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
                                   p_result, 660, 30, 3600) FROM r WHERE k = p_k $$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.finish(text, jsonb) TO service_role;

-- Created and running; then its plan grows and the update's deploy keeps failing (502),
-- its backoff at the cap: an hour.
SET LOCAL role service_role;
INSERT INTO r VALUES ('p', to_jsonb(public.lifecycle_provision('20500000-0000-4000-8000-000000000001')));
INSERT INTO r VALUES ('c', public.lifecycle_claim('w1', 660));
INSERT INTO r SELECT 'c1', pg_temp.finish('c', ('{"ok": true, "config_version": '
    || (v #>> '{step,config_version}') || ', "welcome_email": {"ok": true}}')::jsonb) FROM r WHERE k = 'c';
RESET role;
UPDATE public.instances SET memory_limit_mb = memory_limit_mb + 512, attempts = 20
 WHERE subscription_id = '20500000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
INSERT INTO r VALUES ('u', public.lifecycle_claim('w1', 660));
INSERT INTO r VALUES ('u1', pg_temp.finish('u', '{"ok": false, "error": "provisioner POST /apps answered 502"}'));
SELECT ok((SELECT v #>> '{step,action}' = 'update' AND i.next_attempt_at > now() + interval '59 minutes'
             FROM r, pg_temp.inst() i WHERE k = 'u'),
          'the update failed and backs off for an hour');

-- The subscription becomes unpaid: the webhook asks for a stop.
DO $$ BEGIN PERFORM public.instance_request((pg_temp.inst()).id, 'stopped'); END $$;
SELECT ok((SELECT owed_action = 'stop' AND owed_due_at <= now() FROM pg_temp.inst()),
          'the unpaid customer''s stop is due at once, not in an hour');
INSERT INTO r VALUES ('s', public.lifecycle_claim('w2', 660));
SELECT is((SELECT v #>> '{step,action}' FROM r WHERE k = 's'), 'stop', 'and is claimed now');

-- The stop fails too, and backs off (its own first failure's backoff: 208); the
-- customer pays again.
INSERT INTO r VALUES ('s1', pg_temp.finish('s', '{"ok": false, "error": "provisioner POST /apps/x/stop answered 502"}'));
SELECT ok((SELECT next_attempt_at BETWEEN now() + interval '29 seconds' AND now() + interval '31 seconds'
             FROM pg_temp.inst()), 'the stop backs off');
DO $$ BEGIN PERFORM public.instance_request((pg_temp.inst()).id, 'running'); END $$;
SELECT ok((SELECT owed_action IS NOT NULL AND owed_action <> 'stop' AND owed_due_at <= now() FROM pg_temp.inst()),
          'paid again, what runs it again is due at once');
-- A request that changes nothing lifts nothing.
RESET role;
UPDATE public.instances SET next_attempt_at = now() + interval '1 hour'
 WHERE subscription_id = '20500000-0000-4000-8000-000000000001';
DO $$ BEGIN PERFORM public.instance_request((pg_temp.inst()).id, 'running'); END $$;
SELECT ok((SELECT next_attempt_at > now() + interval '59 minutes' FROM pg_temp.inst()),
          'asking again for what it is already asked to be keeps the backoff');

SELECT * FROM finish();
ROLLBACK;
