-- 174_teardown_owner.sql (174_teardown_owner.sql): a teardown's lease has an owner.
-- A worker whose call outlived its lease, after another worker took the teardown
-- over, does not record its failure over the other's lease; a success is recorded
-- whoever called; the forms a worker built before 174 calls still work.
BEGIN;
\ir _helpers.inc
SELECT plan(13);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('d1740001-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('d1740002-0000-4000-8000-0000000000a2', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE TEMP TABLE tokens (k text PRIMARY KEY, token text);
GRANT SELECT ON ids TO service_role;
GRANT SELECT, INSERT ON tokens TO service_role;
INSERT INTO ids SELECT 'i' || n, (public.lifecycle_provision(('d174000' || n || '-0000-4000-8000-0000000000a' || n)::uuid)
                                  #>> '{instance,id}')::uuid
  FROM generate_series(1, 2) n;
DELETE FROM public.instances WHERE id IN (SELECT id FROM ids);
CREATE FUNCTION pg_temp.i(k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE ids.k = $1 $$;
CREATE FUNCTION pg_temp.t(k text) RETURNS text LANGUAGE sql AS $$ SELECT token FROM tokens WHERE tokens.k = $1 $$;
-- The lease on teardown k runs out (its call outlived it).
CREATE FUNCTION pg_temp.expire(k text) RETURNS void LANGUAGE sql AS $$
    UPDATE public.instance_teardowns SET claimed_until = now() - interval '1 second'
     WHERE instance_id = pg_temp.i(k) $$;

SET LOCAL role service_role;
INSERT INTO tokens VALUES ('A', public.instance_teardown_begin(pg_temp.i('i1'), 600, 'hostA/1'));
SELECT matches(pg_temp.t('A'), '^[0-9a-f-]{36}/hostA/1$', 'the begin returns its lease''s token');
SELECT is(public.instance_teardown_begin(pg_temp.i('i1'), 600, 'hostB/2'), NULL,
          'under that lease another worker begins nothing');
RESET role;
SELECT pg_temp.expire('i1');
SET LOCAL role service_role;
INSERT INTO tokens VALUES ('B', public.instance_teardown_begin(pg_temp.i('i1'), 600, 'hostB/2'));
SELECT ok(pg_temp.t('B') IS NOT NULL AND pg_temp.t('B') <> pg_temp.t('A'),
          'once it ran out, another worker takes the teardown over under a lease of its own');
SELECT ok(NOT public.instance_teardown_finish(pg_temp.i('i1'), false, 'timed out', 60, 600, pg_temp.t('A')),
          'the first worker''s failure, late, is not recorded');
SELECT results_eq($$SELECT claimed_by = pg_temp.t('B'), claimed_until > now(), attempts, last_error
                      FROM public.instance_teardowns WHERE instance_id = pg_temp.i('i1')$$,
                  $$VALUES (true, true, 0, NULL::text)$$,
                  'the second worker''s lease stands: no backoff, no attempt, no error');
SELECT is_empty($$SELECT * FROM public.instance_teardowns_due(10) WHERE instance_id = pg_temp.i('i1')$$,
                'and the teardown is not due while its call is in flight');
SELECT ok(public.instance_teardown_finish(pg_temp.i('i1'), false, 'refused', 60, 600, pg_temp.t('B')),
          'the second worker''s failure is recorded');
SELECT results_eq($$SELECT claimed_by IS NULL AND claimed_until IS NULL, attempts, last_error,
                           not_before > now()
                      FROM public.instance_teardowns WHERE instance_id = pg_temp.i('i1')$$,
                  $$VALUES (true, 1, 'refused', true)$$, 'its lease given back, with a backoff');

-- A success is recorded whoever called: the apps and the data are gone.
INSERT INTO tokens VALUES ('C', public.instance_teardown_begin(pg_temp.i('i2'), 600, 'hostA/1'));
RESET role;
SELECT pg_temp.expire('i2');
SET LOCAL role service_role;
INSERT INTO tokens VALUES ('D', public.instance_teardown_begin(pg_temp.i('i2'), 600, 'hostB/2'));
SELECT ok(public.instance_teardown_finish(pg_temp.i('i2'), true, NULL, 60, 600, pg_temp.t('C')),
          'the first worker''s late success is recorded');
SELECT ok(NOT public.instance_teardown_finish(pg_temp.i('i2'), false, 'gone', 60, 600, pg_temp.t('D')),
          'the teardown is done: the second worker''s outcome changes nothing');
SELECT results_eq($$SELECT done_at IS NOT NULL, attempts, last_error FROM public.instance_teardowns
                     WHERE instance_id = pg_temp.i('i2')$$,
                  $$VALUES (true, 1, NULL::text)$$, 'done once');

-- A worker built before 174: no owner, no token.
RESET role;
UPDATE public.instance_teardowns SET not_before = now() WHERE instance_id = pg_temp.i('i1');
SET LOCAL role service_role;
SELECT ok(public.instance_teardown_begin(pg_temp.i('i1'), 600)
          AND public.instance_teardown_finish(pg_temp.i('i1'), false, 'old', 0, 0),
          'the forms without owner and token take the lease and record the outcome');
SELECT throws_ok($$SELECT public.instance_teardown_begin(pg_temp.i('i1'), 600, NULL)$$,
                 '22023', NULL, 'a lease needs its owner');
SELECT * FROM finish();
ROLLBACK;
