-- 136_plain_env_never_replaces.sql: a legacy plaintext value never replaces a sealed
-- one, neither through this worker's instance_plain_env_put nor through
-- instance_take_plain_env, which the worker built before 123 calls (it stores what
-- it is handed with instance_secret_put, an upsert).
BEGIN;
\ir _helpers.inc
SELECT plan(9);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('13600000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id() RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = 'i' $$;
CREATE FUNCTION pg_temp.cv() RETURNS bigint LANGUAGE sql AS $$
    SELECT config_version FROM public.instances WHERE id = pg_temp.id()
$$;
CREATE FUNCTION pg_temp.sealed(p_name text) RETURNS text LANGUAGE sql AS $$
    SELECT ciphertext FROM public.instance_secrets
     WHERE instance_id = pg_temp.id() AND kind = 'env' AND name = p_name
$$;
INSERT INTO ids SELECT 'i', (public.lifecycle_provision('13600000-0000-4000-8000-0000000000a1')
                             #>> '{instance,id}')::uuid;
GRANT SELECT ON ids TO service_role;
-- An operator's value, set after the upgrade (mindroomctl env set).
SELECT public.instance_secret_put(pg_temp.id(), 'env', 'OPENAI_API_KEY', 'mrs1:00000000:NEW',
                                  'mrd1:00000000:new', true);
CREATE TEMP TABLE v AS SELECT pg_temp.cv() AS cv;

-- 1. This worker: insert only, and the answer is the value in force -------------------
SELECT is(pg_temp.cell('service_role', $$SELECT public.instance_plain_env_put(
              (SELECT id FROM ids WHERE k = 'i'), 'OPENAI_API_KEY', 'mrs1:00000000:OLD',
              'mrd1:00000000:old')$$), 'ok:1', 'service_role may store a legacy value');
SELECT is(public.instance_plain_env_put(pg_temp.id(), 'OPENAI_API_KEY', 'mrs1:00000000:OLD',
                                        'mrd1:00000000:old'),
          'mrs1:00000000:NEW', 'a name with a sealed value: the sealed one is the answer');
SELECT is(pg_temp.sealed('OPENAI_API_KEY'), 'mrs1:00000000:NEW', 'and it is still the one stored');
SELECT is(public.instance_plain_env_put(pg_temp.id(), 'OTHER', 'mrs1:00000000:OTH',
                                        'mrd1:00000000:oth'),
          'mrs1:00000000:OTH', 'a name without one: the legacy value is stored and is the answer');
SELECT is(pg_temp.cv(), (SELECT cv FROM v), 'neither owes an update');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', $$SELECT public.instance_plain_env_put(
              '13600000-0000-4000-8000-0000000000ff', 'X', 'mrs1:0:a', 'mrd1:0:a')$$),
          'err:42501', 'nobody else may call it');

-- 2. The worker built before 123: handed only the names with no sealed value ---------
UPDATE public.instances SET environment_vars = '{"OPENAI_API_KEY": "sk-old", "LEGACY": "l"}'
 WHERE id = pg_temp.id();
SELECT is(public.instance_take_plain_env(pg_temp.id()), '{"LEGACY": "l"}'::jsonb,
          'the old worker is not handed a legacy value whose name has a sealed one');
SELECT is((SELECT environment_vars FROM public.instances WHERE id = pg_temp.id()), '{}'::jsonb,
          'the whole column is emptied');
SELECT is(pg_temp.sealed('OPENAI_API_KEY'), 'mrs1:00000000:NEW', 'the sealed value stands');

SELECT * FROM finish();
ROLLBACK;
