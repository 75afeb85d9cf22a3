-- 166_teardown_lease.sql (166_teardown_lease.sql): the worker takes a teardown's lease
-- before its call (instance_teardown_begin). A teardown under lease is not due and
-- cannot be begun again, so a worker that takes the teardown job over from a run
-- presumed dead never calls a teardown still in flight; its outcome gives the lease
-- back; a lease that runs out makes it due again.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('d1660000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
GRANT SELECT ON ids TO service_role;
INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('d1660000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
DELETE FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'i1');

SET LOCAL role service_role;
SELECT ok(public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i1'), 600),
          'a due teardown is begun: its call may be made');
SELECT is_empty($$SELECT * FROM public.instance_teardowns_due(10)$$,
                'under its lease it is not due');
SELECT ok(NOT public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i1'), 600),
          'nor begun again (a run that took the job over does not call it a second time)');
SELECT ok(public.instance_teardown_finish((SELECT id FROM ids WHERE k = 'i1'), false, 'timed out', 0, 0),
          'its failure is recorded');
SELECT results_eq($$SELECT claimed_until IS NULL, attempts FROM public.instance_teardowns
                     WHERE instance_id = (SELECT id FROM ids WHERE k = 'i1')$$,
                  $$VALUES (true, 1)$$, 'the outcome gives the lease back');
SELECT ok(public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i1'), 600),
          'after its backoff it is begun again');
RESET role;
-- The worker died in the call: its lease runs out.
UPDATE public.instance_teardowns SET claimed_until = now() - interval '1 second'
 WHERE instance_id = (SELECT id FROM ids WHERE k = 'i1');
SET LOCAL role service_role;
SELECT is((SELECT count(*) FROM public.instance_teardowns_due(10)), 1::bigint,
          'a lease that ran out makes it due again');
SELECT throws_ok($$SELECT public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i1'), 0)$$,
                 '22023', NULL, 'a lease must be positive');
SELECT * FROM finish();
ROLLBACK;
