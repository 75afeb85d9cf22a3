-- 139_kept_storage_env.sql: the step of an instance that took a destroyed one's kept
-- storage over carries that instance's operator variables with its homeserver keys,
-- and they are stored with the keys, never over the new instance's own and never
-- after its keys are (139_kept_storage_env.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(10);

INSERT INTO auth.users (id, email) VALUES ('13900000-0000-4000-8000-000000000001', 'kept139@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('139000a1-0000-4000-8000-000000000000', '13900000-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
GRANT ALL ON ids TO service_role;
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
GRANT EXECUTE ON FUNCTION pg_temp.id(text) TO service_role;
CREATE FUNCTION pg_temp.destroyed(p_id uuid) RETURNS void LANGUAGE sql AS $$
    SELECT public.lifecycle_deprovision(p_id, NULL, 'destroy', false);
    UPDATE public.instances SET status = 'deprovisioning' WHERE id = p_id;
    UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
           storage_destroy_after = now() + interval '30 days' WHERE id = p_id;
$$;
CREATE FUNCTION pg_temp.secret(p_id uuid, p_kind text, p_name text, p_tag text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
    VALUES (p_id, p_kind, p_name, 'mrs1:00000000:' || p_tag, 'mrd1:00000000:' || p_tag);
$$;
CREATE FUNCTION pg_temp.step(p_id uuid) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_step_json(i) FROM public.instances i WHERE i.id = p_id $$;
CREATE FUNCTION pg_temp.env(p_id uuid) RETURNS jsonb LANGUAGE sql AS $$
    SELECT coalesce(jsonb_object_agg(name, ciphertext), '{}') FROM public.instance_secrets
     WHERE instance_id = p_id AND kind = 'env' $$;

-- A ran with its keys and two operator variables, and was destroyed; B is created
-- again on its kept storage.
INSERT INTO ids SELECT 'a', (public.lifecycle_provision('139000a1-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
UPDATE public.instances SET status = 'running' WHERE id = pg_temp.id('a');
SELECT pg_temp.secret(pg_temp.id('a'), 'homeserver', n, 'a-' || n)
  FROM unnest(ARRAY['signing_key', 'registration_shared_secret', 'macaroon_secret_key', 'form_secret']) n;
SELECT pg_temp.secret(pg_temp.id('a'), 'env', 'OPENAI_API_KEY', 'a-openai');
SELECT pg_temp.secret(pg_temp.id('a'), 'env', 'ANTHROPIC_API_KEY', 'a-anthropic');
SELECT pg_temp.destroyed(pg_temp.id('a'));
INSERT INTO ids SELECT 'b', (public.lifecycle_provision('139000a1-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
UPDATE public.instances SET claim_action = 'create', claimed_by = 'tok' WHERE id = pg_temp.id('b');

SELECT is(pg_temp.step(pg_temp.id('b')) #> '{predecessor,env}',
          '{"OPENAI_API_KEY": "mrs1:00000000:a-openai", "ANTHROPIC_API_KEY": "mrs1:00000000:a-anthropic"}'::jsonb,
          'B''s first create carries the variables of the instance whose data it mounts');

SELECT is(pg_temp.cell('13900000-0000-4000-8000-000000000001',
                       $$SELECT public.instance_secrets_issue(pg_temp.id('b'), NULL, NULL, '[]')$$),
          'err:42501', 'a tenant cannot store an instance''s variables');
SELECT is(pg_temp.cell('anon', $$SELECT public.instance_secrets_issue(pg_temp.id('b'), NULL, NULL, '[]')$$),
          'err:42501', 'nor anon');

-- The operator set ANTHROPIC_API_KEY on B itself before its create ran.
SELECT pg_temp.secret(pg_temp.id('b'), 'env', 'ANTHROPIC_API_KEY', 'b-own');
SET LOCAL role service_role;
SELECT is(public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key", "digest": "mrd1:00000000:b-key"}]',
            '[{"name": "OPENAI_API_KEY", "ciphertext": "mrs1:00000000:b-openai", "digest": "mrd1:00000000:b-openai"},
              {"name": "ANTHROPIC_API_KEY", "ciphertext": "mrs1:00000000:b-anthropic", "digest": "mrd1:00000000:b-anthropic"}]'),
          '{"token": null, "homeserver": {"signing_key": "mrs1:00000000:b-key"},
            "env": {"OPENAI_API_KEY": "mrs1:00000000:b-openai", "ANTHROPIC_API_KEY": "mrs1:00000000:b-own"}}'::jsonb,
          'stored with the keys; the answer is the variables in force');
RESET role;
SELECT is(pg_temp.env(pg_temp.id('b')),
          '{"OPENAI_API_KEY": "mrs1:00000000:b-openai", "ANTHROPIC_API_KEY": "mrs1:00000000:b-own"}'::jsonb,
          'the variable the operator set on B is B''s, not the destroyed instance''s');
SELECT is((SELECT digest FROM public.instance_secrets WHERE instance_id = pg_temp.id('b')
            AND kind = 'env' AND name = 'OPENAI_API_KEY'), 'mrd1:00000000:b-openai',
          'with the digest sealed for B');
SELECT is(pg_temp.step(pg_temp.id('b')) -> 'predecessor', 'null'::jsonb,
          'once B has keys of its own, its steps carry nobody''s variables');

-- The operator removes OPENAI_API_KEY from B; a worker that lost its lease then
-- stores what it had prepared.
DELETE FROM public.instance_secrets WHERE instance_id = pg_temp.id('b') AND kind = 'env'
   AND name = 'OPENAI_API_KEY';
SET LOCAL role service_role;
SELECT is(public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key2", "digest": "mrd1:00000000:b-key2"}]',
            '[{"name": "OPENAI_API_KEY", "ciphertext": "mrs1:00000000:b-openai2", "digest": "mrd1:00000000:b-openai2"}]'),
          '{"token": null, "homeserver": {"signing_key": "mrs1:00000000:b-key"},
            "env": {"ANTHROPIC_API_KEY": "mrs1:00000000:b-own"}}'::jsonb,
          'a second call stores nothing: the keys were stored, and so were the variables');
-- Without variables, the answer is the 3-argument function's.
SELECT is(public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key3", "digest": "mrd1:00000000:b-key3"}]',
            NULL),
          public.instance_secrets_issue(pg_temp.id('b'), NULL,
            '[{"name": "signing_key", "ciphertext": "mrs1:00000000:b-key3", "digest": "mrd1:00000000:b-key3"}]'),
          'with no variables to carry, the same answer as the 3-argument function');
RESET role;
SELECT is(pg_temp.env(pg_temp.id('b')), '{"ANTHROPIC_API_KEY": "mrs1:00000000:b-own"}'::jsonb,
          'the removed variable stays removed');

SELECT * FROM finish();
ROLLBACK;
