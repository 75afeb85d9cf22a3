-- 100_provisioner_targets.sql: provisioner targets (100_provisioner_targets.sql):
-- placement by the rule, drained and pinned targets, disabled and busy targets'
-- owed work waiting with a reason, teardowns on the instance's own target, and
-- least privilege.
BEGIN;
SELECT plan(31);
\ir _helpers.inc

CREATE TEMP TABLE placed (n integer PRIMARY KEY, expected bigint, got bigint);
GRANT ALL ON placed TO service_role;

-- 1. Least privilege ------------------------------------------------------------------
INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb)
VALUES (901, 'probe', 'http://10.0.0.9:8002', 'env:PROBE_TOKEN', 'k3s', 1000);
SELECT is(pg_temp.cell('anon', 'SELECT * FROM public.provisioner_targets'), 'err:42501',
          'anon cannot read targets');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', 'SELECT * FROM public.provisioner_targets'),
          'err:42501', 'a tenant cannot read targets');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001',
                       $$UPDATE public.provisioner_targets SET enabled = false$$),
          'err:42501', 'a tenant cannot change targets');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', 'SELECT target_id FROM public.instances'),
          'err:42501', 'a tenant does not see where its instance runs');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', 'SELECT * FROM public.lifecycle_waiting()'),
          'err:42501', 'nor what waits for a target');
SELECT is(pg_temp.cell('service_role', 'SELECT * FROM public.provisioner_targets'), 'ok:1',
          'service_role reads targets');
SELECT throws_ok($$INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb)
                   VALUES ('leak', 'http://x:8002', 'sk_live_0123456789abcdef', 1000)$$, '23514', NULL,
                 'a token itself is no token reference: only env:NAME or file:/path');
SELECT throws_ok($$INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb, scheduler)
                   VALUES ('bad', 'http://x:8002', 'env:T_TOKEN', 1000, 'nomad')$$, '23514', NULL,
                 'scheduler is docker-local or k3s');
DELETE FROM public.provisioner_targets WHERE id = 901;

