-- 119_lease_per_step.sql: a retried finish is never recorded as the chained step's
-- outcome (it gets the first call's answer again); a purge asked during a destroy is due when it is done; a rejected step
-- holds only itself (119_lease_per_step.sql).
BEGIN;
SELECT plan(12);

-- Each case on an account of its own: a new subscription of an account whose only
-- instance is being destroyed waits for that destroy (202_resubscribed_while_removed).
INSERT INTO auth.users (id, email) VALUES
  ('99200000-0000-4000-8000-0000000000a0', 'lease119a@example.com'),
  ('99300000-0000-4000-8000-0000000000a0', 'lease119b@example.com'),
  ('99400000-0000-4000-8000-0000000000a0', 'lease119c@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('99100000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('99200000-0000-4000-8000-000000000002', '99200000-0000-4000-8000-0000000000a0', 'price_starter', 'starter', 'active'),
  ('99300000-0000-4000-8000-000000000003', '99300000-0000-4000-8000-0000000000a0', 'price_starter', 'starter', 'active'),
  ('99400000-0000-4000-8000-000000000004', '99400000-0000-4000-8000-0000000000a0', 'price_starter', 'starter', 'active');

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
CREATE FUNCTION pg_temp.inst(p_sub text) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = p_sub::uuid
$$;
CREATE FUNCTION pg_temp.finish(p_k text, p_result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
                                   p_result, 60, 30, 3600) FROM r WHERE k = p_k
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(text), pg_temp.finish(text, jsonb) TO service_role;
SET LOCAL role service_role;

-- A. lifecycle_finish retried with the same token (the worker retries it when the
--    connection broke after the call was sent: the outcome unknown). The first call
--    committed and chained the next step; the retry must not be recorded as that
--    step's outcome (the apps never deleted, the storage owed at once).
INSERT INTO r VALUES ('x1', to_jsonb(public.lifecycle_provision('99100000-0000-4000-8000-000000000001')));
INSERT INTO r VALUES ('a', public.lifecycle_claim('w1', 60));
SELECT is((SELECT v #>> '{step,action}' FROM r WHERE k = 'a'), 'create', 'A: create claimed');
-- The customer cancels while the create is in flight.
INSERT INTO r VALUES ('x2', to_jsonb(public.lifecycle_deprovision((SELECT id FROM pg_temp.inst('99100000-0000-4000-8000-000000000001')),
                                    NULL, 'destroy')));
INSERT INTO r VALUES ('a1', pg_temp.finish('a', '{"ok": true, "config_version": 1}'));
-- The answer to a1 is lost with the connection; the worker retries the same call.
INSERT INTO r VALUES ('a2', pg_temp.finish('a', '{"ok": true, "config_version": 1}'));
SELECT is((SELECT concat_ws(' ', v ->> 'outcome', v #>> '{step,action}', v #>> '{step,token}') FROM r WHERE k = 'a2'),
          (SELECT concat_ws(' ', 'claimed', 'destroy', v #>> '{step,token}') FROM r WHERE k = 'a1'),
          'A: a retried finish of the create is given the first answer again (the chained destroy), not applied to it');
SELECT isnt((SELECT status::text FROM pg_temp.inst('99100000-0000-4000-8000-000000000001')), 'deprovisioned',
            'A: the instance is not recorded destroyed without a DELETE /apps');

-- A'. The same with the welcome email chained after a create: marked sent, never sent.
INSERT INTO r VALUES ('x3', to_jsonb(public.lifecycle_provision('99200000-0000-4000-8000-000000000002')));
INSERT INTO r VALUES ('e', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('e1', pg_temp.finish('e', '{"ok": true, "config_version": 1}'));
SELECT is((SELECT v #>> '{step,action}' FROM r WHERE k = 'e1'), 'email', 'A'': email chained');
INSERT INTO r VALUES ('e2', pg_temp.finish('e', '{"ok": true, "config_version": 1}'));
SELECT ok((SELECT welcome_email_sent_at IS NULL FROM pg_temp.inst('99200000-0000-4000-8000-000000000002')),
          'A'': the create''s result retried is not recorded as the welcome email sent');
SELECT isnt((SELECT v #>> '{step,token}' FROM r WHERE k = 'e1'), (SELECT v #>> '{step,token}' FROM r WHERE k = 'e'),
            'A'': the chained step has a lease token of its own');
SELECT is((SELECT v #>> '{step,token}' FROM r WHERE k = 'e2'), (SELECT v #>> '{step,token}' FROM r WHERE k = 'e1'),
          'A'': the retry is given the chained step again, under its own token');
-- Any other stale token is lost.
SELECT is(public.lifecycle_finish((SELECT (v #>> '{step,instance_id}')::uuid FROM r WHERE k = 'e'),
                                  'not-a-token/w1', '{"ok": true}', 60, 30, 3600) ->> 'outcome',
          'lost', 'A'': a token that never held the lease is answered lost');
-- The chained email, done under its own token, is recorded.
INSERT INTO r VALUES ('e3', pg_temp.finish('e1', '{"ok": true}'));
SELECT ok((SELECT v ->> 'outcome' = 'done' AND welcome_email_sent_at IS NOT NULL
             FROM r, pg_temp.inst('99200000-0000-4000-8000-000000000002') WHERE k = 'e3'),
          'A'': the chained step finishes under its own token');

-- B. Purge asked while the (non-purging) destroy is in flight: the step was built
--    with "purge": false; the purge must not wait the retention period.
INSERT INTO r VALUES ('x4', to_jsonb(public.lifecycle_provision('99300000-0000-4000-8000-000000000003')));
INSERT INTO r VALUES ('b', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('b1', pg_temp.finish('b', '{"ok": true, "config_version": 1,
                                              "welcome_email": {"ok": true}}'));
INSERT INTO r VALUES ('x5', to_jsonb(public.lifecycle_deprovision((SELECT id FROM pg_temp.inst('99300000-0000-4000-8000-000000000003')),
                                    NULL, 'destroy')));
INSERT INTO r VALUES ('b2', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('x6', to_jsonb(public.lifecycle_deprovision((SELECT id FROM pg_temp.inst('99300000-0000-4000-8000-000000000003')),
                                    NULL, 'destroy', true)));
INSERT INTO r VALUES ('b3', pg_temp.finish('b2', '{"ok": true, "purged": false, "retention_s": 2592000}'));
SELECT ok((SELECT v ->> 'outcome' = 'claimed' AND v #>> '{step,action}' = 'destroy_storage'
                  AND (v #>> '{step,purge}')::boolean FROM r WHERE k = 'b3'),
          'B: a purge asked during the destroy is carried out at once, not after 30 days');

-- C. A rejected step holds the instance; a later cancellation (the webhook calls
--    instance_request) owes a destroy, which must become due: the cancelled
--    customer's apps must not run on.
INSERT INTO r VALUES ('x7', to_jsonb(public.lifecycle_provision('99400000-0000-4000-8000-000000000004')));
INSERT INTO r VALUES ('c', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('c1', pg_temp.finish('c', '{"ok": true, "config_version": 1,
                                              "welcome_email": {"ok": true}}'));
-- An operator sets a variable the provisioner refuses: an update owed, rejected (4xx).
INSERT INTO r VALUES ('x8', to_jsonb(public.instance_secret_put((SELECT id FROM pg_temp.inst('99400000-0000-4000-8000-000000000004')),
                                  'env', 'BAD', 'mrs1:0:x', 'mrd1:0:x', true)));
INSERT INTO r VALUES ('c2', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('c3', pg_temp.finish('c2', '{"ok": false, "rejected": true, "error": "answered 400"}'));
RESET role;
-- The rejected update stays held through writes that owe nothing new.
UPDATE public.instances SET health_status = 'healthy'
 WHERE subscription_id = '99400000-0000-4000-8000-000000000004';
SELECT ok((SELECT owed_action = 'update' AND owed_due_at IS NULL
             FROM pg_temp.inst('99400000-0000-4000-8000-000000000004')),
          'C: the rejected update itself stays held');
INSERT INTO r VALUES ('x9', to_jsonb(public.instance_request((SELECT id FROM pg_temp.inst('99400000-0000-4000-8000-000000000004')),
                               'deprovisioned')));
SELECT ok((SELECT owed_action = 'destroy' AND owed_due_at IS NOT NULL
             FROM pg_temp.inst('99400000-0000-4000-8000-000000000004')),
          'C: a cancellation after a rejected update owes a destroy that becomes due');

SELECT * FROM finish();
ROLLBACK;
