-- 130_waiting_for_room.sql: provisioner targets and the instances that wait for
-- room (130_waiting_for_room.sql).
--   1. A new instance goes where its names' data is really kept: not to the target
--      of a destroyed row whose storage another row took over and destroyed.
--   2. A claim while instances wait for room takes milliseconds: no statement of it is
--      JIT-compiled, and the placements it makes are planned as they are, not under
--      the claim's own settings (sorts and sequential scans priced out).
--   3. The stop or destroy of an instance that waits for room (nothing of it exists
--      anywhere) is done at the next claim, calling no provisioner; a create still
--      waits, and so does the start of one stopped before it was made.
--   4. A waiting instance that fits is placed, however many larger ones that do not
--      waited longer.
BEGIN;
SELECT plan(16);
\ir _helpers.inc

-- 1. -------------------------------------------------------------------------------
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (971, 'old', 'http://10.0.0.7:8002', 'env:OLD_TOKEN', 1000000),
       (972, 'new', 'http://10.0.0.8:8002', 'env:NEW_TOKEN', 1000000);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
VALUES ('a2500003-0000-4000-8000-000000000000', '5eed5eed-0000-4000-8000-000000000001',
        'price_starter', 'starter', 'active');
-- A: destroyed on 'old', its data kept.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              target_id, provisioned_at, deprovisioned_at, storage_destroy_after, created_at)
SELECT 'a2500003-0000-4000-8000-000000000000', n.dokku_app_name, n.subdomain, 'deprovisioned',
       'deprovisioned', 971, now() - interval '60 days', now() - interval '40 days',
       now() - interval '10 days', now() - interval '60 days'
  FROM public.instance_names('a2500003-0000-4000-8000-000000000000') n;
-- B: re-created on 'old' where A's data is (it takes A's storage), then destroyed,
-- its data kept.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              provisioned_at, deprovisioned_at, storage_destroy_after, created_at)
SELECT 'a2500003-0000-4000-8000-000000000000', n.dokku_app_name, n.subdomain, 'deprovisioned',
       'deprovisioned', now() - interval '30 days', now() - interval '2 days',
       now() + interval '28 days', now() - interval '30 days'
  FROM public.instance_names('a2500003-0000-4000-8000-000000000000') n;
-- The operator moves off 'old': drained. B's data is still there: a re-creation goes
-- there, whatever the rule says.
UPDATE public.provisioner_targets SET drained = true WHERE id = 971;
SELECT is((SELECT public.target_of_kept_storage(n.dokku_app_name, gen_random_uuid())
             FROM public.instance_names('a2500003-0000-4000-8000-000000000000') n),
          971::bigint, 'a re-creation goes where the data of its names is kept');
-- B's data destroyed (a purge, or its retention); 'old' disabled.
UPDATE public.instances SET storage_destroyed_at = now() - interval '1 day'
 WHERE subscription_id = 'a2500003-0000-4000-8000-000000000000' AND target_id = 971
   AND storage_taken_by IS NULL;
UPDATE public.provisioner_targets SET enabled = false WHERE id = 971;
DO $$ BEGIN PERFORM public.lifecycle_provision('a2500003-0000-4000-8000-000000000000'); END $$;
SELECT is((SELECT t.name FROM public.instances i JOIN public.provisioner_targets t ON t.id = i.target_id
            WHERE i.subscription_id = 'a2500003-0000-4000-8000-000000000000' AND i.status <> 'deprovisioned'),
          'new', 'no data is kept on the drained, disabled target any more: the new instance goes by the rule');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i
            WHERE subscription_id = 'a2500003-0000-4000-8000-000000000000' AND status <> 'deprovisioned'),
          NULL, 'and its create does not wait for a disabled target');

-- 2. -------------------------------------------------------------------------------
-- The plan a statement gets inside a placement that a claim makes: the claim's
-- settings (its SET clauses), then instance_place's own on top, as nested calls apply
-- them. Its total cost.
CREATE FUNCTION pg_temp.placement_cost(p_sql text) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE c text; f text; v json;
BEGIN
    FOREACH f IN ARRAY ARRAY['public.lifecycle_claim(text, integer)', 'public.instance_place(uuid)'] LOOP
        FOREACH c IN ARRAY coalesce((SELECT proconfig FROM pg_catalog.pg_proc
                                      WHERE oid = f::regprocedure), '{}') LOOP
            IF c NOT LIKE 'search\_path=%' THEN
                PERFORM pg_catalog.set_config(split_part(c, '=', 1), split_part(c, '=', 2), true);
            END IF;
        END LOOP;
    END LOOP;
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || p_sql INTO v;
    RETURN (v -> 0 -> 'Plan' ->> 'Total Cost')::double precision;
END $$;

