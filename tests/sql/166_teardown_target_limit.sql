-- 166_teardown_target_limit.sql (166_teardown_lease.sql): a target's
-- teardowns under lease count against its max_in_flight together with its instances'
-- leases (public.target_in_flight): its steps wait ('target_busy') while a teardown
-- is in flight there, and a teardown is not begun while the target is at its limit
-- (it stays due, no attempt counted).
BEGIN;
\ir _helpers.inc
SELECT plan(9);

INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb, max_in_flight)
VALUES (966, 'solo', 'http://10.0.0.66:8002', 'env:SOLO_TOKEN', 'docker-local', 1000000, 1);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('d1670000-0000-4000-8000-00000000000' || n)::uuid, '5eed5eed-0000-4000-8000-000000000001',
       'price_starter', 'starter', 'active' FROM generate_series(1, 3) n;
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
GRANT SELECT ON ids TO service_role;
WITH made AS (
    INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
    SELECT ('d1670000-0000-4000-8000-00000000000' || n)::uuid, 'mindroom-td' || n, 'td' || n
      FROM generate_series(1, 3) n
    RETURNING id, dokku_app_name)
INSERT INTO ids SELECT 'i' || right(dokku_app_name, 1), id FROM made;
SELECT is((SELECT count(*) FROM public.instances WHERE target_id = 966), 3::bigint,
          'three instances on the target');
DELETE FROM public.instances WHERE id IN (SELECT id FROM ids WHERE k IN ('i1', 'i3'));
CREATE FUNCTION pg_temp.wait2() RETURNS text LANGUAGE sql AS
    $$ SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = (SELECT id FROM ids WHERE k = 'i2') $$;

SET LOCAL role service_role;
SELECT is(pg_temp.wait2(), NULL, 'nothing in flight: the create of I2 does not wait');
SELECT ok(public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i1'), 600),
          'the teardown of I1 is begun');
SELECT is(pg_temp.wait2(), 'target_busy', 'while it is in flight, the target''s steps wait');
SELECT ok(NOT public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i3'), 600),
          'and its other teardowns are not begun');
SELECT results_eq($$SELECT attempts, claimed_until IS NULL FROM public.instance_teardowns
                     WHERE instance_id = (SELECT id FROM ids WHERE k = 'i3')$$,
                  $$VALUES (0, true)$$, 'that teardown is left due, no attempt counted');
SELECT ok(public.instance_teardown_finish((SELECT id FROM ids WHERE k = 'i1'), true, NULL, 30, 3600),
          'the teardown of I1 is done');
SELECT is(pg_temp.wait2(), NULL, 'its slot is free again');
RESET role;
-- A step of I2 in flight (its lease).
UPDATE public.instances SET claimed_by = 'w/1', claim_expires_at = now() + interval '1 minute',
       claim_action = 'create'
 WHERE id = (SELECT id FROM ids WHERE k = 'i2');
SET LOCAL role service_role;
SELECT ok(NOT public.instance_teardown_begin((SELECT id FROM ids WHERE k = 'i3'), 600),
          'a teardown is not begun while a step holds the target''s only slot');
SELECT * FROM finish();
ROLLBACK;
