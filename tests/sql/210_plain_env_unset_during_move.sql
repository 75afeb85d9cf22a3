-- 210_plain_env_unset_during_move.sql: the worker stores a legacy plaintext value only
-- while the column still reads as what it read: a name unset in between is not stored
-- again (the answer is NULL, and the column is not emptied on the old read); with the
-- column unchanged the value is stored, and a sealed value still wins.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('21000000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid, was text);
GRANT SELECT ON ids TO service_role;
CREATE FUNCTION pg_temp.id() RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = 'i' $$;
CREATE FUNCTION pg_temp.was() RETURNS text LANGUAGE sql AS $$ SELECT was FROM ids WHERE k = 'i' $$;
CREATE FUNCTION pg_temp.sealed(p_name text) RETURNS text LANGUAGE sql AS $$
    SELECT ciphertext FROM public.instance_secrets
     WHERE instance_id = pg_temp.id() AND kind = 'env' AND name = p_name
$$;
INSERT INTO ids SELECT 'i', (public.lifecycle_provision('21000000-0000-4000-8000-0000000000a1')
                             #>> '{instance,id}')::uuid;
UPDATE public.instances SET environment_vars = '{"LEAKED": "sk-leaked", "KEPT": "k", "ROTATED": "old"}'
 WHERE id = pg_temp.id();
-- An operator's value, set after the upgrade (mindroomctl env set).
SELECT public.instance_secret_put(pg_temp.id(), 'env', 'ROTATED', 'mrs1:00000000:NEW',
                                  'mrd1:00000000:new', true);

-- The worker reads the column, as it sends the digest of what it read.
UPDATE ids SET was = encode(sha256(convert_to(public.instance_plain_env(id)::text, 'UTF8')), 'hex');
SELECT is(pg_temp.run('service_role', $$SELECT public.instance_plain_env_put(
              (SELECT id FROM ids WHERE k = 'i'), 'KEPT', 'mrs1:00000000:KPT', 'mrd1:00000000:kpt',
              (SELECT was FROM ids WHERE k = 'i'))$$), 'ok:1', 'service_role may store a legacy value');
SELECT is(pg_temp.sealed('KEPT'), 'mrs1:00000000:KPT', 'the column unchanged: the value is stored');
SELECT is(public.instance_plain_env_put(pg_temp.id(), 'ROTATED', 'mrs1:00000000:OLD', 'mrd1:00000000:old',
                                        pg_temp.was()),
          'mrs1:00000000:NEW', 'a name with a sealed value: the sealed one is the answer, as before');

-- Before LEAKED is stored, the operator unsets it (mindroomctl env unset).
SELECT ok(public.instance_secret_delete(pg_temp.id(), 'env', 'LEAKED'), 'env unset LEAKED: removed');
SELECT is(public.instance_plain_env_put(pg_temp.id(), 'LEAKED', 'mrs1:00000000:LKD', 'mrd1:00000000:lkd',
                                        pg_temp.was()),
          NULL, 'the store of the value read before answers that none is in force');
SELECT is(pg_temp.sealed('LEAKED'), NULL, 'and stores nothing: the unset stands');
SELECT is(public.instance_plain_env_sealed(pg_temp.id(), pg_temp.was()), false,
          'the column is not emptied on the old read');
SELECT is((SELECT environment_vars FROM public.instances WHERE id = pg_temp.id()),
          '{"KEPT": "k", "ROTATED": "old"}'::jsonb, 'the next step reads it without the name');

SELECT * FROM finish();
ROLLBACK;