SELECT ok((SELECT proconfig @> ARRAY['jit=off'] FROM pg_catalog.pg_proc
            WHERE oid = 'public.lifecycle_claim(text, integer)'::regprocedure),
          'no statement of a claim is JIT-compiled');
-- target_of_kept_storage's query: one app name's rows, the latest first.
SELECT cmp_ok(pg_temp.placement_cost($$SELECT x.target_id FROM public.instances x
     WHERE x.dokku_app_name = 'mindroom-x' AND x.id <> gen_random_uuid()
       AND x.target_id IS NOT NULL AND x.storage_destroyed_at IS NULL AND x.storage_taken_by IS NULL
     ORDER BY x.created_at DESC LIMIT 1$$), '<', 1e6::double precision,
          'a placement inside a claim is planned at its real cost (no sort priced out)');

-- 17 instances wait for room; the only target has none.
UPDATE public.provisioner_targets SET enabled = false WHERE id IN (971, 972);
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (981, 'small', 'http://10.0.0.9:8002', 'env:SMALL_TOKEN', 1);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('a26000' || lpad(n::text, 2, '0') || '-0000-4000-8000-000000000000')::uuid,
       '5eed5eed-0000-4000-8000-000000000001',
       CASE WHEN n <= 16 THEN 'price_professional' ELSE 'price_starter' END,
       (CASE WHEN n <= 16 THEN 'professional' ELSE 'starter' END)::public.subscription_tier, 'active'
  FROM generate_series(1, 17) n;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
SELECT s.id, n.dokku_app_name, n.subdomain
  FROM public.subscriptions s, public.instance_names(s.id) n WHERE s.id::text LIKE 'a26000%';
-- The professional ones waited longest.
UPDATE public.instances SET owed_since = now() - interval '1 hour'
 WHERE subscription_id::text LIKE 'a26000%' AND memory_limit_mb = 2048;
UPDATE public.lifecycle_limits SET max_in_flight = 100 WHERE scope = 'global';
CREATE TEMP TABLE claim_clock AS SELECT clock_timestamp() AS t0, NULL::timestamptz AS t1;
DO $$ BEGIN PERFORM public.lifecycle_claim('pgtap/s' || n, 60) FROM generate_series(1, 3) n; END $$;
UPDATE claim_clock SET t1 = clock_timestamp();
SELECT diag('three claims: ' || (SELECT t1 - t0 FROM claim_clock));
-- Milliseconds each; the bound leaves a loaded machine a hundredfold.
SELECT cmp_ok((SELECT t1 - t0 FROM claim_clock), '<', interval '3 seconds',
              'three claims while 17 instances wait for room take milliseconds, not seconds');

-- 3. -------------------------------------------------------------------------------
-- Still no room anywhere. W1 and W2 sign up and wait; W1 is cancelled, W2 paused.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('a27000' || lpad(n::text, 2, '0') || '-0000-4000-8000-000000000000')::uuid,
       '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'
  FROM generate_series(1, 3) n;
