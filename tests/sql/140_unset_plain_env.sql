-- 140_unset_plain_env.sql: unsetting an environment variable (instance_secret_delete)
-- also removes it from the legacy plaintext column, whose move would seal it again.
BEGIN;
\ir _helpers.inc
SELECT plan(9);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('14000000-0000-4000-8000-0000000000b1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id() RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = 'i' $$;
CREATE FUNCTION pg_temp.cv() RETURNS bigint LANGUAGE sql AS $$
    SELECT config_version FROM public.instances WHERE id = pg_temp.id()
$$;
INSERT INTO ids SELECT 'i', (public.lifecycle_provision('14000000-0000-4000-8000-0000000000b1')
                             #>> '{instance,id}')::uuid;
GRANT SELECT ON ids TO service_role;
-- An instance from before the secrets were sealed: its legacy column holds X and
-- LEGACY; X was also set since with mindroomctl env set.
UPDATE public.instances SET environment_vars = '{"X": "old", "LEGACY": "l", "ONLY_PLAIN": "p"}'
 WHERE id = pg_temp.id();
SELECT public.instance_secret_put(pg_temp.id(), 'env', 'X', 'mrs1:00000000:NEW',
                                  'mrd1:00000000:new', true);
CREATE TEMP TABLE v AS SELECT pg_temp.cv() AS cv;

-- 1. mindroomctl env unset X: gone from both, one update owed.
SELECT is(public.instance_secret_delete(pg_temp.id(), 'env', 'X'), true, 'X is removed');
SELECT is(public.instance_plain_env(pg_temp.id()), '{"LEGACY": "l", "ONLY_PLAIN": "p"}'::jsonb,
          'and is no longer in the legacy column; the other names stay');
SELECT is(pg_temp.cv(), (SELECT cv FROM v) + 1, 'one update owed');
-- The next step's move of the legacy column cannot bring X back.
SELECT is((SELECT count(*) FROM public.instance_secrets WHERE instance_id = pg_temp.id()
             AND kind = 'env' AND name = 'X'), 0::bigint, 'no sealed X');

-- 2. A name only in the legacy column (unset before the column was moved).
SELECT is(public.instance_secret_delete(pg_temp.id(), 'env', 'ONLY_PLAIN'), true,
          'a name only in the legacy column is removed too');
SELECT is(public.instance_plain_env(pg_temp.id()), '{"LEGACY": "l"}'::jsonb, 'gone from the column');
SELECT is(pg_temp.cv(), (SELECT cv FROM v) + 2, 'one more update owed, not two');

-- 3. A name nowhere: nothing changes.
SELECT is(public.instance_secret_delete(pg_temp.id(), 'env', 'NOWHERE'), false, 'was not set');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', $$SELECT public.instance_secret_delete(
              (SELECT id FROM ids WHERE k = 'i'), 'env', 'LEGACY')$$),
          'err:42501', 'nobody but the service role may call it');

SELECT * FROM finish();
ROLLBACK;
