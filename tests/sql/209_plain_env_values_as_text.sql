-- 209_plain_env_values_as_text.sql: the worker reads a legacy plaintext environment
-- as the text each value was deployed as (jsonb_each_text), never a number to print
-- back; the column is emptied when the digest of that text is what it read, and only
-- then.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('20900000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id() RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = 'i' $$;
CREATE FUNCTION pg_temp.sha(p text) RETURNS text LANGUAGE sql AS $$
    SELECT encode(sha256(convert_to(p, 'UTF8')), 'hex') $$;
INSERT INTO ids SELECT 'i', (public.lifecycle_provision('20900000-0000-4000-8000-0000000000a1')
                             #>> '{instance,id}')::uuid;
GRANT SELECT ON ids TO service_role;
UPDATE public.instances SET environment_vars =
    '{"BIG": 123456789012345678, "RATE": 1.10, "ON": true, "CFG": {"a": [1, 2.50]}, "KEY": "sk-x", "NONE": null}'
 WHERE id = pg_temp.id();

SELECT is(public.instance_plain_env(pg_temp.id()),
          '{"BIG": "123456789012345678", "RATE": "1.10", "ON": "true", "CFG": "{\"a\": [1, 2.50]}",
            "KEY": "sk-x", "NONE": null}'::jsonb,
          'every value is read as the text it was deployed as');
SELECT is(pg_temp.cell('service_role', $$SELECT public.instance_plain_env((SELECT id FROM ids WHERE k = 'i'))$$),
          'ok:1', 'service_role reads it');
SELECT is(public.instance_plain_env_sealed(pg_temp.id(),
              pg_temp.sha((SELECT environment_vars FROM public.instances WHERE id = pg_temp.id())::text)),
          false, 'the digest of the column as stored is not what was read: the column stays');
SELECT isnt((SELECT environment_vars FROM public.instances WHERE id = pg_temp.id()), '{}'::jsonb,
            'and holds its values');
SELECT is(public.instance_plain_env_sealed(pg_temp.id(), pg_temp.sha(public.instance_plain_env(pg_temp.id())::text)),
          true, 'the digest of what was read empties it');
SELECT is((SELECT environment_vars FROM public.instances WHERE id = pg_temp.id()), '{}'::jsonb, 'emptied');

-- A column that is not an object reads as {}; once that is acknowledged, it is emptied.
UPDATE public.instances SET environment_vars = '["stray"]' WHERE id = pg_temp.id();
SELECT ok(public.instance_plain_env(pg_temp.id()) = '{}'::jsonb
          AND public.instance_plain_env_sealed(pg_temp.id(), pg_temp.sha('{}')),
          'a column that is not an object reads as none, and acknowledging that');
SELECT is((SELECT environment_vars FROM public.instances WHERE id = pg_temp.id()), '{}'::jsonb,
          'empties it');

SELECT * FROM finish();
ROLLBACK;
