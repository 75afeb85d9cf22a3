-- 143_kept_storage_env_upgrade.sql: while an upgrade runs, the lifecycle worker built
-- before 139 (the three-argument instance_secrets_issue) cannot store the homeserver
-- keys of an instance whose step carries a destroyed instance's variables: that
-- would end their carrying before any worker carried them. Nothing is stored, the
-- step still carries them, and this release's call carries them. Any other call of
-- that worker is answered as before.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO auth.users (id, email) VALUES ('14300000-0000-4000-8000-000000000001', 'kept143@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('143000a1-0000-4000-8000-000000000000', '14300000-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('143000a2-0000-4000-8000-000000000000', '14300000-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
GRANT ALL ON ids TO service_role;
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
GRANT EXECUTE ON FUNCTION pg_temp.id(text) TO service_role;
CREATE FUNCTION pg_temp.secret(p_id uuid, p_kind text, p_name text, p_tag text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
    VALUES (p_id, p_kind, p_name, 'mrs1:00000000:' || p_tag, 'mrd1:00000000:' || p_tag);
$$;
CREATE FUNCTION pg_temp.step(p_id uuid) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_step_json(i) FROM public.instances i WHERE i.id = p_id $$;

-- A ran with its keys and an operator variable and was destroyed; B is created
-- again on its kept storage, and its first create is claimed.
INSERT INTO ids SELECT 'a', (public.lifecycle_provision('143000a1-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
UPDATE public.instances SET status = 'running' WHERE id = pg_temp.id('a');
SELECT pg_temp.secret(pg_temp.id('a'), 'homeserver', 'signing_key', 'a-key');
SELECT pg_temp.secret(pg_temp.id('a'), 'env', 'OPENAI_API_KEY', 'a-openai');
SELECT public.lifecycle_deprovision(pg_temp.id('a'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('a');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = pg_temp.id('a');
INSERT INTO ids SELECT 'b', (public.lifecycle_provision('143000a1-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
UPDATE public.instances SET claim_action = 'create', claimed_by = 'tok' WHERE id = pg_temp.id('b');
-- C: a new instance with no predecessor, its first create claimed.
INSERT INTO ids SELECT 'c', (public.lifecycle_provision('143000a2-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
UPDATE public.instances SET claim_action = 'create', claimed_by = 'tok' WHERE id = pg_temp.id('c');

SELECT is(pg_temp.step(pg_temp.id('b')) #> '{predecessor,env}', '{"OPENAI_API_KEY": "mrs1:00000000:a-openai"}'::jsonb,
          'B''s first create carries A''s variable');

-- The worker built before 139 stores B's keys (A's, sealed again for B).
SELECT is(pg_temp.run('service_role', $$SELECT public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key", "digest": "mrd1:00000000:b-key"}]')$$),
          'err:55000', 'the worker before 139 cannot store the keys of an instance that carries variables');
SELECT is((SELECT count(*) FROM public.instance_secrets WHERE instance_id = pg_temp.id('b')), 0::bigint,
          'nothing is stored');
SELECT is(pg_temp.step(pg_temp.id('b')) #> '{predecessor,env}', '{"OPENAI_API_KEY": "mrs1:00000000:a-openai"}'::jsonb,
          'the step still carries A''s variable');
SELECT is(pg_temp.run('service_role', $$SELECT public.instance_secrets_issue(pg_temp.id('b'),
            '{"key_id": "0000000000000143", "hash": "abababababababababababababababababababababababababababababababab", "ciphertext": "mrs1:00000000:b-tok", "digest": "mrd1:00000000:b-tok"}', NULL)$$),
          'ok:1', 'its token alone is stored as before');

-- A worker of this release carries it.
SET LOCAL role service_role;
SELECT is(public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key", "digest": "mrd1:00000000:b-key"}]',
            '[{"name": "OPENAI_API_KEY", "ciphertext": "mrs1:00000000:b-openai", "digest": "mrd1:00000000:b-openai"}]')
          -> 'env', '{"OPENAI_API_KEY": "mrs1:00000000:b-openai"}'::jsonb,
          'this release''s worker carries it with the keys');
-- The worker before 139 still stores a new instance's keys, and sees B's.
SELECT is(public.instance_secrets_issue(pg_temp.id('c'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:c-key", "digest": "mrd1:00000000:c-key"}]'),
          '{"token": null, "homeserver": {"signing_key": "mrs1:00000000:c-key"}}'::jsonb,
          'an instance with no predecessor gets its keys from the worker before 139');
SELECT is(public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key2", "digest": "mrd1:00000000:b-key2"}]'),
          '{"token": null, "homeserver": {"signing_key": "mrs1:00000000:b-key"}}'::jsonb,
          'once the variables are carried, it gets the keys in force');
RESET role;

SELECT * FROM finish();
ROLLBACK;
