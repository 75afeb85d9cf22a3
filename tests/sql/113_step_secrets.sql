-- 113_step_secrets.sql: a step's new secrets (a control-plane token, the homeserver's
-- keys) stored in one call (113_step_secrets.sql); the first of two racing workers
-- wins each; service_role only.
BEGIN;
SELECT plan(8);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71400000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
SET LOCAL role service_role;
INSERT INTO r VALUES ('p', public.lifecycle_provision('71400000-0000-4000-8000-000000000001'));
SELECT set_config('t.iid', v #>> '{instance,id}', true) FROM r WHERE k = 'p';
RESET role;
CREATE FUNCTION pg_temp.iid() RETURNS uuid LANGUAGE sql AS $$ SELECT current_setting('t.iid')::uuid $$;
GRANT EXECUTE ON FUNCTION pg_temp.iid() TO service_role;

SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001',
                       $$SELECT public.instance_secrets_issue(pg_temp.iid(), NULL, NULL)$$),
          'err:42501', 'a tenant cannot store an instance''s secrets');
SELECT is(pg_temp.cell('anon', $$SELECT public.instance_secrets_issue(pg_temp.iid(), NULL, NULL)$$),
          'err:42501', 'nor anon');

SET LOCAL role service_role;
SELECT is(public.instance_secrets_issue(pg_temp.iid(),
            '{"key_id": "00000000000000b1", "hash": "1111111111111111111111111111111111111111111111111111111111111111",
              "ciphertext": "mrs1:00000000:tok1", "digest": "mrd1:00000000:t1"}',
            '[{"name": "signing_key", "ciphertext": "mrs1:1:key1", "digest": "mrd1:1:k1"}]'),
          '{"token": "mrs1:00000000:tok1", "homeserver": {"signing_key": "mrs1:1:key1"}}'::jsonb,
          'token and keys stored in one call; the answer is what is in force');
SELECT results_eq($$SELECT key_id FROM public.instance_tokens WHERE instance_id = pg_temp.iid()$$,
                  $$VALUES ('00000000000000b1')$$, 'the credential is the token''s');
SELECT is(public.instance_secrets_issue(pg_temp.iid(),
            '{"key_id": "00000000000000b2", "hash": "2222222222222222222222222222222222222222222222222222222222222222",
              "ciphertext": "mrs1:00000000:tok2", "digest": "mrd1:00000000:t2"}',
            '[{"name": "signing_key", "ciphertext": "mrs1:1:key2", "digest": "mrd1:1:k2"}]'),
          '{"token": "mrs1:00000000:tok1", "homeserver": {"signing_key": "mrs1:1:key1"}}'::jsonb,
          'a racing worker''s set: the first stays, for both');
SELECT is(public.instance_secrets_issue(pg_temp.iid(), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:1:key3", "digest": "mrd1:1:k3"}]'),
          '{"token": null, "homeserver": {"signing_key": "mrs1:1:key1"}}'::jsonb,
          'keys alone (the token is live)');
SELECT is((SELECT count(*)::int FROM public.instance_secrets WHERE instance_id = pg_temp.iid()), 2,
          'one sealed token, one key: nothing of the losers stored');

-- An instance that does not run gets no credential, and then no keys either.
RESET role;
UPDATE public.instances SET desired_status = 'stopped', status = 'stopped' WHERE id = pg_temp.iid();
DELETE FROM public.instance_secrets WHERE instance_id = pg_temp.iid();
SET LOCAL role service_role;
SELECT throws_ok($$SELECT public.instance_secrets_issue(pg_temp.iid(),
                   '{"key_id": "00000000000000b3", "hash": "3333333333333333333333333333333333333333333333333333333333333333",
                     "ciphertext": "mrs1:00000000:tok3", "digest": "mrd1:00000000:t3"}',
                   '[{"name": "signing_key", "ciphertext": "mrs1:1:key4", "digest": "mrd1:1:k4"}]')$$,
                 '55000', NULL, 'a stopped instance: refused as a whole');

SELECT * FROM finish();
ROLLBACK;
