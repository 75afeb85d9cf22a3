-- 60_instance.sql: the instance of 060_instance.sql: sealed secrets no tenant can
-- read, change detection that owes an update only for a changed value, the
-- homeserver's keys generated once, the environment contract, the homeserver's
-- share of a plan, retention and purge, and teardown of deleted instances.
BEGIN;
SELECT plan(43);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('60000000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('60000000-0000-4000-8000-000000000002', '5eed5eed-0000-4000-8000-000000000001', 'price_free', 'free', 'active'),
  ('60000000-0000-4000-8000-000000000003', '5eed5eed-0000-4000-8000-000000000001', 'price_free', 'free', 'active');

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
-- The instance under test, where every role can read it (a setting, not a table:
-- a tenant's "permission denied" must come from what is tested, not from r).
CREATE FUNCTION pg_temp.iid() RETURNS uuid LANGUAGE sql AS $$ SELECT current_setting('t.iid')::uuid $$;
CREATE FUNCTION pg_temp.cv() RETURNS bigint LANGUAGE sql AS $$
    SELECT config_version FROM public.instances WHERE id = pg_temp.iid()
$$;
SET LOCAL role service_role;
INSERT INTO r VALUES ('p1', public.lifecycle_provision('60000000-0000-4000-8000-000000000001'));
SELECT set_config('t.iid', v #>> '{instance,id}', true) FROM r WHERE k = 'p1';

-- 1. The homeserver's share of the plan, and the storage size --------------------------
SELECT results_eq($$SELECT memory_limit_mb, homeserver_memory_mb, homeserver_cpu::float8, storage_gb
                      FROM public.instances WHERE id = pg_temp.iid()$$,
                  $$VALUES (1024, 512, 0.5::float8, 5)$$,
                  'starter: MindRoom 1024 MB, its homeserver 512 MB / 0.5 CPU, 5 GB of storage');

-- 2. Sealed secrets: service_role only --------------------------------------------------
SELECT is(public.instance_secret_put(pg_temp.iid(), 'env', 'OPENAI_API_KEY', 'mrs1:00000000:AAAA',
                                     'mrd1:00000000:aa', true), 2::bigint,
          'a new secret owes an update (config_version 1 -> 2)');
SELECT is(public.instance_secret_put(pg_temp.iid(), 'env', 'OPENAI_API_KEY', 'mrs1:11111111:BBBB',
                                     'mrd1:11111111:bb', false), 2::bigint,
          're-sealed, same value: nothing owed');
SELECT is((SELECT ciphertext FROM public.instance_secrets WHERE instance_id = pg_temp.iid()),
          'mrs1:11111111:BBBB', 'the new ciphertext is stored');
SELECT throws_ok($$SELECT public.instance_secret_put(pg_temp.iid(), 'env', 'X', 'plaintext', 'mrd1:0:a', true)$$,
                 '23514', NULL, 'only ciphertext is accepted');
SELECT throws_ok($$SELECT public.instance_secret_put(pg_temp.iid(), 'env', 'X', 'mrs1:0:a', 'sha256', true)$$,
                 '23514', NULL, 'only keyed digests are accepted');
SELECT throws_ok($$SELECT public.instance_secret_put('60000000-0000-4000-8000-0000000000ff', 'env', 'X',
                                                     'mrs1:0:a', 'mrd1:0:a', true)$$,
                 '23503', NULL, 'an unknown instance is refused');
SELECT ok(public.instance_secret_delete(pg_temp.iid(), 'env', 'OPENAI_API_KEY') AND pg_temp.cv() = 3,
          'deleting a secret owes an update');
SELECT ok(NOT public.instance_secret_delete(pg_temp.iid(), 'env', 'OPENAI_API_KEY') AND pg_temp.cv() = 3,
          'deleting it again changes nothing');
SELECT lives_ok($$SELECT public.instance_secret_put(pg_temp.iid(), 'env', 'OPENAI_API_KEY',
                    'mrs1:11111111:CCCC', 'mrd1:11111111:cc', true)$$, 'set again');

RESET role;
SET LOCAL role authenticated;
SET LOCAL request.jwt.claims = '{"sub": "5eed5eed-0000-4000-8000-000000000001", "role": "authenticated"}';
SELECT throws_ok($$SELECT count(*) FROM public.instance_secrets$$, '42501', NULL,
                 'the owner cannot read its instance''s secrets, not even ciphertext');
SELECT throws_ok($$SELECT count(*) FROM public.instance_teardowns$$, '42501', NULL,
                 'nor the teardowns');
SELECT throws_ok($$SELECT public.instance_secret_put(pg_temp.iid(), 'env', 'X', 'mrs1:0:a', 'mrd1:0:a', true)$$,
                 '42501', NULL, 'nor write them');
SELECT throws_ok($$SELECT public.lifecycle_step_json(NULL::public.instances)$$, '42501', NULL,
                 'nor see a worker''s step');
RESET role;
SET LOCAL role anon;
SELECT throws_ok($$SELECT count(*) FROM public.instance_secrets$$, '42501', NULL, 'anon: no access');
RESET role;
SET LOCAL role service_role;

-- 3. The homeserver's keys: the first set stays ------------------------------------------
SELECT is(public.instance_homeserver_keys(pg_temp.iid(),
            '[{"name": "signing_key", "ciphertext": "mrs1:1:first", "digest": "mrd1:1:a"}]'),
          '{"signing_key": "mrs1:1:first"}'::jsonb, 'generated keys are stored');
SELECT is(public.instance_homeserver_keys(pg_temp.iid(),
            '[{"name": "signing_key", "ciphertext": "mrs1:1:second", "digest": "mrd1:1:b"}]'),
          '{"signing_key": "mrs1:1:first"}'::jsonb, 'a second set (a racing worker) is dropped');

-- 4. Legacy plaintext environment: handed over once, then gone ---------------------------
RESET role;
UPDATE public.instances SET environment_vars = '{"LEGACY": "v"}' WHERE id = pg_temp.iid();
SET LOCAL role service_role;
SELECT is(public.instance_plain_env(pg_temp.iid()), '{"LEGACY": "v"}'::jsonb, 'read');
-- What was sealed is named by the SHA-256 of the text read, never sent back itself.
SELECT is(public.instance_plain_env_sealed(pg_temp.iid(),
              encode(sha256(convert_to(public.instance_plain_env(pg_temp.iid())::text || ' ', 'UTF8')), 'hex')),
          false, 'not emptied while it holds other than what was sealed');
SELECT is(public.instance_plain_env_sealed(pg_temp.iid(), '{"LEGACY": "v"}'::text), false,
          'the values themselves are not taken for their digest');
SELECT is(public.instance_plain_env(pg_temp.iid()), '{"LEGACY": "v"}'::jsonb, 'still there');
SELECT is(public.instance_plain_env_sealed(pg_temp.iid(),
              encode(sha256(convert_to(public.instance_plain_env(pg_temp.iid())::text, 'UTF8')), 'hex')),
          true, 'emptied once sealed');
SELECT is(public.instance_plain_env(pg_temp.iid()), '{}'::jsonb, 'and gone');

-- 5. The step a worker gets: ciphertext, never plaintext; the environment contract ------
-- (lifecycle_step_json is lifecycle_claim's and lifecycle_finish's: run it as its owner.)
RESET role;
UPDATE public.instances SET claim_action = 'update', claimed_by = 'tok' WHERE id = pg_temp.iid();
SELECT results_eq($$SELECT s #> '{payload,env}', s -> 'secrets' @> '[{"kind": "env", "name": "OPENAI_API_KEY",
                                                                     "ciphertext": "mrs1:11111111:CCCC"}]',
                           s #> '{payload,homeserver,memory_mb}', s ? 'plain_env'
                      FROM (SELECT public.lifecycle_step_json(i) s FROM public.instances i
                             WHERE id = pg_temp.iid()) x$$,
                  $$SELECT jsonb_build_object('MINDROOM_INSTANCE_ID', pg_temp.iid()::text,
                           'MINDROOM_SUBSCRIPTION_ID', '60000000-0000-4000-8000-000000000001',
                           'MINDROOM_SUBDOMAIN', (SELECT subdomain FROM public.instances WHERE id = pg_temp.iid()),
                           'MINDROOM_TIER', 'starter', 'MAX_AGENTS', '3', 'MAX_MESSAGES_PER_DAY', '1000',
                           'MAX_STORAGE_GB', '5'), true, '512'::jsonb, true$$,
                  'the step: the environment contract, the secrets as ciphertext, the homeserver''s share');
UPDATE public.instances SET claim_action = NULL, claimed_by = NULL WHERE id = pg_temp.iid();

-- 6. A plan change reaches both components and MindRoom's limits ------------------------
SELECT lives_ok($$UPDATE public.subscriptions SET tier = 'professional', stripe_price_id = 'price_professional'
                   WHERE id = '60000000-0000-4000-8000-000000000001'$$, 'upgrade');
SELECT results_eq($$SELECT memory_limit_mb, homeserver_memory_mb, storage_gb, owed_action::text
                      FROM public.instances WHERE id = pg_temp.iid()$$,
                  $$VALUES (2048, 1024, 20, 'create')$$,
                  'professional: new shares, storage; the instance owes its (first) deploy');
SELECT is(pg_temp.cv(), 6::bigint, 'the plan change bumped the configuration (5 -> 6)');
SET LOCAL role service_role;

-- 7. Destroy keeps the storage for the retention period; purge ends it now -------------
SELECT throws_ok($$SELECT public.lifecycle_deprovision(pg_temp.iid(), NULL, 'stop', true)$$, '22023', NULL,
                 'purge goes with destroy only');
SELECT is(public.lifecycle_deprovision(pg_temp.iid(), NULL, 'destroy', false) #>> '{instance,owed_action}',
          'destroy', 'destroy owed');
RESET role;
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.iid();
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = pg_temp.iid();
SELECT results_eq($$SELECT owed_action::text, owed_due_at = now() + interval '30 days'
                      FROM public.instances WHERE id = pg_temp.iid()$$,
                  $$VALUES ('destroy_storage', true)$$, 'then the storage, after the retention period');
SET LOCAL role service_role;
SELECT is(public.lifecycle_deprovision(pg_temp.iid(), NULL, 'destroy', true) #>> '{instance,purge_requested}',
          'true', 'purge of a destroyed instance');
SELECT results_eq($$SELECT owed_action::text, owed_due_at <= now() FROM public.instances WHERE id = pg_temp.iid()$$,
                  $$VALUES ('destroy_storage', true)$$, 'its storage is due now');
SELECT is((SELECT count(*)::int FROM public.audit_logs WHERE action = 'instance.purge_requested'
            AND details ->> 'instance_id' = pg_temp.iid()::text), 1, 'purge audited once');

-- 8. Deleting rows never orphans apps or data: a teardown is recorded --------------------
INSERT INTO r VALUES ('p2', public.lifecycle_provision('60000000-0000-4000-8000-000000000002'));
RESET role;
DELETE FROM public.subscriptions WHERE id = '60000000-0000-4000-8000-000000000002';
SELECT results_eq($$SELECT t.dokku_app_name, t.subscription_id, t.done_at IS NULL FROM public.instance_teardowns t
                     WHERE t.instance_id = (SELECT (v #>> '{instance,id}')::uuid FROM r WHERE k = 'p2')$$,
                  $$SELECT (SELECT v #>> '{instance,dokku_app_name}' FROM r WHERE k = 'p2'),
                           '60000000-0000-4000-8000-000000000002'::uuid, true$$,
                  'a deleted instance with apps leaves a teardown behind');
SELECT is((SELECT count(*)::int FROM public.audit_logs WHERE action = 'instance.teardown_requested'
            AND details ->> 'instance_id' = (SELECT v #>> '{instance,id}' FROM r WHERE k = 'p2')), 1,
          'and an audit row');
INSERT INTO r VALUES ('p3', public.lifecycle_provision('60000000-0000-4000-8000-000000000003'));
UPDATE public.instances SET status = 'deprovisioning'
 WHERE subscription_id = '60000000-0000-4000-8000-000000000003';
UPDATE public.instances SET status = 'deprovisioned', storage_destroyed_at = now()
 WHERE subscription_id = '60000000-0000-4000-8000-000000000003';
DELETE FROM public.subscriptions WHERE id = '60000000-0000-4000-8000-000000000003';
SELECT is((SELECT count(*)::int FROM public.instance_teardowns
            WHERE instance_id = (SELECT (v #>> '{instance,id}')::uuid FROM r WHERE k = 'p3')), 0,
          'nothing left to tear down: nothing recorded');
SET LOCAL role service_role;
SELECT results_eq($$SELECT dokku_app_name FROM public.instance_teardowns_due(10)$$,
                  $$SELECT v #>> '{instance,dokku_app_name}' FROM r WHERE k = 'p2'$$, 'due now');
-- (Each outcome in its own statement: a statement does not see its own function's writes.)
SELECT ok(public.instance_teardown_finish((SELECT (v #>> '{instance,id}')::uuid FROM r WHERE k = 'p2'),
                                          false, 'provisioner down', 30, 3600), 'a failure is recorded');
SELECT is_empty($$SELECT * FROM public.instance_teardowns_due(10)$$, 'and waits for its backoff');
SELECT ok(public.instance_teardown_finish((SELECT (v #>> '{instance,id}')::uuid FROM r WHERE k = 'p2'),
                                          true, NULL, 30, 3600), 'a success is recorded');
SELECT results_eq($$SELECT done_at IS NOT NULL, attempts FROM public.instance_teardowns
                     WHERE instance_id = (SELECT (v #>> '{instance,id}')::uuid FROM r WHERE k = 'p2')$$,
                  $$VALUES (true, 2)$$, 'done after two attempts');
SELECT is((SELECT count(*)::int FROM public.audit_logs WHERE action = 'instance.storage_destroyed'
            AND details ->> 'instance_id' = (SELECT v #>> '{instance,id}' FROM r WHERE k = 'p2')), 1,
          'and audited');

-- 9. The call of the worker built before 199 (the values sent back, not their digest)
-- works while an upgrade runs.
RESET role;
UPDATE public.instances SET environment_vars = '{"LEGACY": "v"}' WHERE id = pg_temp.iid();
SET LOCAL role service_role;
SELECT is(public.instance_plain_env_sealed(pg_temp.iid(), '{"LEGACY": "v"}'::jsonb), true,
          'the earlier worker''s call still empties it');

SELECT * FROM finish();
ROLLBACK;