-- 2. Placement: 100 new instances over three targets, a drained fourth ----------------
INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb, max_in_flight, drained)
VALUES (911, 'alpha', 'http://10.0.0.1:8002', 'env:ALPHA_TOKEN', 'docker-local', 100000, 2, false),
       (912, 'beta', 'https://beta.example.com', 'file:/etc/mindroom/beta.token', 'k3s', 80000, 4, false),
       (913, 'gamma', 'http://10.0.0.3:8002', 'env:GAMMA_TOKEN', 'k3s', 80000, 0, false),
       (914, 'old-host', 'http://10.0.0.4:8002', 'env:OLD_TOKEN', 'docker-local', 1000000, 4, true);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('a1000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid,
       '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'
  FROM generate_series(1, 101) n;

-- Each placement checked against the rule computed independently before it: the
-- most free memory after the instance's reservation, ties by id, drained excluded.
DO $$
DECLARE r integer; want bigint; got bigint;
BEGIN
    FOR n IN 1..100 LOOP
        SELECT x.memory_limit_mb + coalesce(x.homeserver_memory_mb, 0) INTO r
          FROM (SELECT p.memory_limit_mb, p.homeserver_memory_mb FROM public.plans p
                 WHERE p.stripe_price_id = 'price_starter') x;
        SELECT t.id INTO want FROM public.provisioner_targets t
         WHERE t.enabled AND NOT t.drained
           AND t.capacity_mb - r * (SELECT count(*) FROM public.instances i WHERE i.target_id = t.id) - r >= 0
         ORDER BY t.capacity_mb - r * (SELECT count(*) FROM public.instances i WHERE i.target_id = t.id) DESC, t.id
         LIMIT 1;
        INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
        VALUES (('a1000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid,
                'mindroom-p' || n, 'mp' || n)
        RETURNING target_id INTO got;
        INSERT INTO placed VALUES (n, want, got);
    END LOOP;
END $$;

SELECT is((SELECT count(*) FROM placed WHERE got IS DISTINCT FROM expected), 0::bigint,
          'every one of 100 placements follows the rule');
SELECT diag('placed over alpha/beta/gamma/old-host (100000/80000/80000/1000000 MB, old-host drained): ' ||
            (SELECT string_agg(t.name || '=' || (SELECT count(*) FROM placed p WHERE p.got = t.id), ' ' ORDER BY t.id)
               FROM public.provisioner_targets t WHERE t.id BETWEEN 911 AND 914));
SELECT is((SELECT count(*) FROM placed WHERE got = 914), 0::bigint,
          'the drained target gets none, though it has the most free memory');
SELECT ok((SELECT bool_and((SELECT count(*) FROM placed p WHERE p.got = t.id) > 0)
             FROM public.provisioner_targets t WHERE t.id BETWEEN 911 AND 913),
          'all three undrained targets get instances');
-- alpha has 20000 MB more than beta and gamma: it takes every placement while its
-- free memory is at least theirs (a tie goes to its lower id), floor(20000 / r) + 1
-- of them, r being the starter plan's reservation.
SELECT is((SELECT min(n) FROM placed WHERE got <> 911),
          (SELECT 20000 / (p.memory_limit_mb + p.homeserver_memory_mb) + 2 FROM public.plans p
            WHERE p.stripe_price_id = 'price_starter'),
          'the freest target first, until it is no freer than the others');
SELECT ok((SELECT min(n) FROM placed WHERE got = 912) < (SELECT min(n) FROM placed WHERE got = 913),
          'beta and gamma equally free: the lower id first');
SELECT cmp_ok((SELECT min(public.target_free_mb(id)) FROM public.provisioner_targets WHERE id BETWEEN 911 AND 913),
              '>=', 0::bigint, 'no target is placed past its capacity');

-- 3. Waiting: a disabled target, a target at its own limit ------------------------------
UPDATE public.provisioner_targets SET enabled = false WHERE name = 'beta';
UPDATE public.lifecycle_limits SET max_in_flight = 100 WHERE scope = 'global';
DO $$
BEGIN
    FOR n IN 1..20 LOOP
        PERFORM public.lifecycle_claim('pgtap/' || n, 60);
    END LOOP;
END $$;
SELECT results_eq($$SELECT t.name, count(i.id) FROM public.instances i JOIN public.provisioner_targets t
                      ON t.id = i.target_id WHERE i.claimed_by IS NOT NULL GROUP BY t.name ORDER BY t.name$$,
                  $$VALUES ('alpha', 2::bigint)$$,
                  'claims stop at each target''s max_in_flight (alpha 2, gamma 0) and skip the disabled target');
SELECT is((SELECT count(*) FROM public.lifecycle_waiting() WHERE target = 'beta' AND reason = 'target_disabled'),
          (SELECT count(*) FROM public.instances WHERE target_id = 912),
          'the disabled target''s owed work waits, saying why');
SELECT is((SELECT count(*) FROM public.lifecycle_waiting() WHERE target = 'gamma' AND reason = 'target_busy'),
          (SELECT count(*) FROM public.instances WHERE target_id = 913), 'a target at its limit: target_busy');
SELECT is((SELECT count(*) FROM public.lifecycle_waiting() WHERE target = 'alpha' AND reason = 'target_busy'),
          (SELECT count(*) - 2 FROM public.instances WHERE target_id = 911),
          'alpha''s others wait for a slot');
SELECT cmp_ok((public.lifecycle_claim('pgtap/x', 60)->>'next_due_in_ms')::bigint, '>', 30000::bigint,
          'waiting work is not due for the worker (no busy loop): next is a lease''s end');
SELECT is(public.lifecycle_target_of((SELECT id FROM public.instances WHERE target_id = 912 LIMIT 1)),
          '{"url": "https://beta.example.com", "target": "beta", "enabled": false, "scheduler": "k3s", "token_ref": "file:/etc/mindroom/beta.token", "answering": true}'::jsonb,
          'lifecycle_target_of: the URL and the token''s reference, never a token');

-- 4. No room anywhere; pinned ------------------------------------------------------------
UPDATE public.provisioner_targets SET capacity_mb = 1 WHERE id BETWEEN 911 AND 913;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
VALUES ('a1000000-0000-4000-8000-000000000101', 'mindroom-p101', 'mp101');
SELECT is((SELECT reason FROM public.lifecycle_waiting() w JOIN public.instances i ON i.id = w.instance_id
            WHERE i.dokku_app_name = 'mindroom-p101'), 'no_capacity',
          'no target with room: the new instance waits, no_capacity');
UPDATE public.provisioner_targets SET capacity_mb = 1000000, pinned = true WHERE name = 'gamma';
UPDATE public.provisioner_targets SET capacity_mb = 2000000 WHERE name = 'alpha';
SELECT is(public.instance_place((SELECT id FROM public.instances WHERE dokku_app_name = 'mindroom-p101')),
          913::bigint, 'once there is room it is placed; a pinned target wins over a freer unpinned one');
SELECT is(public.instance_place((SELECT id FROM public.instances WHERE dokku_app_name = 'mindroom-p101')),
          NULL, 'an instance is placed once');

-- Re-created under the names of a destroyed instance whose data is kept on beta: it
-- goes to beta, though the rule (gamma pinned) would say gamma.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
VALUES ('a1000000-0000-4000-8000-000000000102', '5eed5eed-0000-4000-8000-000000000001',
        'price_starter', 'starter', 'active');
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              target_id, deprovisioned_at)
VALUES ('a1000000-0000-4000-8000-000000000102', 'mindroom-p102', 'mp102', 'deprovisioned',
        'deprovisioned', 912, now());
SELECT is((SELECT target_id FROM public.instances WHERE dokku_app_name = 'mindroom-p102'
             AND status = 'deprovisioned'), 912::bigint, 'the destroyed one''s data is on beta');
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
VALUES ('a1000000-0000-4000-8000-000000000102', 'mindroom-p102', 'mp102');
SELECT is((SELECT target_id FROM public.instances WHERE dokku_app_name = 'mindroom-p102'
             AND status <> 'deprovisioned'), 912::bigint,
          'an instance re-created under the same names goes where its kept data is');
UPDATE public.instances SET storage_destroyed_at = now()
 WHERE dokku_app_name = 'mindroom-p102' AND status = 'deprovisioned';
SELECT is(public.target_of_kept_storage('mindroom-p102',
              (SELECT id FROM public.instances WHERE dokku_app_name = 'mindroom-p102'
                 AND status <> 'deprovisioned')),
          NULL, 'once that data is destroyed, nothing holds it there');

-- 5. Teardowns go to the instance's own target -------------------------------------------
-- One of the 100 placed instances on each (not the destroyed 'mindroom-p102' above,
-- whose deletion owes no teardown: ids are random, so the choice must exclude it).
CREATE TEMP TABLE gone AS
WITH ours AS (SELECT i.id, i.target_id FROM public.instances i JOIN placed p
                ON i.dokku_app_name = 'mindroom-p' || p.n WHERE i.claimed_by IS NULL)
SELECT (SELECT id FROM ours WHERE target_id = 911 ORDER BY id LIMIT 1) AS on_alpha,
       (SELECT id FROM ours WHERE target_id = 912 ORDER BY id LIMIT 1) AS on_beta;
GRANT ALL ON gone TO service_role;
DELETE FROM public.instances WHERE id IN (SELECT on_alpha FROM gone UNION ALL SELECT on_beta FROM gone);
SELECT results_eq($$SELECT t.instance_id, t.target_id FROM public.instance_teardowns t
                     WHERE t.instance_id IN (SELECT on_alpha FROM gone UNION ALL SELECT on_beta FROM gone)
                     ORDER BY t.target_id$$,
                  $$SELECT on_alpha, 911::bigint FROM gone UNION ALL SELECT on_beta, 912::bigint FROM gone$$,
                  'a deleted instance''s teardown keeps its target');
SELECT is((SELECT target FROM public.instance_teardowns_due(100) WHERE instance_id = (SELECT on_alpha FROM gone)),
          '{"url": "http://10.0.0.1:8002", "target": "alpha", "enabled": true, "scheduler": "docker-local", "token_ref": "env:ALPHA_TOKEN", "answering": true}'::jsonb,
          'the teardown job is told where: the target''s URL and token reference');
SELECT is((SELECT count(*) FROM public.instance_teardowns_due(100) WHERE instance_id = (SELECT on_beta FROM gone)),
          0::bigint, 'a disabled target''s teardown is not due: it waits');
UPDATE public.provisioner_targets SET enabled = true WHERE name = 'beta';
SELECT is((SELECT target->>'target' FROM public.instance_teardowns_due(100)
            WHERE instance_id = (SELECT on_beta FROM gone)), 'beta', 'and is due once its target is enabled');
SELECT is((SELECT attempts FROM public.instance_teardowns WHERE instance_id = (SELECT on_beta FROM gone)),
          0, 'waiting counted no attempt');

SELECT * FROM finish();
ROLLBACK;