CREATE TEMP TABLE w (k text PRIMARY KEY, sub uuid, id uuid);
INSERT INTO w SELECT 'w' || n, s, (public.lifecycle_provision(s) #>> '{instance,id}')::uuid
  FROM generate_series(1, 3) n,
       LATERAL (SELECT ('a27000' || lpad(n::text, 2, '0') || '-0000-4000-8000-000000000000')::uuid) x(s);
CREATE FUNCTION pg_temp.w(p_k text) RETURNS public.instances LANGUAGE sql AS $$
    SELECT i.* FROM public.instances i JOIN w ON w.id = i.id WHERE w.k = p_k $$;
SELECT is((SELECT array_agg(public.lifecycle_target_wait(pg_temp.w(k)) ORDER BY k) FROM w),
          ARRAY['no_capacity', 'no_capacity', 'no_capacity'], 'three sign-ups wait for room');
-- W3 was made before there were targets (inserted then, it did not wait for
-- placement) and its create was tried on DOKKU_PROVISIONER_URL and failed.
UPDATE public.instances SET status = 'failed', attempts = 1, last_error = 'boom',
       placement_waited = false
 WHERE id = (SELECT id FROM w WHERE k = 'w3');
DO $$ BEGIN
    PERFORM public.lifecycle_deprovision(NULL, (SELECT sub FROM w WHERE k = 'w1'), 'destroy');
    PERFORM public.lifecycle_deprovision(NULL, (SELECT sub FROM w WHERE k = 'w2'), 'stop');
    PERFORM public.lifecycle_deprovision(NULL, (SELECT sub FROM w WHERE k = 'w3'), 'destroy');
END $$;
-- The workers claim until nothing is left to claim.
CREATE TEMP TABLE claimed (n serial, v jsonb);
DO $$
DECLARE v jsonb;
BEGIN
    FOR n IN 1..50 LOOP
        v := public.lifecycle_claim('pgtap/w' || n, 60);
        EXIT WHEN v ->> 'outcome' <> 'claimed';
        INSERT INTO claimed (v) VALUES (v);
    END LOOP;
END $$;
SELECT is((SELECT concat_ws(' ', i.status, coalesce(i.owed_action::text, 'nothing'),
                            CASE WHEN i.storage_destroyed_at IS NULL THEN 'data kept' ELSE 'no data' END)
             FROM pg_temp.w('w1') i),
          'deprovisioned nothing no data',
          'the cancelled instance that waited for room is destroyed, and keeps no data');
SELECT is((SELECT concat_ws(' ', i.status, coalesce(i.owed_action::text, 'nothing'))
             FROM pg_temp.w('w2') i),
          'stopped nothing', 'the paused one is stopped');
SELECT is((SELECT count(*) FROM claimed WHERE v #>> '{instance,id}' IN
             (SELECT id::text FROM w WHERE k IN ('w1', 'w2'))), 0::bigint,
          'neither step was handed to a worker: no provisioner is called');
SELECT is((SELECT v #>> '{step,action}' || ' ' || (v -> 'step' -> 'target')::text FROM claimed
            WHERE v #>> '{instance,id}' = (SELECT id::text FROM w WHERE k = 'w3')),
          'destroy null',
          'an unplaced instance whose create was tried goes to DOKKU_PROVISIONER_URL to be destroyed');
SELECT is(public.lifecycle_provision((SELECT sub FROM w WHERE k = 'w1')) ->> 'outcome', 'ok',
          'the cancelled subscription can be provisioned again');
-- W2 is resumed: it owes a start, which makes its apps: it waits for room.
DO $$ BEGIN PERFORM public.lifecycle_provision((SELECT sub FROM w WHERE k = 'w2')); END $$;
SELECT is((SELECT i.owed_action || ' ' || public.lifecycle_target_wait(i) FROM pg_temp.w('w2') i),
          'start no_capacity', 'the resumed one waits for room');
UPDATE public.provisioner_targets SET capacity_mb = 1000000, max_in_flight = 100 WHERE id = 981;
DO $$ BEGIN
    FOR n IN 1..50 LOOP
        EXIT WHEN public.lifecycle_claim('pgtap/room' || n, 60) ->> 'outcome' <> 'claimed';
    END LOOP;
END $$;
SELECT is((SELECT t.name || ' ' || i.claim_action FROM pg_temp.w('w2') i
             JOIN public.provisioner_targets t ON t.id = i.target_id),
          'small start', 'once a target has room it is placed there and started');

-- 4. -------------------------------------------------------------------------------
-- A target with room for a starter (1536 MB), not for a professional (3072 MB);
-- 16 professionals wait, then a starter.
UPDATE public.provisioner_targets SET enabled = false WHERE id = 981;
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (982, 'medium', 'http://10.0.0.10:8002', 'env:MEDIUM_TOKEN', 2000);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('a28000' || lpad(n::text, 2, '0') || '-0000-4000-8000-000000000000')::uuid,
       '5eed5eed-0000-4000-8000-000000000001',
       CASE WHEN n <= 16 THEN 'price_professional' ELSE 'price_starter' END,
       (CASE WHEN n <= 16 THEN 'professional' ELSE 'starter' END)::public.subscription_tier, 'active'
  FROM generate_series(1, 17) n;
UPDATE public.provisioner_targets SET capacity_mb = 1 WHERE id = 982;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
SELECT s.id, n.dokku_app_name, n.subdomain
  FROM public.subscriptions s, public.instance_names(s.id) n WHERE s.id::text LIKE 'a28000%';
UPDATE public.instances SET owed_since = now() - interval '1 hour'
 WHERE subscription_id::text LIKE 'a28000%' AND memory_limit_mb = 2048;
SELECT is((SELECT count(*) FROM public.instances
            WHERE subscription_id::text LIKE 'a28000%' AND target_id IS NULL), 17::bigint,
          '17 instances wait for room');
UPDATE public.provisioner_targets SET capacity_mb = 2000 WHERE id = 982;
DO $$ BEGIN PERFORM public.lifecycle_claim('pgtap/m' || n, 60) FROM generate_series(1, 3) n; END $$;
SELECT is((SELECT t.name FROM public.instances i JOIN public.provisioner_targets t ON t.id = i.target_id
            WHERE i.subscription_id = 'a2800017-0000-4000-8000-000000000000'), 'medium',
          'the one that fits is placed, whatever larger ones wait before it');

SELECT * FROM finish();
ROLLBACK;
